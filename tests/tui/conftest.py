"""Real sshd servers in network namespaces on 198.51.100.0/24 (a documentation range) for the SSH tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

N_HOSTS = 3
SSHD_START_S = 10.0
# routed into the first namespace, which does not forward: packets to it vanish, so connecting times out
DROP_ADDR = "198.51.100.200"
REPO = Path(__file__).resolve().parents[2]


def checkout_python(venv: Path) -> str:
    """A python in a new venv at `venv` that imports this checkout, and whatever this interpreter imports, from any
    directory (the remote shells start in $HOME).

    `venv --system-site-packages` is not enough: made from a venv's python, it inherits the *base* interpreter's
    packages, not the venv's. So every directory on this interpreter's path becomes a site directory of the new
    one (their .pth files, editable installs among them, are read too)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (venv_site_packages(venv) / "ikctl-checkout.pth").write_text(f"{REPO}\n{these_packages_pth_line()}")
    return str(venv / "bin" / "python")


def venv_site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


def these_packages_pth_line() -> str:
    """A .pth line that makes every directory on this interpreter's path a site directory of the one reading it."""
    dirs = [p for p in sys.path if p and Path(p).is_dir()]
    return f"import site; list(map(site.addsitedir, {dirs!r}))\n"


@dataclass(frozen=True)
class SshdHost:
    """One namespace with an sshd on addr:22 that accepts root with the cluster's client key."""

    netns: str
    addr: str
    host_key_line: str  # the server's public key, as a known_hosts line

    @property
    def ssh(self) -> str:
        return f"root@{self.addr}:22"


@dataclass(frozen=True)
class SshdCluster:
    hosts: tuple[SshdHost, ...]
    client_key: Path
    other_key: Path  # a valid key that no sshd authorizes

    def known_hosts_text(self) -> str:
        return "".join(h.host_key_line for h in self.hosts)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _why_no_namespaces() -> str | None:
    """None when namespaces and sshd are usable, else exactly what is missing."""
    if os.geteuid() != 0:
        return f"needs root to create network namespaces (running as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not on PATH (apt-get install iproute2)"
    if _sshd() is None:
        return "sshd is not installed (apt-get install openssh-server)"
    probe = f"ikprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sshd() -> str | None:
    return shutil.which("sshd", path=f"/usr/sbin:/usr/local/sbin:{os.environ.get('PATH', '')}")


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ikctl-test", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text()


SSHD_CONFIG = """\
ListenAddress {addr}:22
HostKey {dir}/host_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
Subsystem sftp internal-sftp
LogLevel VERBOSE
"""


def _wait_listening(netns: str, addr: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + SSHD_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd in {netns} exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            socket.create_connection((addr, 22), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd in {netns} not listening on {addr}:22 after {SSHD_START_S} s")


def _add_namespace(i: int, tag: str, work: Path, client_pub: str) -> tuple[SshdHost, subprocess.Popen[bytes]]:
    netns, root_if, ns_if = f"ikt{tag}n{i}", f"ikt{tag}r{i}", f"ikt{tag}p{i}"
    root_addr, addr = f"198.51.100.{4 * i + 1}", f"198.51.100.{4 * i + 2}"
    _ip("netns", "add", netns)
    _ip("link", "add", root_if, "type", "veth", "peer", "name", ns_if)
    _ip("link", "set", ns_if, "netns", netns)
    _ip("addr", "add", f"{root_addr}/30", "dev", root_if)
    _ip("link", "set", root_if, "up")
    _ip("-n", netns, "addr", "add", f"{addr}/30", "dev", ns_if)
    _ip("-n", netns, "link", "set", ns_if, "up")
    _ip("-n", netns, "link", "set", "lo", "up")
    d = work / netns
    d.mkdir()
    host_pub = _keygen(d / "host_key")
    (d / "authorized_keys").write_text(client_pub)
    (d / "sshd_config").write_text(SSHD_CONFIG.format(addr=addr, dir=d))
    log = d / "sshd.log"
    proc = subprocess.Popen(["ip", "netns", "exec", netns, str(_sshd()), "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    host = SshdHost(netns, addr, f"{addr} {' '.join(host_pub.split()[:2])}\n")
    return host, proc


def _teardown(tag: str, procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for i in range(N_HOSTS):
        # deleting the root end removes its peer, the addresses and DROP_ADDR's route with them
        subprocess.run(["ip", "link", "del", f"ikt{tag}r{i}"], capture_output=True)
        subprocess.run(["ip", "netns", "del", f"ikt{tag}n{i}"], capture_output=True)


@pytest.fixture(scope="session")
def sshd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdCluster]:
    """N_HOSTS namespaces joined to this one by veth pairs, each running a real sshd."""
    why = _why_no_namespaces()
    if why:
        pytest.skip(f"SSH cluster tests skipped: {why}")
    # sshd refuses to start without its privilege separation directory
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    work = tmp_path_factory.mktemp("sshd")
    work.chmod(0o755)
    tag = str(os.getpid() % 10000)  # interface names must stay within 15 characters
    client_pub = _keygen(work / "client_key")
    _keygen(work / "other_key")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        hosts = []
        for i in range(N_HOSTS):
            host, proc = _add_namespace(i, tag, work, client_pub)
            hosts.append(host)
            procs.append(proc)
        _ip("route", "add", f"{DROP_ADDR}/32", "via", hosts[0].addr)
        for host, proc in zip(hosts, procs, strict=True):
            _wait_listening(host.netns, host.addr, proc, work / host.netns / "sshd.log")
        yield SshdCluster(tuple(hosts), work / "client_key", work / "other_key")
    finally:
        _teardown(tag, procs)


@pytest.fixture
def known_hosts(tmp_path: Path, sshd_cluster: SshdCluster) -> Path:
    """A known_hosts file trusting every namespace's host key, fresh for each test."""
    path = tmp_path / "known_hosts"
    path.write_text(sshd_cluster.known_hosts_text())
    return path


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh IKCTL_CACHE (the embedded model, worker caches, TUI cluster file) and no token in the environment."""
    monkeypatch.setenv("IKCTL_CACHE", str(tmp_path / "ikctl-cache"))
    monkeypatch.delenv("IKCTL_RPC_TOKEN", raising=False)
    monkeypatch.delenv("IKCTL_RPC_TOKEN_FILE", raising=False)
    return tmp_path / "ikctl-cache"

