"""A real worker against faults on its disk and odd requests: cache entries changed after verification, fatal
errors whose reply must arrive, typed errors for every bad value, a full disk, unusable --models entries."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import load_model
from engine.synth import SynthSpec, write_model
from rpcnode import protocol as P
from rpcnode.client import Client, OfferSpec, RPCError
from rpcnode.digest import digest_of
from tests.rpcnode.conftest import WorkerProc, start_worker, tmpfs
from tests.rpcnode.session_fuzz import (
    HOSTILE,
    Request,
    Session,
    mutate,
    paths,
    record_session,
    reshaped_sections,
    restore,
    section_mutations,
)

PROMPT = [1, 5, 9, 20, 33]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("m") / "small.gguf", SynthSpec(layers=2, dense_layers=1, seed=3))


def cache_entries(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("??/*") if p.is_file() and not p.name.startswith("."))


def scribble(path: Path) -> None:
    """Write into a cache entry in place (same inode, same size): its old maps see the new bytes."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\x7f\x7f\x7f\x7f")


# ---- cache entries changed on disk after verification --------------------------------------------------------


@pytest.mark.parametrize("free_first", [False, True])
def test_cache_entries_changed_after_verification_are_fetched_again(
        workers: Callable[..., WorkerProc], small_model: Path, free_first: bool) -> None:
    """Every entry of a loaded model is written into on disk; the next load (whether the worker still holds the
    tensors or freed them) finds out and fetches them again, and the logits are the local ones."""
    want = load_model(small_model).logits(PROMPT)
    w = workers()
    first = load_model(small_model, rpc=w.endpoint, n_gpu_layers=99)
    assert first.net.load_stats.bytes_uploaded > 0
    first.net.close()
    entries = cache_entries(w.cache)
    assert entries
    for p in entries:
        scribble(p)
    if free_first:
        with Client.connect(w.endpoint) as c:
            assert c.free().tensors_held == 0
    again = load_model(small_model, rpc=w.endpoint, n_gpu_layers=99)
    stats = again.net.load_stats
    assert stats.tensors_uploaded == len(entries) and stats.bytes_uploaded > 0
    assert np.array_equal(again.logits(PROMPT), want)
    log = w.log_text()
    assert "Traceback" not in log
    if not free_first:
        assert log.count("changed on disk after it was verified; fetching it again") == len(entries)


# ---- fatal errors: the reply arrives ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProc]:
    """One worker shared by the tests that only send it requests (none changes what it holds)."""
    w = start_worker(tmp_path_factory.mktemp("hardening"), "-m", "64MiB")
    yield w
    w.kill()


