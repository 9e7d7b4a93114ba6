"""Launching rpcnode workers over SSH: which workers a host gets (pure), starting them, checking each answers."""

from __future__ import annotations

import asyncio
import json
import secrets
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine.byte_sizes import format_bytes
from engine.cluster import Cluster, ClusterWorker
from rpcnode.client import Client
from tui.install import install
from tui.inventory import Host
from tui.probe import HostFacts, probe
from tui.ssh import HostError, LocalTransport, Session, SSHTransport, Transport, describe_error
from tui.stop import stop_on

_SCRIPT = Path(__file__).with_name("remote_launch.py")
DEFAULT_REMOTE_DIR = "~/.cache/ikctl"


@dataclass(frozen=True)
class LaunchOptions:
    """How to launch; every time is in seconds."""

    install: bool = False  # install this ikctl on hosts that lack it (see tui.install)
    remote_dir: str = DEFAULT_REMOTE_DIR  # on each host: workers/ (logs, token files), venv/ and wheels/ of --install
    bind: str | None = None  # None: the address the host was reached at over SSH; loopback without SSH
    timeout: float = 10.0  # connecting and probing, per host
    start_timeout: float = 30.0  # until a worker logs that it listens
    hello_timeout: float = 10.0  # until it answers hello with its token, from here
    install_timeout: float = 600.0  # pip may download the dependencies


@dataclass(frozen=True)
class WorkerPlan:
    """One worker to start: the device it owns and its settings; `problem` says why it cannot start at all."""

    device: str  # "cpu" or "cudaN", as in the hosts file
    threads: int
    mem_bytes: int | None  # None: the worker's default (the machine's RAM)
    cache_dir: str | None  # None: the worker's default
    problem: str | None = None

    @property
    def device_flag(self) -> str:
        """rpcnode's --device value."""
        return "cpu" if self.device == "cpu" else f"cuda:{self.device.removeprefix('cuda')}"


@dataclass(frozen=True)
class WorkerLaunch:
    """One worker's outcome: running and answering (worker), or the one-line reason and its log's last lines."""

    plan: WorkerPlan
    worker: ClusterWorker | None
    error: str | None = None
    log: str | None = None  # its log file on the host, when it was started
    log_tail: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostLaunch:
    """One host's outcome: its workers, or the reason none could be tried (unreachable, no python...)."""

    host: Host
    workers: tuple[WorkerLaunch, ...] = ()
    error: str | None = None
    python: str | None = None  # the interpreter the workers run with

    @property
    def running(self) -> tuple[ClusterWorker, ...]:
        return tuple(w.worker for w in self.workers if w.worker is not None)


@dataclass(frozen=True)
class LaunchResults:
    """All hosts' outcomes in the order given."""

    hosts: tuple[HostLaunch, ...]

    @property
    def running(self) -> tuple[ClusterWorker, ...]:
        return tuple(w for h in self.hosts for w in h.running)

    def cluster(self) -> Cluster:
        return Cluster(self.running)


# ---- planning: pure -------------------------------------------------------------------------------------------

def worker_devices(host: Host, n_gpus: int) -> list[str]:
    """The devices that get a worker: by default each GPU and the CPU; else the host's list, in its order."""
    if host.devices == "all":
        return [f"cuda{i}" for i in range(n_gpus)] + ["cpu"]
    return list(dict.fromkeys(host.devices))


