"""Experts on a worker across an emulated gigabit LAN vs local: TG and PP ratios at 0, 0.4 and 1.25 ms RTT (issue 5).

    sudo python benchmarks/lan_bench.py [-t 1] [--worker-threads 1] [-n 32] [--pp 128] [-ub 512] [--rounds 3]
                                        [--rtt 0.4,1.25] [--poll MS] [--dtype Q8_0] [--dir DIR]
                                        [--json OUT]

Needs root, `ip` and `tc`. A network namespace is joined to this one by a veth pair (198.51.100.129/30 here,
198.51.100.130/30 there), both ends shaped to 1 Gbit/s by an HTB class. The kernel may lack netem, so latency comes
from benchmarks/delay_proxy.py: a TCP proxy here that holds every chunk RTT/2 in each direction. Its hold is
calibrated so that a ping-pong of small messages through it measures the asked RTT, and changed at runtime, so the
model is loaded through the link once (a cold load: every expert tensor crosses the shaped link) and reused for
every RTT. One rpcnode worker runs in the namespace with the expert tensors (`-ot exps=RPC[...]`); attention,
the dense layer and the output stay local. Per RTT, interleaved per round with the local model (all tensors
here, same threads): TG (tokens/s of -n decodes after a 16-token prompt), PP (tokens/s of one --pp prompt in
micro-batches of -ub tokens, remote pipelined and with --no-pipeline), best of --rounds, and the round trips and
bytes on the wire per generated token from the client's counters.
The namespace, the link, the worker and the proxy are removed on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from delay_proxy import ProxyProcess, pingpong, split_addr, summary  # noqa: E402
from rpc_bench import PROMPT, start_worker, stop, tg, wire_per_token  # noqa: E402

# Documentation addresses only (RFC 5737); tests use 198.51.100.1-12 and .200, so this /30 is ours.
NS = "ikctl-lanbench"
VETH_HERE, VETH_THERE = "iklb0", "iklb1"
ADDR_HERE, ADDR_THERE, PREFIX = "198.51.100.129", "198.51.100.130", 30
RATE = "1gbit"
# llama.cpp RPC measured the same way (issue 5); ikctl's target is >= 0.8x local TG at 0.4 ms.
ANCHOR = {"tg_ratio": {0.4: 0.46, 1.25: 0.38}, "round_trips_per_token": 11, "wire_mb_per_token": 1.19}
TARGET_RATIO_AT_04 = 0.8


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()}")
    return r


def in_ns(*cmd: str) -> list[str]:
    return ["ip", "netns", "exec", NS, *cmd]


class Lan:
    """The namespace, the veth pair and an HTB rate limit on both ends; `down()` removes all of it."""

    def up(self) -> None:
        self.down()  # a run killed with SIGKILL may have left them
        sh("ip", "netns", "add", NS)
        sh("ip", "link", "add", VETH_HERE, "type", "veth", "peer", "name", VETH_THERE)
        sh("ip", "link", "set", VETH_THERE, "netns", NS)
        sh("ip", "addr", "add", f"{ADDR_HERE}/{PREFIX}", "dev", VETH_HERE)
        sh("ip", "link", "set", VETH_HERE, "up")
        sh(*in_ns("ip", "addr", "add", f"{ADDR_THERE}/{PREFIX}", "dev", VETH_THERE))
        sh(*in_ns("ip", "link", "set", VETH_THERE, "up"))
        sh(*in_ns("ip", "link", "set", "lo", "up"))
        for wrap, dev in (((), VETH_HERE), (tuple(in_ns()), VETH_THERE)):
            # r2q 1000: a 1 Gbit/s class's default quantum (rate / 10) is over HTB's limit and draws a warning.
            sh(*wrap, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10", "r2q", "1000")
            sh(*wrap, "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", RATE,
               "ceil", RATE)

    def down(self) -> None:
        # Deleting the namespace deletes its veth end, which takes the peer and both qdiscs with it.
        sh("ip", "netns", "del", NS, check=False)
        if sh("ip", "link", "show", VETH_HERE, check=False).returncode == 0:
            sh("ip", "link", "del", VETH_HERE, check=False)


def pp(model: Any, n: int) -> float:
    """Tokens per second of one n-token prompt on a fresh sequence."""
    ids = [(13 * k + 7) % 997 + 1 for k in range(n)]
    cache = model.new_cache(n + 1)
    t0 = time.perf_counter()
    model.eval(ids, cache)
    return n / (time.perf_counter() - t0)


def wire_totals(model: Any) -> tuple[int, int]:
    """(round trips, bytes sent + received) so far over all of the model's worker connections."""
    cs = [c.counters for c in model.net.clients.values()]
    return sum(c.runs for c in cs), sum(c.bytes_sent + c.bytes_received for c in cs)


