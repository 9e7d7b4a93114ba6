"""A fuzz campaign against one rpcnode worker held in a memory cgroup of -m plus its stated overhead.

    sudo python benchmarks/fuzz_worker.py [--frames 1000000] [--connections 16] [-m 64MiB] [--overhead 704MiB]
                                          [--max-minutes 30] [--seed 0] [--dir DIR] [--json OUT]

Records real sessions (a model load and a forward pass, placed three ways) against the worker, then sends
mutations of their requests (tests/rpcnode/session_fuzz.py: header fields, msgpack bytes and types, every field,
config value and count, tensor shapes, offsets and digests, section values and shapes, uploads out of order),
pipelined in batches of up to 32 frames over --connections connections at once, each connection ending after a
few hundred frames or at a frame cut short. It checks: the worker never dies (nor is OOM-killed in its cgroup,
memory.max = -m + --overhead, no swap), never answers INTERNAL, never logs a traceback, answers every frame or
closes the connection on purpose within the deadline, and a legitimate client's logits afterwards are those of a
fresh worker. Needs root (cgroup v2 at /sys/fs/cgroup, or v1 at /sys/fs/cgroup/memory); not run in CI (the
test suite runs a few thousand frames: tests/rpcnode/test_fuzz_campaign.py). Run it niced on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from rpc_bench import start_worker, stop  # noqa: E402

from engine.byte_sizes import parse_size  # noqa: E402
from engine.synth import SynthSpec, write_model  # noqa: E402
from rpcnode.client import Client, RPCError  # noqa: E402
from tests.rpcnode.fuzz_campaign import PROMPT, Plan, logits_through, run_campaign  # noqa: E402
from tests.rpcnode.session_fuzz import Mutator, record_sessions  # noqa: E402

WORKER_FLAGS = ["--stall-timeout", "2", "--idle-timeout", "30"]


class MemoryCgroup:
    """A child memory cgroup with a hard limit and no swap (v2, or v1 nested under this process's own)."""

    def __init__(self, limit: int, name: str) -> None:
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.exists() and "memory" in v2.read_text().split():
            self.v2, self.path = True, Path("/sys/fs/cgroup") / name
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(limit))
            (self.path / "memory.swap.max").write_text("0")
        else:
            own = next((line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                        if line.split(":")[1] == "memory"), None)
            if own is None:
                raise SystemExit("fuzz_worker: no memory cgroup controller (neither v2 nor v1) on this machine")
            self.v2, self.path = False, Path("/sys/fs/cgroup/memory") / own.lstrip("/") / name
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            swap = self.path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(limit))
        self.limit = limit

    def wrap(self) -> list[str]:
        """A command prefix that moves itself into the cgroup, then execs the command."""
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh"]

    def usage(self) -> int:
        return int((self.path / ("memory.current" if self.v2 else "memory.usage_in_bytes")).read_text())

    def peak(self) -> int | None:
        f = self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return int(f.read_text()) if f.exists() else None

    def oom_kills(self) -> int:
        text = (self.path / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        m = re.search(r"^oom_kill (\d+)", text, re.M)
        return int(m[1]) if m else 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            return m[1].strip()
    return platform.processor() or platform.machine()


def legit_logits(model_path: Path, endpoint: str) -> tuple[np.ndarray, str]:
    """A legitimate client's logits; if what the fuzz left held fills -m (OUT_OF_MEMORY), after freeing it."""
    try:
        return logits_through(model_path, endpoint), "as the fuzz left it"
    except RPCError as e:
        if "OUT_OF_MEMORY" not in str(e):
            raise
        with Client.connect(endpoint) as c:
            c.free()
        return logits_through(model_path, endpoint), f"after a Free ({str(e)[:120]})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=1_000_000)
    p.add_argument("--connections", type=int, default=16, help="connections at once (default 16)")
    p.add_argument("-m", "--mem", default="64MiB", help="the worker's -m (default 64MiB)")
    p.add_argument("--overhead", default="704MiB",
                   help="the cgroup's limit beyond -m (default 704MiB, the worker's stated overhead: the process "
                   "128 MiB (about 110 MiB RSS idle), the 64 MiB receive pool, the 512 MiB scratch pool of the running "
                   "segment: README)")
    p.add_argument("--max-minutes", type=float, default=30.0, help="stop sending after this long (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=None, help="work dir (default: a temporary one, removed)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("fuzz_worker: needs root (it makes a memory cgroup)")


    work = args.dir or Path(tempfile.mkdtemp(prefix="ikctl-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    mem, overhead = parse_size(args.mem), parse_size(args.overhead)
    model_path = write_model(work / "small.gguf", SynthSpec(layers=2, dense_layers=1, seed=3))
    flags = ["-m", args.mem, *WORKER_FLAGS]

    # the reference: a fresh worker, fresh cache, nothing else ever sent to it
    proc, ep = start_worker(work / "fresh-cache", 1, work / "fresh.log", extra=flags)
    try:
        want = logits_through(model_path, ep)
    finally:
        stop(proc)

    cg = MemoryCgroup(mem + overhead, f"ikctl-fuzz-{os.getpid()}")
    proc, ep = start_worker(work / "cache", 1, work / "worker.log", wrap=cg.wrap(), extra=flags)
    peak = {"rss": 0, "cgroup": 0}
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(0.2):
            try:
                peak["rss"] = max(peak["rss"], psutil.Process(proc.pid).memory_info().rss)
                peak["cgroup"] = max(peak["cgroup"], cg.usage())
            except (psutil.Error, OSError):
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        before = logits_through(model_path, ep)
        sessions = record_sessions(model_path, ep, PROMPT)
        mutator = Mutator(sessions, seed=args.seed)
        plan = Plan(frames=args.frames, connections=args.connections, stall_s=2.0, deadline_s=60.0,
                    max_seconds=args.max_minutes * 60, seed=args.seed)
        print(f"worker pid {proc.pid} in {cg.path} (limit {cg.limit >> 20} MiB = -m {mem >> 20} MiB + "
              f"{overhead >> 20} MiB), {len(sessions)} recorded sessions of "
              f"{sum(map(len, sessions.values()))} requests; sending {args.frames} frames over "
              f"{args.connections} connections at once", flush=True)
        t0 = time.monotonic()

        def progress(n: int) -> None:
            dt = time.monotonic() - t0
            print(f"  {n:>9} frames  {dt:7.1f} s  {n / max(dt, 1e-9):6.0f} frames/s  worker RSS "
                  f"{peak['rss'] >> 20} MiB peak, cgroup {cg.usage() >> 20} MiB now, {peak['cgroup'] >> 20} MiB "
                  "peak", flush=True)

        tally = run_campaign(ep, mutator, plan, progress)
        seconds = time.monotonic() - t0
        alive = proc.poll() is None
        after, how = legit_logits(model_path, ep) if alive else (np.zeros(0), "worker dead")
    finally:
        stop_sampling.set()
        sampler.join()
        alive_at_end = proc.poll() is None
        stop(proc)
        oom_kills, cg_peak = cg.oom_kills(), cg.peak()
        cg.remove()

    log = (work / "worker.log").read_text(errors="replace")
    result: dict[str, Any] = {
        "frames_sent": tally.frames, "replies": tally.replies, "connections": tally.connections,
        "connections_at_once": args.connections, "seconds": round(seconds, 1),
        "frames_per_second": round(tally.frames / seconds), "closed_by_worker": tally.closes,
        "resets": tally.resets, "unread_after_fatal": tally.unanswered, "out_of_order": tally.out_of_order,
        "internal": tally.n_internal, "hangs": tally.n_hangs, "worker_alive": alive and alive_at_end,
        "oom_kills": oom_kills, "tracebacks_logged": log.count("Traceback"),
        "mem_bytes": mem, "cgroup_limit_bytes": cg.limit, "cgroup_peak_bytes": cg_peak or peak["cgroup"],
        "worker_rss_peak_bytes": peak["rss"],
        "logits_before_equal_fresh": bool(np.array_equal(before, want)),
        "logits_after_equal_fresh": bool(np.array_equal(after, want)), "logits_after": how,
        "replies_by_kind": dict(tally.codes.most_common()), "frames_by_strategy": dict(tally.strategies.most_common()),
        "internal_samples": tally.internal, "hang_samples": tally.hangs,
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total >> 30} GiB, shared",
    }
    ok = (result["worker_alive"] and not oom_kills and not tally.n_internal and not tally.n_hangs
          and not result["tracebacks_logged"] and result["logits_after_equal_fresh"])
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_samples")}, indent=1))
    for s in tally.internal + tally.hangs:
        print("  ", s[:400])
    print(f"{'PASS' if ok else 'FAIL'}: {tally.frames} frames ({tally.replies} replies) over {tally.connections} "
          f"connections ({args.connections} at once) in {seconds:.0f} s ({tally.frames / seconds:.0f} frames/s); "
          f"{tally.n_internal} INTERNAL, {tally.n_hangs} hangs, {oom_kills} OOM kills, worker "
          f"{'alive' if result['worker_alive'] else 'DEAD'}; cgroup peak {result['cgroup_peak_bytes'] >> 20} of "
          f"{cg.limit >> 20} MiB (worker RSS peak {peak['rss'] >> 20} MiB); logits after "
          f"{'equal' if result['logits_after_equal_fresh'] else 'DIFFERENT'} to a fresh worker's ({how})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
