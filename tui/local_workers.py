"""Workers on this machine that the app owns: `python -m rpcnode --port 0` subprocesses on loopback."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from engine.errors import IkctlError
from rpcnode.protocol import rpc_device

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
_LISTENING = re.compile(r"listening on ([0-9.]+):(\d+)")
_ROOT = Path(__file__).resolve().parents[1]  # so `-m rpcnode` finds this checkout's package, installed or not


def default_threads() -> int:
    """Half the cores each: two local workers and the coordinator share this machine."""
    return max(1, (os.cpu_count() or 2) // 2)


@dataclass
class LocalWorker:
    """One worker process; `endpoint` is 127.0.0.1:PORT once it listens. Its output goes to `log`."""

    proc: subprocess.Popen[bytes]
    endpoint: str
    log: Path
    threads: int

    @property
    def device(self) -> str:
        return rpc_device(self.endpoint)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> str:
        """SIGTERM, then SIGKILL after `timeout`; the status as `ikctl stop` words it."""
        if not self.running:
            return "not running (already gone)"
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
            return "stopped"
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return f"killed (did not exit on SIGTERM in {timeout:g} s)"

    def log_tail(self, n: int = 20) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return []


def ram_share(available_bytes: int, running: int, starting: int) -> int:
    """The memory each of `starting` new workers may claim: an equal share of the RAM available now among them and
    the `running` ones (without it, each would claim the whole machine's RAM)."""
    return available_bytes // max(1, running + starting)


def _spawn(directory: Path, threads: int, extra: Sequence[str]) -> tuple[subprocess.Popen[bytes], Path]:
    log = directory / f"worker-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "rpcnode", "--host", "127.0.0.1", "--port", "0", "-t", str(threads), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p)}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return proc, log


def _wait_listening(proc: subprocess.Popen[bytes], log: Path, threads: int, timeout: float) -> LocalWorker:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        m = _LISTENING.search(text)
        if m:
            return LocalWorker(proc, f"{m[1]}:{m[2]}", log, threads)
        if proc.poll() is not None:
            last = (text.strip().splitlines() or ["no output"])[-1]
            raise IkctlError(f"local worker exited with status {proc.returncode}: {last} (log: {log})")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise IkctlError(f"local worker did not listen within {timeout:g} s (log: {log})")
        time.sleep(0.05)


DIR_PREFIX = "ikctl-workers-"


def _owner_gone(directory: Path) -> bool:
    """Whether the process named in `ikctl-workers-PID-…` is gone (this user's directories only)."""
    pid = directory.name.removeprefix(DIR_PREFIX).partition("-")[0]
    if not pid.isdigit() or directory.stat().st_uid != os.getuid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _stop_orphans(directory: Path) -> None:
    """Kill the workers that still write to a dead owner's logs, then remove the directory. A process counts as one
    only when its stdout is that log file (its pid may have been reused since)."""
    for log in directory.glob("worker-*.log"):
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                if os.readlink(pid_dir / "fd" / "1") == str(log):
                    os.kill(int(pid_dir.name), signal.SIGKILL)
            except OSError:  # gone meanwhile, or not ours to read
                continue
    shutil.rmtree(directory, ignore_errors=True)


def sweep_stale(tmp: Path | None = None) -> list[Path]:
    """Remove what an app killed without warning (SIGKILL, a crash) left in the temp dir: its workers and their
    directory. Those of a running app are left alone. The removed directories."""
    removed = []
    for d in Path(tmp or tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        try:
            stale = d.is_dir() and _owner_gone(d)
        except OSError:
            continue
        if stale:
            _stop_orphans(d)
            removed.append(d)
    return removed


class LocalWorkers:
    """The app's own workers, logging into one temporary directory named with this process's pid; all stopped by
    `close()` (and at exit). What a killed app left behind is removed when the next one starts."""

    def __init__(self, threads: int | None = None, extra: Sequence[str] = ()) -> None:
        self.threads = threads or default_threads()
        self.extra = tuple(extra)
        sweep_stale()
        self.directory = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-"))
        self.workers: list[LocalWorker] = []
        atexit.register(self.close)  # never leave a worker behind, whatever ends the app

    @property
    def endpoints(self) -> list[str]:
        """Those still running (a stopped worker stays listed, with its log)."""
        return [w.endpoint for w in self.workers if w.running]

    def start(self, n: int = 1, timeout: float = START_TIMEOUT_S) -> list[LocalWorker]:
        """Start `n` workers at once and wait until each listens; on any failure none of them is kept."""
        extra = self.extra
        if "-m" not in extra and "--mem" not in extra:
            share = ram_share(psutil.virtual_memory().available, len(self.endpoints), n)
            extra = ("-m", str(share), *extra)
        spawned = [_spawn(self.directory, self.threads, extra) for _ in range(n)]
        started: list[LocalWorker] = []
        try:
            for proc, log in spawned:
                started.append(_wait_listening(proc, log, self.threads, timeout))
        except BaseException:
            for proc, _ in spawned:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            raise
        self.workers += started
        return started

    def stop(self, worker: LocalWorker) -> str:
        """Stop one worker; it stays listed, with its log, until close()."""
        return worker.stop()

    def find(self, endpoint: str) -> LocalWorker | None:
        return next((w for w in self.workers if w.endpoint == endpoint), None)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
        atexit.unregister(self.close)
