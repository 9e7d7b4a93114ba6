"""A real `ikctl serve` subprocess on a free loopback port, for the server's end-to-end tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"listening on (http://[^ ]+)")
START_TIMEOUT_S = 120.0  # a first run compiles the kernels


@dataclass
class ServeProc:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def client(self, key: str | None = "unused", timeout: float = 60.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=timeout)

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=30, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=60, **kwargs)  # type: ignore[arg-type]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve_env(cache: Path) -> dict[str, str]:
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "IKCTL_CACHE": str(cache)}
    for name in ("IKCTL_RPC_TOKEN", "IKCTL_RPC_TOKEN_FILE"):
        env.pop(name, None)
    return env


def start_serve(tmp: Path, *args: str) -> ServeProc:
    """`python -m tui.cli serve --port 0 ARGS` from this checkout; returns once /health answers 200."""
    log = tmp / f"serve-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tui.cli", "serve", "--port", "0", *args], stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO, env=serve_env(tmp / "ikctl-cache"))
    deadline = time.monotonic() + START_TIMEOUT_S
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ikctl serve exited with {proc.returncode}: {log.read_text()}")
        m = _LISTENING.search(log.read_text(errors="replace"))
        url = url or (m[1] if m else None)
        if url:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return ServeProc(proc, url, log)
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"ikctl serve was not ready in {START_TIMEOUT_S} s: {log.read_text()}")