def plan_workers(host: Host, facts: HostFacts) -> list[WorkerPlan]:
    """The workers of one host from its probed facts, with the host's settings overriding the defaults."""
    devices = worker_devices(host, len(facts.gpus))
    n_gpu_workers = sum(d != "cpu" for d in devices)
    plans = []
    for d in devices:
        if d == "cpu":
            # each GPU worker keeps one core busy feeding its GPU; the CPU worker gets the others
            threads = host.threads or max(1, facts.cores - n_gpu_workers)
            plans.append(WorkerPlan("cpu", threads, host.mem_bytes, host.cache_dir))
            continue
        i = int(d.removeprefix("cuda"))
        if i >= len(facts.gpus):
            problem = f"no {d} on this host (nvidia-smi lists {len(facts.gpus)} GPU{'s' * (len(facts.gpus) != 1)})"
            plans.append(WorkerPlan(d, 1, None, host.cache_dir, problem))
        else:
            plans.append(WorkerPlan(d, 1, facts.gpus[i].mem_total_bytes, host.cache_dir))
    return plans


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def launch_script(python: str, plans: Iterable[WorkerPlan], tokens: Sequence[str], host: Host,
                  options: LaunchOptions, bind: str | None) -> str:
    """The text sent to the host's python on stdin: the script, then a call with its parameters and tokens."""
    workers = [{"device": p.device, "device_flag": p.device_flag, "threads": p.threads, "cache_dir": p.cache_dir,
                "mem_bytes": p.mem_bytes, "token": token} for p, token in zip(plans, tokens, strict=True)]
    params = {"python": python, "bind": bind, "files_dir": f"{options.remote_dir.rstrip('/')}/workers",
              "port_range": list(host.port_range), "start_timeout": options.start_timeout, "workers": workers}
    return f"{_SCRIPT.read_text()}\nmain(json.loads({json.dumps(params)!r}))\n"


# ---- I/O at the edge --------------------------------------------------------------------------------------------

async def _start(session: Session, python: str, plans: list[WorkerPlan], host: Host, options: LaunchOptions,
                 bind: str | None) -> tuple[str, list[dict[str, Any]], list[str]]:
    """Start the workers in one round trip: (bind address, one record per plan, their tokens)."""
    tokens = [secrets.token_urlsafe(32) for _ in plans]
    text = launch_script(python, plans, tokens, host, options, bind)
    r = await session.run(f"exec {shlex.quote(python)} -", input=text,
                          timeout=options.start_timeout + options.timeout)
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise HostError(f"launch script failed (exit {r.exit_status}): {last}") from None
    return out["addr"], out["workers"], tokens


def _hello(ep: str, token: str, timeout: float) -> tuple[int, int]:
    """Connect as the coordinator will, prove the token both ways, and read (memory bytes, threads)."""
    with Client.connect(ep, token, timeout=timeout) as client:
        info = client.device_info()
    return info.mem_total_bytes, info.threads


async def _check(host: Host, route: tuple[str, str | None] | None, plan: WorkerPlan, addr: str,
                 record: dict[str, Any], token: str, timeout: float) -> WorkerLaunch:
    """Whether a started worker answers hello from here; `route`: (ssh destination, known_hosts file) it was started
    through, None for this machine without SSH."""
    if record["error"]:
        tail = tuple(record["log_tail"])
        # the last log line is most often the reason (an exception, rpcnode's own error line)
        error = f"{record['error']}: {tail[-1].strip()}" if tail else record["error"]
        return WorkerLaunch(plan, None, error, record.get("log"), tail)
    ep = endpoint(addr, record["port"])
    try:
        mem, threads = await asyncio.wait_for(asyncio.to_thread(_hello, ep, token, timeout), timeout)
    except Exception as e:  # RPCError, or the time ran out
        why = f"timeout after {timeout:g} s" if isinstance(e, TimeoutError) else str(e)
        return WorkerLaunch(plan, None, f"started (pid {record['pid']}) but does not answer from here: {why}",
                            record["log"])
    worker = ClusterWorker(host=host.name, device=plan.device, endpoint=ep, token=token, mem_bytes=mem,
                           threads=threads, pid=record["pid"], log=record["log"], token_file=record["token_file"],
                           ssh=route[0] if route else None, known_hosts=route[1] if route else None,
                           identity=_absolute(host.identity) if route else host.identity)
    return WorkerLaunch(plan, worker, log=record["log"])


def _absolute(path: str | None) -> str | None:
    """A path that means the same from any directory: the cluster file is used from wherever `ikctl stop` runs."""
    return None if path is None else str(Path(path).expanduser().absolute())


def _known_hosts_of(transport: Transport) -> str | None:
    """The known_hosts file a transport verifies host keys against, recorded so that `stop` verifies the same way."""
    return str(transport.known_hosts_path.absolute()) if isinstance(transport, SSHTransport) else None


