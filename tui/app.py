"""The `ikctl` terminal app: `make_app(...)` for the CLI and tests, and `python -m tui.app [-m MODEL]`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen

from engine.errors import IkctlError
from engine.gguf_file import GGUFFile
from engine.model import Options
from engine.placement import PlacementRules
from engine.placement_rules import device_kind
from engine.placement_spec import placement_spec, read_token
from engine.user_cache import cache_dir
from rpcnode.protocol import rpc_device
from tui.flags import add_model_flags, add_placement_flags, model_options, placement_options
from tui.host_board import HostBoard
from tui.inventory import Host, load_hosts
from tui.local_workers import LocalWorkers
from tui.messages import SwitchTo, WorkerNotice, WorkersChanged, WorkFailed
from tui.modes import MODES
from tui.plan_flags import PlanFlags
from tui.screens.bench import BenchScreen
from tui.screens.confirm import Confirm
from tui.screens.generate import GenerateScreen
from tui.screens.hosts import HostsScreen
from tui.screens.live import LiveScreen
from tui.screens.placement import PlacementScreen
from tui.screens.serve import ServeScreen
from tui.server.watch import DEFAULT_URL
from tui.shared_model import SharedModel
from tui.telemetry import TelemetryMonitor

# (title, help, screen class or None for the app, action) — one command palette entry per action
COMMANDS = (
    *((f"Show {m.name}", f"{m.help} ({m.key.upper()})", None, f"switch_mode('{m.name}')") for m in MODES),
    ("Placement: apply plan", "Load the model with these flags; a load bar per worker", PlacementScreen,
     "apply_plan"),
    ("Placement: reset flags", "Back to the flags the app started with", PlacementScreen, "reset_flags"),
    ("Placement: show command", "The `ikctl plan` command line for these flags", PlacementScreen, "show_command"),
    ("Generate: stop", "Stop the running generation", GenerateScreen, "stop"),
    ("Generate: clear", "Forget the conversation", GenerateScreen, "clear"),
    ("Bench: run", "Run the sweep with these settings", BenchScreen, "run_bench"),
    ("Bench: stop", "Stop the running sweep", BenchScreen, "stop"),
    ("Bench: save JSON", "Write settings and rows like `ikctl bench --json`", BenchScreen, "save_json"),
    ("Live: pause or resume", "Freeze the panels to read them (polling goes on)", LiveScreen, "pause"),
    ("Hosts: probe again", "Probe every host: reachable, CPU, RAM, GPUs", HostsScreen, "probe"),
    ("Hosts: launch workers", "Start workers on the selected host", HostsScreen, "launch"),
    ("Hosts: stop workers", "Stop the selected host's workers", HostsScreen, "stop_host"),
)


class IkctlApp(App[None]):
    """Its modes (tui.modes), each a screen that keeps its state while hidden. The app owns what they share: the
    loaded model, the telemetry monitor and the local workers it started."""

    CSS_PATH = "app.tcss"
    TITLE = "ikctl"
    # the mode tabs already say F1-F5, so the footer keeps its width for the screen's own keys (80 columns)
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding(m.key, f"switch_mode('{m.name}')", m.title, show=False) for m in MODES
    ]

    def __init__(self, model_path: str | None = None, flags: PlanFlags | None = None,
                 model_options: Mapping[str, Any] | None = None, start_mode: str = "placement",
                 tokens: Mapping[str, str] | None = None, local: LocalWorkers | None = None,
                 board: HostBoard | None = None, monitor: TelemetryMonitor | None = None,
                 serve_url: str = DEFAULT_URL) -> None:
        super().__init__()
        flags = flags or PlanFlags()
        self.model_path = model_path
        self.start_mode = start_mode
        self.local = local
        self.tokens = dict(tokens or {})
        self.shared = SharedModel(model_path, model_options, flags, self.tokens)
        # from the model thread (post_message is thread-safe)
        self.shared.on_failover = lambda event: self.post_message(WorkerNotice(event.line(), lost=True))
        self.shared.on_rejoin = lambda line: self.post_message(WorkerNotice(line, lost=False))
        self.monitor = monitor or TelemetryMonitor()
        self.watched = list(dict.fromkeys(flags.rules().rpc if flags.rpc.strip() else ()))
        self.placement = PlacementScreen(model_path, flags, self.shared, self.monitor)
        self.board = board or HostBoard((), local)
        screens: dict[str, Callable[[], Screen[Any]]] = {
            "placement": lambda: self.placement,
            "generate": lambda: GenerateScreen(self.shared),
            "bench": lambda: BenchScreen(self.shared),
            "live": lambda: LiveScreen(self.monitor, shared=self.shared),
            "hosts": lambda: HostsScreen(self.board, self.monitor),
            "serve": lambda: ServeScreen(serve_url),
        }
        for m in MODES:
            self.add_mode(m.name, screens[m.name])

    def on_mount(self) -> None:
        try:
            default_token = read_token()
        except Exception as e:  # an unreadable $IKCTL_RPC_TOKEN_FILE: the workers show as down, with why
            default_token = None
            self.notify(str(e), title="error", severity="error", timeout=10)
        self.default_token = default_token
        self.monitor.watch(self.watched, self.tokens, default_token)
        self.switch_mode(self.start_mode)
        # a closed terminal (SIGHUP) or a plain `kill` ends the app as ctrl+q does: its local workers are stopped
        # and their directory removed on the way out (a SIGKILL's leftovers go when the next app starts)
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGHUP, signal.SIGTERM):
                loop.add_signal_handler(signum, self.exit)

    def on_unmount(self) -> None:
        self.monitor.close()
        if self.local is not None:
            self.local.close()

    async def action_quit(self) -> None:
        """ctrl+q: with workers launched over SSH still running (they outlive the app), ask whether to stop them."""
        launched = self.board.launched_workers()
        if not launched or isinstance(self.screen, Confirm):
            self.exit()
            return
        n = len(launched)
        hosts = ", ".join(dict.fromkeys(w.host for w in launched))
        where = f"\n`ikctl stop --cluster {self.board.cluster_file}` stops them later." if self.board.cluster_file \
            else ""
        text = f"{n} worker{'s' * (n != 1)} launched over SSH still run{'s' * (n == 1)} on {hosts}; they keep " \
               f"running after the app ends.{where}"
        self.push_screen(Confirm(text, [("s", "Stop them and quit"), ("l", "Leave them running"),
                                        ("c", "Cancel")]), self.quit_answered)

    def quit_answered(self, answer: str | None) -> None:
        if answer == "s":
            self.notify("stopping the launched workers…", timeout=30)
            self.stop_launched_and_exit()
        elif answer == "l":
            n = len(self.board.launched_workers())
            where = f": ikctl stop --cluster {self.board.cluster_file}" if self.board.cluster_file else ""
            self.exit(message=f"ikctl: {n} worker{'s' * (n != 1)} launched over SSH still running{where}")

    @work(name="stop-launched", exclusive=True, group="quit")
    async def stop_launched_and_exit(self) -> None:
        results = await self.board.stop_launched()
        failed = [f"{e.endpoint}: {status}" for e, status in results
                  if not status.startswith(("stopped", "killed", "not running"))]
        left = f"; {len(failed)} may still run ({'; '.join(failed)})" if failed else ""
        self.exit(message=f"ikctl: stopped {len(results) - len(failed)} of {len(results)} launched workers{left}")

    @on(SwitchTo)
    def switch_to(self, event: SwitchTo) -> None:
        self.switch_mode(event.mode)

    @on(WorkFailed)
    def work_failed(self, event: WorkFailed) -> None:
        self.notify(event.message, title="error", severity="error", timeout=10)

    @on(WorkerNotice)
    def worker_notice(self, event: WorkerNotice) -> None:
        self.notify(event.line, title="worker lost" if event.lost else "worker back",
                    severity="warning" if event.lost else "information", timeout=15)

    @on(WorkersChanged)
    def workers_changed(self, event: WorkersChanged) -> None:
        """Workers were launched or stopped on Hosts: watch the new ones, offer them to the plan, forget the gone."""
        self.tokens.update(event.tokens)
        self.shared.add_tokens(event.tokens)
        self.monitor.watch(event.added, self.tokens, self.default_token)
        self.monitor.unwatch(event.removed)
        self.placement.add_workers(event.added, event.capacities)
        self.placement.remove_workers(event.removed)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for title, help_text, owner, action in COMMANDS:
            if owner is None:
                yield SystemCommand(title, help_text, lambda a=action: self.run_action(a))
            elif isinstance(screen, owner):
                yield SystemCommand(title, help_text, lambda a=action, s=screen: self.run_action(a, s))


def make_app(model_path: str | None = None, rules: PlacementRules | None = None,
             capacities: Mapping[str, int] | None = None, model_options: Mapping[str, Any] | None = None,
             start_mode: str = "placement", tokens: Mapping[str, str] | None = None,
             local: LocalWorkers | None = None, board: HostBoard | None = None,
             monitor: TelemetryMonitor | None = None, serve_url: str = DEFAULT_URL) -> IkctlApp:
    """The app for a model (None: the embedded default), starting from these placement rules and capacities.

    model_options are load_model keywords (threads, ctx_size); tokens are per worker endpoint; `local` are workers
    the app owns (stopped when it exits); `board` holds the hosts and launched workers for the Hosts screen;
    `monitor` polls the workers' telemetry (a test may give one that does not)."""
    # libgomp's default spin-wait made decode 3 t/s instead of ~180 on a busy 2-core machine (the UI thread and
    # other processes compete with the spinning kernel threads); a short spin kept decode and prefill near their
    # idle-machine speed, while fully passive waiting slowed prefill 5-20x. Effective only before any parallel
    # kernel has run in this process; an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    return IkctlApp(model_path, PlanFlags.from_rules(rules, capacities), model_options, start_mode, tokens, local,
                    board, monitor, serve_url)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ikctl", description="The ikctl terminal app. With nothing given: the embedded "
                                "model and two local workers on loopback, its layers split across them.")
    add_model_flags(p)
    add_placement_flags(p)
    p.add_argument("--hosts", metavar="FILE", help="hosts file: probe the hosts, launch workers on Hosts (F5); "
                   "not with --cluster")
    p.add_argument("--local", type=int, default=None, metavar="N",
                   help="start N workers on this machine, owned by the app (default: 2 when nothing else is given)")
    p.add_argument("--serve", metavar="URL", default=DEFAULT_URL,
                   help=f"the `ikctl serve --metrics` the Serve screen (F6) watches (default: {DEFAULT_URL}; its key "
                   "from $IKCTL_API_KEY)")
    return p


