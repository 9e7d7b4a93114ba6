"""A prompt's micro-batches pipelined across real workers (engine.pipeline): bit for bit the logits of the same
passes run one after another (--no-pipeline), which are the local logits of the same -ub; the work really
interleaves; a worker killed mid-prefill is named at once and leaves no reply pending on the other connections."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import load_model
from engine.model import Model
from engine.synth import SynthSpec, write_model
from rpcnode.client import Client, RPCError
from tests.rpcnode.conftest import WorkerProc

UB = 8
PROMPT = [int(t) for t in np.random.default_rng(3).integers(1, 280, 40)]  # 5 micro-batches of 8
BATCH_PROMPTS = [PROMPT[:19], PROMPT[19:30], PROMPT[30:36]]  # 36 rows: 5 passes, sequences split across them


@pytest.fixture(scope="module")
def synth_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers (1 dense), Q8_0 weights."""
    return write_model(tmp_path_factory.mktemp("synth") / "synth-q8.gguf",
                       SynthSpec(layers=4, dense_layers=1, dtype="Q8_0", seed=7))


PLACEMENTS: dict[str, Callable[[list[WorkerProc]], dict[str, Any]]] = {
    "experts-remote": lambda ws: {"rpc": ws[0].endpoint, "override_tensor": [f"exps={ws[0].device}"]},
    "layer-split": lambda ws: {"rpc": [w.endpoint for w in ws], "n_gpu_layers": 3, "tensor_split": [1, 2]},
    # each layer's routed experts on one of two workers
    "experts-by-layer": lambda ws: {"rpc": [w.endpoint for w in ws],
                                    "override_tensor": [rf"blk\.[13]\.ffn_.*exps={ws[0].device}",
                                                        f"exps={ws[1].device}"]},
    # each layer's experts split over both (expert parallel); layer 1's whole on the first: a split layer waits
    # for a worker's run of another pass to land before it asks that worker
    "expert-parallel": lambda ws: {"rpc": [w.endpoint for w in ws],
                                   "override_tensor": [rf"blk\.1\.ffn_.*exps={ws[0].device}",
                                                       f"exps={ws[0].device},{ws[1].device}"]},
}


def prefill_truncate_batch(model: Model) -> list[np.ndarray]:
    """All-position logits of a 5-pass prompt, a decode, a truncate and a 3-pass re-eval, then three sequences
    prefilled together in 5 passes and a decode pass of all three."""
    cache = model.new_cache(128)
    out = [model.eval(PROMPT, cache, all_logits=True), model.eval([5], cache)]
    cache.truncate(20)
    out.append(model.eval(PROMPT[3:20], cache))
    caches = [model.new_cache(128) for _ in BATCH_PROMPTS]
    out += model.eval_batch(list(zip(BATCH_PROMPTS, caches, strict=True)))
    out += model.eval_batch([([t], c) for t, c in zip([7, 8, 9], caches, strict=True)])
    return out


def run_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """("sent" or "answered", first position) of each run the clients send, in order."""
    log: list[tuple[str, int]] = []
    positions: dict[tuple[int, int], int] = {}
    start, finish = Client.start_segment, Client.finish_segment

    def start_segment(self: Client, segment_id: int, seqs: Any, arrays: Any) -> int:
        rid = start(self, segment_id, seqs, arrays)
        positions[id(self), rid] = seqs[0][1]
        log.append(("sent", seqs[0][1]))
        return rid

    def finish_segment(self: Client, request_id: int) -> dict[str, np.ndarray]:
        out = finish(self, request_id)
        log.append(("answered", positions[id(self), request_id]))
        return out

    monkeypatch.setattr(Client, "start_segment", start_segment)
    monkeypatch.setattr(Client, "finish_segment", finish_segment)
    return log


def prefill_log(model: Model, log: list[tuple[str, int]]) -> list[tuple[str, int]]:
    log.clear()
    model.eval(PROMPT, model.new_cache())
    return list(log)


