"""Inference through rpcnode workers on loopback vs local: TG speed, round trips and wire bytes per token, load times.

    python benchmarks/rpc_bench.py [-t 2] [--dtype Q8_0] [-n 32] [--rounds 3] [--dir DIR] [--json OUT]

Uses the benchmark model (engine.synth BENCH_SPEC, a scaled-down DeepSeek-V2-Lite) written once into --dir. In one
run, interleaved per round: TG (tokens/s over -n decodes after a 16-token prompt) locally, through one worker that
holds every layer (`-ngl 99`), and with the experts on the worker (`-ot exps=RPC[...]`), where it also counts the
round trips and the bytes on the wire per generated token. Then load times: local, through a worker with a cold
cache (every tensor uploaded), with a warm disk cache (a new worker process on the same cache dir), and with the
tensors still held by a running worker. The worker is a separate process on this machine with the same threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PROMPT = list(range(1, 17))


def start_worker(cache: Path, threads: int, log: Path, wrap: Sequence[str] = (),
                 extra: Sequence[str] = ()) -> tuple[subprocess.Popen[bytes], str]:
    """A worker on a free port (loopback unless `extra` names a --host); its endpoint once it logs it.
    `wrap` prefixes the command (e.g. `ip netns exec NS`), `extra` adds rpcnode flags."""
    import re

    with open(log, "wb") as out:
        proc = subprocess.Popen([*wrap, sys.executable, "-m", "rpcnode", "--port", "0", "-c", str(cache), "-t",
                                 str(threads), *extra], stdout=out, stderr=subprocess.STDOUT, cwd=HERE.parent)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = re.search(r"listening on ([0-9.]+):(\d+)", log.read_text(errors="replace"))
        if m:
            return proc, f"{m[1]}:{m[2]}"
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"the worker did not start: {log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def tg(model: Any, n: int) -> float:
    """Tokens per second of n single-token decodes after the prompt."""
    cache = model.new_cache(len(PROMPT) + n + 1)
    model.eval(PROMPT, cache)
    model.eval([3], cache)  # the first decode pays one-off costs (compiled kernels, first pages)
    t0 = time.perf_counter()
    for k in range(n):
        model.eval([(7 * k + 5) % 200], cache)
    return n / (time.perf_counter() - t0)


def wire_per_token(model: Any, n: int) -> dict[str, float]:
    """Round trips and bytes on the wire per generated token, from the clients' counters."""
    clients = list(model.net.clients.values())
    cache = model.new_cache(len(PROMPT) + n + 1)
    model.eval(PROMPT, cache)
    def totals() -> tuple[int, int, float]:
        cs = [c.counters for c in clients]
        return (sum(c.runs for c in cs), sum(c.bytes_sent + c.bytes_received for c in cs),
                sum(c.run_seconds - c.worker_seconds for c in cs))

    runs0, wire0, beyond0 = totals()
    for k in range(n):
        model.eval([(7 * k + 5) % 200], cache)
    runs1, wire1, beyond1 = totals()
    runs = runs1 - runs0
    # a round trip's time beyond the worker's compute: the network both ways and both sides' overheads
    return {"round_trips_per_token": runs / n, "wire_bytes_per_token": (wire1 - wire0) / n,
            "ms_per_round_trip_beyond_compute": 1e3 * (beyond1 - beyond0) / max(runs, 1),
            "remote_segments": len(model.net.remote)}


def timed_load(path: Path, **kw: Any) -> tuple[Any, float]:
    from engine import load_model

    t0 = time.perf_counter()
    model = load_model(path, **kw)
    return model, time.perf_counter() - t0


def bench_tg(path: Path, endpoint: str, args: argparse.Namespace) -> dict[str, Any]:
    from engine import load_model

    local = load_model(path, threads=args.threads)
    remote = load_model(path, threads=args.threads, rpc=endpoint, n_gpu_layers=99)
    experts = load_model(path, threads=args.threads, rpc=endpoint, override_tensor=[f"exps=RPC[{endpoint}]"])
    best: dict[str, float] = {"local": 0.0, "all_layers_remote": 0.0, "experts_remote": 0.0}
    for r in range(args.rounds):
        for name, m in (("local", local), ("all_layers_remote", remote), ("experts_remote", experts)):
            best[name] = max(best[name], tg(m, args.n))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f} t/s" for k, v in best.items()), file=sys.stderr)
    return {"tg_tps": best, "ratio_all_layers_remote": best["all_layers_remote"] / best["local"],
            "ratio_experts_remote": best["experts_remote"] / best["local"],
            "experts_remote": wire_per_token(experts, args.n), "all_layers_remote": wire_per_token(remote, args.n)}


