"""Probing hosts: one remote script per host, all hosts at once, a per-host result that never raises."""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tui.inventory import Host
from tui.ssh import HostError, Transport, describe_error

_SCRIPT = Path(__file__).with_name("remote_probe.py")
_NO_PYTHON = 127  # the shell's "command not found"


@dataclass(frozen=True)
class Gpu:
    name: str
    mem_total_bytes: int
    mem_free_bytes: int


@dataclass(frozen=True)
class HostFacts:
    """What a host has, as its probe script reported it."""

    os: str
    arch: str
    cores: int
    mem_total_bytes: int
    mem_free_bytes: int
    gpus: tuple[Gpu, ...]
    python: str
    python_version: str
    ikctl_version: str | None
    ikctl_importable: bool

    @classmethod
    def from_json(cls, text: str) -> HostFacts:
        d = json.loads(text)
        return cls(**{**d, "gpus": tuple(Gpu(**g) for g in d["gpus"]), "mem_total_bytes": d["mem_total_bytes"] or 0,
                      "mem_free_bytes": d["mem_free_bytes"] or 0})


@dataclass(frozen=True)
class HostProbe:
    """One host's result: facts when reachable, else the one-line reason."""

    host: Host
    facts: HostFacts | None
    error: str | None
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.facts is not None


@dataclass(frozen=True)
class ProbeResults:
    """All hosts' results in the order given, with succeeded and failed views."""

    probes: tuple[HostProbe, ...]

    @property
    def succeeded(self) -> tuple[HostProbe, ...]:
        return tuple(p for p in self.probes if p.ok)

    @property
    def failed(self) -> tuple[HostProbe, ...]:
        return tuple(p for p in self.probes if not p.ok)


def shell_path(path: str) -> str:
    """`path` quoted for the remote shell, keeping a leading ~/ expandable there."""
    return f'"$HOME"/{shlex.quote(path[2:])}' if path.startswith("~/") else shlex.quote(path)


def probe_command(host: Host) -> str:
    """The shell command that runs the probe script (sent on stdin) with the host's python."""
    python = shell_path(host.python_path)
    return f"command -v {python} >/dev/null 2>&1 || exit {_NO_PYTHON}; exec {python} -"


async def _probe_facts(transport: Transport, host: Host, timeout: float) -> HostFacts:
    session = await transport.connect(host)
    try:
        r = await session.run(probe_command(host), input=_SCRIPT.read_text(), timeout=timeout)
    finally:
        await session.close()
    if r.exit_status == _NO_PYTHON:
        raise HostError(f"no {host.python_path} on PATH" if "/" not in host.python_path
                        else f"no python at {host.python_path}")
    if r.exit_status != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise HostError(f"probe script failed (exit {r.exit_status}): {last}")
    try:
        return HostFacts.from_json(r.stdout.strip().splitlines()[-1])
    except (ValueError, TypeError, KeyError, IndexError):
        raise HostError(f"probe script printed no facts: {r.stdout.strip()[:80]!r}") from None


async def probe(transport: Transport, host: Host, timeout: float = 10.0) -> HostProbe:
    """Probe one host within `timeout` seconds in all; every failure becomes the result's reason."""
    start = time.monotonic()
    try:
        facts = await asyncio.wait_for(_probe_facts(transport, host, timeout), timeout)
    except HostError as e:
        return HostProbe(host, None, str(e), time.monotonic() - start)
    except Exception as e:  # one host's surprise must not take the others down
        return HostProbe(host, None, describe_error(e, timeout), time.monotonic() - start)
    return HostProbe(host, facts, None, time.monotonic() - start)


async def probe_all(transport: Transport, hosts: Iterable[Host], timeout: float = 10.0) -> ProbeResults:
    """Probe every host concurrently, one coroutine each."""
    return ProbeResults(tuple(await asyncio.gather(*(probe(transport, h, timeout) for h in hosts))))
