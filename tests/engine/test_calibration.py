"""engine.calibration: measured decode speed per GGML type, and its cache file (key, staleness, corruption)."""

from __future__ import annotations

import json
from pathlib import Path

from engine import calibration, kernels
from engine.block_decoders import F32, Q4_K, Q8_0

UNKNOWN = 99  # no GGML type has this id


def test_decode_speed_of_q8_0_is_measured() -> None:
    gbps = calibration.decode_gbps(Q8_0, seconds=0.05)
    assert 0.1 < gbps < 10_000  # bytes over seconds, in GB/s: any real CPU lands in here


def test_the_scratch_matrix_is_about_matrix_bytes_of_whole_rows() -> None:
    for qtype in (F32, Q8_0, Q4_K):
        R, C = calibration.matrix_shape(qtype)
        nbytes = R * kernels.row_bytes(qtype, C)
        assert calibration.MATRIX_BYTES * 0.99 < nbytes <= calibration.MATRIX_BYTES


def test_a_type_the_kernels_cannot_run_is_zero() -> None:
    assert calibration.decode_gbps(UNKNOWN) == 0.0
    assert calibration.calibrate([UNKNOWN, UNKNOWN]) == {UNKNOWN: 0.0}


def test_the_key_names_the_cpu_the_threads_and_the_instruction_set() -> None:
    k1, k2 = calibration.machine_key(1), calibration.machine_key(2)
    assert k1 != k2 and "threads=2" in k2
    assert calibration.cpu_model() in k1


def test_the_cache_keeps_figures_under_their_key_and_merges(tmp_path: Path) -> None:
    cache = calibration.CalibrationCache(tmp_path / "sub" / "calibration.json")
    key = calibration.machine_key(4)
    assert cache.load(key) == {}  # no file yet
    cache.store(key, {Q8_0: 12.5})
    assert cache.store(key, {Q4_K: 9.0}) == {Q8_0: 12.5, Q4_K: 9.0}
    assert cache.load(key) == {Q8_0: 12.5, Q4_K: 9.0}
    doc = json.loads(cache.path.read_text())
    assert doc == {"key": key, "gbps": {str(Q8_0): 12.5, str(Q4_K): 9.0}}
    assert not [p for p in cache.path.parent.iterdir() if p.name != "calibration.json"]  # no temp file left


def test_a_stale_key_is_ignored_and_replaced(tmp_path: Path) -> None:
    cache = calibration.CalibrationCache(tmp_path / "calibration.json")
    cache.store(calibration.machine_key(1), {Q8_0: 3.0})
    key = calibration.machine_key(2)  # another thread count: the figures do not hold
    assert cache.load(key) == {}
    assert cache.store(key, {Q4_K: 5.0}) == {Q4_K: 5.0}  # the stale figures are not merged in
    assert cache.load(calibration.machine_key(1)) == {}


def test_a_corrupt_file_reads_as_empty(tmp_path: Path) -> None:
    cache = calibration.CalibrationCache(tmp_path / "calibration.json")
    key = calibration.machine_key(2)
    bad = [b"\x00\xff garbage", b"[1, 2]", b'{"key": "%s", "gbps": {"8": "fast"}}' % key.encode(),
           b'{"key": "%s", "gbps": {"x": 1.0}}' % key.encode(), b'{"key": "%s", "gbps": [1]}' % key.encode(),
           b'{"key": "%s", "gbps": {"8": -1.0}}' % key.encode(), b'{"key": "%s"' % key.encode()]
    for content in bad:
        cache.path.write_bytes(content)
        assert cache.load(key) == {}, content
    assert cache.store(key, {Q8_0: 1.5}) == {Q8_0: 1.5}
    assert cache.load(key) == {Q8_0: 1.5}
