"""File I/O under the tensor cache: read-only maps (and verified ranges of local model files), whole writes,
preallocation, durable renames, and the cache directory's layout (entries, temp files of writes in progress)."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from rpcnode.digest import DIGEST_PATTERN, digest_of

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def empty_array() -> np.ndarray:
    arr = np.empty(0, dtype=np.uint8)
    arr.flags.writeable = False
    return arr


Ident = tuple[int, int, int, int, int]


def file_ident(st: os.stat_result) -> Ident:
    """What tells a file's bytes unchanged without reading them: any write, truncation or utime sets ctime to
    now, and no one can set it back, so a file with the same (device, inode, size, mtime, ctime) holds the same
    bytes. (Since Linux 6.13 a change right after a stat gets a fine-grained ctime; older kernels stamp changes
    with the clock tick, so a write within a few ms of the stat we recorded can go unseen.)"""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def map_file(path: Path, touch: bool = False) -> tuple[os.stat_result, mmap.mmap | None]:
    """The file's stat and a read-only map of it (None for an empty file, which cannot be mapped).

    touch: set its times to now first (best effort), so the stat returned already includes that change."""
    with open(path, "rb") as f:
        if touch:
            now = time.time_ns()
            with contextlib.suppress(OSError):  # a cache dir of someone else's, read-only: no LRU mark
                os.utime(f.fileno(), ns=(now, now))
        st = os.fstat(f.fileno())
        return st, (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else None)


def fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse to open directories, which is harmless here.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    # os.pwrite may write less than asked (a nearly full disk does exactly that before raising ENOSPC).
    done = 0
    while done < mv.nbytes:
        n = os.pwrite(fd, mv[done:], offset + done)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n


def reserve(fd: int, nbytes: int) -> None:
    """Allocate the file's blocks up front so a full disk shows at begin(), not halfway through a stream."""
    if nbytes == 0:
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise
        os.ftruncate(fd, nbytes)  # the filesystem cannot preallocate; ENOSPC may then come from a write




class FileMaps:
    """Read-only maps of local model files, and which byte ranges of them were verified against a digest."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[str, tuple[Ident, mmap.mmap | None]] = {}
        self._verified: set[tuple[str, int, int, str]] = set()

    def view(self, path: str | os.PathLike[str], offset: int, nbytes: int) -> np.ndarray | None:
        """A read-only view of the range, or None if the file cannot be read or is too short."""
        key = os.path.abspath(path)
        mm = self._map(key)
        if offset < 0 or nbytes < 0 or (mm is None and nbytes) or (mm is not None and offset + nbytes > len(mm)):
            return None
        if nbytes == 0:
            return empty_array()
        return np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=offset)

    def verified_view(self, path: str | os.PathLike[str], offset: int, nbytes: int, digest: str) -> np.ndarray | None:
        """The range if its bytes hash to `digest` (hashed once per mapping), else None."""
        arr = self.view(path, offset, nbytes)
        if arr is None:
            return None
        mark = (os.path.abspath(path), offset, nbytes, digest)
        if mark not in self._verified:
            if digest_of(arr) != digest:
                return None
            self._verified.add(mark)
        return arr

    def mark_verified(self, path: str | os.PathLike[str], offset: int, nbytes: int, digest: str) -> None:
        """Record that the range, hashed from this object's current map, gave `digest`."""
        self._verified.add((os.path.abspath(path), offset, nbytes, digest))

    def _map(self, key: str) -> mmap.mmap | None:
        try:
            st = os.stat(key)
        except OSError:
            return None
        ident = file_ident(st)
        with self._lock:
            known = self._maps.get(key)
            if known is not None and known[0] == ident:
                return known[1]
            # The file changed: what was verified against the old map says nothing about the new one.
            self._verified = {m for m in self._verified if m[0] != key}
            try:
                st2, mm = map_file(Path(key))
            except (OSError, ValueError):
                self._maps.pop(key, None)
                return None
            self._maps[key] = (file_ident(st2), mm)
            return mm


# ---- the cache directory: `<root>/<aa>/<digest>` entries and `.<digest>.<pid>.<random>.tmp` writes in progress

_TMP = re.compile(r"\.([0-9a-f]{64})\.(\d+)\.[0-9a-f]+\.tmp")


def temp_path(root: Path, digest: str) -> Path:
    """A fresh temp file name beside the entry; the pid lets a later process tell a crashed writer's leftovers
    from a live writer's file."""
    return root / digest[:2] / f".{digest}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"


def scan_entries(root: Path, clean_temps: bool = False) -> dict[str, tuple[int, float]]:
    """digest -> (size, mtime) of every entry under root; with clean_temps, delete the temp files of writers
    that died."""
    entries: dict[str, tuple[int, float]] = {}
    for sub in root.iterdir():
        if len(sub.name) != 2 or not sub.is_dir():
            continue
        for f in os.scandir(sub):
            if DIGEST_PATTERN.fullmatch(f.name) and f.name[:2] == sub.name:
                with contextlib.suppress(OSError):
                    st = f.stat(follow_symlinks=False)
                    entries[f.name] = (st.st_size, st.st_mtime)
            elif clean_temps:
                _clean_dead_temp(Path(f.path))
    return entries


def _clean_dead_temp(path: Path) -> None:
    m = _TMP.fullmatch(path.name)
    if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but belongs to someone else
    return True
