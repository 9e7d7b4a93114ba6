"""Experts split over two workers (expert parallel) vs all experts on one, across the emulated gigabit LAN of
lan_bench.py (issue 16).

    sudo python benchmarks/expert_parallel_bench.py [--rtt 0.4] [-n 32] [--rounds 5] [--phase-reps 200]
                                                    [--dtype Q8_0 | --model GGUF] [--dir DIR] [--json OUT]

Two rpcnode workers run in lan_bench's network namespace (1 Gbit/s HTB each way, RTT from delay_proxy.py's hold,
calibrated on a ping-pong), every process -t 1, polling off (on 2 cores a spinning process takes a core from
another). The coordinator keeps attention, the dense layer, the router and the shared experts. Two placements of
the same bench model, loaded once each: `-ot exps=RPC[w1]` (one worker holds every expert) and
`-ot exps=RPC[w1],RPC[w2]` (each worker half of each layer's experts), beside the model all here (-t 1).
Measured, the three alternating per round:

- TG: tokens/s of -n decodes after a 16-token prompt, with round trips and bytes on the wire per token;
- the expert phase: one MoE layer's routed experts for one decoded token (random routing of K of E experts),
  from sending the hidden state to holding every partial sum, with the shared experts already computed, so
  nothing else computes meanwhile (median of --phase-reps calls per round).

Here the coordinator, both workers and the proxy share 2 cores, which caps the end-to-end gain; the expert phase
shows what the split does to the bytes each machine reads per token.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from delay_proxy import ProxyProcess  # noqa: E402
from lan_bench import (  # noqa: E402
    ADDR_HERE,
    ADDR_THERE,
    NS,
    RATE,
    Lan,
    calibrate,
    in_ns,
    measure_rtt,
    run_benchmark,
    shared_token,
    start_echo,
    tear_down,
)
from rpc_bench import start_worker, tg, wire_per_token  # noqa: E402

from engine import load_model  # noqa: E402
from engine.batch import Batch  # noqa: E402
from engine.digests import model_digests  # noqa: E402
from engine.distributed import DistributedNet  # noqa: E402
from engine.gguf_file import GGUFFile  # noqa: E402
from engine.synth import bench_model  # noqa: E402


def expert_step(net: DistributedNet) -> tuple[int, Any]:
    """The first MoE layer's routed-experts segment and its executor."""
    return next((k, e) for k, e in net.steps if net.segments[k].ops == ((net.segments[k].ops[0][0], "moe_experts"),))