async def _launch(transport: Transport, host: Host, options: LaunchOptions) -> HostLaunch:
    local = isinstance(transport, LocalTransport)
    p = await probe(transport, host, options.timeout)
    venv_missing = options.install and host.venv is not None and (p.error or "").startswith("no python at")
    if venv_missing:
        p = await probe(transport, replace(host, venv=None), options.timeout)  # the python that creates the venv
    if p.facts is None:
        return HostLaunch(host, error=p.error)
    facts, python = p.facts, p.facts.python
    if not (facts.ikctl_importable or options.install):
        return HostLaunch(host, error=f"ikctl is not installed for {python} (--install installs it, or set "
                          "python/venv in the hosts file)")
    plans = plan_workers(host, facts)
    startable = [pl for pl in plans if pl.problem is None]
    session = await transport.connect(host)
    try:
        if venv_missing or not facts.ikctl_importable:
            python = await install(session, host, facts, options)
        addr, records, tokens = "", [], []
        if startable:
            addr, records, tokens = await _start(session, python, startable, host, options,
                                                 options.bind or ("127.0.0.1" if local else None))
        route = None if local else (host.ssh, _known_hosts_of(transport))
        checked = await asyncio.gather(*(_check(host, route, pl, addr, rec, tok, options.hello_timeout)
                                         for pl, rec, tok in zip(startable, records, tokens, strict=True)))
        # a worker the coordinator cannot reach is of no use, and no cluster file lists it: stop it now (stop_on
        # needs only the pid, port and token file)
        stray = [ClusterWorker(host=host.name, device=c.plan.device, endpoint=endpoint(addr, r["port"]), token="-",
                               mem_bytes=0, threads=0, pid=r["pid"], log=r["log"], token_file=r["token_file"],
                               ssh=None) for c, r in zip(checked, records, strict=True)
                 if c.worker is None and r.get("pid")]
        if stray:
            await stop_on(session, stray, options.timeout)
    finally:
        await session.close()
    outcomes = iter(checked)  # in the order of `startable`
    results = tuple(WorkerLaunch(pl, None, pl.problem) if pl.problem else next(outcomes) for pl in plans)
    return HostLaunch(host, results, python=python)


async def launch_host(transport: Transport, host: Host, options: LaunchOptions | None = None) -> HostLaunch:
    """Probe one host, install ikctl there if asked and needed, start its workers and check each answers hello
    with its token from here. Never raises: a failure of the whole host is its `error`, a worker's its own."""
    options = options or LaunchOptions()
    try:
        return await _launch(transport, host, options)
    except HostError as e:
        return HostLaunch(host, error=str(e))
    except Exception as e:  # one host's surprise must not take the others down
        return HostLaunch(host, error=describe_error(e, options.timeout))


async def launch_all(transport: Transport, hosts: Iterable[Host], options: LaunchOptions | None = None
                     ) -> LaunchResults:
    """Launch on every host concurrently, one coroutine each."""
    return LaunchResults(tuple(await asyncio.gather(*(launch_host(transport, h, options) for h in hosts))))


# ---- display ---------------------------------------------------------------------------------------------------

HEADER = ("HOST", "DEVICE", "ENDPOINT", "MEMORY", "THREADS", "STATUS")


def table_rows(results: LaunchResults) -> list[tuple[str, ...]]:
    """One row per worker (and one per host that got none), as the table and the TUI show them."""
    rows: list[tuple[str, ...]] = []
    for h in results.hosts:
        if h.error is not None:
            rows.append((h.host.name, "-", "-", "-", "-", h.error))
        for wl in h.workers:
            w = wl.worker
            if w is None:
                rows.append((h.host.name, wl.plan.device, "-", "-", "-", wl.error or "failed"))
            else:
                rows.append((h.host.name, w.device, w.endpoint, format_bytes(w.mem_bytes), str(w.threads), "ok"))
    return rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows])


def log_tails(results: LaunchResults) -> list[str]:
    """For each worker that failed with a log: a heading line and its last lines, indented."""
    out = []
    for h in results.hosts:
        for wl in h.workers:
            if wl.worker is None and wl.log_tail:
                out.append(f"{h.host.name} {wl.plan.device}: the end of {wl.log}:")
                out += [f"    {line}" for line in wl.log_tail]
    return out