def measure_rtt(addr: str) -> dict[str, float]:
    return summary(pingpong(split_addr(addr)))


def calibrate(proxy: ProxyProcess, echo_via: str, rtt_ms: float, base_ms: float) -> dict[str, float]:
    """The one-way hold that makes the small-message RTT through the proxy `rtt_ms` (within 3%, at most 4 tries)."""
    hold = max(0.0, (rtt_ms - base_ms) / 2)
    for _ in range(4):  # the proxy's hand-off and sleep overshoot add ~0.05 ms, and a busy machine more: correct
        proxy.set_delay(hold / 1e3)
        got = measure_rtt(echo_via)
        if abs(got["median_ms"] - rtt_ms) <= 0.03 * rtt_ms:
            break
        hold = max(0.0, hold + (rtt_ms - got["median_ms"]) / 2)
    return {"target_ms": rtt_ms, "hold_ms_each_way": hold, **got}


def bench_setting(local: Any, remote: Any, args: argparse.Namespace) -> dict[str, Any]:
    """TG and PP of the remote model and of the local one, interleaved per round (best of rounds), and the wire."""
    best = {"tg_local": 0.0, "tg_remote": 0.0, "pp_local": 0.0, "pp_remote": 0.0, "pp_remote_no_pipeline": 0.0}
    paired: list[float] = []  # remote over local TG within each round: this host's speed drifts between rounds
    pp_rt = pp_bytes = 0
    for r in range(args.rounds):
        now = {"tg_local": tg(local, args.n), "tg_remote": tg(remote, args.n), "pp_local": pp(local, args.pp)}
        rt0, b0 = wire_totals(remote)
        now["pp_remote"] = pp(remote, args.pp)
        rt1, b1 = wire_totals(remote)
        pp_rt, pp_bytes = rt1 - rt0, b1 - b0
        now["pp_remote_no_pipeline"] = pp(remote.with_options(pipeline=False), args.pp)
        best = {k: max(v, now[k]) for k, v in best.items()}
        paired.append(now["tg_remote"] / now["tg_local"])
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in now.items()) + " t/s", file=sys.stderr)
    wire = wire_per_token(remote, args.n)
    return {**best, "tg_ratio": best["tg_remote"] / best["tg_local"], "tg_ratio_median": statistics.median(paired),
            "tg_ratios": paired, "pp_ratio": best["pp_remote"] / best["pp_local"],
            "pp_ratio_no_pipeline": best["pp_remote_no_pipeline"] / best["pp_local"],
            "tg_extra_ms_per_token": 1e3 / best["tg_remote"] - 1e3 / best["tg_local"],
            "pp_round_trips": pp_rt, "pp_wire_bytes_per_token": pp_bytes / args.pp, **wire}


def preflight() -> str | None:
    """Why this cannot run here, or None."""
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (it creates a network namespace, a veth pair and tc qdiscs); run it with sudo"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return f"needs {' and '.join(missing)} (iproute2)"
    return None


