"""Transport to a host: a small connect/run/put interface, over asyncssh or on this machine."""

from __future__ import annotations

import asyncio
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import asyncssh

from engine.errors import IkctlError
from tui.inventory import Host


class HostError(IkctlError):
    """One host failed: the message is the one-line reason shown in its row."""


@dataclass(frozen=True)
class SSHOptions:
    """Limits and trust for every SSH connection; host keys are verified unless accept_new_host_keys."""

    connect_timeout: float = 5.0
    keepalive_interval: float = 15.0
    known_hosts: str | None = None  # None: ~/.ssh/known_hosts
    accept_new_host_keys: bool = False  # like ssh's StrictHostKeyChecking=accept-new: a changed key is refused


@dataclass(frozen=True)
class RunResult:
    exit_status: int
    stdout: str
    stderr: str


class Session(Protocol):
    """An open connection to one host."""

    async def run(self, command: str, *, input: str | None = None, timeout: float = 60.0) -> RunResult: ...
    async def put(self, local: Path, remote: str) -> None: ...
    async def close(self) -> None: ...


class Transport(Protocol):
    """Opens sessions; raises HostError with a one-line reason when a host cannot be reached."""

    async def connect(self, host: Host) -> Session: ...


def describe_error(exc: BaseException, timeout: float) -> str:
    """The one-line reason for a failed host; order matters, asyncssh's TimeoutError is an OSError."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return f"timeout after {timeout:g} s"
    if isinstance(exc, asyncssh.PermissionDenied):
        return "authentication failed"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return f"host key not verifiable: {exc.reason}"
    if isinstance(exc, asyncssh.KeyImportError):
        return f"cannot load the ssh key: {exc}"
    if isinstance(exc, asyncssh.Error):
        return f"ssh: {exc.reason}"
    if isinstance(exc, socket.gaierror):
        return f"unreachable: unknown host name ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return "unreachable: connection refused"
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"cannot read {exc.filename}: {exc.strerror}"
    if isinstance(exc, OSError):
        return f"unreachable: {(exc.strerror or str(exc) or type(exc).__name__).lower()}"
    return f"{type(exc).__name__}: {exc}"


class _HostKeyPolicy(asyncssh.SSHClient):
    """Asked only for a key that known_hosts does not trust: takes it when the host has no entry at all."""

    def __init__(self, known_hosts: Path, accept_new: bool) -> None:
        super().__init__()
        self._known_hosts, self._accept_new = known_hosts, accept_new
        self.new_key: tuple[str, int, asyncssh.SSHKey] | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        if not self._accept_new:
            return False
        if any(_read_known_hosts(self._known_hosts).match(host, addr, None if port == 22 else port)):
            return False  # the host is known with another key: possibly an attack, never overwrite
        self.new_key = (addr, port, key)
        return True


class SSHSession:
    """A Session over one asyncssh connection."""

    def __init__(self, conn: asyncssh.SSHClientConnection, timeout: float) -> None:
        self._conn, self._timeout = conn, timeout

    async def run(self, command: str, *, input: str | None = None, timeout: float = 60.0) -> RunResult:
        try:
            r = await self._conn.run(command, input=input, check=False, timeout=timeout)
        except asyncssh.TimeoutError:
            raise HostError(f"timeout after {timeout:g} s running {command.split()[0]}") from None
        except (OSError, asyncssh.Error) as e:
            raise HostError(describe_error(e, timeout)) from None
        return RunResult(r.exit_status if r.exit_status is not None else -1, str(r.stdout), str(r.stderr))

    async def put(self, local: Path, remote: str) -> None:
        try:
            async with self._conn.start_sftp_client() as sftp:
                await sftp.put(str(local), remote)
        except (OSError, asyncssh.Error) as e:
            raise HostError(f"sftp {local.name}: {describe_error(e, self._timeout)}") from None

    async def close(self) -> None:
        self._conn.close()
        await self._conn.wait_closed()


class SSHTransport:
    """Connects with asyncssh: keys from the agent, the usual files, or the host's identity."""

    def __init__(self, options: SSHOptions | None = None) -> None:
        self.options = options or SSHOptions()

    @property
    def known_hosts_path(self) -> Path:
        return Path(self.options.known_hosts or Path.home() / ".ssh" / "known_hosts").expanduser()

    async def connect(self, host: Host) -> Session:
        user, hostname, port = host.destination
        known = self.known_hosts_path
        policy = _HostKeyPolicy(known, self.options.accept_new_host_keys)
        kwargs: dict[str, object] = {}
        if user:
            kwargs["username"] = user
        if port:
            kwargs["port"] = port
        if host.identity:
            kwargs["client_keys"] = [str(Path(host.identity).expanduser())]
        try:
            conn, _ = await asyncssh.create_connection(
                lambda: policy, hostname, known_hosts=_read_known_hosts(known),
                connect_timeout=self.options.connect_timeout, keepalive_interval=self.options.keepalive_interval,
                **kwargs)
        except (OSError, asyncssh.Error) as e:
            raise HostError(describe_error(e, self.options.connect_timeout)) from None
        if policy.new_key is not None:
            _remember_key(known, *policy.new_key)
        return SSHSession(conn, self.options.connect_timeout)


