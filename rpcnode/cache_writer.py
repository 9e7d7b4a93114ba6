"""A cache entry streamed in chunks (an upload): written to a preallocated temp file, verified, then published."""

from __future__ import annotations

import contextlib
import mmap
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from rpcnode.cache import CacheError, DigestMismatch, DiskFailed, DiskFull
from rpcnode.cache_files import NO_SPACE, pwrite_all
from rpcnode.digest import PARALLEL_BYTES, byte_view, digest_of

if TYPE_CHECKING:
    from rpcnode.cache import TensorCache


class Writer:
    """One entry being streamed in: `write(offset, chunk)` in any order, then `commit()` or `abort()`.

    Nothing is visible under the digest until `commit` has verified the whole file. A writer dropped or
    left by an exception inside `with` is aborted; a process killed mid-write leaves only a temp file,
    which the next TensorCache opened on the root deletes.
    """

    def __init__(self, cache: TensorCache, digest: str, nbytes: int, tmp: Path, fd: int) -> None:
        self.digest = digest
        self.nbytes = nbytes
        self._cache = cache
        self._tmp = tmp
        self._fd = fd
        # Chunks arriving in order are hashed as they come, so commit need not read the file back.
        threads = blake3.blake3.AUTO if nbytes >= PARALLEL_BYTES else 1
        self._hasher: blake3.blake3 | None = blake3.blake3(max_threads=threads)
        self._hashed = 0
        self._cleanup = weakref.finalize(self, _abandon, fd, tmp, cache, nbytes)

    @property
    def active(self) -> bool:
        """Neither committed nor aborted yet."""
        return self._cleanup.alive

    def write(self, offset: int, chunk: Any) -> None:
        """Write `chunk` at `offset`; ValueError if it falls outside the entry, DiskFull if the disk is full."""
        self._require_open()
        mv = byte_view(chunk)
        if offset < 0 or offset + mv.nbytes > self.nbytes:
            raise ValueError(f"a chunk of {mv.nbytes} bytes at {offset} falls outside the {self.nbytes}-byte entry")
        try:
            pwrite_all(self._fd, mv, offset)
        except OSError as e:
            self.abort()
            if e.errno in NO_SPACE:
                raise DiskFull(f"no space left on the disk of {self._cache.root} while writing an entry") from e
            raise DiskFailed(self._cache.root, e) from e
        if self._hasher is not None and offset == self._hashed:
            self._hasher.update(mv)
            self._hashed += mv.nbytes
        else:
            self._hasher = None

    def commit(self) -> None:
        """Verify the whole entry against its digest and make it visible; DigestMismatch (and abort) if wrong."""
        self._require_open()
        try:
            os.fsync(self._fd)
            actual = self._digest()
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError) and e.errno in NO_SPACE:  # delayed allocation reports a full disk here
                raise DiskFull(f"no space left on the disk of {self._cache.root} while writing an entry") from e
            if isinstance(e, OSError):
                raise DiskFailed(self._cache.root, e) from e
            raise
        if actual != self.digest:
            self.abort()
            self._cache._count("rejected")
            raise DigestMismatch(f"the {self.nbytes} bytes streamed for {self.digest[:16]}… hash to something else")
        self._cleanup.detach()
        os.close(self._fd)
        try:
            self._cache._publish(self._tmp, self.digest, self.nbytes)
        finally:
            self._cache._release(self.nbytes)

    def abort(self) -> None:
        """Drop the partial entry; harmless if already committed or aborted."""
        self._cleanup()

    def _digest(self) -> str:
        if self._hasher is not None and self._hashed == self.nbytes:
            return self._hasher.hexdigest()
        if self.nbytes == 0:
            return digest_of(b"")
        with mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ) as mm:
            return digest_of(mm)

    def _require_open(self) -> None:
        if not self.active:
            raise CacheError(f"the writer for {self.digest[:16]}… was already committed or aborted")

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def _abandon(fd: int, tmp: Path, cache: TensorCache, nbytes: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    cache._discard_temp(tmp, nbytes)