def bench_load(path: Path, args: argparse.Namespace, work: Path) -> dict[str, float]:
    from engine.digests import model_digests
    from engine.gguf_file import GGUFFile

    t0 = time.perf_counter()
    model_digests(GGUFFile(path))  # hashed once per model file; later loads read the stored digests
    hash_s = time.perf_counter() - t0
    _, local_s = timed_load(path, threads=args.threads)
    cache = work / "load-cache"
    shutil.rmtree(cache, ignore_errors=True)
    out: dict[str, float] = {"hash_once_s": hash_s, "local_s": local_s}
    proc, ep = start_worker(cache, args.threads, work / "worker-cold.log")
    try:
        m, out["cold_s"] = timed_load(path, threads=args.threads, rpc=ep, n_gpu_layers=99)
        out["cold_bytes"] = m.net.load_stats.bytes_uploaded
        m.net.close()
        m, out["held_s"] = timed_load(path, threads=args.threads, rpc=ep, n_gpu_layers=99)
        m.net.close()
    finally:
        stop(proc)
    proc, ep = start_worker(cache, args.threads, work / "worker-warm.log")
    try:
        m, out["warm_s"] = timed_load(path, threads=args.threads, rpc=ep, n_gpu_layers=99)
        out["warm_bytes"] = m.net.load_stats.bytes_uploaded
        m.net.close()
    finally:
        stop(proc)
    out["warm_over_local"] = out["warm_s"] / out["local_s"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dtype", default="Q8_0")
    p.add_argument("-n", type=int, default=32, help="decoded tokens per TG measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="models and caches (default: <ikctl cache dir>/rpc-bench)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.dir is None:
        from engine.user_cache import cache_dir

        args.dir = cache_dir() / "rpc-bench"
    args.dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("IKCTL_CACHE", str(args.dir / "ikctl-cache"))
    from engine.synth import bench_model

    path = bench_model(args.dir, args.dtype)
    load = bench_load(path, args, args.dir)
    proc, ep = start_worker(args.dir / "tg-cache", args.threads, args.dir / "worker-tg.log")
    try:
        tgr = bench_tg(path, ep, args)
    finally:
        stop(proc)
    result = {"model": path.name, "model_bytes": path.stat().st_size, "threads": args.threads,
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "load": load, **tgr}
    t = tgr["tg_tps"]
    e, a = tgr["experts_remote"], tgr["all_layers_remote"]
    print(f"model {path.name} ({path.stat().st_size / 2**20:.0f} MiB), -t {args.threads}, one loopback worker")
    print(f"TG local {t['local']:.2f} t/s | all layers on the worker {t['all_layers_remote']:.2f} t/s "
          f"({tgr['ratio_all_layers_remote']:.2f}x, {a['round_trips_per_token']:.0f} round trip/token, "
          f"{a['wire_bytes_per_token'] / 1024:.1f} KiB/token) | experts on the worker {t['experts_remote']:.2f} t/s "
          f"({tgr['ratio_experts_remote']:.2f}x, {e['round_trips_per_token']:.0f} round trips/token for "
          f"{e['remote_segments']} remote segments, {e['wire_bytes_per_token'] / 1024:.1f} KiB/token)")
    print(f"load: local {load['local_s']:.2f} s | worker cold {load['cold_s']:.2f} s "
          f"({load['cold_bytes'] / 2**20:.0f} MiB sent) | warm disk cache {load['warm_s']:.2f} s "
          f"({load['warm_bytes']} B sent, {load['warm_over_local']:.1f}x local) | tensors held "
          f"{load['held_s']:.2f} s | hashing once {load['hash_once_s']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