def _nothing_given(args: argparse.Namespace) -> bool:
    return not (args.model or args.cluster or args.hosts or args.rpc or args.override_tensor or args.n_gpu_layers
                or args.tensor_split or args.device_mem)


def app_from_args(args: argparse.Namespace) -> IkctlApp:
    """The app for parsed arguments; starts the local workers it is to own. IkctlError on bad input."""
    if args.model:  # a missing or broken file is one line here, before any worker starts
        GGUFFile(args.model)
    if args.cluster and args.hosts:
        raise IkctlError("--cluster and --hosts both name the workers; give one (Hosts (F5) launches workers of a "
                         "hosts file, a cluster file lists running ones)")
    # flags first, so that a typo is reported before any worker starts
    spec = placement_spec(Options(**placement_options(args)))  # type: ignore[arg-type]
    hosts: tuple[Host, ...] = ()
    cluster_file = Path(args.cluster).expanduser() if args.cluster else None
    if args.hosts:
        hosts = load_hosts(args.hosts)
        # workers launched here are listed in a file of the app's own, so that `ikctl stop --cluster` (or the next
        # `ikctl --hosts`) finds them; `ikctl launch`'s default cluster file is left alone
        cluster_file = cache_dir() / "tui-cluster.json"
    rules = spec.rules
    n_local = args.local if args.local is not None else (2 if _nothing_given(args) else 0)
    local = None
    if n_local > 0:
        local = LocalWorkers()
        print(f"ikctl: starting {n_local} local worker{'s' * (n_local != 1)} on loopback…", file=sys.stderr)
        started = local.start(n_local)
        rpc = [*rules.rpc, *(w.endpoint for w in started)]
        ngl, ts = rules.n_gpu_layers, rules.tensor_split
        if _nothing_given(args):  # the demo: every layer on the workers, split evenly, so Live shows them busy
            ngl, ts = 99, [1.0 for _ in started]
        rules = replace(rules, rpc=rpc, n_gpu_layers=ngl, tensor_split=ts)
    in_plan = {rpc_device(ep) for ep in rules.rpc}
    capacities = {d: c for d, c in spec.given_capacities.items() if d in in_plan or device_kind(d) != "rpc"}
    defaults = Options()
    options = {k: v for k, v in model_options(args).items() if v != getattr(defaults, k)}  # what the user set
    board = HostBoard(hosts, local, cluster_file=cluster_file)
    return make_app(args.model, rules, capacities, options, tokens=spec.tokens, local=local, board=board,
                    serve_url=args.serve)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        app = app_from_args(args)
    except IkctlError as e:
        print(f"ikctl: error: {e}", file=sys.stderr)
        return 1
    try:
        app.run()
    finally:
        if app.local is not None:
            app.local.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
