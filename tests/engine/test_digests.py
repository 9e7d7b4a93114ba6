"""Tensor digests on the coordinator: correct, hashed once per file version, a bad store ignored."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest

from engine import digests
from engine.gguf_file import GGUFFile
from engine.synth import SynthSpec, write_model
from tests.refs import V3

REF_MODEL = V3


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "m.gguf", SynthSpec(dtype="Q8_0", seed=3))


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the tensors actually hashed (every hash goes through digests._hash)."""
    calls: list[str] = []
    real = digests._hash

    def counting(data: Any, threads: int) -> str:
        calls.append(real(data, threads))
        return calls[-1]

    monkeypatch.setattr(digests, "_hash", counting)
    return calls


def plain_digests(path: Path) -> dict[str, str]:
    g = GGUFFile(path)
    return {n: blake3.blake3(g.raw(n).tobytes()).hexdigest() for n in g.tensors}


@pytest.mark.parametrize("path", [REF_MODEL, None])
def test_digests_are_blake3_of_the_tensor_bytes(tmp_path: Path, model: Path, path: Path | None) -> None:
    path = path or model
    got = digests.model_digests(GGUFFile(path), store_dir=tmp_path / "store")
    assert got == plain_digests(path)
    assert list(got) == list(GGUFFile(path).tensors)  # the file's tensor order


def test_parallel_and_big_tensor_paths_agree(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = GGUFFile(model)
    expected = plain_digests(model)
    assert digests.hash_tensors(g, workers=1) == expected
    assert digests.hash_tensors(g, workers=8) == expected
    monkeypatch.setattr(digests, "_BIG_TENSOR", 0)  # every tensor through blake3's own threads
    assert digests.hash_tensors(g) == expected


def test_second_call_reads_the_store(tmp_path: Path, model: Path, hash_calls: list[str]) -> None:
    store = tmp_path / "store"
    first = digests.model_digests(GGUFFile(model), store_dir=store)
    n = len(GGUFFile(model).tensors)
    assert len(hash_calls) == n
    assert len(list(store.glob("*.json"))) == 1
    second = digests.model_digests(GGUFFile(model), store_dir=store)  # a new GGUFFile: as in a new run
    assert second == first and len(hash_calls) == n  # nothing hashed again


def test_default_store_is_under_the_cache_dir(tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IKCTL_CACHE", str(tmp_path / "cache"))
    assert digests.default_store_dir() == tmp_path / "cache" / "digests"
    digests.model_digests(GGUFFile(model))
    [record] = (tmp_path / "cache" / "digests").glob("*.json")
    doc = json.loads(record.read_text())
    st = model.stat()
    assert (doc["path"], doc["size"], doc["mtime_ns"]) == (str(model), st.st_size, st.st_mtime_ns)


def test_store_invalidated_when_mtime_changes(tmp_path: Path, model: Path, hash_calls: list[str]) -> None:
    store = tmp_path / "store"
    digests.model_digests(GGUFFile(model), store_dir=store)
    n = len(hash_calls)
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    digests.model_digests(GGUFFile(model), store_dir=store)
    assert len(hash_calls) == 2 * n
    digests.model_digests(GGUFFile(model), store_dir=store)  # the new version is remembered in turn
    assert len(hash_calls) == 2 * n


def test_store_invalidated_when_the_file_is_replaced(tmp_path: Path, model: Path) -> None:
    store = tmp_path / "store"
    before = digests.model_digests(GGUFFile(model), store_dir=store)
    other = write_model(tmp_path / "other.gguf", SynthSpec(dtype="Q8_0", seed=4, layers=2, dense_layers=1))
    st = model.stat()
    shutil.copyfile(other, model)  # a different size...
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...even with the old mtime
    after = digests.model_digests(GGUFFile(model), store_dir=store)
    assert after == plain_digests(model) and after != before


def test_store_invalidated_when_the_size_changes(tmp_path: Path, model: Path, hash_calls: list[str]) -> None:
    store = tmp_path / "store"
    digests.model_digests(GGUFFile(model), store_dir=store)
    n = len(hash_calls)
    st = model.stat()
    with open(model, "ab") as f:  # trailing bytes keep it a valid GGUF
        f.write(bytes(64))
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert digests.model_digests(GGUFFile(model), store_dir=store) == plain_digests(model)
    assert len(hash_calls) == 2 * n


@pytest.mark.parametrize("corruption", [
    lambda doc: "{not json",
    lambda doc: "[]",
    lambda doc: json.dumps({**doc, "version": 99}),
    lambda doc: json.dumps({**doc, "digests": "all of them"}),
    lambda doc: json.dumps({**doc, "digests": dict(list(doc["digests"].items())[1:])}),  # a tensor missing
    lambda doc: json.dumps({**doc, "digests": {**doc["digests"], "extra.weight": "0" * 64}}),
    lambda doc: json.dumps({**doc, "digests": {k: "../" + v[3:] for k, v in doc["digests"].items()}}),
    lambda doc: json.dumps({**doc, "digests": {k: 7 for k in doc["digests"]}}),
    lambda doc: json.dumps({**doc, "path": "/elsewhere.gguf"}),
    lambda doc: "\udcff",
])
def test_corrupt_store_ignored(
    tmp_path: Path, model: Path, hash_calls: list[str], corruption: Callable[[dict[str, Any]], str]
) -> None:
    store = tmp_path / "store"
    expected = digests.model_digests(GGUFFile(model), store_dir=store)
    n = len(hash_calls)
    [record] = store.glob("*.json")
    record.write_text(corruption(json.loads(record.read_text())), errors="surrogateescape")
    assert digests.model_digests(GGUFFile(model), store_dir=store) == expected
    assert len(hash_calls) == 2 * n  # hashed again, and the record repaired:
    assert digests.model_digests(GGUFFile(model), store_dir=store) == expected and len(hash_calls) == 2 * n


def test_unwritable_store_still_gives_digests(tmp_path: Path, model: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store directory should be")
    assert digests.model_digests(GGUFFile(model), store_dir=blocker) == plain_digests(model)
    assert blocker.read_text().startswith("a file")


def test_agrees_with_the_worker_cache(model: Path) -> None:
    from rpcnode.cache import TensorCache
    from rpcnode.digest import check_digest, digest_of

    g = GGUFFile(model)
    got = digests.model_digests(g, store_dir=model.parent / "store")
    for name, d in got.items():
        assert check_digest(d) == d == digest_of(g.raw(name).reshape(-1).view("u1"))
    cache = TensorCache(model.parent / "cache", 1 << 24)
    name = max(g.tensors, key=lambda n: g.tensors[n].n_bytes)
    cache.put(got[name], g.raw(name).reshape(-1).view("u1"))
    assert cache.get(got[name]) is not None
