"""Stopping launched workers: exactly those of a cluster file, by pid, after checking each pid is still that worker."""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from engine.cluster import ClusterWorker
from rpcnode.endpoint import Endpoint
from tui.inventory import Host
from tui.ssh import HostError, LocalTransport, Session, SSHTransport, Transport, describe_error

# A pid may have been reused since launch: only a process whose command line is rpcnode on that port is ours.
# A zombie's command line is empty, so a worker that has exited counts as gone whoever reaps it.
_STOP_FUNCTIONS = r"""
ours() { tr '\0' ' ' < /proc/$1/cmdline 2>/dev/null | grep -q -e "rpcnode.* --port $2 "; }
stop() {
  if ! ours "$1" "$2"; then echo "$1 not-running"
  else
    kill "$1" 2>/dev/null; i=0
    while ours "$1" "$2" && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    if ours "$1" "$2"; then kill -9 "$1" 2>/dev/null; echo "$1 killed"; else echo "$1 stopped"; fi
  fi
  rm -f "$3"
}
"""
STATUSES = {"stopped": "stopped", "killed": "killed (did not exit on SIGTERM in 5 s)",
            "not-running": "not running (already gone)"}


@dataclass(frozen=True)
class StopResult:
    """One worker: how it was stopped, or why it could not be."""

    worker: ClusterWorker
    status: str | None  # a value of STATUSES
    error: str | None = None

    @property
    def done(self) -> bool:
        """Whether the worker is certainly not running any more."""
        return self.error is None


def port_of(endpoint: str) -> int:
    return Endpoint(endpoint).port


def stop_command(workers: Iterable[ClusterWorker]) -> str:
    """The shell command stopping these workers of one host: one line `PID STATUS` each."""
    calls = "".join(f"stop {w.pid} {port_of(w.endpoint)} {shlex.quote(w.token_file)}\n" for w in workers)
    return _STOP_FUNCTIONS + calls


async def stop_on(session: Session, workers: Sequence[ClusterWorker], timeout: float = 30.0) -> list[StopResult]:
    """Stop workers of one host through an open session."""
    r = await session.run("sh -s", input=stop_command(workers), timeout=timeout)
    seen = dict(line.split(None, 1) for line in r.stdout.splitlines() if len(line.split()) == 2)
    out = []
    for w in workers:
        status = seen.get(str(w.pid))
        if status in STATUSES:
            out.append(StopResult(w, STATUSES[status]))
        else:
            last = (r.stderr.strip().splitlines() or [f"exit {r.exit_status}"])[-1]
            out.append(StopResult(w, None, f"stop script failed: {last}"))
    return out


async def _stop_host(transport: Transport, workers: list[ClusterWorker], timeout: float) -> list[StopResult]:
    first = workers[0]
    host = Host(name=first.host, ssh=first.ssh or "localhost", identity=first.identity)
    try:
        session = await transport.connect(host)
        try:
            return await stop_on(session, workers, timeout)
        finally:
            await session.close()
    except HostError as e:
        return [StopResult(w, None, str(e)) for w in workers]
    except Exception as e:  # one host's surprise must not stop the others
        return [StopResult(w, None, describe_error(e, timeout)) for w in workers]


def _verifying_with(transport: Transport, known_hosts: str | None) -> Transport:
    """`transport`, verifying host keys against the known_hosts file the workers were launched with, unless the
    transport names one itself (`ikctl stop --known-hosts`)."""
    if known_hosts is None or not isinstance(transport, SSHTransport) or transport.options.known_hosts is not None:
        return transport
    return SSHTransport(replace(transport.options, known_hosts=known_hosts))


async def stop_workers(transport: Transport, workers: Sequence[ClusterWorker], timeout: float = 30.0
                       ) -> list[StopResult]:
    """Stop every worker, one coroutine per host, results in the order given. Workers launched without SSH
    (`ssh` None) are stopped on this machine; the others through `transport`, reaching each host the way it was
    launched: the same destination (user, port), key and known_hosts file."""
    groups: dict[tuple[str | None, str | None, str | None], list[ClusterWorker]] = {}
    for w in workers:
        groups.setdefault((w.ssh, w.identity, w.known_hosts), []).append(w)
    local = LocalTransport()
    per_host = await asyncio.gather(*(_stop_host(local if ssh is None else _verifying_with(transport, known), ws,
                                                 timeout)
                                      for (ssh, _, known), ws in groups.items()))
    by_worker = {id(r.worker): r for results in per_host for r in results}
    return [by_worker[id(w)] for w in workers]


HEADER = ("HOST", "DEVICE", "ENDPOINT", "PID", "STATUS")


def table_rows(results: Sequence[StopResult]) -> list[tuple[str, ...]]:
    return [(r.worker.host, r.worker.device, r.worker.endpoint, str(r.worker.pid), r.error or r.status or "?")
            for r in results]
