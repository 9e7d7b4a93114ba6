"""The Hosts view's model: the hosts with their probe results, the workers each runs, and launching and stopping
them (tui.launch / tui.stop over SSH; the app's own local workers for this machine). No Textual here."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from engine.cluster import Cluster, ClusterWorker, read_cluster, write_cluster
from engine.errors import IkctlError
from rpcnode.protocol import rpc_device
from tui.formatting import size_flag
from tui.inventory import Host
from tui.launch import launch_host
from tui.local_workers import LocalWorker, LocalWorkers
from tui.plan_flags import PlanFlags
from tui.probe import HostProbe, ProbeResults, probe_all, shell_path
from tui.ssh import (
    HostError,
    LocalTransport,
    NewHostKey,
    SSHTransport,
    Transport,
    describe_error,
    fetch_host_key,
    trust_host_key,
)
from tui.stop import stop_workers
from tui.telemetry import WorkerStatus

if TYPE_CHECKING:
    from tui.launch import LaunchOptions

LOCAL_NAME = "this machine"
LOG_LINES = 20


def local_host() -> Host:
    """The pseudo-host of the app's own workers, probed without SSH."""
    return Host(name=LOCAL_NAME, ssh="localhost")


@dataclass(frozen=True)
class WorkerEntry:
    """One worker on the board: launched over SSH (`launched`) or the app's own (`local`)."""

    host: str
    device: str
    endpoint: str
    pid: int | None
    log: str | None
    launched: ClusterWorker | None = None
    local: LocalWorker | None = None

    @classmethod
    def of_local(cls, w: LocalWorker) -> WorkerEntry:
        return cls(LOCAL_NAME, "cpu", w.endpoint, w.pid, str(w.log), local=w)

    @classmethod
    def of_launched(cls, w: ClusterWorker) -> WorkerEntry:
        return cls(w.host, w.device, w.endpoint, w.pid, w.log, launched=w)

    def state(self, status: WorkerStatus | None) -> str:
        """`running`, `exited (status 1)`, or from telemetry: `up, busy 12%` / `down: why`."""
        if self.local is not None and not self.local.running:
            return f"exited (status {self.local.proc.returncode})"
        if status is None:
            return "running" if self.local is not None else "launched"
        if not status.up:
            return f"down: {status.error}"
        busy = status.rates.busy
        return "up" if busy is None else f"up, busy {100 * busy:.0f}%"


def host_cells(host: Host, probe: HostProbe | None, n_workers: int, error: str | None = None) -> tuple[str, ...]:
    """HOST, STATUS, CPU, RAM GiB total/free, GPUS, WORKERS as the table shows them (narrow: 80 columns)."""
    if error is not None:
        return (host.name, error, "-", "-", "-", str(n_workers))
    if probe is None:
        return (host.name, "probing…", "", "", "", str(n_workers))
    f = probe.facts
    if f is None:
        return (host.name, probe.error or "failed", "-", "-", "-", str(n_workers))
    gpus = "; ".join(f"{g.name} {g.mem_total_bytes / 2**30:.0f}G" for g in f.gpus) or "-"
    ram = f"{f.mem_total_bytes / 2**30:.1f}/{f.mem_free_bytes / 2**30:.1f} GiB"
    return (host.name, "ok", f"{f.cores} {f.arch}", ram, gpus, str(n_workers))


