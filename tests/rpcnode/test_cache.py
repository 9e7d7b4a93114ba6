"""The worker's tensor cache: verified atomic writes, corruption, LRU eviction, full disks, local models."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import blake3
import numpy as np
import pytest

from engine.gguf_file import GGUFFile
from engine.synth import SynthSpec, write_model
from rpcnode import cache as cache_mod
from rpcnode import cache_files, model_index
from rpcnode.cache import CacheFull, DigestMismatch, DiskFull, TensorCache
from rpcnode.digest import digest_of
from rpcnode.gguf_table import read_tensor_table
from rpcnode.model_index import INDEX_FILE, ModelIndex
from tests.refs import V3
from tests.rpcnode.conftest import tmpfs

REF_MODEL = V3


def blob(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def entry_files(root: Path) -> list[str]:
    return [f for f in files_under(root) if f != INDEX_FILE]


@pytest.fixture
def cache(tmp_path: Path) -> TensorCache:
    return TensorCache(tmp_path / "c", limit_bytes=1 << 20)


# ---- put / get -------------------------------------------------------------------------------------------------


def test_put_get_round_trip(cache: TensorCache) -> None:
    data = blob(5000)
    d = digest_of(data)
    assert d == blake3.blake3(data).hexdigest()
    assert not cache.has(d) and cache.get(d) is None
    cache.put(d, data)
    assert cache.has(d)
    assert cache.path(d) == cache.root / d[:2] / d and cache.path(d).read_bytes() == data
    arr = cache.get(d)
    assert arr is not None and arr.tobytes() == data and arr.dtype == np.uint8
    assert not arr.flags.writeable
    s = cache.stats()
    assert (s.entries, s.bytes, s.hits, s.misses, s.in_use) == (1, 5000, 1, 1, 1)


def test_put_accepts_arrays_and_memoryviews(cache: TensorCache) -> None:
    arr = np.arange(600, dtype=np.float32).reshape(20, 30)
    d = digest_of(arr)
    assert d == blake3.blake3(arr.tobytes()).hexdigest()
    cache.put(d, memoryview(arr))
    got = cache.get(d)
    assert got is not None and np.array_equal(got.view(np.float32).reshape(20, 30), arr)
    with pytest.raises(ValueError, match="contiguous"):
        cache.put(d, arr[:, ::2])


def test_empty_entry(cache: TensorCache) -> None:
    d = digest_of(b"")
    cache.put(d, b"")
    got = cache.get(d)
    assert got is not None and got.nbytes == 0


def test_entries_survive_a_new_cache_object(cache: TensorCache) -> None:
    data = blob(3000)
    cache.put(digest_of(data), data)
    again = TensorCache(cache.root, limit_bytes=1 << 20)
    assert again.stats().entries == 1 and again.stats().bytes == 3000
    got = again.get(digest_of(data))
    assert got is not None and got.tobytes() == data


def test_digest_mismatch_refused_before_writing(cache: TensorCache) -> None:
    data = blob(4000)
    wrong = digest_of(data[:-1])
    with pytest.raises(DigestMismatch):
        cache.put(wrong, data)
    assert entry_files(cache.root) == []
    assert cache.stats().rejected == 1 and not cache.has(wrong)


@pytest.mark.parametrize("bad", ["", "../" * 20 + "etc/passwd", "A" * 64, "0" * 63, "0" * 65, "g" * 64])
def test_malformed_digests_rejected(cache: TensorCache, bad: str) -> None:
    # Digests come off the wire and become file names.
    for call in (cache.has, cache.get, lambda d: cache.put(d, b"x"), lambda d: cache.begin(d, 1)):
        with pytest.raises(ValueError, match="not a digest"):
            call(bad)


def test_entry_over_the_limit_refused(tmp_path: Path) -> None:
    c = TensorCache(tmp_path / "c", limit_bytes=1000)
    data = blob(1001)
    with pytest.raises(CacheFull, match="exceeds the cache limit"):
        c.put(digest_of(data), data)
    with pytest.raises(CacheFull, match="exceeds the cache limit"):
        c.begin(digest_of(data), 1001)
    assert entry_files(c.root) == []


# ---- streaming writer and atomicity ----------------------------------------------------------------------------


def test_writer_in_order(cache: TensorCache) -> None:
    data = blob(10_000)
    d = digest_of(data)
    with cache.begin(d, len(data)) as w:
        for i in range(0, len(data), 3000):
            w.write(i, data[i : i + 3000])
        assert not cache.has(d)  # invisible until commit
        w.commit()
    assert cache.path(d).read_bytes() == data and not w.active
    assert entry_files(cache.root) == [f"{d[:2]}/{d}"]


def test_writer_out_of_order(cache: TensorCache) -> None:
    data = blob(10_000, seed=1)
    d = digest_of(data)
    w = cache.begin(d, len(data))
    for i in reversed(range(0, len(data), 4096)):
        w.write(i, memoryview(data)[i : i + 4096])
    w.commit()
    got = cache.get(d)
    assert got is not None and got.tobytes() == data


def test_writer_wrong_bytes_leave_nothing(cache: TensorCache) -> None:
    data = blob(8000)
    d = digest_of(data)
    w = cache.begin(d, len(data))
    w.write(0, data[:4000])
    w.write(4000, bytes(4000))  # a corrupted half
    with pytest.raises(DigestMismatch):
        w.commit()
    assert entry_files(cache.root) == [] and cache.stats().rejected == 1
    assert cache._reserved == 0


def test_writer_missing_chunk_fails_verification(cache: TensorCache) -> None:
    data = blob(8000)
    w = cache.begin(digest_of(data), len(data))
    w.write(0, data[:4000])
    with pytest.raises(DigestMismatch):
        w.commit()
    assert entry_files(cache.root) == []


def test_writer_rejects_chunks_outside_the_entry(cache: TensorCache) -> None:
    data = blob(100)
    with cache.begin(digest_of(data), 100) as w:
        with pytest.raises(ValueError, match="outside"):
            w.write(90, data[:20])
        with pytest.raises(ValueError, match="outside"):
            w.write(-1, data[:1])


def test_abort_and_exceptions_leave_nothing(cache: TensorCache) -> None:
    data = blob(5000)
    d = digest_of(data)
    w = cache.begin(d, len(data))
    w.write(0, data[:100])
    w.abort()
    w.abort()  # idempotent
    with pytest.raises(cache_mod.CacheError):
        w.write(100, data[100:200])
    with pytest.raises(RuntimeError), cache.begin(d, len(data)) as w2:
        w2.write(0, data[:2500])
        raise RuntimeError("connection lost")
    assert not w2.active
    assert entry_files(cache.root) == [] and cache._reserved == 0
    assert not cache.has(d)


def test_writer_dropped_without_commit_is_cleaned(cache: TensorCache) -> None:
    data = blob(5000)
    w = cache.begin(digest_of(data), len(data))
    w.write(0, data[:100])
    del w
    assert entry_files(cache.root) == [] and cache._reserved == 0


def test_killed_writer_leaves_no_entry(tmp_path: Path) -> None:
    root = tmp_path / "c"
    data = blob(200_000, seed=7)
    d = digest_of(data)
    src = tmp_path / "data.bin"
    src.write_bytes(data)
    script = textwrap.dedent(f"""
        import sys, time
        from rpcnode.cache import TensorCache
        data = open({str(src)!r}, "rb").read()
        w = TensorCache({str(root)!r}, 1 << 20).begin({d!r}, len(data))
        w.write(0, data[:100_000])
        print("half", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "half"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers = entry_files(root)
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # only the dead writer's temp file
    c = TensorCache(root, 1 << 20)
    assert not c.has(d) and c.get(d) is None
    assert entry_files(root) == []  # opening the cache removed the dead writer's temp file
    assert c.stats().entries == 0


def test_live_writers_temp_files_are_kept(cache: TensorCache) -> None:
    data = blob(1000)
    with cache.begin(digest_of(data), len(data)) as w:
        w.write(0, data)
        TensorCache(cache.root, 1 << 20)  # another cache object in this (live) process
        assert len(entry_files(cache.root)) == 1
        w.commit()
    assert cache.has(digest_of(data))


# ---- corruption ------------------------------------------------------------------------------------------------


def test_corrupt_entry_detected_and_removed(cache: TensorCache) -> None:
    data = blob(20_000)
    d = digest_of(data)
    cache.put(d, data)
    path = cache.path(d)
    raw = bytearray(path.read_bytes())
    raw[12_345] ^= 0x01
    path.write_bytes(bytes(raw))
    fresh = TensorCache(cache.root, 1 << 20)  # first use in a new process: verified
    assert fresh.get(d) is None
    assert not path.exists() and not fresh.has(d)
    s = fresh.stats()
    assert (s.corrupt, s.misses, s.hits, s.entries) == (1, 1, 0, 0)
    fresh.put(d, data)  # re-fetched
    got = fresh.get(d)
    assert got is not None and got.tobytes() == data


def test_put_repairs_an_unverified_entry_and_keeps_a_verified_one(cache: TensorCache) -> None:
    data = blob(5000)
    d = digest_of(data)
    cache.path(d).parent.mkdir(parents=True)
    cache.path(d).write_bytes(b"garbage")  # e.g. left by a buggy tool; has() cannot tell
    assert cache.has(d)
    cache.put(d, data)  # not verified in this process: written anew
    assert cache.path(d).read_bytes() == data
    assert cache.get(d) is not None
    ino = cache.path(d).stat().st_ino
    cache.put(d, data)  # verified: nothing to write
    assert cache.path(d).stat().st_ino == ino


@pytest.mark.parametrize("keep", [0, 1, 9_999])
def test_truncated_entry_detected(cache: TensorCache, keep: int) -> None:
    data = blob(10_000)
    d = digest_of(data)
    cache.put(d, data)
    os.truncate(cache.path(d), keep)
    fresh = TensorCache(cache.root, 1 << 20)
    assert fresh.get(d) is None
    assert not cache.path(d).exists() and fresh.stats().corrupt == 1


def write_in_place(path: Path, offset: int, keep_times: bool = False) -> None:
    """Flip one byte of a file without replacing it (same inode and size), as a tool writing into it would;
    keep_times: put its mtime back, as `rsync --inplace -t` or `touch -r` would."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))
    if keep_times:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("keep_times", [False, True])
@pytest.mark.parametrize("mapped", [True, False])
def test_bytes_changed_after_verification_are_caught(cache: TensorCache, mapped: bool, keep_times: bool) -> None:
    """An entry verified (and mapped) here and then written into on disk is hashed again on its next get,
    whether or not its old map is still alive, and deleted as corrupt: never handed out."""
    data = blob(20_000)
    d = digest_of(data)
    cache.put(d, data)
    held = cache.get(d)
    assert held is not None
    if not mapped:
        del held
    write_in_place(cache.path(d), 12_345, keep_times)
    assert cache.get(d) is None
    assert not cache.path(d).exists() and cache.stats().corrupt == 1
    cache.put(d, data)  # re-fetched
    got = cache.get(d)
    assert got is not None and got.tobytes() == data


def test_changed_but_same_bytes_are_hashed_once_more(cache: TensorCache, monkeypatch: pytest.MonkeyPatch) -> None:
    data = blob(10_000)
    d = digest_of(data)
    cache.put(d, data)
    held = cache.get(d)
    calls = count_hashing(monkeypatch)
    os.utime(cache.path(d))  # touched (or the same bytes written back): the stat changed, so hash again
    assert cache.get(d) is not None and len(calls) == 1 and cache.stats().corrupt == 0
    assert cache.get(d) is not None and len(calls) == 1  # verified as it is now
    assert held.tobytes() == data


def test_local_model_bytes_changed_in_place_are_caught(tmp_path: Path) -> None:
    """The same for a tensor served from a local GGUF under --models: its file changed in place (even with
    its mtime put back) is hashed again, and a changed tensor is not served."""
    (tmp_path / "m").mkdir()
    path = write_model(tmp_path / "m" / "m.gguf", SynthSpec(seed=9))
    name, (offset, nbytes, d) = max(expected_tensors(path).items(), key=lambda kv: kv[1][1])
    c = TensorCache(tmp_path / "c", 1 << 30, models=ModelIndex([path.parent], tmp_path / "c" / INDEX_FILE))
    held = c.lookup(d, nbytes, name)
    assert held is not None and c.stats().local_hits == 1
    write_in_place(path, offset + nbytes // 2, keep_times=True)
    assert c.lookup(d, nbytes, name) is None


def count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every BLAKE3 hash the cache, its file maps, its writers and the model index compute from now on."""
    calls: list[int] = []
    real = digest_of
    for module in (cache_mod, cache_files, model_index):
        monkeypatch.setattr(module, "digest_of", lambda b: calls.append(1) or real(b))
    return calls


def test_verified_once_per_process(cache: TensorCache, monkeypatch: pytest.MonkeyPatch) -> None:
    data = blob(10_000)
    d = digest_of(data)
    cache.put(d, data)
    calls = count_hashing(monkeypatch)
    fresh = TensorCache(cache.root, 1 << 20)
    assert fresh.get(d) is not None and len(calls) == 1
    assert fresh.get(d) is not None and len(calls) == 1  # mapped: no second hash
    import gc

    gc.collect()
    assert fresh.get(d) is not None and len(calls) == 1  # unmapped, same file: still verified


def test_own_writes_are_not_hashed_again(cache: TensorCache, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_hashing(monkeypatch)
    data = blob(10_000)
    cache.put(digest_of(data), data)
    assert len(calls) == 1  # verified before writing
    assert cache.get(digest_of(data)) is not None and len(calls) == 1  # upload then load: no second hash


# ---- eviction --------------------------------------------------------------------------------------------------


def test_lru_eviction_order(tmp_path: Path) -> None:
    c = TensorCache(tmp_path / "c", limit_bytes=3000)
    blobs = {k: blob(1000, seed=i) for i, k in enumerate("abcde")}
    ds = {k: digest_of(v) for k, v in blobs.items()}
    for k in "abc":
        c.put(ds[k], blobs[k])
    assert c.get(ds["a"]) is not None  # a is now the most recent; the array dies at once
    c.put(ds["d"], blobs["d"])
    assert [k for k in "abcd" if c.has(ds[k])] == ["a", "c", "d"]  # b, the least recent, went
    c.put(ds["e"], blobs["e"])
    assert [k for k in "abcde" if c.has(ds[k])] == ["a", "d", "e"]
    s = c.stats()
    assert (s.evictions, s.entries, s.bytes) == (2, 3, 3000)


def test_lru_order_survives_restart(tmp_path: Path) -> None:
    c = TensorCache(tmp_path / "c", limit_bytes=3000)
    blobs = [blob(1000, seed=i) for i in range(4)]
    for b in blobs[:3]:
        c.put(digest_of(b), b)
    c2 = TensorCache(tmp_path / "c", limit_bytes=3000)  # a later process
    assert c2.get(digest_of(blobs[0])) is not None  # its first use there (a verification) marks the file
    c3 = TensorCache(tmp_path / "c", limit_bytes=3000)  # order read back from the files' mtimes
    c3.put(digest_of(blobs[3]), blobs[3])
    assert [c3.has(digest_of(b)) for b in blobs] == [True, False, True, True]


def test_uses_in_memory_survive_a_rescan(tmp_path: Path) -> None:
    c = TensorCache(tmp_path / "c", limit_bytes=3000)
    blobs = [blob(1000, seed=i) for i in range(4)]
    for b in blobs[:3]:
        c.put(digest_of(b), b)
    assert c.get(digest_of(blobs[0])) is not None  # used after the others were written: in memory only
    c.put(digest_of(blobs[3]), blobs[3])  # over the limit: rescans the directory (other processes share it)
    assert [c.has(digest_of(b)) for b in blobs] == [True, False, True, True]


def test_in_use_entries_not_evicted(tmp_path: Path) -> None:
    c = TensorCache(tmp_path / "c", limit_bytes=2000)
    a, b, x = blob(1000, 1), blob(1000, 2), blob(1000, 3)
    c.put(digest_of(a), a)
    c.put(digest_of(b), b)
    held = c.get(digest_of(a))[10:20]  # a view keeps the map alive, so a stays in use
    assert c.get(digest_of(b)) is not None  # b more recent than a, but not held
    c.put(digest_of(x), x)
    assert c.has(digest_of(a)) and not c.has(digest_of(b)) and c.has(digest_of(x))
    held_x = c.get(digest_of(x))
    assert c.stats().in_use == 2
    y = blob(1000, 4)
    with pytest.raises(CacheFull, match="in use"):
        c.put(digest_of(y), y)
    assert not c.has(digest_of(y)) and len(entry_files(c.root)) == 2
    assert held.tobytes() == a[10:20]
    del held_x
    c.put(digest_of(y), y)  # x is no longer held, so it goes
    assert c.has(digest_of(a)) and not c.has(digest_of(x)) and c.has(digest_of(y))


def test_open_writers_count_against_the_limit(tmp_path: Path) -> None:
    c = TensorCache(tmp_path / "c", limit_bytes=2000)
    a, b = blob(1500, 1), blob(1000, 2)
    with c.begin(digest_of(a), len(a)) as w:
        with pytest.raises(CacheFull):
            c.put(digest_of(b), b)
        w.write(0, a)
        w.commit()
    c.put(digest_of(b), b)  # now a is a finished, unused entry: evicted
    assert not c.has(digest_of(a)) and c.has(digest_of(b))


def test_stats_counts(tmp_path: Path) -> None:
    c = TensorCache(tmp_path / "c", limit_bytes=2000)
    a, b, x = blob(1000, 1), blob(1000, 2), blob(1000, 3)
    assert c.get(digest_of(a)) is None
    c.put(digest_of(a), a)
    c.put(digest_of(b), b)
    for _ in range(3):
        assert c.get(digest_of(b)) is not None
    c.put(digest_of(x), x)  # evicts a
    with pytest.raises(DigestMismatch):
        c.put(digest_of(a), b)
    s = c.stats()
    assert (s.entries, s.bytes, s.hits, s.misses, s.evictions, s.corrupt, s.rejected) == (2, 2000, 3, 1, 1, 0, 1)


def test_threads_share_a_cache(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    c = TensorCache(tmp_path / "c", limit_bytes=40_000)
    blobs = [blob(3000 + i, seed=i) for i in range(24)]

    def work(i: int) -> None:
        for b in blobs[i::4] * 3:
            d = digest_of(b)
            with contextlib.suppress(CacheFull):  # all entries may be held by the other threads at once
                c.put(d, b)
            got = c.get(d)
            assert got is None or got.tobytes() == b

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    s = c.stats()
    assert s.bytes <= 40_000 and s.evictions > 0 and c._reserved == 0
    assert sum(p.stat().st_size for p in c.root.rglob("*") if p.is_file()) == s.bytes


# ---- full disk -------------------------------------------------------------------------------------------------


def test_enospc_simulated(cache: TensorCache, monkeypatch: pytest.MonkeyPatch) -> None:
    old = blob(1000, 1)
    cache.put(digest_of(old), old)
    data = blob(5000)
    d = digest_of(data)

    def full(fd: int, buf: memoryview, offset: int) -> int:
        return 0 if offset else os.write(fd, bytes(buf[:10]))  # a short write, then nothing: a full disk

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(DiskFull, match="no space left"):
        cache.put(d, data)
    assert not cache.has(d) and not cache.has(digest_of(old))  # evicted to retry, which failed too
    assert entry_files(cache.root) == [] and cache._reserved == 0

    def no_fallocate(fd: int, offset: int, n: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(os, "posix_fallocate", no_fallocate)
    w = cache.begin(d, len(data))  # cannot preallocate: the full disk shows at write time
    with pytest.raises(DiskFull, match="no space left"):
        w.write(0, data)
    assert not w.active and entry_files(cache.root) == [] and cache._reserved == 0


def test_enospc_on_a_real_full_disk(tiny_disk: Path) -> None:
    c = TensorCache(tiny_disk / "c", limit_bytes=100 << 20)  # the limit is not what stops it: the disk is
    foreign = tiny_disk / "other-files"
    foreign.write_bytes(b"\0" * (800 << 10))
    data = blob(400 << 10)
    d = digest_of(data)
    with pytest.raises(DiskFull, match="no space left"):
        c.put(d, data)
    with pytest.raises(DiskFull, match="no space left"):
        c.begin(d, len(data))  # preallocation finds the full disk before any byte is streamed
    assert entry_files(c.root) == [] and c._reserved == 0
    foreign.unlink()

    a, b = blob(600 << 10, 1), blob(600 << 10, 2)
    c.put(digest_of(a), a)
    c.put(digest_of(b), b)  # the disk is full of our own entries: evict the oldest and try again
    assert not c.has(digest_of(a)) and c.has(digest_of(b))
    with c.begin(digest_of(a), len(a)) as w:
        w.write(0, a)
        w.commit()
    assert c.has(digest_of(a)) and not c.has(digest_of(b)) and c.stats().evictions == 2


def test_no_inodes_left_is_a_full_disk_too(tmp_path: Path) -> None:
    """A filesystem out of inodes refuses the entry's directory or its temp file (ENOSPC) before any byte: a
    streamed entry is refused as DiskFull as well as a whole one."""
    with tmpfs(tmp_path / "few-inodes", "size=1m,nr_inodes=3") as mnt:
        c = TensorCache(mnt / "c", limit_bytes=100 << 20)
        data = blob(1000)
        for attempt in range(3):  # one subdirectory may still fit; the temp file beside it may not
            with pytest.raises(DiskFull, match="no space left"):
                if attempt % 2:
                    c.put(digest_of(data), data)
                else:
                    c.begin(digest_of(data), len(data))
        assert entry_files(c.root) == [] and c._reserved == 0


# ---- local models (--models DIR) -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    shutil.copy(REF_MODEL, d / "open-v3.gguf")
    (d / "sub").mkdir()
    write_model(d / "sub" / "q8.gguf", SynthSpec(dtype="Q8_0", seed=5))
    (d / "notes.txt").write_text("not a model")
    (d / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    return d


def expected_tensors(path: Path) -> dict[str, tuple[int, int, str]]:
    g = GGUFFile(path)
    return {n: (t.offset, t.n_bytes, digest_of(g.raw(n).reshape(-1).view(np.uint8))) for n, t in g.tensors.items()}


@pytest.mark.parametrize("dtype", ["F32", "F16", "Q4_0", "Q8_0", "Q4_K", "Q6_K"])
def test_table_reader_agrees_with_the_engine(tmp_path: Path, dtype: str) -> None:
    path = write_model(tmp_path / "m.gguf", SynthSpec(dtype=dtype))
    g = GGUFFile(path)
    assert {e.name: (e.offset, e.nbytes) for e in read_tensor_table(path)} == {
        n: (t.offset, t.n_bytes) for n, t in g.tensors.items()
    }


def test_table_reader_on_a_real_model(smollm2_path: Path) -> None:
    g = GGUFFile(smollm2_path)
    assert {e.name: (e.offset, e.nbytes) for e in read_tensor_table(smollm2_path)} == {
        n: (t.offset, t.n_bytes) for n, t in g.tensors.items()
    }


@pytest.mark.parametrize("cut", [3, 10, 30, 200, 4000])
def test_table_reader_rejects_truncated_headers(tmp_path: Path, cut: int) -> None:
    p = tmp_path / "t.gguf"
    p.write_bytes(REF_MODEL.read_bytes()[:cut])
    with pytest.raises(ValueError):
        read_tensor_table(p)


def test_model_index_finds_local_tensors(tmp_path: Path, local_models: Path) -> None:
    index = ModelIndex([local_models], tmp_path / INDEX_FILE)
    assert sorted(p.name for p in index.files()) == ["open-v3.gguf", "q8.gguf"]
    assert len(index.problems) == 1 and "broken.gguf" in index.problems[0]
    for model in (local_models / "open-v3.gguf", local_models / "sub" / "q8.gguf"):
        for name, (offset, nbytes, d) in expected_tensors(model).items():
            found = index.find(d, nbytes=nbytes, name=name)
            assert found is not None and found.nbytes == nbytes
            # Another tensor with the very same bytes would do as well; these models have none.
            assert (found.path, found.name, found.offset) == (model, name, offset)
    assert index.find(digest_of(b"nowhere"), nbytes=64) is None
    assert index.find(digest_of(b"nowhere")) is None  # hashes whatever was left, then gives up


def test_model_index_remembered_per_file(tmp_path: Path, local_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index_file = tmp_path / INDEX_FILE
    assert ModelIndex([local_models], index_file).build() > 0
    doc = json.loads(index_file.read_text())
    assert set(doc["files"]) == {str(local_models / "open-v3.gguf"), str(local_models / "sub" / "q8.gguf")}
    calls = count_hashing(monkeypatch)
    again = ModelIndex([local_models], index_file)
    assert again.build() == 0
    name, (_, nbytes, d) = next(iter(expected_tensors(local_models / "open-v3.gguf").items()))
    assert again.find(d, nbytes, name) is not None and calls == []  # from the index file, no hashing


def test_lookup_serves_local_bytes_verified(tmp_path: Path, local_models: Path) -> None:
    c = TensorCache(tmp_path / "c", 1 << 20, models=ModelIndex([local_models], tmp_path / "c" / INDEX_FILE))
    model = local_models / "open-v3.gguf"
    tensors = expected_tensors(model)
    raw = model.read_bytes()
    for name, (offset, nbytes, d) in tensors.items():
        arr = c.lookup(d, nbytes=nbytes, name=name)
        assert arr is not None and arr.tobytes() == raw[offset : offset + nbytes] and not arr.flags.writeable
    s = c.stats()
    assert s.local_hits == len(tensors) and s.entries == 0  # mapped where they are, not copied
    assert c.lookup(digest_of(b"absent"), nbytes=6) is None


def test_lying_index_file_is_caught(tmp_path: Path, local_models: Path) -> None:
    index_file = tmp_path / INDEX_FILE
    ModelIndex([local_models], index_file).build()
    doc = json.loads(index_file.read_text())
    rec = doc["files"][str(local_models / "open-v3.gguf")]
    names = sorted(rec["digests"])
    rec["digests"][names[0]], rec["digests"][names[1]] = rec["digests"][names[1]], rec["digests"][names[0]]
    index_file.write_text(json.dumps(doc))
    c = TensorCache(tmp_path / "c", 1 << 20, models=ModelIndex([local_models], index_file))
    d = rec["digests"][names[0]]  # the index now points it at the wrong tensor
    offset, nbytes, real = expected_tensors(local_models / "open-v3.gguf")[names[1]]
    assert real == d
    arr = c.lookup(d)  # the wrong bytes are refused, the record dropped, the right tensor found by hashing
    assert arr is not None and arr.tobytes() == (local_models / "open-v3.gguf").read_bytes()[offset : offset + nbytes]


BAD_INDEXES = ["", "{", "[]", '{"version": 1, "files": {"/x": {"size": "big"}}}',
               '{"version": 1, "files": {"/x": {"size": 1, "mtime_ns": 1, "digests": {"t": "zz"}}}}']


@pytest.mark.parametrize("content", BAD_INDEXES)
def test_malformed_index_file_ignored(tmp_path: Path, local_models: Path, content: str) -> None:
    index_file = tmp_path / INDEX_FILE
    index_file.write_text(content)
    index = ModelIndex([local_models], index_file)
    name, (_, nbytes, d) = next(iter(expected_tensors(local_models / "open-v3.gguf").items()))
    assert index.find(d, nbytes, name) is not None
    index.save()
    assert json.loads(index_file.read_text())["version"] == 1


def test_local_file_changed_after_indexing(tmp_path: Path) -> None:
    models = tmp_path / "m"
    models.mkdir()
    path = write_model(models / "a.gguf", SynthSpec(seed=1))
    tensors = expected_tensors(path)
    c = TensorCache(tmp_path / "c", 1 << 20, models=ModelIndex([models], tmp_path / INDEX_FILE))
    name, (offset, nbytes, d) = max(tensors.items(), key=lambda kv: kv[1][1])
    assert c.lookup(d, nbytes, name) is not None
    with open(path, "r+b") as f:  # edited in place behind the index's back, same size
        f.seek(offset)
        f.write(bytes(16))
    assert c.link_or_read_from(path, offset, nbytes, d) is None
    assert c.link_or_read_from(path, offset, nbytes + len(path.read_bytes()), d) is None
    assert c.link_or_read_from(tmp_path / "gone.gguf", 0, 10, d) is None


def test_cache_module_imports_nothing_from_engine() -> None:
    code = "import sys, rpcnode.cache; sys.exit(any(m == 'engine' or m.startswith('engine.') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2]).returncode == 0
