"""The worker's content-addressed tensor cache on local disk, keyed by the BLAKE3 digest of a tensor's bytes."""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import blake3
import numpy as np

from rpcnode.cache_files import (
    NO_SPACE,
    FileMaps,
    Ident,
    empty_array,
    file_ident,
    fsync_dir,
    map_file,
    pwrite_all,
    reserve,
    scan_entries,
    temp_path,
)
from rpcnode.digest import PARALLEL_BYTES, byte_view, check_digest, digest_of
from rpcnode.errors import IkctlError

if TYPE_CHECKING:
    from rpcnode.model_index import ModelIndex


_T = TypeVar("_T")


class CacheError(IkctlError):
    """The cache refused an operation; the message says why. The tensor itself is still usable from memory."""


class DigestMismatch(CacheError):
    """The bytes do not hash to the digest they were offered under; nothing was stored."""


class CacheFull(CacheError):
    """No room: the entry exceeds the limit, entries in use fill it, or the disk is full. Nothing was stored."""


class DiskFull(CacheFull):
    """The disk (or the user's quota) under the cache is full, even after evicting what could be. Nothing was
    stored."""


class DiskFailed(CacheError):
    """The disk under the cache failed otherwise (an I/O error, a read-only filesystem, a file too large for
    it). Nothing was stored."""

    def __init__(self, root: Path, e: OSError) -> None:
        super().__init__(f"the disk under {root} failed while writing an entry ({e.strerror or e}); check it, or "
                         "give the worker another cache directory (-c)")


@dataclass(frozen=True)
class CacheStats:
    """Counters since this TensorCache was opened; entries/bytes/in_use are the current state."""

    entries: int
    bytes: int
    hits: int
    misses: int
    evictions: int
    corrupt: int  # entries that failed verification on get and were deleted
    rejected: int  # put/commit bytes that did not match their digest
    local_hits: int  # tensors served from a local GGUF under --models
    in_use: int  # entries mapped by this process, never evicted


@dataclass
class _Entry:
    size: int
    last_used: float


