"""The `ikctl` terminal app: `make_app(...)` for the CLI and tests, and `python -m tui.app [-m MODEL]`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from textual import on
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen

from engine.placement import PlacementRules
from tui.messages import SwitchTo, WorkFailed
from tui.plan_flags import PlanFlags
from tui.screens.bench import BenchScreen
from tui.screens.generate import GenerateScreen
from tui.screens.placement import PlacementScreen

# (title, help, screen class or None for the app, action) — one command palette entry per action
COMMANDS = (
    ("Show placement", "The tensor map, memory bars and placement flags (F1)", None, "switch_mode('placement')"),
    ("Show generate", "Prompt and streaming transcript (F2)", None, "switch_mode('generate')"),
    ("Show bench", "Sweep benchmark table and plot (F3)", None, "switch_mode('bench')"),
    ("Placement: reset flags", "Back to the flags the app started with", PlacementScreen, "reset_flags"),
    ("Placement: show command", "The `ikctl plan` command line for these flags", PlacementScreen, "show_command"),
    ("Generate: stop", "Stop the running generation", GenerateScreen, "stop"),
    ("Generate: clear", "Forget the conversation", GenerateScreen, "clear"),
    ("Bench: run", "Run the sweep with these settings", BenchScreen, "run_bench"),
    ("Bench: stop", "Stop the running sweep", BenchScreen, "stop"),
    ("Bench: save JSON", "Write settings and rows like `ikctl bench --json`", BenchScreen, "save_json"),
)


class IkctlApp(App[None]):
    """Three modes (placement, generate, bench), each a screen that keeps its state while hidden."""

    CSS_PATH = "app.tcss"
    TITLE = "ikctl"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f1", "switch_mode('placement')", "Placement"),
        Binding("f2", "switch_mode('generate')", "Generate"),
        Binding("f3", "switch_mode('bench')", "Bench"),
    ]

    def __init__(self, model_path: str | None = None, flags: PlanFlags | None = None,
                 model_options: Mapping[str, Any] | None = None, start_mode: str = "placement") -> None:
        super().__init__()
        self.model_path = model_path
        self.start_mode = start_mode
        options = dict(model_options or {})
        self.add_mode("placement", lambda: PlacementScreen(model_path, flags or PlanFlags()))
        self.add_mode("generate", lambda: GenerateScreen(model_path, options))
        self.add_mode("bench", lambda: BenchScreen(model_path, options))

    def on_mount(self) -> None:
        self.switch_mode(self.start_mode)

    @on(SwitchTo)
    def switch_to(self, event: SwitchTo) -> None:
        self.switch_mode(event.mode)

    @on(WorkFailed)
    def work_failed(self, event: WorkFailed) -> None:
        self.notify(event.message, title="error", severity="error", timeout=10)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for title, help_text, owner, action in COMMANDS:
            if owner is None:
                yield SystemCommand(title, help_text, lambda a=action: self.run_action(a))
            elif isinstance(screen, owner):
                yield SystemCommand(title, help_text, lambda a=action, s=screen: self.run_action(a, s))


def make_app(model_path: str | None = None, rules: PlacementRules | None = None,
             capacities: Mapping[str, int] | None = None, model_options: Mapping[str, Any] | None = None,
             start_mode: str = "placement") -> IkctlApp:
    """The app for a model (None: the embedded default), starting from these placement rules and capacities.

    model_options are load_model keywords for Generate and Bench (e.g. threads); those screens run the model
    locally until applying a plan to workers lands."""
    # libgomp's default spin-wait made decode 3 t/s instead of ~180 on a busy 2-core machine (the UI thread and
    # other processes compete with the spinning kernel threads); a short spin kept decode and prefill near their
    # idle-machine speed, while fully passive waiting slowed prefill 5-20x. Effective only before any parallel
    # kernel has run in this process; an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    return IkctlApp(model_path, PlanFlags.from_rules(rules, capacities), model_options, start_mode)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tui.app", description="The ikctl terminal app.")
    p.add_argument("-m", "--model", help="GGUF model file (default: the embedded deepseek2 model)")
    p.add_argument("--rpc", metavar="SERVERS", help="comma-separated host:port of rpcnode workers")
    p.add_argument("-ot", "--override-tensor", dest="override_tensor", action="append", default=[],
                   metavar="REGEX=DEV", help="tensor override rule (repeatable)")
    p.add_argument("-ngl", "--n-gpu-layers", dest="n_gpu_layers", type=int, default=0, metavar="N")
    p.add_argument("-ts", "--tensor-split", metavar="SPLIT")
    p.add_argument("--device-mem", action="append", default=[], metavar="DEV=SIZE")
    p.add_argument("-t", "--threads", type=int, default=None, help="compute threads for generate and bench")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from engine.errors import IkctlError
    from engine.placement import parse_device_mem

    args = _parser().parse_args(argv)
    try:
        rules = PlacementRules.from_flags(args.override_tensor, args.n_gpu_layers, args.tensor_split, args.rpc)
        capacities = dict(parse_device_mem(t) for t in args.device_mem)
    except IkctlError as e:
        print(f"ikctl: error: {e}", file=sys.stderr)
        return 1
    options = {"threads": args.threads} if args.threads else {}
    make_app(args.model, rules, capacities, options).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
