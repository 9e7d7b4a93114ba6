"""Recovery time after a worker's SIGKILL mid-generation, with the worker left's tensor cache warm and cold.

    python benchmarks/failover_bench.py [-t 1] [--dtype Q8_0] [--prompt 128] [-n 16] [--rounds 2] [--dir DIR]
        [--json OUT]

The benchmark model (engine.synth BENCH_SPEC, DeepSeek-V2-Lite-shaped) on two loopback workers, placed two ways:
its layers split over them (`-ngl 99 -ts 1,1`) and its experts split over them (`-ot exps=A,B`). Each round
prefills a --prompt-token prompt, decodes -n tokens, SIGKILLs the second worker and decodes once more: the
failover re-plans onto the first worker, loads what it lacks, rebuilds the sequence's KV cache from its tokens and
runs the step. Measured: that step's time (the recovery, as `ikctl run` reports it) and the bytes sent to the
worker left. "Warm": the worker left already holds the lost worker's tensors in its disk cache (it held the whole
model in an earlier run), so nothing is sent; "cold": its cache held only its own share, so the lost share is
uploaded over loopback. Each worker is a separate process with -t threads, as is the coordinator.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from rpc_bench import start_worker, stop  # noqa: E402  (after the path above)

from engine import load_model  # noqa: E402
from engine.distributed import DistributedNet, Failover  # noqa: E402
from engine.synth import bench_model  # noqa: E402
from engine.user_cache import cache_dir  # noqa: E402


def placement(kind: str, a: str, b: str) -> dict[str, Any]:
    if kind == "layer split":
        return {"rpc": f"{a},{b}", "n_gpu_layers": 99, "tensor_split": "1,1"}
    return {"rpc": f"{a},{b}", "override_tensor": [f"exps=RPC[{a}],RPC[{b}]"]}


def one_round(path: Path, kind: str, warm: bool, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """A fresh pair of workers (the first with a cache warmed with the whole model, or empty), a generation, a
    SIGKILL of the second, and the step that recovers."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cache_a = work / "cache-a"
    if warm:  # the whole model through worker A once: its disk cache then holds every tensor
        proc, ep = start_worker(cache_a, args.threads, work / "warm.log")
        try:
            m = load_model(path, rpc=ep, n_gpu_layers=99, ctx_size=args.ctx, threads=args.threads)
            assert isinstance(m.net, DistributedNet)
            m.net.close()
        finally:
            stop(proc)
    pa, a = start_worker(cache_a, args.threads, work / "a.log")
    pb, b = start_worker(work / "cache-b", args.threads, work / "b.log")
    try:
        model = load_model(path, ctx_size=args.ctx, threads=args.threads, **placement(kind, a, b))
        assert isinstance(model.net, DistributedNet)
        events: list[Failover] = []
        model.on_failover(events.append)
        cache = model.new_cache()
        logits = model.eval([(7 * k) % 1000 + 3 for k in range(args.prompt)], cache)
        for _ in range(args.n):
            logits = model.eval([int(logits.argmax())], cache)
        sent = model.net.load_stats.bytes_uploaded
        pb.kill()
        pb.wait()
        t0 = time.perf_counter()
        model.eval([int(logits.argmax())], cache)
        step = time.perf_counter() - t0
        assert len(events) == 1, events
        t1 = time.perf_counter()
        model.eval([5], cache)
        after = time.perf_counter() - t1
        uploaded = model.net.load_stats.bytes_uploaded - sent
        model.net.close()
    finally:
        stop(pa)
        if pb.poll() is None:
            stop(pb)
    return {"placement": kind, "cache": "warm" if warm else "cold", "recovery_s": events[0].seconds,
            "step_s": step, "next_step_s": after, "tokens_replayed": events[0].tokens_replayed,
            "bytes_uploaded": uploaded}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-t", "--threads", type=int, default=1)
    p.add_argument("--dtype", default="Q8_0")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens before the loss")
    p.add_argument("-n", type=int, default=16, help="tokens decoded before the loss")
    p.add_argument("-c", "--ctx", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: <ikctl cache dir>/failover-bench)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    work = args.dir or cache_dir() / "failover-bench"
    path = bench_model(cache_dir() / "bench", args.dtype)
    rows: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for kind in ("layer split", "expert parallel"):
            for warm in ((True, False) if r % 2 == 0 else (False, True)):
                row = one_round(path, kind, warm, args, work / "round")
                rows.append({"round": r, **row})
                print(json.dumps(row), file=sys.stderr, flush=True)
    shutil.rmtree(work / "round", ignore_errors=True)
    print(f"model {path.name} ({path.stat().st_size / 2**20:.0f} MiB), prompt {args.prompt} + {args.n} decoded, "
          f"-t {args.threads} each, {platform.processor() or platform.machine()} x{os.cpu_count()}, median of "
          f"{args.rounds} rounds")
    print("| placement | worker left's cache | recovery (s) | sent to it | next step (s) |")
    print("|---|---|---|---|---|")
    for kind in ("layer split", "expert parallel"):
        for cache in ("warm", "cold"):
            sel = [x for x in rows if x["placement"] == kind and x["cache"] == cache]
            rec = statistics.median(x["recovery_s"] for x in sel)
            mib = statistics.median(x["bytes_uploaded"] for x in sel) / 2**20
            nxt = statistics.median(x["next_step_s"] for x in sel)
            print(f"| {kind} | {cache} | {rec:.2f} | {mib:.0f} MiB | {nxt:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": path.name, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
