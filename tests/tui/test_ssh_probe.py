"""Probing real sshd servers in network namespaces: facts, and each failure's one-line reason."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.tui.conftest import DROP_ADDR, SshdCluster
from tui.inventory import Host
from tui.probe import Gpu, ProbeResults, probe, probe_all
from tui.ssh import HostError, LocalTransport, RunResult, SSHOptions, SSHTransport


def _host(cluster: SshdCluster, i: int = 0, **changes: Any) -> Host:
    h = cluster.hosts[i]
    # the namespaces share this filesystem, so this interpreter is the remote python too
    return replace(Host(name=h.netns, ssh=h.ssh, identity=str(cluster.client_key), python=sys.executable), **changes)


def _probe_all(hosts: list[Host], known_hosts: Path, timeout: float = 10.0, accept_new: bool = False) -> ProbeResults:
    options = SSHOptions(connect_timeout=timeout, known_hosts=str(known_hosts), accept_new_host_keys=accept_new)
    return asyncio.run(probe_all(SSHTransport(options), hosts, timeout))


def test_probe_every_namespace(sshd_cluster: SshdCluster, known_hosts: Path) -> None:
    hosts = [_host(sshd_cluster, i) for i in range(len(sshd_cluster.hosts))]
    results = _probe_all(hosts, known_hosts)
    assert [p.error for p in results.probes] == [None] * len(hosts)
    for p in results.succeeded:
        f = p.facts
        assert f is not None
        assert f.cores >= 1 and f.mem_total_bytes > 0 and 0 < f.mem_free_bytes <= f.mem_total_bytes
        assert f.python_version == platform.python_version()
        assert f.ikctl_version == importlib.metadata.version("ikctl") and f.ikctl_importable
        assert f.os and f.arch == platform.machine()


def test_connection_refused(sshd_cluster: SshdCluster, known_hosts: Path) -> None:
    start = time.monotonic()
    results = _probe_all([_host(sshd_cluster, ssh=f"root@{sshd_cluster.hosts[0].addr}:2222")], known_hosts)
    assert results.probes[0].error == "unreachable: connection refused"
    assert time.monotonic() - start < 2.0


def test_dropped_packets_time_out(sshd_cluster: SshdCluster, known_hosts: Path) -> None:
    start = time.monotonic()
    results = _probe_all([_host(sshd_cluster, ssh=f"root@{DROP_ADDR}:22")], known_hosts, timeout=1.5)
    assert results.probes[0].error == "timeout after 1.5 s"
    assert time.monotonic() - start < 4.0


def test_wrong_key_fails_authentication(sshd_cluster: SshdCluster, known_hosts: Path) -> None:
    results = _probe_all([_host(sshd_cluster, identity=str(sshd_cluster.other_key))], known_hosts)
    assert results.probes[0].error == "authentication failed"


def test_unknown_host_key_refused_unless_accepted(sshd_cluster: SshdCluster, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    host = _host(sshd_cluster, 1)
    refused = _probe_all([host], empty).probes[0]
    assert refused.error is not None and refused.error.startswith("host key not verifiable: ")
    assert not empty.exists()
    assert _probe_all([host], empty, accept_new=True).probes[0].ok
    assert sshd_cluster.hosts[1].host_key_line.split()[2] in empty.read_text()
    assert _probe_all([host], empty).probes[0].ok  # recorded: trusted from now on


def test_changed_host_key_refused_even_with_accept(sshd_cluster: SshdCluster, tmp_path: Path) -> None:
    # host 1's address with host 0's key: what a man in the middle would look like
    wrong = tmp_path / "known_hosts"
    key = " ".join(sshd_cluster.hosts[0].host_key_line.split()[1:])
    wrong.write_text(f"{sshd_cluster.hosts[1].addr} {key}\n")
    p = _probe_all([_host(sshd_cluster, 1)], wrong, accept_new=True).probes[0]
    assert p.error is not None and p.error.startswith("host key not verifiable: ")


def test_missing_python(sshd_cluster: SshdCluster, known_hosts: Path) -> None:
    p = _probe_all([_host(sshd_cluster, python="python-nope")], known_hosts).probes[0]
    assert p.error == "no python-nope on PATH"
    p = _probe_all([_host(sshd_cluster, python="python3", venv="/nonexistent/venv")], known_hosts).probes[0]
    assert p.error == "no python at /nonexistent/venv/bin/python"


def test_bad_hosts_do_not_stop_the_others(sshd_cluster: SshdCluster, known_hosts: Path) -> None:
    hosts = [
        _host(sshd_cluster, 0, name="dropped", ssh=f"root@{DROP_ADDR}:22"),
        _host(sshd_cluster, 0),
        _host(sshd_cluster, 1, name="refused", ssh=f"root@{sshd_cluster.hosts[1].addr}:2222"),
        _host(sshd_cluster, 1, name="badkey", identity=str(sshd_cluster.other_key)),
        _host(sshd_cluster, 2),
    ]
    start = time.monotonic()
    results = _probe_all(hosts, known_hosts, timeout=2.0)
    assert time.monotonic() - start < 5.0  # concurrent: the slowest host, not the sum
    assert [p.host.name for p in results.succeeded] == [hosts[1].name, hosts[4].name]
    assert [p.error for p in results.failed] == ["timeout after 2 s", "unreachable: connection refused",
                                                 "authentication failed"]


def test_local_transport_runs_the_same_probe() -> None:
    p = asyncio.run(probe(LocalTransport(), Host(name="here", ssh="localhost", python=sys.executable)))
    assert p.ok and p.facts is not None and p.facts.python_version == platform.python_version()


def test_gpus_from_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a stand-in nvidia-smi printing what the real one prints for this query (no GPU on the test machine)
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559, 80123'\necho 'NVIDIA L4, 23034, 22000'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    p = asyncio.run(probe(LocalTransport(), Host(name="here", ssh="localhost", python=sys.executable)))
    assert p.facts is not None and p.facts.gpus == (Gpu("NVIDIA H100 80GB HBM3", 81559 << 20, 80123 << 20),
                                                    Gpu("NVIDIA L4", 23034 << 20, 22000 << 20))


@pytest.mark.parametrize("identity", ["/nonexistent/key"])
def test_unreadable_identity(sshd_cluster: SshdCluster, known_hosts: Path, identity: str) -> None:
    p = _probe_all([_host(sshd_cluster, identity=identity)], known_hosts).probes[0]
    assert p.error is not None and "/nonexistent/key" in p.error


def test_session_run_put_and_run_timeout(sshd_cluster: SshdCluster, known_hosts: Path, tmp_path: Path) -> None:
    async def scenario() -> tuple[RunResult, str, str]:
        session = await SSHTransport(SSHOptions(known_hosts=str(known_hosts))).connect(_host(sshd_cluster, 2))
        try:
            src = tmp_path / "payload.bin"
            src.write_bytes(b"\x00ikctl\xff" * 1000)
            await session.put(src, str(tmp_path / "copied.bin"))  # the namespaces share this filesystem
            echoed = await session.run("cat; echo done >&2", input="secret via stdin\n", timeout=5)
            with pytest.raises(HostError) as e:
                await session.run("sleep 5", timeout=0.5)
            return echoed, (tmp_path / "copied.bin").read_bytes().hex(), str(e.value)
        finally:
            await session.close()

    echoed, copied, timeout_error = asyncio.run(scenario())
    assert echoed == RunResult(0, "secret via stdin\n", "done\n")
    assert copied == (b"\x00ikctl\xff" * 1000).hex()
    assert timeout_error == "timeout after 0.5 s running sleep"
