"""Several sequences in one pass through real workers: one round trip per remote segment for all of them, the
logits of the same pass run here, and a worker that checks a batch's sequences (protocol 1.1 RunSegment.seqs)
from a hostile peer before it allocates anything, answering a bad one with an error and serving on."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest

from engine import load_model
from engine.forward_pass import segment_inputs
from engine.segments import MAX_SEQUENCES
from engine.synth import SynthSpec, write_model
from rpcnode import protocol as P
from rpcnode.client import Client, RPCError
from tests.engine.test_batch import PROMPTS, alone, batched
from tests.rpcnode.conftest import WorkerProc
from tests.rpcnode.test_hostile_peers import one_context_worker

CTX = 256


@pytest.fixture(scope="module")
def synth_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers (1 dense), Q8_0 weights."""
    return write_model(tmp_path_factory.mktemp("synth") / "synth-q8.gguf",
                       SynthSpec(layers=4, dense_layers=1, dtype="Q8_0", seed=7))


PLACEMENTS = {
    "experts-remote": lambda ws: {"rpc": ws[0].endpoint, "override_tensor": [f"exps={ws[0].device}"]},
    "layer-split": lambda ws: {"rpc": [w.endpoint for w in ws], "n_gpu_layers": 3, "tensor_split": [1, 2]},
}


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
@pytest.mark.parametrize(("mla", "cache_type"), [(3, "f16"), (0, "q8_0")])
def test_a_batch_through_workers_is_the_batch_run_here(workers: Callable[..., WorkerProc], synth_model: Path,
                                                       placement: str, mla: int, cache_type: str) -> None:
    """The workers run the same rows through the same kernels: the logits of the local batch (to float32 rounding
    of the sums), which are each sequence's alone (tests/engine/test_batch.py); the same greedy tokens."""
    ws = [workers(), workers()] if placement == "layer-split" else [workers()]
    flags = {"ctx_size": CTX, "mla": mla, "cache_type_k": cache_type}
    model = load_model(synth_model, **flags, **PLACEMENTS[placement](ws))
    assert model.net.remote
    local = load_model(synth_model, **flags)
    got, got_tokens = batched(model)
    want, want_tokens = batched(local)
    assert got_tokens == want_tokens == alone(local)[1]
    for g_seq, w_seq in zip(got, want, strict=True):
        for g, w in zip(g_seq, w_seq, strict=True):
            assert np.abs(g - w).max() <= 1e-6 * np.abs(w).max()


def test_one_round_trip_per_remote_segment_for_the_whole_batch(workers: Callable[..., WorkerProc],
                                                               synth_model: Path) -> None:
    w = workers()
    model = load_model(synth_model, ctx_size=CTX, rpc=w.endpoint, override_tensor=[f"exps={w.device}"])
    client = model.net.clients[w.device]
    caches = [model.new_cache() for _ in range(5)]
    model.eval_batch([(p, c) for p, c in zip([*PROMPTS, [3], [4, 5]], caches, strict=True)])
    before = client.counters.runs
    outs = model.eval_batch([([7], c) for c in caches])
    assert len(outs) == 5 and all(o.shape == (model.n_vocab,) for o in outs)
    assert client.counters.runs - before == len(model.net.remote)  # one RunSegment per remote segment, not 5
    # more sequences than a worker takes in one run: further passes, the same logits as in passes of up to 16
    many = [model.new_cache() for _ in range(MAX_SEQUENCES + 2)]
    before = client.counters.runs
    got = model.eval_batch([([k + 1], c) for k, c in enumerate(many)])
    assert client.counters.runs - before == 2 * len(model.net.remote)
    local = load_model(synth_model, ctx_size=CTX)
    items = [([k + 1], local.new_cache()) for k in range(len(many))]
    want = local.eval_batch(items[:MAX_SEQUENCES]) + local.eval_batch(items[MAX_SEQUENCES:])
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() <= 1e-6 * np.abs(w).max()