def phase_seconds(model: Any, reps: int, seed: int) -> float:
    """Median seconds of one layer's routed experts for one token, the shared experts' output given."""
    net = model.net
    k, executor = expert_step(net)
    cfg = net.cfg
    rng = np.random.default_rng(seed)
    cache = model.new_cache(8)
    batch, positions = Batch.of([cache], [1]), np.zeros(1, np.int64)
    times = []
    for _ in range(reps):
        state = {"x": np.zeros((1, cfg.hidden_size), np.float32),
                 "h": rng.standard_normal((1, cfg.hidden_size)).astype(np.float32),
                 "idx": rng.choice(cfg.n_routed_experts, (1, cfg.n_experts_per_tok), replace=False),
                 "w": rng.random((1, cfg.n_experts_per_tok)).astype(np.float32),
                 "shared": np.zeros((1, cfg.hidden_size), np.float32)}
        t0 = time.perf_counter()
        executor.run(k, state, positions, batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    path = args.model or bench_model(args.dir, args.dtype)
    token_file = shared_token(args.dir / "ep-bench.token")
    lan = Lan()
    procs: list[subprocess.Popen[Any]] = []
    proxy: ProxyProcess | None = None
    models: list[Any] = []
    try:
        lan.up()
        eps = []
        for n in (1, 2):
            worker, ep = start_worker(args.dir / f"ep-cache-{n}", 1, args.dir / f"ep-worker-{n}.log", wrap=in_ns(),
                                      extra=["--host", ADDR_THERE, "--token-file", str(token_file), "--poll", "0"])
            procs.append(worker)
            eps.append(ep)
        echo_ep = start_echo(procs)
        proxy = ProxyProcess([(f"{ADDR_HERE}:0", eps[0]), (f"{ADDR_HERE}:0", eps[1]), (f"{ADDR_HERE}:0", echo_ep)])
        w1, w2, echo_via = proxy.addresses
        base = measure_rtt(echo_via)["median_ms"]
        rtt = calibrate(proxy, echo_via, args.rtt, base)
        print(f"RTT {rtt['median_ms']:.3f} ms (hold {rtt['hold_ms_each_way']:.3f} ms each way)", file=sys.stderr)
        model_digests(GGUFFile(path))
        proxy.set_delay(0.0)  # load at full speed, then hold
        common = dict(threads=1, rpc=f"{w1},{w2}", rpc_poll=0.0)
        local = load_model(path, threads=1)
        one = load_model(path, override_tensor=[f"exps=RPC[{w1}]"], **common)
        two = load_model(path, override_tensor=[f"exps=RPC[{w1}],RPC[{w2}]"], **common)
        models += [one, two]
        proxy.set_delay(rtt["hold_ms_each_way"] / 1e3)
        cells: dict[str, dict[str, list[float]]] = {"one worker": {"tg": [], "phase_ms": []},
                                                    "two workers": {"tg": [], "phase_ms": []}}
        local_tg: list[float] = []
        for r in range(args.rounds):
            order = [("one worker", one), ("two workers", two)]
            local_tg.append(tg(local, args.n))
            for name, model in order if r % 2 == 0 else order[::-1]:
                cells[name]["tg"].append(tg(model, args.n))
                cells[name]["phase_ms"].append(1e3 * phase_seconds(model, args.phase_reps, r))
            print(f"  round {r + 1}: " + ", ".join(f"{k} TG {v['tg'][-1]:.2f} t/s, expert phase "
                                                   f"{v['phase_ms'][-1]:.3f} ms" for k, v in cells.items()),
                  file=sys.stderr)
        rows = {}
        for name, model in (("one worker", one), ("two workers", two)):
            rows[name] = {"tg_best": max(cells[name]["tg"]), "tg_median": statistics.median(cells[name]["tg"]),
                          "phase_ms_median": statistics.median(cells[name]["phase_ms"]),
                          "tg_all": cells[name]["tg"], "phase_ms_all": cells[name]["phase_ms"],
                          **wire_per_token(model, args.n)}
        return {"model": path.name, "model_path": str(path), "rate": RATE, "rtt": rtt, "n": args.n,
                "rounds": args.rounds, "phase_reps": args.phase_reps, "namespace": NS, "rows": rows,
                "local_tg_median": statistics.median(local_tg), "local_tg_all": local_tg}
    finally:
        tear_down(models, proxy, procs, lan, token_file)


def print_table(res: dict[str, Any]) -> None:
    rows = res["rows"]
    print(f"model {res['model']}, two workers in namespace {res['namespace']} behind {res['rate']} HTB, RTT "
          f"{res['rtt']['median_ms']:.3f} ms; every process -t 1, polling off; {res['rounds']} rounds alternating; "
          f"all local (-t 1): TG {res['local_tg_median']:.2f} t/s (median)")
    print()
    print("| experts on | TG best | TG median | round trips/token | wire/token | expert phase (median) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['tg_best']:.2f} t/s | {r['tg_median']:.2f} t/s | {r['round_trips_per_token']:.1f} | "
              f"{r['wire_bytes_per_token'] / 1e3:.1f} kB | {r['phase_ms_median']:.3f} ms |")
    one, two = rows["one worker"], rows["two workers"]
    print()
    print(f"two workers / one: TG {two['tg_median'] / one['tg_median']:.2f}x (medians), expert phase "
          f"{two['phase_ms_median'] / one['phase_ms_median']:.2f}x of one worker's time (goal <= 0.6x)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="Q8_0")
    p.add_argument("--model", type=Path, default=None, help="another deepseek2 GGUF (default: the bench model in "
                   "--dtype); e.g. ~/.cache/ikctl/bench/bench-v3.Q4_K_M.gguf, DeepSeek-V3's expert sizes")
    p.add_argument("-n", type=int, default=32, help="decoded tokens per TG measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--phase-reps", type=int, default=200, help="expert-phase calls per round")
    p.add_argument("--rtt", type=float, default=0.4, help="round-trip time to emulate, ms")
    p.add_argument("--dir", type=Path, default=None, help="model and caches (default: <ikctl cache dir>/rpc-bench)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    return run_benchmark("expert_parallel_bench", args, [f"ep-cache-{n}" for n in (1, 2)], run, print_table)


if __name__ == "__main__":
    sys.exit(main())
