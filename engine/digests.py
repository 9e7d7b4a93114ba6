"""BLAKE3 digests of a GGUF file's tensors: hashed once per file version with all cores, remembered on disk."""

from __future__ import annotations

import contextlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from engine.atomic_file import write_atomic
from engine.gguf_file import GGUFFile
from engine.user_cache import cache_dir

# The digest of a tensor is BLAKE3-256 of its exact bytes in the file, as 64 lowercase hex characters: the key
# of the workers' content-addressed cache (rpcnode.cache checks the same format).
_DIGEST = re.compile(r"[0-9a-f]{64}")
STORE_VERSION = 1
# Tensors this big are hashed one at a time with all cores inside blake3; smaller ones are spread over a
# thread pool, one tensor per thread (blake3 releases the GIL), which keeps every core busy on small tensors.
_BIG_TENSOR = 64 << 20


def default_store_dir() -> Path:
    """Where the digests of model files are remembered: <cache dir>/digests."""
    return cache_dir() / "digests"


def model_digests(gguf: GGUFFile, store_dir: Path | None = None, workers: int | None = None) -> dict[str, str]:
    """Tensor name -> digest for every tensor of the file, read from the store when the file is unchanged.

    The store holds one JSON file per model path, valid while the file's size and mtime_ns are the same;
    a missing, stale or malformed record is ignored and the file hashed again (and the record rewritten).
    """
    store = default_store_dir() if store_dir is None else Path(store_dir)
    key = _file_key(gguf.path)
    record_path = store / f"{blake3.blake3(key['path'].encode()).hexdigest()[:32]}.json"
    known = _load_record(record_path, key, set(gguf.tensors))
    if known is not None:
        return known
    digests = hash_tensors(gguf, workers)
    # Remember them only if the file is the one that was hashed: same key now, and the size we mapped.
    if _file_key(gguf.path) == key and key["size"] == gguf.file_bytes:
        _save_record(record_path, {"version": STORE_VERSION, **key, "digests": digests})
    return digests


def hash_tensors(gguf: GGUFFile, workers: int | None = None) -> dict[str, str]:
    """Hash every tensor's bytes with all cores (no store); name -> digest in the file's tensor order."""
    infos = sorted(gguf.tensors.values(), key=lambda t: -t.n_bytes)
    big = [t.name for t in infos if t.n_bytes >= _BIG_TENSOR]
    small = [t.name for t in infos if t.n_bytes < _BIG_TENSOR]
    out = {name: _hash(tensor_bytes(gguf, name), blake3.blake3.AUTO) for name in big}
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        # Largest first, so the last tensors to finish are small and no core idles for long at the end.
        out.update(zip(small, pool.map(lambda n: _hash(tensor_bytes(gguf, n), 1), small), strict=True))
    return {name: out[name] for name in gguf.tensors}


def _hash(data: np.ndarray, threads: int) -> str:
    """BLAKE3 of the bytes as hex (the one place tensor bytes are hashed: tests count calls here)."""
    return blake3.blake3(data, max_threads=threads).hexdigest()


def hash_bytes(data: np.ndarray) -> str:
    """The digest of some bytes of a file (a range of a tensor's experts), with all cores."""
    return _hash(data, blake3.blake3.AUTO)


def tensor_bytes(gguf: GGUFFile, name: str) -> np.ndarray:
    """A tensor's bytes as flat uint8, a view of the memory map."""
    # raw() is a view of the memory map with a float or byte dtype; blake3 wants flat unsigned bytes.
    return gguf.raw(name).reshape(-1).view(np.uint8)


def _file_key(path: Path) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _load_record(path: Path, key: dict[str, Any], names: set[str]) -> dict[str, str] | None:
    """The stored digests if the record matches the file and names exactly its tensors; None otherwise."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != STORE_VERSION:
        return None
    if any(doc.get(k) != v for k, v in key.items()):
        return None
    digests = doc.get("digests")
    if not isinstance(digests, dict) or set(digests) != names:
        return None
    if not all(isinstance(d, str) and _DIGEST.fullmatch(d) for d in digests.values()):
        return None
    return digests


def _save_record(path: Path, doc: dict[str, Any]) -> None:
    """Write atomically; a store that cannot be written only costs hashing next time."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(doc))
