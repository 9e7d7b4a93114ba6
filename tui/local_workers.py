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

from engine.errors import IkctlError

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
        return f"RPC[{self.endpoint}]"

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


class LocalWorkers:
    """The app's own workers, logging into one temporary directory; all stopped by `close()` (and at exit)."""

    def __init__(self, threads: int | None = None, extra: Sequence[str] = ()) -> None:
        self.threads = threads or default_threads()
        self.extra = tuple(extra)
        self.directory = Path(tempfile.mkdtemp(prefix="ikctl-workers-"))
        self.workers: list[LocalWorker] = []
        atexit.register(self.close)  # never leave a worker behind, whatever ends the app

    @property
    def endpoints(self) -> list[str]:
        """Those still running (a stopped worker stays listed, with its log)."""
        return [w.endpoint for w in self.workers if w.running]

    def start(self, n: int = 1, timeout: float = START_TIMEOUT_S) -> list[LocalWorker]:
        """Start `n` workers at once and wait until each listens; on any failure none of them is kept."""
        spawned = [_spawn(self.directory, self.threads, self.extra) for _ in range(n)]
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