def test_a_client_sends_a_batch_only_to_a_worker_speaking_1_1(workers: Callable[..., WorkerProc]) -> None:
    w = workers()
    with Client.connect(w.endpoint) as c:
        assert c.minor == P.PROTOCOL_MINOR >= 1
        c.minor = 0  # as with a 1.0 worker, which would run the rows as one sequence
        with pytest.raises(RPCError, match=r"speaks protocol 1\.0; running several sequences in one pass needs 1\.1"):
            c.start_segment(1, [(1, 0, 1), (2, 0, 1)], [("x", np.zeros((2, 8), np.float32))])


# ---- a hostile peer's batches ----------------------------------------------------------------------------------


class RawPeer:
    """RunSegment frames written by hand to a remote attention segment, each answered by one reply."""

    def __init__(self, w: WorkerProc, model: object) -> None:
        host, _, port = w.endpoint.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.sendall(P.encode_frame(P.Hello(want_auth=False), 1))
        assert isinstance(P.recv_frame(self.sock).message, P.HelloReply)
        self.segment_id, seg = model.net.remote[0]  # type: ignore[attr-defined]
        assert any(p == "attn" for _, p in seg.ops)
        self.names = segment_inputs(seg, {"x": 0, "n_out": 0})  # type: ignore[dict-item]
        self.width = model.config.hidden_size  # type: ignore[attr-defined]
        self.rid = 1

    def run(self, seqs: list[tuple[int, int, int]], n_tokens: int | None = None, rows: int | None = None) -> P.Message:
        total = sum(n for _, _, n in seqs)
        n_rows = total if rows is None else rows
        arrays = [("x", np.full((n_rows, self.width), 0.01, np.float32)), ("n_out", np.asarray(1))]
        specs, parts = P.pack_arrays([(n, a) for n, a in arrays if n in self.names])
        m = P.RunSegment(segment_id=self.segment_id, seq_id=seqs[0][0], pos_start=seqs[0][1],
                         n_tokens=total if n_tokens is None else n_tokens, sections=specs,
                         seqs=[P.SeqSpan(seq_id=i, pos_start=p, n_tokens=n) for i, p, n in seqs])
        self.rid += 1
        self.sock.sendall(P.encode_frame(m, self.rid, b"".join(bytes(p) for p in parts)))
        return P.recv_frame(self.sock).message


def _refused(reply: P.Message, code: P.ErrorCode, says: str) -> None:
    assert isinstance(reply, P.ErrorReply), reply
    assert (reply.code, reply.fatal) == (code, False), reply
    assert says in reply.message, reply.message


