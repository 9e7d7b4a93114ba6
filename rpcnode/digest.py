"""Content digests: BLAKE3-256 of a tensor's exact bytes, as 64 lowercase hex characters (engine.digests agrees)."""

from __future__ import annotations

import re
from typing import Any

import blake3

DIGEST_CHARS = 64
DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")
# Above this size blake3 hashes with all cores; below it the threads cost more than they save.
PARALLEL_BYTES = 16 << 20


def check_digest(digest: str) -> str:
    """The digest if well-formed; a ValueError otherwise (digests come off the wire and name files)."""
    if not isinstance(digest, str) or not DIGEST_PATTERN.fullmatch(digest):
        raise ValueError(f"not a digest (64 lowercase hex characters): {digest!r:.80}")
    return digest


def byte_view(data: Any) -> memoryview:
    """A flat unsigned-byte view of a C-contiguous buffer (bytes, memoryview, NumPy array) without copying."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if not mv.c_contiguous:
        raise ValueError("the data is not contiguous in memory")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def digest_of(data: Any) -> str:
    """BLAKE3 of the bytes as hex, using all cores for big buffers (blake3 releases the GIL)."""
    mv = byte_view(data)
    threads = blake3.blake3.AUTO if mv.nbytes >= PARALLEL_BYTES else 1
    return blake3.blake3(mv, max_threads=threads).hexdigest()
