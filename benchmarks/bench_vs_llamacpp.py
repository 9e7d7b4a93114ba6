"""ikctl vs llama.cpp on the benchmark deepseek2 models (Q8_0, Q4_K): both sweep-benched, interleaved, one run.

    python benchmarks/bench_vs_llamacpp.py [-t 2] [-c 512] [-ub 128] [-n 32] [--rounds 2] [--json OUT]

Generates the models once (engine.synth BENCH_SPEC: a scaled-down DeepSeek-V2-Lite, 0.70 B total / 0.22 B active
parameters) into --dir, then alternates `ikctl bench` and llama.cpp (benchmarks/peer_llamacpp.py, needs the
optional `peer` extra) per model and round, each in its own process. Prints, per model: PP and TG t/s of both
(best of the rounds, averaged over the sweep's N_KV rows), the ikctl/llama.cpp ratios, weight bytes read per
decoded token and the GB/s that makes, a multi-threaded DRAM read measured in the same run, and the generic
dequantize path (--generic) as the before-kernels baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def run_ikctl(model: Path, threads: int, ctx: int, ub: int, n: int, generic: bool = False) -> dict[str, Any]:
    out = model.with_suffix(".ikctl.json")
    cmd = [sys.executable, "-m", "tui.cli", "bench", "-m", str(model), "-t", str(threads), "-c", str(ctx),
           "-ub", str(ub), "-n", str(n), "--json", str(out)] + (["--generic"] if generic else [])
    subprocess.run(cmd, check=True, cwd=HERE.parent, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def run_peer(model: Path, threads: int, ctx: int, ub: int, n: int) -> list[dict[str, Any]] | None:
    cmd = [sys.executable, str(HERE / "peer_llamacpp.py"), "-m", str(model), "-t", str(threads), "-c", str(ctx),
           "-ub", str(ub), "-n", str(n), "--jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"llama.cpp peer unavailable: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]


def summarize(runs: list[list[dict[str, Any]]]) -> dict[str, float]:
    """Best speed per N_KV over the rounds, then the mean over N_KV; also the N_KV = 0 row."""
    by_kv: dict[int, dict[str, float]] = {}
    for rows in runs:
        for r in rows:
            best = by_kv.setdefault(r["n_kv"], {"pp": 0.0, "tg": 0.0})
            best["pp"] = max(best["pp"], r["speed_pp"])
            best["tg"] = max(best["tg"], r["speed_tg"])
    kvs = sorted(by_kv)
    return {
        "pp": sum(by_kv[k]["pp"] for k in kvs) / len(kvs),
        "tg": sum(by_kv[k]["tg"] for k in kvs) / len(kvs),
        "pp0": by_kv[0]["pp"],
        "tg0": by_kv[0]["tg"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "ikctl" / "bench")
    ap.add_argument("--types", default="Q8_0,Q4_K")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("-ub", "--ubatch", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-baseline", action="store_true", help="skip the generic-path (before kernels) run")
    ap.add_argument("--json", type=Path, help="write all results here")
    args = ap.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)

    import numba
    from kernels_bench import bandwidth

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    dram = bandwidth(1 << 30, 1, 1.0)
    print(f"multi-threaded DRAM read ({args.threads} threads, 1 GiB): {dram:.1f} GB/s", flush=True)

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results: dict[str, Any] = {"dram_gbs": dram, "settings": settings, "models": {}}
    from engine.synth import bench_model

    models = {dt: bench_model(args.dir, dt) for dt in args.types.split(",")}
    runs: dict[str, dict[str, list]] = {dt: {"ikctl": [], "llama.cpp": []} for dt in models}
    meta: dict[str, dict[str, Any]] = {}
    for rnd in range(args.rounds):
        for dt, path in models.items():
            print(f"round {rnd + 1}/{args.rounds}: {dt} ikctl ...", file=sys.stderr, flush=True)
            doc = run_ikctl(path, args.threads, args.ctx, args.ubatch, args.n_gen)
            meta[dt] = doc
            runs[dt]["ikctl"].append(doc["rows"])
            print(f"round {rnd + 1}/{args.rounds}: {dt} llama.cpp ...", file=sys.stderr, flush=True)
            peer = run_peer(path, args.threads, args.ctx, args.ubatch, args.n_gen)
            if peer is not None:
                runs[dt]["llama.cpp"].append(peer)

    print()
    print("| model | engine | PP t/s | TG t/s | PP ratio | TG ratio | weight MB/token | TG GB/s | % of DRAM read |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dt in models:
        active = meta[dt]["active_weight_bytes"]
        ik = summarize(runs[dt]["ikctl"])
        peer = summarize(runs[dt]["llama.cpp"]) if runs[dt]["llama.cpp"] else None
        entry: dict[str, Any] = {"active_weight_bytes": active, "ikctl": ik, "llama.cpp": peer,
                                 "ikctl_rows": runs[dt]["ikctl"], "llama_cpp_rows": runs[dt]["llama.cpp"]}
        for name, s in (("ikctl", ik), ("llama.cpp", peer)):
            if s is None:
                continue
            gbs = s["tg"] * active / 1e9
            ratio_pp = f"{ik['pp'] / peer['pp']:.2f}x" if peer and name == "ikctl" else ""
            ratio_tg = f"{ik['tg'] / peer['tg']:.2f}x" if peer and name == "ikctl" else ""
            print(f"| {dt} | {name} | {s['pp']:.1f} | {s['tg']:.2f} | {ratio_pp} | {ratio_tg} | "
                  f"{active / 1e6:.0f} | {gbs:.1f} | {100 * gbs / dram:.0f}% |")
        if peer:
            entry["ratio_pp"], entry["ratio_tg"] = ik["pp"] / peer["pp"], ik["tg"] / peer["tg"]
        results["models"][dt] = entry

    if not args.no_baseline:
        print()
        print("before/after the fused kernels (ikctl, N_KV = 0, -ub 32, -n 4):")
        print("| model | path | PP t/s | TG t/s | TG GB/s |")
        print("|---|---|---|---|---|")
        for dt, path in models.items():
            active = meta[dt]["active_weight_bytes"]
            for generic in (True, False):
                doc = run_ikctl(path, args.threads, 64, 32, 4, generic=generic)
                r = doc["rows"][0]
                label = "generic dequantize + BLAS" if generic else "fused kernels"
                print(f"| {dt} | {label} | {r['speed_pp']:.1f} | {r['speed_tg']:.2f} | "
                      f"{r['speed_tg'] * active / 1e9:.2f} |", flush=True)
                results["models"][dt]["generic" if generic else "fused_short"] = r
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
