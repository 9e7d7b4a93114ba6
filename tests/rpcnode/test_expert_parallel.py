"""A layer's experts split over devices (-ot REGEX=DEV1,DEV2): real workers on loopback, logits bit for bit those
of one device, each device sent only the rows that picked its experts."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engine import load_model
from engine.distributed import DistributedNet
from engine.forward_pass import ExpertsSplit
from engine.synth import SynthSpec, write_model
from rpcnode.client import RPCError
from tests.refs import V3
from tests.rpcnode.conftest import WorkerProc
from tests.rpcnode.test_distributed import DECODE, PROMPT, assert_same, run_sequence

SEQUENCES = [[3, 9, 27, 81, 2], [5, 6], [40, 41, 42, 43, 44, 45, 46, 47]]


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Q8_0, 4 layers (1 dense), 16 experts, 4 per token."""
    path = tmp_path_factory.mktemp("ep") / "ep-q8.gguf"
    return write_model(path, SynthSpec(layers=4, dense_layers=1, dtype="Q8_0", experts=16, top_k=4, seed=11))


def assert_identical(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w), float(np.max(np.abs(g - w)))


def split_of(model: object) -> ExpertsSplit:
    net = model.net  # type: ignore[attr-defined]
    assert isinstance(net, DistributedNet)
    splits = {id(e): e for _, e in net.steps if isinstance(e, ExpertsSplit)}
    assert len(splits) == 1
    return next(iter(splits.values()))


@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
def test_experts_split_over_two_workers_equal_one_device(workers: Callable[..., WorkerProc], moe_model: Path,
                                                         cache_type: str) -> None:
    a, b = workers(), workers()
    want = run_sequence(load_model(moe_model, cache_type_k=cache_type))
    model = load_model(moe_model, rpc=f"{a.endpoint},{b.endpoint}", override_tensor=[f"exps={a.device},{b.device}"],
                       cache_type_k=cache_type)
    # each MoE layer: one segment, experts 0-7 on a and 8-15 on b, both defined there under the same id
    assert {(s.device, s.experts[0].first, s.experts[0].count) for _, s in model.net.remote} == {
        (a.device, 0, 8), (b.device, 8, 8)}
    assert len(model.net.remote) == 2 * 3
    assert_identical(run_sequence(model), want)


def test_float_experts_split_agree_to_float_rounding(workers: Callable[..., WorkerProc]) -> None:
    """The reference model's experts are F32, multiplied by BLAS, whose result for a row depends on how many rows
    it is given: a device sent fewer rows agrees to a few float32 ulps, not bit for bit."""
    a, b = workers(), workers()
    want = run_sequence(load_model(V3, mla=0))
    model = load_model(V3, rpc=f"{a.endpoint},{b.endpoint}", override_tensor=[f"exps={a.device},{b.device}"],
                       mla=0)
    assert_same(run_sequence(model), want)


def test_shares_and_this_process_as_one_device(workers: Callable[..., WorkerProc], moe_model: Path) -> None:
    w = workers()
    want = run_sequence(load_model(moe_model))
    model = load_model(moe_model, rpc=w.endpoint, override_tensor=[f"exps=CPU:1,{w.device}:3"])
    assert {(s.device, s.experts[0].first, s.experts[0].count) for _, s in model.net.remote} == {(w.device, 4, 12)}
    # the worker holds 12 of 16 experts of each of the 3 MoE layers
    held = sum(t.n_bytes for n, t in model.gguf.tensors.items() if "_exps" in n) * 12 // 16
    assert model.net.load_stats.bytes_uploaded >= held
    assert_identical(run_sequence(model), want)


def test_several_sequences_in_one_pass(workers: Callable[..., WorkerProc], moe_model: Path) -> None:
    a, b = workers(), workers()
    local = load_model(moe_model)
    model = load_model(moe_model, rpc=f"{a.endpoint},{b.endpoint}", override_tensor=[f"exps={a.device},{b.device}"])
    for m in (local, model):
        m.caches = [m.new_cache(64) for _ in SEQUENCES]  # type: ignore[attr-defined]
    for step in range(3):
        items = [(s if step == 0 else [s[-1] + step], c) for s, c in zip(SEQUENCES, local.caches, strict=True)]
        want = local.eval_batch(items)
        items = [(ids, c) for (ids, _), c in zip(items, model.caches, strict=True)]
        assert_identical(model.eval_batch(items), want)


