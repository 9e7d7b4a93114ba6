"""The session fuzz as a campaign (a few thousand mutated frames, pipelined over several connections at once) and
a regression test for each fault it found; benchmarks/fuzz_worker.py runs the same campaign with a million."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import psutil
import pytest

from engine.synth import SynthSpec, write_model
from rpcnode import protocol as P
from tests.rpcnode.conftest import WorkerProc, start_worker
from tests.rpcnode.fuzz_campaign import PROMPT, Plan, logits_through, run_campaign
from tests.rpcnode.session_fuzz import Mutator, Request, Session, mutate, raw_frame, record_sessions, restore

STALL_S = 1.0


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("m") / "small.gguf", SynthSpec(layers=2, dense_layers=1, seed=3))


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProc]:
    w = start_worker(tmp_path_factory.mktemp("campaign"), "-m", "64MiB", "--stall-timeout", str(STALL_S),
                     "--idle-timeout", "20")
    yield w
    w.kill()


@pytest.fixture(scope="module")
def sessions(worker: WorkerProc, small_model: Path) -> dict[str, list[Request]]:
    return record_sessions(small_model, worker.endpoint, PROMPT)


def first(session: list[Request], kind: P.Kind) -> Request:
    return next(r for r in session if r.kind == kind)


def assert_typed(reply: P.Message, *codes: P.ErrorCode) -> None:
    assert isinstance(reply, P.ErrorReply) and reply.code in codes, reply


def test_a_short_campaign(worker: WorkerProc, sessions: dict[str, list[Request]], small_model: Path) -> None:
    """Three thousand mutated frames over 4 connections at once, in pipelined batches: every frame is answered
    (never INTERNAL) or its connection closed by the worker within the deadline, nothing logged as a traceback,
    and a legitimate client's logits afterwards are what they were."""
    want = logits_through(small_model, worker.endpoint)
    tally = run_campaign(worker.endpoint, Mutator(sessions, seed=13),
                         Plan(frames=3000, connections=4, stall_s=STALL_S, deadline_s=30.0, seed=13))
    assert tally.frames >= 3000 and tally.connections >= 4
    assert tally.n_internal == 0, tally.internal
    assert tally.n_hangs == 0, tally.hangs
    assert tally.out_of_order == 0
    assert tally.codes["RunReply"] > 0 and tally.codes["BAD_METADATA"] > 0  # it reached the ops and the decoder
    assert worker.proc.poll() is None
    assert "Traceback" not in worker.log_text()
    assert np.array_equal(logits_through(small_model, worker.endpoint), want)


# ---- what the campaign found ----------------------------------------------------------------------------------

# an offer with a field no message has, whose value is an array in an array in ... (100,000 levels: 100 KB)
DEEP = b"\x82\xa4kind\x04\xa1x" + b"\x91" * 100_000 + b"\xc0"


def test_metadata_nested_past_the_recursion_limit_is_bad_metadata() -> None:
    """msgspec raises RecursionError (not a DecodeError) skipping an unknown field's value nested ~1000 deep."""
    header = P.Header(1, 0, int(P.Kind.OFFER_TENSOR), 0, 7, 0, 0)
    with pytest.raises(P.ProtocolError) as err:
        P.decode_meta(header, DEEP)
    assert err.value.code == P.ErrorCode.BAD_METADATA and not err.value.fatal


def test_deep_nesting_answers_its_own_request(worker: WorkerProc) -> None:
    """The worker answers BAD_METADATA for that very frame (an unexpected error used to answer with the previous
    request's id), and the connection goes on."""
    with Session(worker.endpoint) as s:
        s.sock.sendall(raw_frame(P.Kind.OFFER_TENSOR, DEEP, b"", 4242))
        reply = P.recv_frame(s.sock)
        assert reply.header.request_id == 4242
        assert_typed(reply.message, P.ErrorCode.BAD_METADATA)
        assert isinstance(s.ask({"kind": int(P.Kind.DEVICE_INFO_REQUEST)}), P.DeviceInfo)
    assert "Traceback" not in worker.log_text()


@pytest.mark.parametrize(("placement", "op", "layer"), [
    ("exps", 0, 0),  # moe_experts on layer 0, a dense one (first_k_dense_replace 1)
    ("exps", 0, -1),  # ... at -1, which would index the last layer
    ("exps", 0, 2),  # ... past the last layer
    ("embd", 0, 0),  # embd anywhere but -1
    ("all", -1, 1),  # output anywhere but n_layers
    ("all", 0, -1),  # a layer's op at -1
])
def test_an_op_at_a_layer_it_cannot_run_at_is_bad_program(worker: WorkerProc, sessions: dict[str, list[Request]],
                                                          placement: str, op: int, layer: int) -> None:
    """A program whose op names a layer that op cannot run at was defined, and its runs failed on weights never
    loaded (INTERNAL: an assert, None.rows, None.matmul_t)."""
    define = first(sessions[placement], P.Kind.DEFINE_SEGMENT)
    index = len(define.doc["ops"]) + op if op < 0 else op + 1  # ops[0] is the config record
    with Session(worker.endpoint) as s:
        reply = s.ask(mutate(define.doc, ("ops", index, "args", "layer"), layer))
        assert_typed(reply, P.ErrorCode.BAD_PROGRAM)
        assert "names layer" in reply.message  # type: ignore[union-attr]
    assert "Traceback" not in worker.log_text()


