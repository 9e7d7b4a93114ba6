"""Measured decode speed of this machine's CPU kernels: GB/s of weight bytes read per GGML type, and its cache file.

Automatic placement divides the bytes each device reads per token by these figures, so they are measured the way
decode reads weights: one token (T = 1) through a matrix of that type, with the current thread count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from engine import kernels
from engine.atomic_file import write_atomic
from engine.block_decoders import BLOCK
from engine.simd_int8 import instruction_set
from engine.threads import compute_threads

log = logging.getLogger("ikctl.calibration")

# The scratch matrix: larger than most CPUs' last-level cache slice a core sees, so DRAM reads are timed, and small
# enough that a worker can charge it to -m while it exists.
MATRIX_BYTES = 32 << 20
COLUMNS = 4096  # a multiple of every type's block (256 values at most)
# Bump when the measurement changes, so that figures measured the old way are taken again.
METHOD_VERSION = 1


def supported(qtype: int) -> bool:
    return kernels.supports(qtype) and COLUMNS % BLOCK[int(qtype)][0] == 0


def matrix_shape(qtype: int) -> tuple[int, int]:
    """(R, C) of the scratch matrix of a type: C = COLUMNS, R rows of its encoding filling about MATRIX_BYTES."""
    return MATRIX_BYTES // kernels.row_bytes(qtype, COLUMNS), COLUMNS


def decode_gbps(qtype: int, seconds: float = 0.15) -> float:
    """GB/s of weight bytes one token's product reads through an all-zero matrix of this type (best of repeats for
    `seconds` after a warm-up call); 0.0 for a type the kernels do not support."""
    if not supported(qtype):
        return 0.0
    R, C = matrix_shape(qtype)
    nbytes = R * kernels.row_bytes(qtype, C)
    raw = np.empty(nbytes, np.uint8)
    raw.fill(0)  # written, not np.zeros: untouched calloc pages all map one zero page, which stays in cache
    x = np.linspace(-1.0, 1.0, C, dtype=np.float32)[None]
    # as a decode step runs: numba's current threads in the kernels, BLAS (F32 weights) on one
    with compute_threads(None, 1):
        kernels.matmul_t(raw, qtype, (R, C), x)  # warm-up: compiles or loads the kernel, faults the pages in
        best, end = float("inf"), time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            kernels.matmul_t(raw, qtype, (R, C), x)
            t1 = time.perf_counter()
            best = min(best, t1 - t0)
            if t1 >= end:
                break
    return nbytes / max(best, 1e-9) / 1e9


def calibrate(qtypes: Sequence[int], seconds: float = 0.15) -> dict[int, float]:
    """decode_gbps of each distinct type, `seconds` each."""
    return {int(t): decode_gbps(int(t), seconds) for t in dict.fromkeys(qtypes)}


def cpu_model() -> str:
    """The CPU's "model name" from /proc/cpuinfo; platform's names where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(threads: int) -> str:
    """What the figures depend on: the CPU, the thread count and the instruction set the kernels compiled to."""
    return f"v{METHOD_VERSION}; {cpu_model()}; threads={int(threads)}; {instruction_set()}"


class CalibrationCache:
    """A JSON file {"key": machine_key, "gbps": {"<type>": float}}; a stale key or a corrupt file reads as empty."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self, key: str) -> dict[int, float]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(doc.get("gbps"), dict):
                return {}
            out = {int(t): float(v) for t, v in doc["gbps"].items()}
        except (OSError, ValueError, TypeError):  # missing, unreadable, not JSON, not numbers: measure again
            return {}
        return {t: v for t, v in out.items() if v >= 0.0 and np.isfinite(v)}

    def figures(self, key: str, qtypes: Iterable[int], refresh: bool,
                measure: Callable[[list[int]], Mapping[int, float]]) -> tuple[dict[int, float], bool]:
        """The figures of each type under `key`: from the file, unless `refresh`, with those missing measured
        (`measure(types)`) and stored; and whether none had to be measured. A file that cannot be written costs a
        measurement next time, nothing else."""
        wanted = list(dict.fromkeys(int(t) for t in qtypes))
        known = {} if refresh else self.load(key)
        missing = [t for t in wanted if t not in known]
        if missing:
            known = {**known, **measure(missing)}
            try:
                known = self.store(key, known)
            except OSError as e:
                log.warning("cannot write %s: %s", self.path, e.strerror or e)
        return {t: known.get(t, 0.0) for t in wanted}, not missing

    def store(self, key: str, gbps: Mapping[int, float]) -> dict[int, float]:
        """Merge `gbps` into the figures kept under `key` and write the file atomically; the merged figures.
        OSError when the file cannot be written (the caller decides whether that matters)."""
        merged = {**self.load(key), **{int(t): float(v) for t, v in gbps.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"key": key, "gbps": {str(t): v for t, v in sorted(merged.items())}}
        write_atomic(self.path, json.dumps(doc, indent=1) + "\n")
        return merged


def machine_id() -> str:
    """This machine's identity as a short digest (of /etc/machine-id, else the host name): processes that report
    the same one share the CPU cores, whatever their network namespace."""
    try:
        ident = Path("/etc/machine-id").read_text().strip()
    except OSError:
        ident = ""
    return hashlib.sha256((ident or platform.node()).encode()).hexdigest()[:16]