def test_a_device_is_sent_only_the_rows_that_picked_its_experts(workers: Callable[..., WorkerProc],
                                                                 moe_model: Path) -> None:
    a, b = workers(), workers()
    model = load_model(moe_model, rpc=f"{a.endpoint},{b.endpoint}",
                       override_tensor=[f"exps={a.device}:15,{b.device}:1"])  # b holds expert 15 alone
    split = split_of(model)
    picked = []

    def spy(op: tuple[int, str], state: dict[str, np.ndarray], *args: object, **kw: object) -> None:
        if op[1] == "shared_experts":  # ExpertsSplit runs it once per layer, with the routing in the state
            picked.append(int(np.count_nonzero((state["idx"] == 15).any(axis=1))))
        run_op(op, state, *args, **kw)

    run_op, split.coordinator = split.coordinator, spy
    a_before, b_before = (c.counters.runs for c in model.net.clients.values())
    cache = model.new_cache(64)
    model.eval(PROMPT, cache)
    for t in DECODE:
        model.eval([t], cache)
    a_runs, b_runs = (c.counters.runs - n for c, n in zip(model.net.clients.values(), (a_before, b_before),
                                                            strict=True))
    assert len(picked) == 3 * (1 + len(DECODE))  # 3 MoE layers per pass
    assert b_runs == sum(n > 0 for n in picked)  # contacted exactly when a row picked expert 15
    assert 0 < b_runs < len(picked)
    assert a_runs == len(picked)  # with 4 of 16 experts per token, a always has some


def test_a_dead_expert_device_is_named(workers: Callable[..., WorkerProc], moe_model: Path) -> None:
    a, b = workers(), workers()
    model = load_model(moe_model, rpc=f"{a.endpoint},{b.endpoint}", override_tensor=[f"exps={a.device},{b.device}"],
                       rpc_timeout=2.0, failover=False)  # failover: tests/rpcnode/test_failover.py
    cache = model.new_cache(64)
    model.eval(PROMPT, cache)
    b.kill()
    t0 = time.monotonic()
    with pytest.raises(RPCError, match=b.endpoint.replace(".", r"\.")):
        for t in DECODE:
            model.eval([t], cache)
    assert time.monotonic() - t0 < 10


def test_split_with_the_worker_reading_its_range_from_its_own_file(workers: Callable[..., WorkerProc],
                                                                   moe_model: Path) -> None:
    w = workers("--models", str(moe_model.parent))
    model = load_model(moe_model, rpc=w.endpoint, override_tensor=[f"exps=CPU,{w.device}"])
    assert model.net.load_stats.bytes_uploaded == 0
    assert_identical(run_sequence(model), run_sequence(load_model(moe_model)))


def test_a_worker_takes_float64_for_routing_weights_only(workers: Callable[..., WorkerProc], moe_model: Path) -> None:
    w = workers()
    model = load_model(moe_model, rpc=w.endpoint, override_tensor=[f"exps=CPU,{w.device}"])
    segment_id = model.net.remote[0][0]
    client = model.net.clients[w.device]
    D, K = model.config.hidden_size, model.config.n_experts_per_tok
    idx = np.array([[0, 1, 2, 3]])  # ids count from the worker's first expert
    ok = client.finish_segment(client.start_segment(segment_id, [(1, 0, 1)], [
        ("h", np.ones((1, D), np.float32)), ("idx", idx), ("w", np.ones((1, K), np.float64))]))
    assert ok["y"].dtype == np.float64
    with pytest.raises(RPCError, match=r"BAD_ARRAY.*h may not be float64"):
        client.finish_segment(client.start_segment(segment_id, [(1, 0, 1)], [
            ("h", np.ones((1, D), np.float64)), ("idx", idx), ("w", np.ones((1, K), np.float32))]))
    with pytest.raises(RPCError, match=r"BAD_ARRAY.*do not fit"):  # ids below "no expert here"
        client.finish_segment(client.start_segment(segment_id, [(1, 0, 1)], [
            ("h", np.ones((1, D), np.float32)), ("idx", idx - 2), ("w", np.ones((1, K), np.float32))]))