def test_moe_experts_on_a_layer_made_dense_by_the_config_is_bad_program(
        worker: WorkerProc, sessions: dict[str, list[Request]]) -> None:
    define = first(sessions["exps"], P.Kind.DEFINE_SEGMENT)
    with Session(worker.endpoint) as s:
        reply = s.ask(mutate(define.doc, ("ops", 0, "args", "cfg.first_k_dense_replace"), 2))
        assert_typed(reply, P.ErrorCode.BAD_PROGRAM)
        assert "no routed experts" in reply.message  # type: ignore[union-attr]


def test_an_embedding_op_without_its_table_is_bad_program(worker: WorkerProc,
                                                          sessions: dict[str, list[Request]]) -> None:
    """The program names embd but not token_embd.weight: the op ran on None (INTERNAL) instead of a refusal."""
    define = first(sessions["embd"], P.Kind.DEFINE_SEGMENT)
    (key,) = [k for k in define.doc["ops"][1]["args"] if k.startswith("t.")]
    with Session(worker.endpoint) as s:
        reply = s.ask(mutate(define.doc, ("ops", 1, "args", key), ...))
        assert_typed(reply, P.ErrorCode.BAD_PROGRAM)
        assert "token_embd.weight" in reply.message  # type: ignore[union-attr]


def test_a_program_of_no_context_is_bad_program(worker: WorkerProc, sessions: dict[str, list[Request]]) -> None:
    """n_ctx 0 was defined; its first run failed making a KV cache of no positions, outside the typed errors."""
    define = first(sessions["all"], P.Kind.DEFINE_SEGMENT)
    with Session(worker.endpoint) as s:
        reply = s.ask(mutate(define.doc, ("ops", 0, "args", "n_ctx"), 0))
        assert_typed(reply, P.ErrorCode.BAD_PROGRAM)
        assert "'n_ctx' must be at least 1" in reply.message  # type: ignore[union-attr]


def test_a_per_token_section_of_no_rows_is_bad_array(worker: WorkerProc, sessions: dict[str, list[Request]]) -> None:
    """Token ids as one number (shape []): the embedding took len() of it (TypeError, INTERNAL)."""
    run = first(sessions["embd"], P.Kind.RUN_SEGMENT)
    specs, parts = P.pack_arrays([("ids", np.array(7, dtype=np.int64))])
    doc = dict(run.doc, sections=msgspec.to_builtins(specs))
    with Session(worker.endpoint) as s:
        restore(s, sessions["embd"])
        reply = s.ask(doc, b"".join(bytes(p) for p in parts))
        assert_typed(reply, P.ErrorCode.BAD_ARRAY)
        assert "must have a row per token" in reply.message  # type: ignore[union-attr]
    assert "Traceback" not in worker.log_text()


def test_a_batch_whose_activations_exceed_the_overhead_is_out_of_memory(
        worker: WorkerProc, sessions: dict[str, list[Request]]) -> None:
    """An expert segment has no KV cache, so its n_ctx costs nothing and bounds nothing: 200,000 tokens (a 100 MiB
    hidden state) took a 64 MiB worker past 500 MiB of RSS computing them. Its activations are counted first now:
    beyond the 512 MiB activation pool, against -m."""
    define, run = first(sessions["exps"], P.Kind.DEFINE_SEGMENT), first(sessions["exps"], P.Kind.RUN_SEGMENT)
    specs = [msgspec.convert(x, P.ArraySpec) for x in run.doc["sections"]]
    n = 200_000
    arrays = [(s.name, np.resize(a, (n, *a.shape[1:]))) for s, a in zip(specs, P.unpack_arrays(specs, run.payload),
                                                                           strict=True)]
    specs, parts = P.pack_arrays(arrays)
    with Session(worker.endpoint, timeout=60) as s:
        restore(s, sessions["exps"])
        reply = s.ask(mutate(define.doc, ("ops", 0, "args", "n_ctx"), 1 << 30))
        assert isinstance(reply, P.DefineReply), reply
        reply = s.ask(dict(run.doc, n_tokens=n, sections=msgspec.to_builtins(specs)), b"".join(map(bytes, parts)))
        assert_typed(reply, P.ErrorCode.OUT_OF_MEMORY)
        assert "send fewer tokens per run (-ub)" in reply.message  # type: ignore[union-attr]
        restore(s, sessions["exps"])  # the recorded n_ctx again
    assert psutil.Process(worker.proc.pid).memory_info().rss < 400 << 20
