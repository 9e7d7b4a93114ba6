"""`ikctl` command line: llama.cpp-style flags over the engine's Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from engine.errors import IkctlError


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and context")
    g.add_argument("-m", "--model", help="GGUF model file (default: the embedded deepseek2 model, generated once)")
    g.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size in tokens (0 = the model's)")
    g.add_argument("-ctk", "--cache-type-k", default="f16", choices=["f16", "f32", "q8_0"], help="KV cache type")
    g.add_argument("-mla", "--mla-use", dest="mla", type=int, default=3, choices=[0, 1, 2, 3],
                   help="MLA mode: 0 naive K/V cache, 1/2 absorbed, 3 naive prefill + absorbed decode")
    g.add_argument("-amb", "--attn-max-batch", dest="amb", type=int, default=256,
                   help="MiB cap on the attention score scratch (long contexts run in chunks)")
    g.add_argument("-t", "--threads", type=int, default=None, help="compute threads (default: all cores)")
    g.add_argument("-ub", "--ubatch-size", type=int, default=512, help="tokens per forward pass in prefill")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (-1 = until EOS)")
    g.add_argument("--temp", type=float, default=0.8, help="temperature (0 = greedy)")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("-s", "--seed", type=int, default=-1, help="RNG seed (-1 = random)")


def _add_placement_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("placement (llama.cpp's flags, same meaning)")
    g.add_argument("--rpc", metavar="SERVERS",
                   help="comma-separated host:port of rpcnode workers (in -ts order, before local GPUs)")
    g.add_argument("-ot", "--override-tensor", dest="override_tensor", action="append", default=[],
                   metavar="REGEX=DEV", help="tensors whose name REGEX matches go to DEV (CPU, RPC[host:port], "
                   "CUDA0...); repeatable, the first matching rule wins")
    g.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers", dest="n_gpu_layers", type=int, default=0, metavar="N",
                   help="offload the last N repeating layers (and the output layer when N > layers) to the "
                   "RPC/GPU devices (default: 0, all on CPU)")
    g.add_argument("-ts", "--tensor-split", metavar="SPLIT",
                   help="proportions of the offloaded layers per RPC/GPU device, e.g. 3,1 (default: by capacity)")
    g.add_argument("--device-mem", action="append", default=[], metavar="DEV=SIZE",
                   help="plan against this capacity, e.g. RPC[10.0.0.2:50052]=48GiB (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ikctl", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="generate text from a prompt (like llama-cli)")
    _add_model_flags(run)
    _add_sampling_flags(run)
    run.add_argument("-p", "--prompt", default="Once upon a time", help="the prompt")
    run.add_argument("-sys", "--system-prompt", default=None, help="system message (chat mode)")
    run.add_argument("-no-cnv", "--no-conversation", dest="chat", action="store_false",
                     help="use the prompt as raw text instead of wrapping it in the model's chat template")
    _add_placement_flags(run)
    bench = sub.add_parser("bench", help="sweep benchmark: PP and TG speed as the context fills (llama-sweep-bench)")
    _add_model_flags(bench)
    bench.set_defaults(ctx_size=2048)
    bench.add_argument("-n", "--n-gen", type=int, default=None, help="tokens generated per step (default: ub/4)")
    bench.add_argument("--json", metavar="FILE", help="write settings and rows (sweep-bench JSONL keys) to FILE")
    bench.add_argument("-s", "--seed", type=int, default=0, help="seed of the random token ids")
    bench.add_argument("--generic", action="store_true",
                       help="use the generic dequantize-then-BLAS path instead of the fused kernels (a baseline)")
    _add_placement_flags(bench)
    rpcnode = sub.add_parser("rpcnode", help="start a worker owning this machine's CPU (for --rpc on a coordinator)")
    from rpcnode.__main__ import add_arguments as add_rpcnode_arguments

    add_rpcnode_arguments(rpcnode)
    plan = sub.add_parser("plan", help="show where every tensor would go and the bytes per device, loading nothing")
    plan.add_argument("-m", "--model", help="GGUF model file (default: the embedded deepseek2 model, generated once)")
    plan.add_argument("-c", "--ctx-size", type=int, default=4096,
                      help="context size whose KV cache counts on each layer's device (0 = the model's)")
    plan.add_argument("-ctk", "--cache-type-k", default="f16", choices=["f16", "f32", "q8_0"], help="KV cache type")
    plan.add_argument("-mla", "--mla-use", dest="mla", type=int, default=3, choices=[0, 1, 2, 3],
                      help="MLA mode (0 caches per-head K/V, the others the latent)")
    _add_placement_flags(plan)
    plan.add_argument("-v", "--verbose", action="store_true", help="also print every tensor's device and rule")
    hosts = sub.add_parser("hosts", help="probe SSH hosts: reachable or why not, OS, cores, RAM, GPUs, ikctl version")
    from tui.hosts import add_arguments as add_hosts_arguments
    from tui.hosts import run as run_hosts

    add_hosts_arguments(hosts)
    hosts.set_defaults(run_hosts=run_hosts)
    return parser


def model_options(args: argparse.Namespace) -> dict[str, object]:
    return {
        "ctx_size": args.ctx_size,
        "cache_type_k": args.cache_type_k,
        "mla": args.mla,
        "amb": args.amb,
        "threads": args.threads,
        "ubatch_size": args.ubatch_size,
        **placement_options(args),
    }


def placement_options(args: argparse.Namespace) -> dict[str, object]:
    """--rpc/-ot/-ngl/-ts as load_model keywords (absent on subcommands without placement flags)."""
    if getattr(args, "rpc", None) is None and not getattr(args, "override_tensor", None) \
            and not getattr(args, "n_gpu_layers", 0) and getattr(args, "tensor_split", None) is None:
        return {}
    return {"rpc": args.rpc or (), "override_tensor": args.override_tensor, "n_gpu_layers": args.n_gpu_layers,
            "tensor_split": args.tensor_split, "device_mem": getattr(args, "device_mem", [])}


def resolve_model_path(path: str | None) -> str:
    if path:
        return path
    from engine.synth import default_model_path

    print("ikctl: no -m given, using the embedded deepseek2 model", file=sys.stderr)
    return str(default_model_path())


def cmd_run(args: argparse.Namespace) -> int:
    from engine import load_model

    model = load_model(resolve_model_path(args.model), **model_options(args))
    prompt = args.prompt
    if args.chat and model.has_chat_template:
        messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        prompt = model.apply_chat_template([*messages, {"role": "user", "content": prompt}])
    gen = model.generate(prompt, n_predict=args.n_predict, temp=args.temp, top_k=args.top_k,
                         top_p=args.top_p, min_p=args.min_p, seed=args.seed)
    out = sys.stdout
    if not args.chat:
        out.write(args.prompt)
    for t in gen:
        out.write(t.text)
        out.flush()
    out.write("\n")
    out.flush()
    print(gen.stats.summary(), file=sys.stderr)
    return 0


def _progress(done: int, total: int) -> None:
    width = 30
    fill = width * done // total
    end = "\n" if done == total else ""
    print(f"\rikctl bench [{'#' * fill}{'.' * (width - fill)}] {done}/{total} steps", end=end, file=sys.stderr,
          flush=True)


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from engine import load_model
    from engine.bench import HEADER, RULE, bench_settings, rows_as_dicts, sweep, sweep_steps

    if args.generic:
        from engine.quant import use_kernels

        use_kernels(False)
    model = load_model(resolve_model_path(args.model), **model_options(args))
    n_ctx = model.n_ctx
    n_gen = args.n_gen if args.n_gen is not None else max(1, args.ubatch_size // 4)
    sweep_steps(n_ctx, args.ubatch_size, n_gen)  # reject impossible settings before printing anything
    settings = bench_settings(model, n_ctx, args.ubatch_size, n_gen, kernels=not args.generic)
    print(f"model: {settings['model_name']} ({settings['arch']}, {', '.join(settings['quant'])}), "
          f"n_ctx {n_ctx}, ub {args.ubatch_size}, tg {n_gen}, threads {settings['threads']}, "
          f"-ctk {settings['cache_type_k']}" + (f", -mla {settings['mla']}" if settings["mla"] is not None else ""))
    print()
    print(HEADER)
    print(RULE, flush=True)
    rows = []
    for row in sweep(model, n_ctx, args.ubatch_size, n_gen, seed=args.seed, on_step=_progress):
        rows.append(row)
        print(row.table_line(), flush=True)
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump({**settings, "rows": rows_as_dicts(rows)}, f, indent=1)
                f.write("\n")
        except OSError as e:
            raise IkctlError(f"cannot write --json {args.json}: {e.strerror}") from None
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from engine.config import model_config
    from engine.distributed import kv_bytes_per_layer
    from engine.gguf_file import GGUFFile
    from engine.model import Options
    from engine.placement import PlacementRules, devices_for, format_bytes, format_table, parse_device_mem, plan

    # flags first, so that a typo is reported before the embedded model is generated
    rules = PlacementRules.from_flags(args.override_tensor, args.n_gpu_layers, args.tensor_split, args.rpc)
    devices = devices_for(rules.rpc, dict(parse_device_mem(t) for t in args.device_mem))
    f = GGUFFile(resolve_model_path(args.model))  # the header only: tensor data stays unread in the map
    n_layers = int(f.get(f"{f.architecture}.block_count"))
    opts = Options(ctx_size=args.ctx_size, cache_type_k=args.cache_type_k, mla=args.mla).validated()
    placement = plan(f.tensors.values(), n_layers, devices, rules,
                     kv_bytes_per_layer=kv_bytes_per_layer(model_config(f), opts))
    total = sum(t.n_bytes for t in f.tensors.values())
    print(f"model: {f.path.name} ({f.architecture}, {n_layers} layers, {len(f.tensors)} tensors, "
          f"{format_bytes(total)})")
    print()
    print(format_table(placement))
    for w in placement.warnings:
        print(f"ikctl: warning: {w}", file=sys.stderr)
    if args.verbose:
        print()
        for name in placement.device_of:
            print(f"{format_bytes(placement.bytes_of[name]):>10}  {placement.explain(name)}")
    return 0


def cmd_rpcnode(args: argparse.Namespace) -> int:
    from rpcnode.__main__ import run

    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if (not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help"))) and sys.stdout.isatty():
        from tui.app import main as app_main  # bare `ikctl [-m MODEL] [placement flags]` opens the terminal app

        return app_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return {"run": cmd_run, "bench": cmd_bench, "plan": cmd_plan, "rpcnode": cmd_rpcnode,
                "hosts": lambda a: a.run_hosts(a)}[args.command](args)
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
