"""Calibrate (protocol 1.3): a worker's decode speed per GGML type, cached in its cache dir, and the link timings a
client takes with empty and payload-carrying requests. Real worker processes on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.block_decoders import F32, Q4_K, Q8_0
from engine.calibration import machine_id
from rpcnode import protocol as P
from rpcnode.client import Client, RPCError
from tests.rpcnode.conftest import WorkerProc, start_worker

UNKNOWN = 99  # no GGML type has this id
TYPES = [Q8_0, Q4_K, F32]


def _calibration(w: WorkerProc) -> dict:
    return json.loads((w.cache / "calibration.json").read_text())


def test_a_worker_measures_caches_and_refreshes(workers: Callable[..., WorkerProc]) -> None:
    w = workers()
    with Client.connect(w.endpoint) as c:
        first = c.calibrate(TYPES)
        assert not first.cached and first.threads == 2
        # the worker's machine, as this process names it (the same machine: they share its cores)
        assert first.machine == machine_id() and first.cores == os.cpu_count()
        assert len(first.gbps) == 3 and all(g > 0.1 for g in first.gbps)
        doc = _calibration(w)
        assert "threads=2" in doc["key"] and set(doc["gbps"]) == {str(t) for t in TYPES}

        t0 = time.perf_counter()
        again = c.calibrate([F32, Q8_0])  # any order, any subset: answered from the file
        assert time.perf_counter() - t0 < 0.1
        assert again.cached and again.gbps == [first.gbps[2], first.gbps[0]]

        fresh = c.calibrate([Q8_0], refresh=True)
        assert not fresh.cached and fresh.gbps[0] > 0.1
        assert _calibration(w)["gbps"][str(Q8_0)] == fresh.gbps[0]
        assert _calibration(w)["gbps"][str(Q4_K)] == first.gbps[1]  # the others kept

        assert c.calibrate([UNKNOWN, Q8_0]).gbps == [0.0, fresh.gbps[0]]  # a type no kernel runs: 0.0
        assert c.calibrate([UNKNOWN]).cached  # and that is remembered too


def test_the_cache_outlives_the_worker_and_a_corrupt_one_is_rewritten(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for content, cached in ((None, False), (None, True), (b"{\x00 not json", False)):
        if content is not None:
            (cache / "calibration.json").write_bytes(content)
        w = start_worker(tmp_path, cache=cache)
        try:
            with Client.connect(w.endpoint) as c:
                reply = c.calibrate([Q8_0])
            assert reply.cached == cached and reply.gbps[0] > 0.1
            assert _calibration(w)["gbps"] == {str(Q8_0): reply.gbps[0]}
        finally:
            w.kill()


def test_another_thread_count_measures_again(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for threads, cached in (("2", False), ("1", False), ("1", True)):
        w = start_worker(tmp_path, "-t", threads, cache=cache)  # the last -t wins
        try:
            with Client.connect(w.endpoint) as c:
                reply = c.calibrate([Q8_0])
            assert (reply.cached, reply.threads) == (cached, int(threads))
        finally:
            w.kill()


def test_bad_requests_are_refused_and_the_worker_goes_on(workers: Callable[..., WorkerProc]) -> None:
    w = workers("-m", "16MiB")  # less than the 32 MiB scratch matrix
    with Client.connect(w.endpoint) as c:
        with pytest.raises(RPCError, match="BAD_METADATA") as e:
            c.calibrate([Q8_0] * (P.MAX_CALIBRATE_TYPES + 1))
        assert e.value.code == P.ErrorCode.BAD_METADATA
        with pytest.raises(RPCError, match=r"OUT_OF_MEMORY: calibration needs 33554432 bytes of scratch, \d+ of "
                                           r"16777216 bytes free") as e:
            c.calibrate([Q8_0])
        assert e.value.code == P.ErrorCode.OUT_OF_MEMORY
        assert c.calibrate([UNKNOWN]).gbps == [0.0]  # nothing to measure: no scratch needed
        assert c.calibrate([]).gbps == []
        assert c.device_info().mem_free_bytes == 16 << 20  # the refused scratch was never charged
    assert not (w.cache / "calibration.json").exists() or str(Q8_0) not in _calibration(w)["gbps"]


def test_a_payload_is_read_and_dropped_not_charged(workers: Callable[..., WorkerProc]) -> None:
    """96 MiB is more than the receive pool (64 MiB) and -m together: stored or charged, it would be refused."""
    w = workers("-m", "16MiB")
    with Client.connect(w.endpoint) as c:
        before = c.telemetry().bytes_in
        reply = c._call(P.Calibrate(ggml_types=[]), P.CalibrateReply, bytes(96 << 20))
        assert reply.gbps == [] and not reply.cached
        assert c.telemetry().bytes_in - before > 96 << 20
        assert c.device_info().mem_free_bytes == 16 << 20


def test_measure_link_on_loopback(workers: Callable[..., WorkerProc]) -> None:
    w = workers()
    with Client.connect(w.endpoint) as c:
        rtt, bps = c.measure_link()
        assert 0 < rtt < 0.05
        assert bps > 50e6
        rtt, bps = c.measure_link(payload_bytes=0, rounds=1)  # no payload: nothing to divide by
        assert 0 < rtt < 0.05 and bps == 1e11


def test_an_empty_request_does_not_wait_for_a_measurement(workers: Callable[..., WorkerProc]) -> None:
    """The worker answers an empty Calibrate at once while another connection's calibration holds the compute
    lock (a round-trip timing must not include someone else's computation)."""
    w = workers()
    with Client.connect(w.endpoint) as busy, Client.connect(w.endpoint) as c:
        busy.calibrate([Q8_0])  # kernels loaded, so the measurement below takes its 0.15 s per type
        done: list[float] = []
        t = threading.Thread(target=lambda: (busy.calibrate([Q8_0, Q4_K, F32] * 3, refresh=True),
                                             done.append(time.perf_counter())))
        t.start()
        time.sleep(0.1)
        asked = time.perf_counter()
        assert c.calibrate([]).gbps == []
        answered = time.perf_counter()
        t.join()
        assert done and answered < done[0] - 0.1  # long before the measurement ended
        assert answered - asked < 0.1


def test_a_1_2_session_refuses_calibration_in_one_line(workers: Callable[..., WorkerProc]) -> None:
    w = workers()
    with Client.connect(w.endpoint) as c:
        assert c.minor == P.PROTOCOL_MINOR == 3
        c.minor = 2  # as with a 1.2 worker
        for call in (lambda: c.calibrate([Q8_0]), c.measure_link):
            with pytest.raises(RPCError, match=r"^RPC\[.*\]: the worker speaks protocol 1\.2; .* needs 1\.3 "
                                               r"\(update ikctl there\)$"):
                call()
        assert c.telemetry().tensors_held == 0  # the session goes on


@pytest.fixture(scope="module")
def worker_1_2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The source of the last commit whose worker speaks 1.2 (git archive of engine/ and rpcnode/)."""
    root = Path(__file__).parents[2]
    out = tmp_path_factory.mktemp("ikctl-1.2")

    def git(*args: str) -> bytes:
        return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True).stdout

    # the newest commit that added or removed the line: the one that moved to 1.3 (then its parent speaks 1.2),
    # or, before that is committed, the one that moved to 1.2
    commit = git("log", "-1", "--format=%H", "-S", "PROTOCOL_MINOR = 2", "--", "rpcnode/messages.py").decode().strip()
    if b"\nPROTOCOL_MINOR = 2" not in git("show", f"{commit}:rpcnode/messages.py"):
        commit += "^"
    archive = git("archive", commit, "engine", "rpcnode")
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    assert "PROTOCOL_MINOR = 2" in (out / "rpcnode" / "messages.py").read_text()
    return out


def test_a_1_3_client_works_with_a_1_2_worker(tmp_path: Path, worker_1_2: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(worker_1_2))
    w = start_worker(tmp_path, source=worker_1_2)
    try:
        with Client.connect(w.endpoint) as c:
            assert c.minor == 2
            assert c.device_info().threads == 2
            with pytest.raises(RPCError, match=r"speaks protocol 1\.2; calibration needs 1\.3 \(update ikctl there\)"):
                c.calibrate([Q8_0])
            assert c.telemetry().tensors_held == 0
    finally:
        w.kill()