def overlapped(log: list[tuple[str, int]]) -> bool:
    """Whether the second micro-batch went to a worker before the first one's last reply came back."""
    return log.index(("sent", UB)) < max(i for i, e in enumerate(log) if e == ("answered", 0))


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
@pytest.mark.parametrize(("mla", "cache_type"), [(3, "f16"), (0, "q8_0")])
def test_pipelined_passes_are_bitwise_the_sequential_ones_and_local(workers: Callable[..., WorkerProc],
                                                                    synth_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    placement: str, mla: int, cache_type: str) -> None:
    ws = [workers()] if placement == "experts-remote" else [workers(), workers()]
    flags = {"ctx_size": 256, "mla": mla, "cache_type_k": cache_type, "ubatch_size": UB}
    pipelined = load_model(synth_model, **flags, **PLACEMENTS[placement](ws))
    sequential = pipelined.with_options(pipeline=False)
    assert pipelined.options.pipeline and len(pipelined.net.remote) >= 2
    want = prefill_truncate_batch(load_model(synth_model, **flags))
    base = prefill_truncate_batch(sequential)
    got = prefill_truncate_batch(pipelined)
    for g, b, w in zip(got, base, want, strict=True):
        np.testing.assert_array_equal(g, b)
        assert np.abs(g - w).max() <= 1e-6 * np.abs(w).max()
    log = run_log(monkeypatch)
    one_by_one, pipelined_log = prefill_log(sequential, log), prefill_log(pipelined, log)
    assert sorted(pipelined_log) == sorted(one_by_one)  # the same runs
    assert overlapped(pipelined_log) and not overlapped(one_by_one)


def test_pipelined_llama_layer_split(workers: Callable[..., WorkerProc], smollm2_path: Path) -> None:
    """A real llama model with its layers split across two workers: the same logits pipelined and not."""
    a, b = workers(), workers()
    flags = {"ctx_size": 64, "ubatch_size": UB, "rpc": f"{a.endpoint},{b.endpoint}", "n_gpu_layers": 99,
             "tensor_split": "1,1"}
    prompt = [int(t) for t in np.random.default_rng(5).integers(1, 49000, 24)]
    want = load_model(smollm2_path, ctx_size=64, ubatch_size=UB).logits(prompt)
    pipelined = load_model(smollm2_path, **flags)
    base = pipelined.with_options(pipeline=False).logits(prompt)
    got = pipelined.logits(prompt)
    np.testing.assert_array_equal(got, base)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_runs_outstanding_on_one_connection_are_answered_in_order(workers: Callable[..., WorkerProc],
                                                                  synth_model: Path) -> None:
    """Several runs in flight on one client: their replies in the order sent, each the reply it gets alone; one
    asked for out of turn or another request meanwhile is refused before anything is read; drop_runs leaves the
    connection ready for the next request."""
    w = workers()
    model = load_model(synth_model, ctx_size=64, rpc=w.endpoint, n_gpu_layers=99)
    segment_id, _ = model.net.remote[0]
    client = model.net.clients[w.device]
    x = np.random.default_rng(1).standard_normal((8, model.config.hidden_size)).astype(np.float32)

    def run(seq: int, pos: int) -> int:
        return client.start_segment(segment_id, [(seq, pos, 4)], [("x", x[pos : pos + 4]), ("n_out", np.asarray(1))])

    alone = [client.finish_segment(run(1, 0)), client.finish_segment(run(1, 4))]
    first, second = run(2, 0), run(2, 4)
    assert client.runs_outstanding == 2
    with pytest.raises(RPCError, match="finished out of order"):
        client.finish_segment(second)
    with pytest.raises(RPCError, match="sent while 2 runs await replies"):
        client.telemetry()
    for want, got in zip(alone, [client.finish_segment(first), client.finish_segment(second)], strict=True):
        np.testing.assert_array_equal(got["logits"], want["logits"])
    run(3, 0)
    client.drop_runs()
    assert client.runs_outstanding == 0 and client.telemetry().tensors_held > 0


def test_a_worker_killed_mid_pipeline_is_named_and_nothing_is_left_pending(workers: Callable[..., WorkerProc],
                                                                           synth_model: Path) -> None:
    a, b = workers(), workers()
    model = load_model(synth_model, ctx_size=512, ubatch_size=UB, rpc=[a.endpoint, b.endpoint], n_gpu_layers=3,
                       tensor_split=[1, 2], failover=False)  # failover: tests/rpcnode/test_failover.py
    prompt = (PROMPT * 10)[:400]  # 50 passes
    model.eval(prompt[:2 * UB], model.new_cache())  # kernels compiled: the kill lands in a pipelined prefill
    killer = threading.Timer(0.3, b.kill)
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(RPCError, match=rf"RPC\[{b.endpoint}\]"):
        while time.monotonic() - t0 < 30:
            model.eval(prompt, model.new_cache())
    assert time.monotonic() - t0 < 5
    killer.join()
    survivor = model.net.clients[a.device]
    assert survivor.runs_outstanding == 0
    assert survivor.telemetry().tensors_held > 0  # its connection is in step: the next request gets its own reply
