"""`ikctl` command line: llama.cpp-style flags over the engine's Python API."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from engine import load_model
from engine.architectures import model_config
from engine.bench import HEADER as SWEEP_HEADER
from engine.bench import RULE as SWEEP_RULE
from engine.bench import bench_settings, sweep, sweep_steps, worker_traffic
from engine.byte_sizes import format_bytes
from engine.cluster import Cluster, default_cluster_path, read_cluster, write_cluster
from engine.cuda.local import local_gpus
from engine.distributed import ask_capacities, auto_choice, kv_bytes_per_layer, program_bytes_per_layer
from engine.errors import IkctlError
from engine.gguf_file import GGUFFile
from engine.model import Options
from engine.placement import devices_for, format_table, plan
from engine.placement_spec import placement_spec
from engine.quant import use_kernels
from engine.synth import default_model_path
from engine.threads import blas_note
from rpcnode.__main__ import add_arguments as add_rpcnode_arguments
from rpcnode.__main__ import run as run_rpcnode
from rpcnode.protocol import rpc_device
from tui.bench_results import save_json
from tui.flags import add_model_flags, add_placement_flags, add_sampling_flags, load_options
from tui.formatting import auto_chosen_line, auto_measured, auto_table
from tui.hosts import add_arguments as add_hosts_arguments
from tui.hosts import run as run_hosts
from tui.inventory import load_hosts, with_identity
from tui.launch import HEADER as LAUNCH_HEADER
from tui.launch import LaunchOptions, launch_all, log_tails
from tui.launch import format_table as format_rows
from tui.launch import table_rows as launch_rows
from tui.server.main import ServeOptions, run_server
from tui.server.main import add_arguments as add_serve_arguments
from tui.ssh import SSHOptions, SSHTransport
from tui.stop import HEADER as STOP_HEADER
from tui.stop import stop_workers
from tui.stop import table_rows as stop_rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ikctl", description=__doc__, epilog="Bare `ikctl` (no command, or only flags such as -m MODEL --rpc …) "
        "in a terminal opens the terminal app: placement map, generation, bench, live workers, hosts. "
        "`ikctl app -h` lists its flags.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="generate text from a prompt (like llama-cli)")
    add_model_flags(run)
    add_sampling_flags(run)
    run.add_argument("-p", "--prompt", default="Once upon a time", help="the prompt")
    run.add_argument("-sys", "--system-prompt", default=None, help="system message (chat mode)")
    run.add_argument("-no-cnv", "--no-conversation", dest="chat", action="store_false",
                     help="use the prompt as raw text instead of wrapping it in the model's chat template")
    add_placement_flags(run)
    run.set_defaults(handler=cmd_run)
    bench = sub.add_parser("bench", help="sweep benchmark: PP and TG speed as the context fills (llama-sweep-bench)")
    add_model_flags(bench)
    bench.set_defaults(ctx_size=2048)
    bench.add_argument("-n", "--n-gen", type=int, default=None, help="tokens generated per step (default: ub/4)")
    bench.add_argument("--json", metavar="FILE", help="write settings and rows (sweep-bench JSONL keys) to FILE")
    bench.add_argument("-s", "--seed", type=int, default=0, help="seed of the random token ids")
    bench.add_argument("--generic", action="store_true",
                       help="use the generic dequantize-then-BLAS path instead of the fused kernels (a baseline)")
    add_placement_flags(bench)
    bench.set_defaults(handler=cmd_bench)
    _add_serve_command(sub)
    rpcnode = sub.add_parser("rpcnode", help="start a worker owning this machine's CPU or one GPU (for --rpc on a "
                             "coordinator)")
    add_rpcnode_arguments(rpcnode)
    rpcnode.set_defaults(handler=run_rpcnode)
    plan = sub.add_parser("plan", help="show where every tensor would go and the bytes per device, loading nothing")
    add_model_flags(plan)  # -c, -ctk and -mla size the KV cache counted on each layer's device
    add_placement_flags(plan, polling=False)
    plan.add_argument("-v", "--verbose", action="store_true", help="also print every tensor's device and rule")
    plan.set_defaults(handler=cmd_plan)
    hosts = sub.add_parser("hosts", help="probe SSH hosts: reachable or why not, OS, cores, RAM, GPUs, ikctl version")
    add_hosts_arguments(hosts)
    hosts.set_defaults(handler=run_hosts)
    launch = sub.add_parser("launch", help="start rpcnode workers on SSH hosts and write a cluster file")
    _add_launch_flags(launch)
    launch.set_defaults(handler=cmd_launch)
    sub.add_parser("app", help="open the terminal app (what bare `ikctl` does in a terminal); `ikctl app -h`")
    stop = sub.add_parser("stop", help="stop the workers of a cluster file")
    stop.add_argument("--cluster", metavar="FILE", required=True, help="the cluster file `ikctl launch` wrote")
    _add_ssh_flags(stop, known_hosts_default="the one each worker was launched with, as the cluster file says")
    stop.set_defaults(handler=cmd_stop)
    return parser


def _add_ssh_flags(p: argparse.ArgumentParser, known_hosts_default: str = "~/.ssh/known_hosts") -> None:
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds per host for connecting (and probing) (default: 10)")
    p.add_argument("--known-hosts", metavar="FILE", help=f"known_hosts file (default: {known_hosts_default})")


LAUNCH_EPILOG = """\
By default a host gets one worker per GPU and one CPU worker with the remaining cores; the hosts file's
devices, threads, port_range, cache_dir and mem override that. Each worker gets its own random token,
handed over the SSH channel (never a command line), listens on the address the host was reached at,
and logs to <remote-dir>/workers/ on its host.
Exit status: 0 when at least one worker runs (the others are listed with the reason), 1 when none does."""


def _add_launch_flags(p: argparse.ArgumentParser) -> None:
    p.description = "Start rpcnode workers on the hosts of a hosts file, concurrently, and write a cluster file."
    p.epilog = LAUNCH_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--hosts", metavar="FILE", required=True, help="hosts file (TOML; see examples/hosts.toml)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="cluster file to write (default: ~/.cache/ikctl/cluster.json, or under $IKCTL_CACHE)")
    p.add_argument("--install", action="store_true",
                   help="on hosts without ikctl: build this ikctl's wheel, copy it over and install it into a venv "
                   "(the host's `venv`, else <remote-dir>/venv)")
    p.add_argument("--remote-dir", default="~/.cache/ikctl", metavar="DIR",
                   help="directory on each host for worker logs and token files (workers/) and for --install's "
                   "wheels/ and venv/ (default: ~/.cache/ikctl)")
    _add_ssh_flags(p)
    p.add_argument("--identity", metavar="KEY", help="private key for hosts that name none (default: agent, ~/.ssh)")
    p.add_argument("--accept-new-host-keys", action="store_true",
                   help="trust and record the key of a host missing from known_hosts (a changed key is still refused)")


def resolve_model_path(path: str | None) -> str:
    if path:
        return path
    print("ikctl: no -m given, using the embedded deepseek2 model", file=sys.stderr)
    return str(default_model_path())


def _note_blas() -> None:
    """Say, before a benchmark, when NumPy's BLAS would leave half of this CPU's prompt-processing speed unused."""
    note = blas_note()
    if note:
        print(note, file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    model = load_model(resolve_model_path(args.model), **load_options(args))
    if model.auto is not None:
        print(f"ikctl: {auto_chosen_line(model.auto)}", file=sys.stderr)
    model.on_failover(lambda event: print(f"\nikctl: {event.line()}", file=sys.stderr, flush=True))
    prompt = args.prompt
    if args.system_prompt is not None and not args.chat:
        raise IkctlError("-sys has no effect with -no-cnv (the prompt goes to the model as raw text); put the "
                         "system text into -p, or drop -no-cnv")
    if args.system_prompt is not None and not model.has_chat_template:
        raise IkctlError(f"-sys needs a chat template and {model.path.name} has none "
                         "(tokenizer.chat_template); put the system text into -p")
    if args.chat and model.has_chat_template:
        messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        prompt = model.apply_chat_template([*messages, {"role": "user", "content": prompt}])
    gen = model.generate(prompt, n_predict=args.n_predict, temp=args.temp, top_k=args.top_k,
                         top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop_at_eos=not args.ignore_eos)
    out = sys.stdout
    if not args.chat:
        out.write(args.prompt)
    for t in gen:
        out.write(t.text)
        out.flush()
    out.write("\n")
    out.flush()
    print(gen.stats.summary(), file=sys.stderr)
    if gen.stats.stop_reason == "context":
        print(f"ikctl: generation stopped: the context of {model.n_ctx} tokens is full; raise -c for more",
              file=sys.stderr)
    return 0


def _progress(done: int, total: int) -> None:
    """A bar redrawn in place on a terminal; a plain line per step anywhere else (a log has no carriage return)."""
    if not sys.stderr.isatty():
        print(f"ikctl bench: {done}/{total} steps", file=sys.stderr, flush=True)
        return
    width = 30
    fill = width * done // total
    end = "\n" if done == total else ""
    print(f"\rikctl bench [{'#' * fill}{'.' * (width - fill)}] {done}/{total} steps", end=end, file=sys.stderr,
          flush=True)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.generic:
        use_kernels(False)
    model = load_model(resolve_model_path(args.model), **load_options(args))
    if model.auto is not None:
        print(f"ikctl: {auto_chosen_line(model.auto)}", file=sys.stderr)
    _note_blas()
    n_ctx = model.n_ctx
    n_gen = args.n_gen if args.n_gen is not None else max(1, args.ubatch_size // 4)
    sweep_steps(n_ctx, args.ubatch_size, n_gen)  # reject impossible settings before printing anything
    settings = bench_settings(model, n_ctx, args.ubatch_size, n_gen, kernels=not args.generic)
    print(f"model: {settings['model_name']} ({settings['arch']}, {', '.join(settings['quant'])}), "
          f"n_ctx {n_ctx}, ub {args.ubatch_size}, tg {n_gen}, threads {settings['threads']}, "
          f"-ctk {settings['cache_type_k']}" + (f", -mla {settings['mla']}" if settings["mla"] is not None else ""))
    slow = settings["decoder_path"]
    if slow:  # say so: these products decode to float32 first, so their speed is not the fused kernels'
        print(f"ikctl bench: {len(slow)} tensors take the decoder path (no fused kernel): "
              f"{', '.join(sorted(set(slow.values())))}", file=sys.stderr)
    print()
    print(SWEEP_HEADER)
    print(SWEEP_RULE, flush=True)
    rows = []
    before = worker_traffic(model)
    for row in sweep(model, n_ctx, args.ubatch_size, n_gen, seed=args.seed, on_step=_progress):
        rows.append(row)
        print(row.table_line(), flush=True)
    traffic = worker_traffic(model, before)
    if traffic:
        print()
        for t in traffic:
            print(t.line())
    if args.json:
        save_json(args.json, settings, rows, traffic)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    # flags first, so that a typo is reported before the embedded model is generated
    opts = Options(**load_options(args)).validated()  # type: ignore[arg-type]
    spec = placement_spec(opts)
    rules = spec.rules
    # as a load does: what the workers report, overridden by what is given (the cluster file's, --device-mem); a
    # worker that cannot be asked is said so, and planned with what is given
    f = GGUFFile(resolve_model_path(args.model))  # the header only: tensor data stays unread in the map
    n_layers = int(f.get(f"{f.architecture}.block_count"))
    cfg = model_config(f)
    choice, unasked = None, {}
    if opts.auto:  # the workers are measured as a load measures them
        choice = auto_choice(f, opts)
        assert choice.chosen.placement is not None
        placement = choice.chosen.placement
    else:
        reported, unasked = ask_capacities([ep for ep in rules.rpc if rpc_device(ep) not in spec.given_capacities],
                                           spec)
        devices = devices_for(rules.rpc, spec.capacities(reported), local_gpus(rules))
        placement = plan(f.tensors.values(), n_layers, devices, rules,
                         kv_bytes_per_layer=kv_bytes_per_layer(cfg, opts),
                         program_bytes_per_layer=program_bytes_per_layer(cfg, opts, f.tensors.values()),
                         n_experts=f.expert_count)
    total = sum(t.n_bytes for t in f.tensors.values())
    print(f"model: {f.path.name} ({f.architecture}, {n_layers} layers, {len(f.tensors)} tensors, "
          f"{format_bytes(total)})")
    print()
    if choice is not None:
        if args.verbose:
            if choice.measured is not None:
                print("\n".join(auto_measured(choice.measured)))
                print()
            print("\n".join(auto_table(choice)))
            print()
        print(auto_chosen_line(choice))
        print()
    print(format_table(placement))
    for device, why in unasked.items():  # said once the flags proved sound (a bad flag is the one error line)
        print(f"ikctl: warning: {device} was not asked its memory ({why}); planned without a capacity for it "
              "(--device-mem gives one)", file=sys.stderr)
    for w in placement.warnings:
        print(f"ikctl: warning: {w}", file=sys.stderr)
    if args.verbose:
        print()
        for name in placement.device_of:
            print(f"{format_bytes(placement.bytes_of[name]):>10}  {placement.explain(name)}")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise IkctlError(f"--timeout must be more than 0 seconds, got {args.timeout:g}")
    out = Path(args.output).expanduser() if args.output else default_cluster_path()
    if out.exists():  # it may list running workers: overwriting it would leave them without a way to stop them
        raise IkctlError(f"{out} exists: stop its workers first (ikctl stop --cluster {out}) or give another -o")
    hosts = [with_identity(h, args.identity) for h in load_hosts(args.hosts)]
    transport = SSHTransport(SSHOptions(connect_timeout=args.timeout, known_hosts=args.known_hosts,
                                        accept_new_host_keys=args.accept_new_host_keys))
    options = LaunchOptions(install=args.install, remote_dir=args.remote_dir, timeout=args.timeout)
    results = asyncio.run(launch_all(transport, hosts, options))
    print(format_rows(LAUNCH_HEADER, launch_rows(results)), flush=True)
    for line in log_tails(results):
        print(line, file=sys.stderr)
    running = results.running
    if not running:
        print(f"\nikctl: no worker started; {out} not written", file=sys.stderr)
        return 1
    write_cluster(out, results.cluster())
    n_hosts = sum(bool(h.running) for h in results.hosts)
    print(f"\n{len(running)} worker{'s' * (len(running) != 1)} on {n_hosts} of {len(hosts)} hosts; wrote {out}\n"
          f"use them: ikctl run --cluster {out} -ngl 99 ...   stop them: ikctl stop --cluster {out}", file=sys.stderr)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise IkctlError(f"--timeout must be more than 0 seconds, got {args.timeout:g}")
    path = Path(args.cluster).expanduser()
    cluster = read_cluster(path)
    transport = SSHTransport(SSHOptions(connect_timeout=args.timeout, known_hosts=args.known_hosts))
    results = asyncio.run(stop_workers(transport, cluster.workers, timeout=args.timeout + 10))
    print(format_rows(STOP_HEADER, stop_rows(results)), flush=True)
    left = tuple(r.worker for r in results if not r.done)
    if not left:
        path.unlink(missing_ok=True)
        print(f"\nall {len(results)} workers stopped; removed {path}", file=sys.stderr)
        return 0
    # keep exactly the workers that may still run, so that running stop again retries only those
    write_cluster(path, Cluster(left))
    print(f"\nikctl: {len(left)} of {len(results)} workers may still run; {path} now lists only those (run "
          "`ikctl stop` again)", file=sys.stderr)
    return 1


# ---- ikctl serve (issue 15): run's model and placement flags plus the server's; the server lives in tui/server/
def _add_serve_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="serve the model over HTTP: OpenAI's and llama-server's API, "
                           "continuous batching (like llama-server)")
    add_model_flags(serve)
    add_placement_flags(serve)
    add_serve_arguments(serve)
    serve.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    path = resolve_model_path(args.model)
    return run_server(ServeOptions.from_args(args), path, lambda: load_model(path, **load_options(args)))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if (not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help"))) and sys.stdout.isatty():
        # bare `ikctl [-m MODEL] [placement flags]` opens the terminal app; textual: loaded only when the app starts,
        # so that run/bench/plan never load it
        from tui.app import main as app_main

        return app_main(argv)
    if argv[:1] == ["app"]:  # the app by name, also for its -h
        from tui.app import main as app_main  # textual: loaded only when the app starts

        return app_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except IkctlError as e:
        print(f"ikctl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ikctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141


if __name__ == "__main__":
    sys.exit(main())
