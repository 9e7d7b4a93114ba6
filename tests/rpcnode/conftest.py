"""Real rpcnode worker processes on loopback for the distributed tests."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_LISTENING = re.compile(r"listening on ([0-9.]+):(\d+)")
START_TIMEOUT_S = 30.0


@dataclass
class WorkerProc:
    """One `python -m rpcnode` process; `endpoint` is host:port once it listens."""

    proc: subprocess.Popen[bytes]
    endpoint: str
    log: Path
    cache: Path

    @property
    def device(self) -> str:
        return f"RPC[{self.endpoint}]"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_worker(tmp: Path, *extra: str, cache: Path | None = None, port: int = 0,
                 source: Path | None = None) -> WorkerProc:
    """Start a worker on a free loopback port and wait until it logs its address. `source`: the directory whose
    rpcnode package runs (default this repository; another version's, to test across versions)."""
    cache = cache or tmp / "cache"
    log = tmp / f"worker-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "rpcnode", "--port", str(port), "-c", str(cache), "-t", "2", *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=source or Path(__file__).parents[2],
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        m = _LISTENING.search(log.read_text(errors="replace"))
        if m:
            return WorkerProc(proc, f"{m[1]}:{m[2]}", log, cache)
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode}: {log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the worker did not start in {START_TIMEOUT_S} s: {log.read_text()}")


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProc]]:
    """A factory of workers, each with its own cache dir unless given one; all killed at teardown."""
    started: list[WorkerProc] = []

    def make(*extra: str, cache: Path | None = None) -> WorkerProc:
        d = tmp_path / f"w{len(started)}"
        d.mkdir()
        w = start_worker(d, *extra, cache=cache)
        started.append(w)
        return w

    yield make
    for w in started:
        w.kill()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Digest records and worker caches under the test's tmp dir, never the user's."""
    monkeypatch.setenv("IKCTL_CACHE", str(tmp_path / "ikctl-cache"))
    monkeypatch.delenv("IKCTL_RPC_TOKEN", raising=False)
    monkeypatch.delenv("IKCTL_RPC_TOKEN_FILE", raising=False)


@contextlib.contextmanager
def tmpfs(mnt: Path, options: str) -> Iterator[Path]:
    """A real small filesystem mounted at mnt (a tmpfs; needs root), so writes past it fail as on a full disk."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode:
            subprocess.run(["umount", "-l", str(mnt)])


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB filesystem."""
    with tmpfs(tmp_path / "tiny", "size=1m") as mnt:
        yield mnt