def test_a_batchs_sequences_are_checked_before_anything_is_allocated(workers: Callable[..., WorkerProc],
                                                                     synth_model: Path) -> None:
    w = workers("-m", "512MiB")
    model = load_model(synth_model, ctx_size=CTX, rpc=w.endpoint, n_gpu_layers=99)
    peer = RawPeer(w, model)
    huge = (1 << 32) - 1
    cases = [
        (dict(seqs=[(1, 0, 2), (2, 0, 1)], n_tokens=4), P.ErrorCode.BAD_METADATA, "sum to 3, n_tokens is 4"),
        (dict(seqs=[(1, 0, 1), (1, 0, 1)]), P.ErrorCode.BAD_METADATA, "sequence 1 appears twice"),
        (dict(seqs=[(k, 0, 1) for k in range(P.MAX_RUN_SEQUENCES + 1)]), P.ErrorCode.BAD_METADATA, "seqs"),
        (dict(seqs=[(k, 0, 1) for k in range(MAX_SEQUENCES + 1)]), P.ErrorCode.BAD_ARRAY,
         f"1 to {MAX_SEQUENCES} sequences, not {MAX_SEQUENCES + 1}"),
        (dict(seqs=[(1, 0, 1), (2, (1 << 63) - 2, 1)]), P.ErrorCode.BAD_ARRAY,
         f"sequence 2: 1 tokens at position {(1 << 63) - 2} do not fit the context of {CTX}"),
        (dict(seqs=[(1, 0, 1), (2, 0, huge - 1)], rows=2), P.ErrorCode.BAD_ARRAY,
         "do not fit the arrays' rows"),
        (dict(seqs=[(1, 0, 0), (2, 0, 2)]), P.ErrorCode.BAD_ARRAY, "sequence 1: 0 tokens"),
        (dict(seqs=[(1, 0, 2), (2, 0, 1)], rows=2), P.ErrorCode.BAD_ARRAY, "3 tokens do not fit the arrays' rows"),
        (dict(seqs=[(1, 0, 1), (2, 0, CTX + 1)]), P.ErrorCode.BAD_ARRAY, f"{CTX + 1} tokens at position 0 do not fit"),
        # a new sequence beside one the worker does not hold: nothing is started for either
        (dict(seqs=[(1, 0, 3), (2, 5, 1)]), P.ErrorCode.UNKNOWN_SEQUENCE, "sequence 2 is unknown here"),
    ]
    rss = psutil.Process(w.proc.pid).memory_info().rss
    for kwargs, code, says in cases:
        _refused(peer.run(**kwargs), code, says)  # type: ignore[arg-type]
    assert psutil.Process(w.proc.pid).memory_info().rss < rss + (64 << 20)
    _refused(peer.run([(1, 3, 1)]), P.ErrorCode.UNKNOWN_SEQUENCE, "sequence 1 is unknown here")  # never started
    # the worker serves on: a good batch runs, and its sequences go on
    reply = peer.run([(1, 0, 3), (2, 0, 2), (3, 0, 1)])
    assert isinstance(reply, P.RunReply), reply
    assert isinstance(peer.run([(3, 1, 1), (1, 3, 2)]), P.RunReply)
    _refused(peer.run([(2, 3, 1)]), P.ErrorCode.UNKNOWN_SEQUENCE, "holds 2 positions; tokens cannot start at 3")
    cache = model.new_cache()
    assert model.eval([5, 6], cache).shape == (1, model.n_vocab)


def test_a_batchs_kv_growth_is_charged_and_refused_past_m(workers: Callable[..., WorkerProc],
                                                          synth_model: Path) -> None:
    """-m holds the weights and one sequence's whole context (256 positions, the rows a new cache takes at once):
    two new sequences in one run would need two, and are refused, keeping the one the worker holds; alone, each
    new sequence takes the least recently used one's room, as single runs always have."""
    w, model, kv = one_context_worker(workers, synth_model, CTX)
    held = model.new_cache()
    model.eval(PROMPTS[0], held)
    a, b = model.new_cache(), model.new_cache()
    with pytest.raises(RPCError, match=r"OUT_OF_MEMORY: segment \d+: the KV caches of 2 sequences need \d+ bytes "
                                       r"more, 0 free"):
        model.eval_batch([(PROMPTS[1], a), (PROMPTS[2], b)])
    with Client.connect(w.endpoint) as c:
        assert c.telemetry().kv_bytes == kv
    assert (a.n_past, b.n_past) == (0, 0)
    local = load_model(synth_model, ctx_size=CTX, cache_type_k="f32")
    want = local.eval([3], _prefilled(local, PROMPTS[0]))[0]
    assert np.allclose(model.eval([3], held)[0], want, rtol=1e-5, atol=1e-5)  # the held sequence goes on
    model.eval(PROMPTS[1], a)  # alone, a new sequence takes the held one's room
    with pytest.raises(RPCError, match=r"UNKNOWN_SEQUENCE"):
        model.eval([4], held)


def _prefilled(model: object, prompt: list[int]) -> object:
    cache = model.new_cache()  # type: ignore[attr-defined]
    model.eval(prompt, cache)  # type: ignore[attr-defined]
    return cache