def connect(w: WorkerProc) -> socket.socket:
    host, _, port = w.endpoint.rpartition(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(P.encode_frame(P.Hello(), 1))
    assert isinstance(P.recv_frame(s).message, P.HelloReply)
    return s


@pytest.mark.parametrize(("head", "code"), [
    (P.HEADER.pack(P.MAGIC, 1, 0, P.Kind.UPLOAD_TENSOR, 0, 7, 100, 300 << 20), P.ErrorCode.TOO_LARGE),
    (P.HEADER.pack(b"HTTP", 1, 0, 0, 0, 7, 0, 0), P.ErrorCode.BAD_MAGIC),
    (P.HEADER.pack(P.MAGIC, 1, 0, P.Kind.FREE, 1, 7, 0, 0), P.ErrorCode.BAD_HEADER),
])
def test_a_fatal_error_reply_arrives_while_the_peer_is_still_sending(worker: WorkerProc, head: bytes,
                                                                     code: P.ErrorCode) -> None:
    """The worker refuses the header and closes, with megabytes of the body still on their way: the peer's send
    completes and it reads the error (no connection reset in its place)."""
    with connect(worker) as s:
        s.sendall(head + bytes(32 << 20))
        reply = P.recv_frame(s).message
        assert isinstance(reply, P.ErrorReply) and reply.fatal and reply.code == code, reply
        assert s.recv(1) == b""  # then an orderly close
    assert "Traceback" not in worker.log_text()


# ---- bad values get their typed error, never INTERNAL --------------------------------------------------------


@pytest.fixture(scope="module")
def sessions(worker: WorkerProc, small_model: Path) -> dict[str, list[Request]]:
    """Real sessions against the shared worker: all layers there, only the experts, only the embedding (so the
    recorded RunSegments carry a hidden state, routing, or token ids)."""
    ep = worker.endpoint
    placements = {"all": {"n_gpu_layers": 99}, "exps": {"override_tensor": [f"exps=RPC[{ep}]"]},
                  "embd": {"override_tensor": [f"token_embd=RPC[{ep}]"]}}
    return {name: record_session(small_model, ep, PROMPT, **opts) for name, opts in placements.items()}


def first(session: list[Request], kind: P.Kind) -> Request:
    return next(r for r in session if r.kind == kind)


def assert_typed(reply: P.Message, *codes: P.ErrorCode) -> None:
    assert isinstance(reply, P.ErrorReply) and reply.code in codes, reply


def test_a_digest_with_a_trailing_newline_is_bad_metadata(worker: WorkerProc) -> None:
    """The schema's pattern must match the whole string: `$` also matches before a final newline."""
    digest = "ab" * 32 + "\n"
    with Session(worker.endpoint) as s:
        offer = {"kind": int(P.Kind.OFFER_TENSOR), "digest": digest, "nbytes": 4, "ggml_type": 0, "shape": [1]}
        assert_typed(s.ask(offer), P.ErrorCode.BAD_METADATA)
        upload = {"kind": int(P.Kind.UPLOAD_TENSOR), "digest": digest, "offset": 0, "final": True}
        assert_typed(s.ask(upload, b"abcd"), P.ErrorCode.BAD_METADATA)
    assert "Traceback" not in worker.log_text()


def test_a_program_naming_a_list_for_its_architecture_is_bad_program(worker: WorkerProc,
                                                                      sessions: dict[str, list[Request]]) -> None:
    define = first(sessions["all"], P.Kind.DEFINE_SEGMENT)
    with Session(worker.endpoint) as s:
        restore(s, sessions["all"])
        for arch in ([], ["deepseek2"], 1.5, "", "llama\n"):
            assert_typed(s.ask(mutate(define.doc, ("ops", 0, "args", "arch"), arch)), P.ErrorCode.BAD_PROGRAM)
    assert "Traceback" not in worker.log_text()


@pytest.mark.parametrize(("placement", "section"), [("exps", "idx"), ("embd", "ids")])
def test_ids_past_their_table_are_bad_array_not_wrapped(worker: WorkerProc, sessions: dict[str, list[Request]],
                                                       placement: str, section: str) -> None:
    """Expert ids and token ids index tables on the worker: a negative one must not silently pick the last row
    (NumPy's indexing would), nor a huge one read past the table. (Expert id -1 means "no expert here", protocol
    1.2: the most negative id refused there is -2.)"""
    run = first(sessions[placement], P.Kind.RUN_SEGMENT)
    specs = [msgspec.convert(x, P.ArraySpec) for x in run.doc["sections"]]
    (a, b), = [ab for spec, ab in zip(specs, P.sections_layout(specs), strict=True) if spec.name == section]
    with Session(worker.endpoint) as s:
        restore(s, sessions[placement])
        assert isinstance(s.ask(run.doc, run.payload), P.RunReply)
        for v in (-2 if section == "idx" else -1, -(2**31), 2**31 - 1):
            payload = run.payload[:a] + np.full((b - a) // 8, v, dtype="<i8").tobytes() + run.payload[b:]
            reply = s.ask(run.doc, payload)
            assert_typed(reply, P.ErrorCode.BAD_ARRAY)
            assert "do not fit" in reply.message  # type: ignore[union-attr]
    assert "Traceback" not in worker.log_text()


def test_an_output_row_count_that_is_not_one_number_is_bad_array(worker: WorkerProc,
                                                                  sessions: dict[str, list[Request]]) -> None:
    run = first(sessions["all"], P.Kind.RUN_SEGMENT)
    with Session(worker.endpoint) as s:
        restore(s, sessions["all"])
        x = P.unpack_arrays([msgspec.convert(x, P.ArraySpec) for x in run.doc["sections"]], run.payload)[0]
        for n_out in (np.array([1]), np.array([1, 2]), np.zeros((1, 1), np.int64)):
            specs, parts = P.pack_arrays([("x", x), ("n_out", n_out)])
            reply = s.ask(dict(run.doc, sections=msgspec.to_builtins(specs)), b"".join(bytes(p) for p in parts))
            assert_typed(reply, P.ErrorCode.BAD_ARRAY)
    assert "Traceback" not in worker.log_text()


@st.composite
def _mutated(draw: st.DrawFn, sessions: dict[str, list[Request]]) -> tuple[str, Request, dict, bytes]:
    """A recorded request (not an upload of a held tensor: that ends early) with 1-3 fields replaced by hostile
    values, and for a RunSegment maybe one section's values."""
    name = draw(st.sampled_from(sorted(sessions)))
    r = draw(st.sampled_from([r for r in sessions[name] if r.kind != P.Kind.UPLOAD_TENSOR]))
    doc, payload = r.doc, r.payload
    if r.kind == P.Kind.RUN_SEGMENT and draw(st.booleans()):
        doc, payload = draw(st.sampled_from([(doc, p) for p in section_mutations(r)] + list(reshaped_sections(r))))
    for _ in range(draw(st.integers(0 if payload is not r.payload else 1, 3))):
        doc = mutate(doc, draw(st.sampled_from(list(paths(doc)))), draw(st.sampled_from((*HOSTILE, ...))))
    return name, r, doc, payload


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_sessions_get_typed_errors(worker: WorkerProc, sessions: dict[str, list[Request]],
                                           data: st.DataObject) -> None:
    """Requests of recorded real sessions with fields replaced (wrong types, out of range, NaN, odd text, ...) and
    section values replaced: every reply is an answer or a typed error, never INTERNAL, and nothing is logged
    as a traceback."""
    name, r, doc, payload = data.draw(_mutated(sessions))
    with Session(worker.endpoint) as s:
        if r.kind == P.Kind.RUN_SEGMENT:
            restore(s, sessions[name])
        reply = s.ask(doc, payload)
        assert not (isinstance(reply, P.ErrorReply) and reply.code == P.ErrorCode.INTERNAL), (doc, reply)
    assert worker.proc.poll() is None and "Traceback" not in worker.log_text()


# ---- a full disk -----------------------------------------------------------------------------------------------


def test_a_full_disk_answers_disk_full(workers: Callable[..., WorkerProc], tiny_disk: Path) -> None:
    """The cache on a real 1 MiB filesystem: a tensor the disk cannot take is DISK_FULL (not OUT_OF_MEMORY, the
    worker has memory to spare), nothing stays reserved, and a tensor that fits still loads."""
    w = workers(cache=tiny_disk / "cache")
    big, small = bytes(2 << 20), b"\x01" * (64 << 10)
    specs = [OfferSpec(digest_of(b), len(b), 0, [len(b) // 4], name, lambda b=b: b)
             for b, name in ((big, "big"), (small, "small"))]
    with Client.connect(w.endpoint) as c:
        with pytest.raises(RPCError) as err:
            c.offer(specs[:1])
        assert err.value.code == P.ErrorCode.DISK_FULL and "no space left on the disk" in str(err.value)
        assert c.offer(specs[1:]) == {specs[1].digest: "uploaded"}
        assert c.device_info().mem_free_bytes == c.device_info().mem_total_bytes - len(small)
    assert "Traceback" not in w.log_text()


def test_a_failing_disk_answers_disk_failed(workers: Callable[..., WorkerProc], tmp_path: Path) -> None:
    """A disk that fails otherwise than by filling up (here a filesystem remounted read-only under a running
    worker) used to answer INTERNAL with a traceback in the log: now DISK_FAILED naming the disk and the fix,
    nothing stays reserved, and tensors the worker holds still serve."""
    with tmpfs(tmp_path / "disk", "size=8m") as mnt:
        w = workers(cache=mnt / "cache")
        first, second = b"\x01" * (64 << 10), b"\x02" * (64 << 10)
        specs = [OfferSpec(digest_of(b), len(b), 0, [len(b) // 4], name, lambda b=b: b)
                 for b, name in ((first, "first"), (second, "second"))]
        with Client.connect(w.endpoint) as c:
            assert c.offer(specs[:1]) == {specs[0].digest: "uploaded"}
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            try:
                with pytest.raises(RPCError) as err:
                    c.offer(specs[1:])
            finally:
                subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
            assert err.value.code == P.ErrorCode.DISK_FAILED, str(err.value)
            assert re.search(r"the disk under .* failed while writing an entry \(Read-only file system\); check "
                             r"it, or give the worker another cache directory \(-c\)", str(err.value))
            info = c.device_info()
            assert info.mem_free_bytes == info.mem_total_bytes - len(first)
            assert c.offer(specs[1:]) == {specs[1].digest: "uploaded"}  # the disk back: the same offer loads
        assert "Traceback" not in w.log_text()


# ---- --models entries that cannot be used ----------------------------------------------------------------------


def test_unusable_models_entries_are_logged_with_the_reason(workers: Callable[..., WorkerProc], small_model: Path,
                                                           tmp_path: Path) -> None:
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    (broken / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    (tmp_path / "notes.txt").write_text("not a model")
    w = workers("--models", str(tmp_path / "missing"), "--models", str(tmp_path / "notes.txt"), "--models",
                str(empty), "--models", str(broken), "--models", str(small_model))
    lines = [ln for ln in w.log_text().splitlines() if ln.startswith("rpcnode: --models ")]
    assert len(lines) == 4, lines
    assert lines[0] == f"rpcnode: --models {tmp_path / 'missing'}: no such directory; left out"
    assert lines[1] == f"rpcnode: --models {tmp_path / 'notes.txt'}: not a directory (nor a .gguf file); left out"
    assert lines[2] == f"rpcnode: --models {empty}: holds no .gguf files; left out"
    assert lines[3].startswith(f"rpcnode: --models {broken / 'bad.gguf'}: ") and lines[3].endswith("; left out")
    # the model file given itself is used: its tensors come from the disk, not the network
    model = load_model(small_model, rpc=w.endpoint, n_gpu_layers=99)
    assert model.net.load_stats.tensors_offered > 0 and model.net.load_stats.bytes_uploaded == 0
