"""The GGUF files a worker was given with --models, and which of their tensors hash to which digest."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.atomic_file import write_atomic
from rpcnode.cache_files import FileMaps
from rpcnode.digest import DIGEST_PATTERN, check_digest, digest_of
from rpcnode.gguf_table import TableEntry, read_tensor_table

INDEX_FILE = "local-models.json"
_INDEX_VERSION = 1
_INDEX_SAVE_EVERY_S = 2.0


@dataclass(frozen=True)
class LocalTensor:
    """Where a local GGUF file holds a tensor's bytes."""

    path: Path
    name: str
    offset: int
    nbytes: int


@dataclass
class _LocalFile:
    path: str
    size: int
    mtime_ns: int
    table: list[TableEntry]
    digests: dict[str, str]  # tensor name -> digest, filled as tensors get hashed


class ModelIndex:
    """The GGUF files under some directories, and which of their tensors hash to which digest.

    Tensors are hashed lazily: `find(digest, nbytes, name)` first looks among known digests, then hashes the
    unhashed tensors of that size (those named `name` first) until one matches. Each local tensor is thus
    hashed at most once per file version; digests are remembered in a JSON file keyed by (path, size,
    mtime_ns). Nothing in that file is trusted: the bytes are verified again before use.
    """

    def __init__(self, dirs: Iterable[str | os.PathLike[str]], index_file: str | os.PathLike[str]) -> None:
        self.dirs = [Path(d) for d in dirs]
        self.index_file = Path(index_file)
        self.maps = FileMaps()
        self.problems: list[str] = []  # entries and files left out, one line each with the reason, for the log
        self._lock = threading.RLock()
        self._files: dict[str, _LocalFile] = {}
        self._by_digest: dict[str, tuple[_LocalFile, TableEntry]] = {}
        self._dirty = False
        self._saved_at = 0.0
        self.scan()

    def scan(self) -> None:
        """Find the *.gguf files again and read their tensor tables (cheap: headers only)."""
        stored = _load_index(self.index_file)
        files: dict[str, _LocalFile] = {}
        paths, problems = self._gguf_paths()
        for path in paths:
            try:
                st = os.stat(path)
                table = read_tensor_table(path)
            except (OSError, ValueError) as e:
                problems.append(f"{path}: {e}")
                continue
            names = {t.name for t in table}
            known = stored.get(path)
            digests = {}
            if known is not None and (known["size"], known["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
                digests = {n: d for n, d in known["digests"].items() if n in names}
            files[path] = _LocalFile(path, st.st_size, st.st_mtime_ns, table, digests)
        with self._lock:
            self._files, self.problems = files, problems
            self._by_digest = {}
            for f in files.values():
                for t in f.table:
                    if t.name in f.digests:
                        self._by_digest.setdefault(f.digests[t.name], (f, t))

    def files(self) -> list[Path]:
        return [Path(p) for p in self._files]

    def find(self, digest: str, nbytes: int | None = None, name: str | None = None) -> LocalTensor | None:
        """A local tensor believed to hold the bytes of `digest` (verify before use), or None."""
        check_digest(digest)
        with self._lock:
            hit = self._by_digest.get(digest)
            if hit is None:
                hit = self._hash_candidates(digest, nbytes, name)
                self._save_if_due()
        if hit is None:
            return None
        f, t = hit
        return LocalTensor(Path(f.path), t.name, t.offset, t.nbytes)

    def forget(self, path: str | os.PathLike[str]) -> None:
        """Drop every digest recorded for a file whose bytes failed verification: it changed in place, or its
        record lied, so none of them can be trusted. They are hashed again as needed."""
        key = os.path.abspath(path)
        with self._lock:
            f = self._files.get(key)
            if f is None or not f.digests:
                return
            f.digests.clear()
            self._by_digest = {d: hit for d, hit in self._by_digest.items() if hit[0] is not f}
            self._dirty = True

    def build(self) -> int:
        """Hash every tensor not hashed yet (eagerly, e.g. at worker start); how many were hashed."""
        with self._lock:
            todo = [(f, t) for f in self._files.values() for t in f.table if t.name not in f.digests]
            for f, t in todo:
                self._hash_one(f, t)
            self.save()
        return len(todo)

    def save(self) -> None:
        """Write the digests known so far (atomically), merged with what other processes stored."""
        with self._lock:
            stored = _load_index(self.index_file)
            stored = {p: v for p, v in stored.items() if os.path.exists(p)}
            for f in self._files.values():
                stored[f.path] = {"size": f.size, "mtime_ns": f.mtime_ns, "digests": dict(f.digests)}
            with contextlib.suppress(OSError):  # a read-only cache dir only costs hashing again next time
                _write_json(self.index_file, {"version": _INDEX_VERSION, "files": stored})
            self._dirty, self._saved_at = False, time.monotonic()

    def _gguf_paths(self) -> tuple[list[str], list[str]]:
        """The GGUF files under the dirs (a .gguf file given itself counts too), and why an entry gave none."""
        paths: set[str] = set()
        problems: list[str] = []
        for d in self.dirs:
            if d.is_file() and d.suffix == ".gguf":
                paths.add(os.path.abspath(d))
                continue
            if not d.exists():
                why = "no such directory"
            elif not d.is_dir():
                why = "not a directory (nor a .gguf file)"
            elif not os.access(d, os.R_OK | os.X_OK):  # rglob would quietly find nothing
                why = "not readable by this user"
            else:
                found = {os.path.abspath(p) for p in d.rglob("*.gguf") if p.is_file()}
                paths |= found
                why = "" if found else "holds no .gguf files"
            if why:
                problems.append(f"{d}: {why}")
        return sorted(paths), problems

    def _hash_candidates(
        self, digest: str, nbytes: int | None, name: str | None
    ) -> tuple[_LocalFile, TableEntry] | None:
        candidates = [(f, t) for f in self._files.values() for t in f.table
                      if t.name not in f.digests and (nbytes is None or t.nbytes == nbytes)]
        candidates.sort(key=lambda c: c[1].name != name)  # the same name first: almost always the one
        for f, t in candidates:
            if self._hash_one(f, t) == digest:
                return f, t
        return None

    def _hash_one(self, f: _LocalFile, t: TableEntry) -> str | None:
        arr = self.maps.view(f.path, t.offset, t.nbytes)
        if arr is None:
            return None
        digest = digest_of(arr)
        self.maps.mark_verified(f.path, t.offset, t.nbytes, digest)
        f.digests[t.name] = digest
        self._by_digest.setdefault(digest, (f, t))
        self._dirty = True
        return digest

    def _save_if_due(self) -> None:
        if self._dirty and time.monotonic() - self._saved_at >= _INDEX_SAVE_EVERY_S:
            self.save()


def _load_index(path: Path) -> dict[str, dict[str, Any]]:
    """The stored per-file digests, keeping only well-formed records; anything unreadable counts as empty."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != _INDEX_VERSION or not isinstance(doc.get("files"), dict):
        return {}
    return {p: rec for p, rec in doc["files"].items() if isinstance(p, str) and _valid_record(rec)}


def _valid_record(rec: Any) -> bool:
    if not isinstance(rec, dict):
        return False
    size, mtime, digests = rec.get("size"), rec.get("mtime_ns"), rec.get("digests")
    return (isinstance(size, int) and isinstance(mtime, int) and isinstance(digests, dict)
            and all(isinstance(n, str) and isinstance(d, str) and DIGEST_PATTERN.fullmatch(d)
                    for n, d in digests.items()))


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(doc))