@dataclass(frozen=True)
class NewHostKey:
    """A host's key as it presented it, for the user to compare and trust (nothing trusts it by being made)."""

    host: str
    port: int
    key: asyncssh.SSHKey

    @property
    def fingerprint(self) -> str:
        return self.key.get_fingerprint("sha256")

    @property
    def algorithm(self) -> str:
        return self.key.get_algorithm()


async def fetch_host_key(host: Host, options: SSHOptions) -> NewHostKey:
    """The key `host` presents, fetched without logging in; HostError when it cannot be reached."""
    _, hostname, port = host.destination
    try:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(hostname, port or 22), options.connect_timeout)
    except (OSError, asyncssh.Error, TimeoutError) as e:
        raise HostError(describe_error(e, options.connect_timeout)) from None
    if key is None:
        raise HostError("the host presented no key")
    return NewHostKey(hostname, port or 22, key)


def trust_host_key(known_hosts: Path, new: NewHostKey) -> None:
    """Record a key the user checked, as `--accept-new-host-keys` would: only for a host known_hosts has no entry
    for; a host known with another key may be an attack and is refused (HostError)."""
    if any(_read_known_hosts(known_hosts).match(new.host, "", None if new.port == 22 else new.port)):
        raise HostError(f"{known_hosts} already has a key for {new.host}: a changed key is never replaced here; "
                        "check it and edit the file")
    _remember_key(known_hosts, new.host, new.port, new.key)


def _read_known_hosts(path: Path) -> asyncssh.SSHKnownHosts:
    """The known_hosts file, or none trusted when it is missing (asyncssh would fall back to ~/.ssh)."""
    try:
        return asyncssh.read_known_hosts(str(path))
    except FileNotFoundError:
        return asyncssh.import_known_hosts("")


def _remember_key(known_hosts: Path, addr: str, port: int, key: asyncssh.SSHKey) -> None:
    """Append an accepted key as `[addr]:port key` so later connections verify against it."""
    pattern = addr if port == 22 else f"[{addr}]:{port}"
    line = f"{pattern} {key.export_public_key('openssh').decode().strip()}\n"
    known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with known_hosts.open("a") as f:
        f.write(line)


class LocalSession:
    """A Session on this machine: the embedded default runs the same code path as SSH."""

    async def run(self, command: str, *, input: str | None = None, timeout: float = 60.0) -> RunResult:
        proc = await asyncio.create_subprocess_shell(
            command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(input.encode() if input else b""), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise HostError(f"timeout after {timeout:g} s running {command.split()[0]}") from None
        return RunResult(proc.returncode if proc.returncode is not None else -1, out.decode(), err.decode())

    async def put(self, local: Path, remote: str) -> None:
        await asyncio.to_thread(shutil.copyfile, local, Path(remote).expanduser())

    async def close(self) -> None:
        return None


class LocalTransport:
    """Every host is this machine (no SSH)."""

    async def connect(self, host: Host) -> Session:
        return LocalSession()