class TensorCache:
    """Entries are `<root>/<aa>/<digest>` files holding exactly the bytes that hash to `digest`.

    Writes are atomic (temp file beside the entry, fsync, rename) and verified before the rename; an entry not
    written by this process is verified on its first `get` here, and a corrupt one is deleted and reported as
    a miss. Every `get` checks the file's stat against the one taken when it was verified (see file_ident): an
    entry changed on disk since, even one still mapped, is hashed again before it is handed out.
    The total size stays under `limit_bytes` by evicting the least recently used entries, except those this
    process has mapped (arrays returned by `get` that are still alive). Uses are ordered in memory; on disk an
    entry's mtime is the last time a process verified (or wrote) it, which orders entries after a restart.
    Thread-safe. Several processes may share a root: files appear and vanish atomically, and a size check
    rescans the directory.
    """

    def __init__(self, root: str | os.PathLike[str], limit_bytes: int, models: ModelIndex | None = None) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"the cache limit must be positive, got {limit_bytes}")
        self.root = Path(root)
        self.limit_bytes = int(limit_bytes)
        self.models = models
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._live: dict[str, tuple[Ident, weakref.ref[mmap.mmap]]] = {}  # the map `get` hands out, of that file
        self._verified: dict[str, Ident] = {}  # the file as it was when its bytes hashed to the digest
        self._reserved = 0
        self._counts = dict.fromkeys(("hits", "misses", "evictions", "corrupt", "rejected", "local_hits"), 0)
        self._local = models.maps if models is not None else FileMaps()
        self._rescan(clean_temps=True)

    # ---- lookups ---------------------------------------------------------------------------------------

    def path(self, digest: str) -> Path:
        """Where the entry for `digest` lives (whether or not it exists)."""
        check_digest(digest)
        return self.root / digest[:2] / digest

    def has(self, digest: str) -> bool:
        """Whether an entry file exists; unverified (use `get` to answer an offer)."""
        return self.path(digest).is_file()

    def get(self, digest: str) -> np.ndarray | None:
        """The entry's bytes as a read-only uint8 array mapped from disk, or None on a miss.

        A corrupt or truncated entry is deleted and counted as a miss, so the caller fetches the bytes again.
        While the array (or any view of it) is alive the entry is in use and is not evicted.
        """
        arr = self._open_verified(digest, self.path(digest))
        if arr is None:
            self._count("misses")
            return None
        self._touch(digest, arr.nbytes)
        self._count("hits")
        return arr

    def lookup(self, digest: str, nbytes: int | None = None, name: str | None = None, part_of: str | None = None,
               part_offset: int = 0) -> np.ndarray | None:
        """`get`, else the same bytes from a local GGUF file under --models (never copied into the cache): the
        tensor itself, or with part_of the nbytes at part_offset of the tensor whose digest that is (a range of a
        split expert tensor)."""
        arr = self.get(digest)
        if arr is not None or self.models is None:
            return arr
        if part_of is not None:
            return self._lookup_part(digest, nbytes, name, part_of, part_offset)
        for _ in range(2):  # a second search after a stale record was dropped hashes the tensors afresh
            found = self.models.find(digest, nbytes=nbytes, name=name)
            if found is None:
                return None
            arr = self.link_or_read_from(found.path, found.offset, found.nbytes, digest)
            if arr is not None:
                return arr
            self.models.forget(found.path)
        return None

    def _lookup_part(self, digest: str, nbytes: int | None, name: str | None, part_of: str,
                     part_offset: int) -> np.ndarray | None:
        """The range of a local tensor, verified against its own digest like any other bytes; None (upload it)
        when the tensor is not here or the range is not inside it or not what was offered."""
        assert self.models is not None
        found = self.models.find(part_of, name=name)
        if found is None or nbytes is None or part_offset + nbytes > found.nbytes:
            return None
        return self.link_or_read_from(found.path, found.offset + part_offset, nbytes, digest)

    def link_or_read_from(
        self, path: str | os.PathLike[str], offset: int, nbytes: int, digest: str
    ) -> np.ndarray | None:
        """A read-only view of `nbytes` bytes at `offset` of a local file if they hash to `digest`, else None.

        The bytes are memory-mapped where they are, not copied into the cache: a local model would otherwise
        take its size twice on the disk. They are verified on first use in this process.
        """
        check_digest(digest)
        arr = self._local.verified_view(path, offset, nbytes, digest)
        if arr is not None:
            self._count("local_hits")
        return arr

    def stats(self) -> CacheStats:
        """Counters since this object was made, and the entries it knows of (rescanned when space is short)."""
        with self._lock:
            in_use = sum(1 for d in self._entries if self._in_use(d))
            return CacheStats(entries=len(self._entries), bytes=self._total(), in_use=in_use, **self._counts)

    # ---- writes ----------------------------------------------------------------------------------------

    def put(self, digest: str, data: Any) -> None:
        """Store `data` under `digest` after checking that it hashes to it.

        DigestMismatch if it does not; CacheFull if it cannot fit (the entry exceeds the limit, entries in use
        fill it, or the disk is full even after evicting). Either way nothing is left on disk.
        """
        path = self.path(digest)
        mv = byte_view(data)
        self._check_size(mv.nbytes)
        if digest_of(mv) != digest:
            self._count("rejected")
            raise DigestMismatch(f"the {mv.nbytes} bytes offered for {digest[:16]}… hash to something else")
        if self._verified_file(digest, path):  # content-addressed: it already holds these bytes
            self._touch(digest, mv.nbytes)
            return
        self._make_room(mv.nbytes)
        try:
            tmp = self._write_temp(digest, mv.nbytes, lambda fd: pwrite_all(fd, mv, 0))
            self._publish(tmp, digest, mv.nbytes)
        finally:
            self._release(mv.nbytes)

    def begin(self, digest: str, nbytes: int) -> Writer:
        """A writer for an entry streamed in chunks; its space is reserved (on the disk too) until commit/abort."""
        path = self.path(digest)
        self._check_size(nbytes)
        self._make_room(nbytes)

        def open_temp() -> tuple[Path, int]:  # a full disk may refuse the directory or the inode already
            path.parent.mkdir(exist_ok=True)
            tmp = temp_path(self.root, digest)
            return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

        try:
            tmp, fd = self._retry_no_space(nbytes, open_temp)
        except BaseException:
            self._release(nbytes)
            raise
        writer = Writer(self, digest, nbytes, tmp, fd)
        try:
            self._retry_no_space(nbytes, lambda: reserve(fd, nbytes))
        except BaseException:
            writer.abort()
            raise
        return writer

    # ---- internals: reading ----------------------------------------------------------------------------

    def _open_verified(self, digest: str, path: Path) -> np.ndarray | None:
        """The entry's bytes if the file still is the one verified here, else hashed again (None if corrupt).

        A held tensor is a shared map of its file, so bytes written into the file show in the map: the stat,
        not the map's age, decides whether the hash still holds."""
        try:
            ident = file_ident(path.stat())
        except FileNotFoundError:  # evicted by another process sharing the root; its live map is not checkable
            self._forget(digest)
            return None
        except OSError:
            return self._corrupt(digest, path, None)
        with self._lock:
            trusted = self._verified.get(digest) == ident
            live = self._live.get(digest)
            mm = live[1]() if trusted and live is not None and live[0] == ident else None
        if mm is not None:
            return np.frombuffer(mm, dtype=np.uint8)
        try:
            # About to hash: mark the use on disk first, so the stat recorded includes that change of ours.
            st, mm = map_file(path, touch=not trusted)
        except FileNotFoundError:
            self._forget(digest)
            return None
        except (OSError, ValueError):
            return self._corrupt(digest, path, None)
        ident = file_ident(st)
        arr = empty_array() if mm is None else np.frombuffer(mm, dtype=np.uint8)
        # Hash the map itself, not a separate read: these are exactly the bytes the caller will use. A write
        # after the stat above changes ctime, so the next get sees it.
        if self._verified.get(digest) != ident and digest_of(arr) != digest:
            return self._corrupt(digest, path, ident)
        with self._lock:
            self._verified[digest] = ident
            if mm is not None:
                self._live[digest] = (ident, weakref.ref(mm))
        return arr

    def _corrupt(self, digest: str, path: Path, ident: Ident | None) -> None:
        # Delete only the file that failed: a concurrent writer may have just renamed a good one into place.
        with contextlib.suppress(OSError):
            if ident is None or file_ident(path.stat()) == ident:
                path.unlink()
        self._count("corrupt")
        self._forget(digest)

    def _verified_file(self, digest: str, path: Path) -> bool:
        """Whether the entry file is the one verified in this process, unchanged since (else it is rewritten)."""
        try:
            st = path.stat()
        except OSError:
            return False
        return self._verified.get(digest) == file_ident(st)

    def _touch(self, digest: str, size: int) -> None:
        # In memory only: setting the file's times would change its ctime, which is how changes are detected.
        with self._lock:
            self._entries[digest] = _Entry(size, time.time())

    # ---- internals: writing ----------------------------------------------------------------------------

    def _check_size(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"a negative size: {nbytes}")
        if nbytes > self.limit_bytes:
            raise CacheFull(f"an entry of {nbytes} bytes exceeds the cache limit of {self.limit_bytes} bytes")

    def _write_temp(self, digest: str, nbytes: int, fill: Callable[[int], None]) -> Path:
        """A complete, fsynced temp file beside the entry; on a full disk, evict and try once more."""

        def attempt() -> Path:
            tmp = temp_path(self.root, digest)
            tmp.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                fill(fd)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
            os.close(fd)
            return tmp

        return self._retry_no_space(nbytes, attempt)

    def _retry_no_space(self, nbytes: int, attempt: Callable[[], _T]) -> _T:
        for tries_left in (1, 0):
            try:
                return attempt()
            except OSError as e:
                if e.errno not in NO_SPACE:
                    raise DiskFailed(self.root, e) from e
                if not tries_left or not self._evict_bytes(nbytes):
                    raise DiskFull(f"no space left on the disk of {self.root} for an entry of {nbytes} bytes") from e
        raise AssertionError("unreachable")

    def _publish(self, tmp: Path, digest: str, nbytes: int) -> None:
        path = self.path(digest)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
        now = time.time()
        ident = None
        with contextlib.suppress(OSError):
            os.utime(path, (now, now))  # an exact time: the kernel's own is coarse, and LRU order needs ties broken
            ident = file_ident(path.stat())  # after our utime: the next change to the file is someone else's
        with self._lock:
            # These bytes were verified on their way in, so the usual upload-then-load needs no second hash.
            if ident is None:
                self._verified.pop(digest, None)
            else:
                self._verified[digest] = ident
            self._entries[digest] = _Entry(nbytes, now)

    def _discard_temp(self, tmp: Path, nbytes: int) -> None:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        self._release(nbytes)

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes

    # ---- internals: size and eviction ------------------------------------------------------------------

    def _make_room(self, nbytes: int) -> None:
        """Reserve `nbytes` under the limit, evicting unused entries oldest first; CacheFull if impossible."""
        with self._lock:
            if self._total() + self._reserved + nbytes > self.limit_bytes:
                self._rescan()  # other processes sharing the root may have added or removed entries
            for digest in self._lru_order():
                if self._total() + self._reserved + nbytes <= self.limit_bytes:
                    break
                self._evict(digest)
            used = self._total() + self._reserved
            if used + nbytes > self.limit_bytes:
                raise CacheFull(f"no room for {nbytes} bytes: {used} of the {self.limit_bytes}-byte limit are in use "
                                "by loaded tensors or writes in progress; raise the cache limit")
            self._reserved += nbytes

    def _evict_bytes(self, nbytes: int) -> bool:
        """Evict unused entries, oldest first, until `nbytes` are freed; whether anything was."""
        freed = 0
        with self._lock:
            for digest in self._lru_order():
                if freed >= nbytes:
                    break
                freed += self._entries[digest].size
                self._evict(digest)
        return freed > 0

    def _lru_order(self) -> list[str]:
        unused = [d for d in self._entries if not self._in_use(d)]
        return sorted(unused, key=lambda d: self._entries[d].last_used)

    def _evict(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()
        self._forget(digest)
        self._counts["evictions"] += 1

    def _in_use(self, digest: str) -> bool:
        live = self._live.get(digest)
        return live is not None and live[1]() is not None

    def _forget(self, digest: str) -> None:
        with self._lock:
            self._entries.pop(digest, None)
            self._verified.pop(digest, None)
            self._live.pop(digest, None)

    def _total(self) -> int:
        return sum(e.size for e in self._entries.values())

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _rescan(self, clean_temps: bool = False) -> None:
        """Rebuild the entry list from the directory; optionally delete temp files of writers that died."""
        scanned = scan_entries(self.root, clean_temps)
        with self._lock:
            # uses in this process are newer than the files' mtimes (see _touch)
            known = self._entries
            self._entries = {d: _Entry(size, max(mtime, known[d].last_used) if d in known else mtime)
                             for d, (size, mtime) in scanned.items()}


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
