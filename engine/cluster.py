"""The cluster file `ikctl launch` writes: each worker's endpoint, token, memory, threads, pid, log and SSH route."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.atomic_file import write_atomic
from engine.errors import IkctlError
from engine.user_cache import cache_dir
from rpcnode.protocol import rpc_device

FORMAT_VERSION = 1


class ClusterFileError(IkctlError):
    """A cluster file that cannot be used; the message names the file and, where it applies, the worker and field."""


@dataclass(frozen=True)
class ClusterWorker:
    """One running rpcnode worker, with what `ikctl stop` needs to find it again."""

    host: str  # the host's name in the hosts file
    device: str  # what it owns on that host: "cpu", "cuda0", ...
    endpoint: str  # host:port the coordinator connects to
    token: str = field(repr=False)  # kept out of reprs, tracebacks and logs
    mem_bytes: int  # tensor bytes it may hold, as it reported
    threads: int
    pid: int
    log: str  # its log file on the host
    token_file: str  # its token file on the host (removed by `ikctl stop`)
    ssh: str | None  # the SSH destination it was launched through; None: this machine, without SSH
    identity: str | None = None  # the private key used for `ssh`
    known_hosts: str | None = None  # the known_hosts file its host key was verified against; None: ~/.ssh/known_hosts

    @property
    def device_name(self) -> str:
        """Its name in placement rules: RPC[host:port]."""
        return rpc_device(self.endpoint)


@dataclass(frozen=True)
class Cluster:
    """The workers of one `ikctl launch`, in the order launched."""

    workers: tuple[ClusterWorker, ...]

    def endpoints(self) -> list[str]:
        """host:port of every worker, as --rpc lists them."""
        return [w.endpoint for w in self.workers]

    def tokens(self) -> dict[str, str]:
        """Each endpoint's own token."""
        return {w.endpoint: w.token for w in self.workers}

    def capacities(self) -> dict[str, int]:
        """RPC[host:port] -> the bytes that worker may hold, for the planner."""
        return {w.device_name: w.mem_bytes for w in self.workers}


def default_cluster_path() -> Path:
    """Where `ikctl launch` writes without -o: the ikctl cache dir's cluster.json."""
    return cache_dir() / "cluster.json"


_TYPES: dict[str, tuple[type, ...]] = {
    "host": (str,), "device": (str,), "endpoint": (str,), "token": (str,), "mem_bytes": (int,), "threads": (int,),
    "pid": (int,), "log": (str,), "token_file": (str,), "ssh": (str, type(None)), "identity": (str, type(None)),
    "known_hosts": (str, type(None)),
}
_REQUIRED = [f.name for f in fields(ClusterWorker) if f.name not in ("identity", "known_hosts")]


def _worker(d: Any, where: str) -> ClusterWorker:
    if not isinstance(d, dict):
        raise ClusterFileError(f"{where}: expected an object, got {type(d).__name__}")
    for key in _REQUIRED:
        if key not in d:
            raise ClusterFileError(f"{where}: field '{key}' is missing")
    for key, value in d.items():
        types = _TYPES.get(key)
        if types is None:
            raise ClusterFileError(f"{where}: unknown field '{key}'")
        if not isinstance(value, types) or isinstance(value, bool):
            raise ClusterFileError(f"{where}: field '{key}': expected {' or '.join(t.__name__ for t in types)}, "
                                   f"got {value!r}")
    if not d["token"]:
        raise ClusterFileError(f"{where}: field 'token' is empty")
    return ClusterWorker(**d)


def parse_cluster(text: str, path: str = "<cluster>") -> Cluster:
    """A cluster file's text as a Cluster; every problem is one line naming the file, worker and field."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ClusterFileError(f"cluster file {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("workers"), list):
        raise ClusterFileError(f"cluster file {path}: expected an object with a 'workers' list")
    if doc.get("version") != FORMAT_VERSION:
        raise ClusterFileError(f"cluster file {path}: format version {doc.get('version')!r}, this ikctl reads "
                               f"{FORMAT_VERSION}; launch the workers again")
    workers = tuple(_worker(w, f"cluster file {path}: worker #{i}") for i, w in enumerate(doc["workers"], 1))
    if not workers:
        raise ClusterFileError(f"cluster file {path}: no workers")
    seen: set[str] = set()
    for w in workers:
        if w.endpoint in seen:
            raise ClusterFileError(f"cluster file {path}: endpoint {w.endpoint} is listed twice")
        seen.add(w.endpoint)
    return Cluster(workers)


def read_cluster(path: str | os.PathLike[str]) -> Cluster:
    """Read a cluster file; refused when others may read it, since it holds the workers' tokens (as ssh does)."""
    p = Path(path).expanduser()
    try:
        with p.open(encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read()
    except FileNotFoundError:
        raise ClusterFileError(f"cluster file {path} not found; `ikctl launch --hosts FILE -o {path}` "
                               "writes one") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ClusterFileError(f"cannot read cluster file {path}: {reason}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ClusterFileError(f"cluster file {path} is accessible by others (mode {stat.S_IMODE(mode):04o}) and "
                               f"holds worker tokens: chmod 600 {path}")
    return parse_cluster(text, str(path))


def format_cluster(cluster: Cluster) -> str:
    return json.dumps({"version": FORMAT_VERSION, "workers": [asdict(w) for w in cluster.workers]}, indent=1) + "\n"


def write_cluster(path: str | os.PathLike[str], cluster: Cluster) -> None:
    """Write atomically (temp file + rename) with mode 0600: a reader sees the old file or the new, whole."""
    p = Path(path).expanduser()
    try:
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(p, format_cluster(cluster))  # its temp file is created 0600, then renamed
    except OSError as e:
        raise ClusterFileError(f"cannot write cluster file {path}: {e.strerror}") from None

