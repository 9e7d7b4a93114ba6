"""--auto across the emulated gigabit LAN of lan_bench.py: predicted vs measured TG of every candidate it weighs, at
several RTTs, and whether its choice is the fastest measured (issue 17).

    sudo python benchmarks/auto_bench.py [--rtt 0.02,0.4,1.25] [-n 24] [--rounds 2] [--cpu-mem SIZE]
                                         [--dtype Q8_0] [--dir DIR] [--json OUT]

Two rpcnode workers in lan_bench's namespace (1 Gbit/s HTB each way, RTT from delay_proxy.py's hold), every
process -t 1, polling off. This machine is planned with --cpu-mem of memory (--device-mem CPU=…; by default the
bench model's weights without its routed experts, plus a quarter of them), so the experts cannot all stay here and
the candidates differ. Per RTT: --auto measures the devices (calibration cached) and the links through the proxy
and weighs its candidates; then every candidate that fits is loaded with its own flags and its TG measured (-n
decodes after a 16-token prompt), the candidates taking turns per round, best of --rounds. Printed: per RTT and
candidate, predicted and measured TG and their ratio; the chosen one marked.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from delay_proxy import ProxyProcess  # noqa: E402
from lan_bench import (  # noqa: E402
    ADDR_HERE,
    ADDR_THERE,
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
from rpc_bench import start_worker, tg  # noqa: E402

from engine import load_model  # noqa: E402
from engine.byte_sizes import parse_size  # noqa: E402
from engine.digests import model_digests  # noqa: E402
from engine.gguf_file import GGUFFile  # noqa: E402
from engine.synth import bench_model  # noqa: E402
from engine.user_cache import cache_dir  # noqa: E402
from tui.formatting import auto_measured  # noqa: E402


def run(args: argparse.Namespace) -> dict[str, Any]:
    path = bench_model(cache_dir() / "bench", args.dtype)
    f = GGUFFile(path)
    experts = sum(t.n_bytes for n, t in f.tensors.items() if "_exps." in n)
    total = sum(t.n_bytes for t in f.tensors.values())
    cpu_mem = parse_size(args.cpu_mem) if args.cpu_mem else total - 3 * experts // 4
    token_file = shared_token(args.dir / "auto-bench.token")
    lan = Lan()
    procs: list[subprocess.Popen[Any]] = []
    proxy: ProxyProcess | None = None
    models: list[Any] = []
    out: dict[str, Any] = {"model": path.name, "rate": RATE, "cpu_mem": cpu_mem, "rtts": []}
    try:
        lan.up()
        eps = []
        for n in (1, 2):
            worker, ep = start_worker(args.dir / f"auto-cache-{n}", 1, args.dir / f"auto-worker-{n}.log",
                                      wrap=in_ns(), extra=["--host", ADDR_THERE, "--token-file", str(token_file),
                                                           "--poll", "0"])
            procs.append(worker)
            eps.append(ep)
        echo_ep = start_echo(procs)
        proxy = ProxyProcess([(f"{ADDR_HERE}:0", eps[0]), (f"{ADDR_HERE}:0", eps[1]), (f"{ADDR_HERE}:0", echo_ep)])
        w1, w2, echo_via = proxy.addresses
        base = measure_rtt(echo_via)["median_ms"]
        model_digests(f)
        common = {"threads": 1, "rpc_poll": 0.0, "ctx_size": 256}
        for rtt_ms in args.rtt:
            rtt = calibrate(proxy, echo_via, rtt_ms, base)
            proxy.set_delay(rtt["hold_ms_each_way"] / 1e3)
            auto = load_model(path, rpc=f"{w1},{w2}", auto=True, device_mem=[f"CPU={cpu_mem}"], **common)
            assert auto.auto is not None
            choice = auto.auto
            if hasattr(auto.net, "close"):
                auto.net.close()
            fits = [c for c in choice.weighed if c.problem is None]
            proxy.set_delay(0.0)  # load at full speed, then hold
            loaded = [(c, load_model(path, **c.rules.options(), **common)) for c in fits]
            models += [m for _, m in loaded]
            proxy.set_delay(rtt["hold_ms_each_way"] / 1e3)
            best: dict[str, float] = {}
            for r in range(args.rounds):
                for c, m in loaded if r % 2 == 0 else loaded[::-1]:
                    best[c.name] = max(best.get(c.name, 0.0), tg(m, args.n))
            rows = [{"name": c.name, "flags": c.rules.flags(), "predicted": c.tokens_per_s, "measured": best[c.name],
                     "chosen": c is choice.chosen} for c in fits]
            out["rtts"].append({"rtt": rtt, "rows": rows, "why": choice.why,
                                "measured": auto_measured(choice.measured) if choice.measured else []})
            for _, m in loaded:
                if hasattr(m.net, "close"):
                    m.net.close()
            models.clear()
            print(f"RTT {rtt['median_ms']:.3f} ms done: chose {choice.chosen.name}", file=sys.stderr)
        return out
    finally:
        tear_down(models, proxy, procs, lan, token_file)


def print_tables(res: dict[str, Any]) -> None:
    print(f"model {res['model']}, two workers behind {res['rate']} HTB, this machine planned with "
          f"{res['cpu_mem'] / 2**20:.0f} MiB; every process -t 1; best of the rounds")
    for r in res["rtts"]:
        print()
        print(f"RTT {r['rtt']['median_ms']:.3f} ms; measured by --auto: " + "; ".join(r["measured"]))
        print("| candidate | predicted TG | measured TG | measured / predicted |")
        print("|---|---|---|---|")
        for row in sorted(r["rows"], key=lambda x: -x["measured"]):
            mark = "**" if row["chosen"] else ""
            print(f"| {mark}{row['name']}{mark} | {row['predicted']:.2f} | {row['measured']:.2f} | "
                  f"{row['measured'] / row['predicted']:.2f} |")
        chosen = next(x for x in r["rows"] if x["chosen"])
        fastest = max(x["measured"] for x in r["rows"])
        print(f"chosen: {chosen['name']}, measured {chosen['measured'] / fastest:.2f}x of the fastest measured; "
              f"prediction {chosen['predicted'] / chosen['measured'] - 1:+.0%} off")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="Q8_0")
    p.add_argument("-n", type=int, default=24, help="decoded tokens per TG measurement")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rtt", type=lambda s: [float(v) for v in s.split(",")], default=[0.02, 0.4, 1.25])
    p.add_argument("--cpu-mem", default=None, help="this machine's memory to plan with (default: see above)")
    p.add_argument("--dir", type=Path, default=None, help="caches (default: <ikctl cache dir>/rpc-bench)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    return run_benchmark("auto_bench", args, [f"auto-cache-{n}" for n in (1, 2)], run, print_tables)


if __name__ == "__main__":
    raise SystemExit(main())