class HostBoard:
    """Hosts (a hosts file's, and this machine when the app owns local workers) and their workers."""

    def __init__(self, hosts: Sequence[Host] = (), local: LocalWorkers | None = None,
                 transport: Transport | None = None, cluster_file: Path | None = None,
                 options: LaunchOptions | None = None) -> None:
        self.local = local
        self.options = options  # None: tui.launch's defaults
        self.hosts = ([local_host()] if local is not None else []) + list(hosts)
        self._transport = transport
        self.cluster_file = cluster_file  # lists the launched workers, so that `ikctl stop --cluster` finds them
        self.probes: dict[str, HostProbe] = {}
        self.errors: dict[str, str] = {}  # a host's last launch or stop failure
        self.launched: dict[str, list[ClusterWorker]] = {}
        self.no_ssh: set[str] = set()  # hosts of cluster-file workers launched without SSH (this machine)
        if cluster_file is not None and cluster_file.exists():
            self.add_cluster(read_cluster(cluster_file))

    def add_cluster(self, cluster: Cluster) -> None:
        """Show a cluster file's workers under their hosts (a host not listed yet is added)."""
        for w in cluster.workers:
            if not any(h.name == w.host for h in self.hosts):
                self.hosts.append(Host(name=w.host, ssh=w.ssh or "localhost", identity=w.identity))
                if w.ssh is None:
                    self.no_ssh.add(w.host)
            self.launched.setdefault(w.host, []).append(w)

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = SSHTransport()
        return self._transport

    def is_local(self, host: Host) -> bool:
        """The app's own workers' pseudo-host."""
        return self.local is not None and host.name == LOCAL_NAME

    def unknown_key(self, host: Host) -> bool:
        """Whether the host's last probe failed on a host key that known_hosts does not have."""
        probe = self.probes.get(host.name)
        return probe is not None and (probe.error or "").startswith("host key not verifiable")

    async def host_key(self, host: Host) -> NewHostKey:
        """The key the host presents, for the user to check (HostError when it cannot be had)."""
        transport = self.transport
        if not isinstance(transport, SSHTransport):
            raise HostError("no SSH here")
        return await fetch_host_key(host, transport.options)

    def trust(self, new: NewHostKey) -> Path:
        """Record a checked key in the known_hosts file this board verifies against; that file."""
        transport = self.transport
        if not isinstance(transport, SSHTransport):
            raise HostError("no SSH here")
        trust_host_key(transport.known_hosts_path, new)
        return transport.known_hosts_path

    def launched_workers(self) -> list[ClusterWorker]:
        """The workers this board launched (or read from its cluster file) and did not stop: they outlive the app."""
        return [w for ws in self.launched.values() for w in ws]

    async def stop_launched(self) -> list[tuple[WorkerEntry, str]]:
        """Stop every launched worker, each host at once: (worker, status or error) each."""
        hosts = [h for h in self.hosts if self.launched.get(h.name)]
        per_host = await asyncio.gather(*(self.stop(h) for h in hosts))
        return [r for results in per_host for r in results]

    def transport_for(self, host: Host) -> Transport:
        return LocalTransport() if self.is_local(host) or host.name in self.no_ssh else self.transport

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def workers(self, host: Host | None = None) -> list[WorkerEntry]:
        """The workers of one host (or all), in launch order."""
        out: list[WorkerEntry] = []
        for h in self.hosts if host is None else [host]:
            if self.is_local(h):
                assert self.local is not None
                out += [WorkerEntry.of_local(w) for w in self.local.workers]
            else:
                out += [WorkerEntry.of_launched(w) for w in self.launched.get(h.name, [])]
        return out

    # ---- I/O: each returns what happened and never raises for one host's trouble --------------------------------
    async def probe(self, timeout: float = 10.0) -> ProbeResults:
        here = [h for h in self.hosts if isinstance(self.transport_for(h), LocalTransport)]
        remote = [h for h in self.hosts if h not in here]
        # without SSH hosts, no SSH transport is made at all
        parts = await asyncio.gather(probe_all(LocalTransport(), here, timeout),
                                     *([probe_all(self.transport, remote, timeout)] if remote else []))
        results = ProbeResults(tuple(p for r in parts for p in r.probes))
        self.probes.update({p.host.name: p for p in results.probes})
        return results

    async def launch(self, host: Host) -> list[WorkerEntry]:
        """Start workers on `host` (one more local worker for this machine); the new ones, or HostError."""
        self.errors.pop(host.name, None)
        if self.is_local(host):
            assert self.local is not None
            try:
                started = await asyncio.to_thread(self.local.start, 1)
            except IkctlError as e:
                self.errors[host.name] = str(e)
                raise HostError(str(e)) from None
            return [WorkerEntry.of_local(w) for w in started]
        result = await launch_host(self.transport_for(host), host, self.options)
        failed = [f"{w.plan.device}: {w.error}" for w in result.workers if w.worker is None and w.error]
        if result.running:
            self.launched.setdefault(host.name, []).extend(result.running)
            self._record()
        if result.error or not result.running:
            self.errors[host.name] = result.error or "; ".join(failed) or "no worker started"
            raise HostError(self.errors[host.name])
        if failed:
            self.errors[host.name] = "; ".join(failed)
        return [WorkerEntry.of_launched(w) for w in result.running]

    async def stop(self, host: Host) -> list[tuple[WorkerEntry, str]]:
        """Stop every worker of `host`: (worker, status or error) each."""
        entries = [e for e in self.workers(host) if e.local is None or e.local.running]
        if self.is_local(host):
            assert self.local is not None
            local = self.local
            return [(e, await asyncio.to_thread(local.stop, e.local)) for e in entries if e.local is not None]
        results = await stop_workers(self.transport, [e.launched for e in entries if e.launched is not None])
        gone = {id(r.worker) for r in results if r.done}
        self.launched[host.name] = [w for w in self.launched.get(host.name, []) if id(w) not in gone]
        self._record()
        by_id = {id(r.worker): r for r in results}
        return [(e, by_id[id(e.launched)].error or by_id[id(e.launched)].status or "?") for e in entries
                if e.launched is not None]

    async def log_tail(self, entry: WorkerEntry, n: int = LOG_LINES) -> list[str]:
        """The last `n` lines of a worker's log: read here for a local worker, over SSH for a launched one."""
        if entry.local is not None:
            return entry.local.log_tail(n)
        if entry.launched is None or not entry.log:
            return []
        w = entry.launched
        transport = LocalTransport() if w.ssh is None else self.transport
        try:
            session = await transport.connect(Host(name=w.host, ssh=w.ssh or "localhost", identity=w.identity))
            try:
                r = await session.run(f"tail -n {int(n)} {shell_path(entry.log)}", timeout=10.0)
            finally:
                await session.close()
        except HostError as e:
            return [f"(cannot read {entry.log}: {e})"]
        except Exception as e:  # a surprise reading a log must not take the screen down
            return [f"(cannot read {entry.log}: {describe_error(e, 10.0)})"]
        return r.stdout.splitlines() or [f"({entry.log} is empty)" if r.exit_status == 0 else r.stderr.strip()]

    def _record(self) -> None:
        """Keep the cluster file listing exactly the workers this board launched and did not stop."""
        if self.cluster_file is None:
            return
        workers = tuple(w for ws in self.launched.values() for w in ws)
        if workers:
            write_cluster(self.cluster_file, Cluster(workers))
        else:
            self.cluster_file.unlink(missing_ok=True)


def with_workers(flags: PlanFlags, endpoints: Iterable[str], capacities: Mapping[str, int]) -> PlanFlags:
    """`flags` with these endpoints added to --rpc and their capacities to --device-mem (each once)."""
    rpc = [e.strip() for e in flags.rpc.split(",") if e.strip()]
    rpc += [ep for ep in endpoints if ep not in rpc]
    mem = flags.device_mem_items()
    named = {item.rpartition("=")[0] for item in mem}
    mem += [f"{dev}={size_flag(n)}" for dev, n in capacities.items() if dev not in named]
    return replace(flags, rpc=",".join(rpc), device_mem=" ".join(mem))


def without_workers(flags: PlanFlags, endpoints: Iterable[str]) -> PlanFlags:
    """`flags` with these endpoints taken out of --rpc and --device-mem (-ot rules naming them stay, and then say
    so in the plan's error)."""
    gone = set(endpoints)
    rpc = [e.strip() for e in flags.rpc.split(",") if e.strip() and e.strip() not in gone]
    devices = {rpc_device(ep) for ep in gone}
    mem = [item for item in flags.device_mem_items() if item.rpartition("=")[0] not in devices]
    return replace(flags, rpc=",".join(rpc), device_mem=" ".join(mem))