def print_table(res: dict[str, Any], args: argparse.Namespace) -> None:
    cold, rtts = res["cold_load"], res["rtt"]
    print(f"model {res['model']} ({res['model_bytes'] / 2**20:.0f} MiB), experts on one worker in a network "
          f"namespace across a veth pair shaped to {RATE} (HTB, both ends); coordinator -t {args.threads}, worker "
          f"-t {args.worker_threads}, local -t {args.threads}; TG: -n {args.n} after a {len(res['prompt'])}-token "
          f"prompt; PP: {args.pp}-token prompt, -ub {args.ub}; best of {args.rounds} rounds, local and remote "
          "interleaved; polling "
          f"{args.poll:g} ms both sides")
    print(f"small-message RTT (64 B ping-pong, median [p10-p90]): veth direct {rtts['direct']['median_ms']:.3f} ms, "
          + ", ".join(f"{k} {v['median_ms']:.3f} ms [{v['p10_ms']:.3f}-{v['p90_ms']:.3f}]"
                      + (f" (hold {v['hold_ms_each_way']:.3f} ms each way)" if "hold_ms_each_way" in v else "")
                      for k, v in rtts.items() if k != "direct"))
    print(f"cold load through the link: {cold['seconds']:.2f} s, {cold['bytes_uploaded'] / 2**20:.0f} MiB uploaded "
          f"({cold['bytes_uploaded'] * 8 / cold['seconds'] / 1e9:.2f} Gbit/s effective); local load "
          f"{res['local_load_s']:.2f} s")
    print()
    print("| link | RTT measured | TG local | TG remote | TG ratio | TG ratio, median of rounds | extra ms/token "
          "| PP local | PP remote | PP ratio | PP ratio --no-pipeline | round trips/token | ms/round trip beyond "
          "compute | wire/token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in res["settings"]:
        print(f"| {row['name']} | {row['rtt_ms']:.3f} ms | {row['tg_local']:.2f} t/s | {row['tg_remote']:.2f} t/s | "
              f"**{row['tg_ratio']:.2f}x** | **{row['tg_ratio_median']:.2f}x** | {row['tg_extra_ms_per_token']:.2f} | "
              f"{row['pp_local']:.1f} t/s | "
              f"{row['pp_remote']:.1f} t/s | {row['pp_ratio']:.2f}x | {row['pp_ratio_no_pipeline']:.2f}x | "
              f"{row['round_trips_per_token']:.0f} | "
              f"{row['ms_per_round_trip_beyond_compute']:.3f} | "
              f"{row['wire_bytes_per_token'] / 1e3:.1f} kB |")
    a = ANCHOR
    print()
    print(f"anchor, llama.cpp RPC measured the same way (issue 5): TG {a['tg_ratio'][0.4]:.2f}x local at 0.4 ms, "
          f"{a['tg_ratio'][1.25]:.2f}x at 1.25 ms; {a['round_trips_per_token']} round trips and "
          f"{a['wire_mb_per_token']:.2f} MB per token. ikctl target: >= {TARGET_RATIO_AT_04:.1f}x at 0.4 ms.")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from engine.synth import bench_model

    path = bench_model(args.dir, args.dtype)
    token_file = shared_token(args.dir / "lan-bench.token")
    cache = args.dir / "lan-cache"
    shutil.rmtree(cache, ignore_errors=True)  # an empty worker cache: the first load uploads every expert

    lan = Lan()
    procs: list[subprocess.Popen[Any]] = []
    proxy: ProxyProcess | None = None
    models: list[Any] = []
    try:
        print(f"link: {ADDR_HERE} <-> {ADDR_THERE} (namespace {NS}), {RATE} each way", file=sys.stderr)
        lan.up()
        worker, worker_ep = start_worker(cache, args.worker_threads, args.dir / "lan-worker.log", wrap=in_ns(),
                                         extra=["--host", ADDR_THERE, "--token-file", str(token_file),
                                                "--poll", str(args.poll)])
        procs.append(worker)
        echo_ep = start_echo(procs)
        proxy = ProxyProcess([(f"{ADDR_HERE}:0", worker_ep), (f"{ADDR_HERE}:0", echo_ep)])
        ep, echo_via = proxy.addresses

        rtt: dict[str, dict[str, float]] = {"direct": measure_rtt(echo_ep), "proxy, no hold": measure_rtt(echo_via)}
        base = rtt["proxy, no hold"]["median_ms"]
        holds = {}
        for t in args.rtt:
            rtt[f"{t:g} ms"] = calibrate(proxy, echo_via, t, base)
            holds[t] = rtt[f"{t:g} ms"]["hold_ms_each_way"] / 1e3
        print("RTT: " + ", ".join(f"{k} {v['median_ms']:.3f} ms" for k, v in rtt.items()), file=sys.stderr)

        from engine import load_model
        from engine.digests import model_digests
        from engine.gguf_file import GGUFFile

        model_digests(GGUFFile(path))  # hashed once per model file (stored): keep it out of the cold-load time
        t0 = time.perf_counter()
        local = load_model(path, threads=args.threads, ubatch_size=args.ub)
        local_load_s = time.perf_counter() - t0
        proxy.set_delay(0.0)
        print(f"cold load through the link (worker {worker_ep} via proxy {ep}) ...", file=sys.stderr)
        t0 = time.perf_counter()
        remote = load_model(path, threads=args.threads, ubatch_size=args.ub, rpc=ep,
                            override_tensor=[f"exps=RPC[{ep}]"], rpc_poll=args.poll)
        cold_s = time.perf_counter() - t0
        models.append(remote)
        cold = {"seconds": cold_s, "bytes_uploaded": remote.net.load_stats.bytes_uploaded,
                "tensors_uploaded": remote.net.load_stats.tensors_uploaded,
                "wire_bytes": sum(c.counters.bytes_sent + c.counters.bytes_received
                                  for c in remote.net.clients.values())}
        print(f"  {cold_s:.2f} s, {cold['bytes_uploaded'] / 2**20:.0f} MiB uploaded", file=sys.stderr)

        plan: list[tuple[str, Any, float, float]] = []
        if args.direct:
            # The same worker without the proxy (it holds the tensors already: a quick load): the proxy's own cost.
            direct = load_model(path, threads=args.threads, ubatch_size=args.ub, rpc=worker_ep,
                                override_tensor=[f"exps=RPC[{worker_ep}]"], rpc_poll=args.poll)
            models.append(direct)
            plan.append(("veth direct, no proxy", direct, 0.0, rtt["direct"]["median_ms"]))
        plan.append(("proxy, no added delay", remote, 0.0, base))
        plan += [(f"RTT {t:g} ms", remote, holds[t], rtt[f"{t:g} ms"]["median_ms"]) for t in args.rtt]

        settings = []
        for name, model, hold, rtt_ms in plan:
            proxy.set_delay(hold)
            print(f"{name} (hold {hold * 1e3:.3f} ms each way):", file=sys.stderr)
            settings.append({"name": name, "rtt_ms": rtt_ms, "hold_ms_each_way": hold * 1e3,
                             **bench_setting(local, model, args)})
        return {"model": path.name, "model_bytes": path.stat().st_size, "threads": args.threads,
                "worker_threads": args.worker_threads, "n": args.n, "pp": args.pp, "ub": args.ub, "rounds": args.rounds,
                "prompt": PROMPT, "rate": RATE, "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(), "rtt": rtt, "cold_load": cold, "local_load_s": local_load_s,
                "settings": settings, "anchor": {**ANCHOR, "tg_ratio": {str(k): v for k, v in
                                                                        ANCHOR["tg_ratio"].items()}}}
    finally:
        tear_down(models, proxy, procs, lan, token_file)


def shared_token(path: Path) -> Path:
    """A fresh token file for the workers, and this process's token (the file wins over $IKCTL_RPC_TOKEN)."""
    from engine.placement_spec import TOKEN_ENV, TOKEN_FILE_ENV

    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    os.environ[TOKEN_FILE_ENV] = str(path)
    os.environ[TOKEN_ENV] = path.read_text().strip()
    return path


def start_echo(procs: list[subprocess.Popen[Any]]) -> str:
    """delay_proxy.py's echo server in the namespace (added to procs); its address, for RTT ping-pongs."""
    echo = subprocess.Popen(in_ns(sys.executable, str(HERE / "delay_proxy.py"), "echo", "--listen",
                                  f"{ADDR_THERE}:0"), stdout=subprocess.PIPE, text=True)
    procs.append(echo)
    assert echo.stdout is not None
    return echo.stdout.readline().split()[1]


def run_benchmark(name: str, args: argparse.Namespace, caches: Sequence[str],
                  run: Callable[[argparse.Namespace], dict[str, Any]], report: Callable[[dict[str, Any]], None]) -> int:
    """The frame of a benchmark in the namespace: the preflight, --dir (default <ikctl cache dir>/rpc-bench) with
    the workers' `caches` emptied, SIGTERM taken as Ctrl-C (run's clean-up then runs), the report and --json."""
    from engine.user_cache import cache_dir

    why = preflight()
    if why:
        print(f"{name}: {why}", file=sys.stderr)
        return 1
    args.dir = args.dir or cache_dir() / "rpc-bench"
    args.dir.mkdir(parents=True, exist_ok=True)
    for c in caches:
        shutil.rmtree(args.dir / c, ignore_errors=True)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        res = run(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; cleaned up", file=sys.stderr)
        return 130
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


def tear_down(models: list[Any], proxy: ProxyProcess | None, procs: list[subprocess.Popen[Any]], lan: Lan,
              token_file: Path) -> None:
    """Close the models' connections, stop the proxy and the processes, remove the namespace and the token."""
    for m in models:
        with contextlib.suppress(Exception):
            m.net.close()
    if proxy is not None:
        proxy.close()
    for p in reversed(procs):
        stop(p)
    lan.down()
    token_file.unlink(missing_ok=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-t", "--threads", type=int, default=1, help="coordinator and local threads (default 1)")
    p.add_argument("--worker-threads", type=int, default=1)
    p.add_argument("--dtype", default="Q8_0")
    p.add_argument("-n", type=int, default=32, help="decoded tokens per TG measurement")
    p.add_argument("--pp", type=int, default=128, help="prompt tokens per PP measurement")
    p.add_argument("-ub", "--ubatch-size", dest="ub", type=int, default=512,
                   help="prompt tokens per micro-batch, here and remote (several make PP pipelined; default 512)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--poll", type=float, default=10.0, metavar="MS",
                   help="the worker's --poll and the coordinator's --rpc-poll (default 10, as in ikctl; 0: sleep)")
    p.add_argument("--rtt", default="0.4,1.25", help="round-trip times to emulate, ms (comma-separated)")
    p.add_argument("--no-direct", dest="direct", action="store_false",
                   help="skip the row through the veth pair without the proxy")
    p.add_argument("--dir", type=Path, default=None, help="model and caches (default: <ikctl cache dir>/rpc-bench, "
                   "shared with rpc_bench.py)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    why = preflight()
    if why:
        print(f"lan_bench: {why}", file=sys.stderr)
        return 1
    args.rtt = [float(v) for v in args.rtt.split(",") if v.strip()]
    if args.dir is None:
        from engine.user_cache import cache_dir

        args.dir = cache_dir() / "rpc-bench"
    args.dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("IKCTL_CACHE", str(args.dir / "ikctl-cache"))  # model digests, hashed once per file

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # run()'s finally removes the namespace and stops the processes

    signal.signal(signal.SIGTERM, on_term)
    try:
        res = run(args)
    except KeyboardInterrupt:
        print("lan_bench: interrupted; cleaned up", file=sys.stderr)
        return 130
    print_table(res, args)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
