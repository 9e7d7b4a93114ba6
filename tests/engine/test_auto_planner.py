"""Automatic placement on synthetic devices and links: which candidate wins where, and why."""

from __future__ import annotations

import pytest

from engine.architectures import model_config
from engine.auto_placement import AutoChoice, Measured, TensorMeta, candidates, choose, model_gbps
from engine.gguf_file import GGUFFile
from engine.placement import CPU, PlacementError
from engine.speed_model import Link, ModelShape, model_shape
from engine.synth import SynthSpec, write_model

EPS = ["10.0.0.2:50052", "10.0.0.3:50052"]
A, B = (f"RPC[{ep}]" for ep in EPS)
Q8_0, Q4_K = 8, 12


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[TensorMeta], int, ModelShape]:
    path = write_model(tmp_path_factory.mktemp("auto") / "m.gguf",
                       SynthSpec(layers=6, dense_layers=1, dtype="Q8_0", seed=3))
    f = GGUFFile(path)
    cfg = model_config(f)
    tensors = [TensorMeta(n, t.n_bytes, t.qtype) for n, t in f.tensors.items()]
    shape = model_shape({t.name: t.n_bytes for t in tensors}, cfg.n_layers, cfg.n_routed_experts,
                        cfg.n_experts_per_tok, cfg.hidden_size, cfg.n_vocab)
    return tensors, cfg.n_layers, shape


def measured(cpu: int, workers: int, rtt: float, gbps: dict[str, float] | None = None,
             bandwidth: float = 1.25e8) -> Measured:
    speeds = {CPU: 0.002, A: 0.002, B: 0.002, **(gbps or {})}  # GB/s small enough that compute is ~ms per token
    return Measured({CPU: cpu, A: workers, B: workers}, {d: {Q8_0: v} for d, v in speeds.items()},
                    {A: Link(rtt, bandwidth), B: Link(rtt, bandwidth)})


def sizes(tensors: list[TensorMeta]) -> tuple[int, int]:
    """(all bytes, the routed experts' bytes)."""
    return sum(t.n_bytes for t in tensors), sum(t.n_bytes for t in tensors if "_exps." in t.name)


def run(model: tuple[list[TensorMeta], int, ModelShape], m: Measured) -> AutoChoice:
    tensors, n_layers, shape = model
    return choose(tensors, n_layers, shape, EPS, m)


def devices_of(choice: AutoChoice, part: str) -> set[str]:
    placement = choice.chosen.placement
    assert placement is not None
    return {d for n in placement.device_of if part in n for d in placement.devices_of(n)}


def test_everything_stays_here_when_it_fits_and_the_link_is_slow(model) -> None:  # type: ignore[no-untyped-def]
    total, _ = sizes(model[0])
    choice = run(model, measured(cpu=4 * total, workers=4 * total, rtt=0.05))
    assert choice.chosen.name == "all on this machine" and choice.chosen.rules.rpc == ()
    assert choice.chosen.rules.flags() == []


def test_a_small_coordinator_with_a_fast_link_sends_the_experts_away(model) -> None:  # type: ignore[no-untyped-def]
    total, experts = sizes(model[0])
    choice = run(model, measured(cpu=total - experts // 2, workers=4 * total, rtt=0.0001))
    assert devices_of(choice, "_exps.") - {CPU}  # the experts (some, or all) on workers: not all fit here
    assert devices_of(choice, "attn_") == {CPU}  # attention stays here: one round trip per MoE layer at most
    assert "all on this machine" in {c.name for c in choice.weighed if c.problem is not None}


def test_layers_go_to_the_workers_when_attention_does_not_fit_here(model) -> None:  # type: ignore[no-untyped-def]
    total, experts = sizes(model[0])
    choice = run(model, measured(cpu=(total - experts) // 8, workers=4 * total, rtt=0.0004))
    assert CPU not in devices_of(choice, "attn_")
    assert choice.chosen.rules.n_gpu_layers > 0


def test_a_much_faster_worker_takes_every_layer(model) -> None:  # type: ignore[no-untyped-def]
    total, _ = sizes(model[0])
    choice = run(model, measured(cpu=4 * total, workers=4 * total, rtt=0.0001, gbps={A: 0.02}))
    assert choice.chosen.name == f"every layer on {A}"
    assert choice.chosen.rules.flags() == [f"--rpc {EPS[0]}", f"-ngl {model[1] + 1}"]


def test_workers_that_each_hold_half_split_the_layers(model) -> None:  # type: ignore[no-untyped-def]
    total, experts = sizes(model[0])
    choice = run(model, measured(cpu=(total - experts) // 8, workers=int(0.7 * total), rtt=0.0004))
    assert devices_of(choice, "attn_") == {A, B} or devices_of(choice, "_exps.") == {A, B}
    fits = {c.name for c in choice.weighed if c.problem is None}
    assert f"every layer on {A}" not in fits and "all on this machine" not in fits


def test_nothing_fits_is_one_line(model) -> None:  # type: ignore[no-untyped-def]
    total, _ = sizes(model[0])
    with pytest.raises(PlacementError, match=r"^--auto: no placement fits the devices' memory \(") as e:
        run(model, measured(cpu=total // 100, workers=total // 100, rtt=0.0004))
    assert "\n" not in str(e.value)


def test_the_weighed_list_is_ranked_and_explained(model) -> None:  # type: ignore[no-untyped-def]
    total, _ = sizes(model[0])
    choice = run(model, measured(cpu=4 * total, workers=4 * total, rtt=0.0004))
    fits = [c for c in choice.weighed if c.problem is None]
    assert [c.tokens_per_s for c in fits] == sorted((c.tokens_per_s for c in fits), reverse=True)
    assert choice.weighed[0] is choice.chosen and choice.why.startswith("the fastest predicted of")
    placements = [(tuple(c.placement.device_of.items()), tuple(c.placement.experts_of.items()))
                  for c in fits if c.placement is not None]
    assert len(placements) == len(set(placements))  # no placement weighed twice under two names
    assert all(c.prediction is not None and c.prediction.round_trips >= 0 for c in fits)


def test_model_speed_weights_each_type_by_the_bytes_read() -> None:
    tensors = [TensorMeta("blk.0.attn_q.weight", 100, Q8_0), TensorMeta("blk.0.ffn_up_exps.weight", 800, Q4_K),
               TensorMeta("token_embd.weight", 10**6, Q8_0)]
    # experts read at 2 of 8: 200 bytes at 2 GB/s, 100 at 1 GB/s -> 300 bytes in 200 ns
    assert model_gbps({Q8_0: 1.0, Q4_K: 2.0}, tensors, 8, 2) == pytest.approx(1.5)
    assert model_gbps({Q8_0: 1.0}, tensors, 8, 2) == pytest.approx(1.0)  # a type not measured: the mean of others
    assert model_gbps({}, tensors, 8, 2) == 0.0


def test_candidates_cover_the_hand_written_placements() -> None:
    names = [n for n, _ in candidates(EPS, 6, [1, 2, 3, 4, 5], {CPU: 1 << 30, A: 1 << 30, B: 3 << 30},
                                      {CPU: 1.0, A: 1.0, B: 2.0})]
    assert names[0] == "all on this machine"
    for want in (f"experts on {A}", f"every layer on {B}", "layers split over the workers by memory",
                 "experts split over the workers by speed (expert parallel)",
                 "experts by layer ranges over the workers by memory",
                 "experts split over this machine and the workers by speed"):
        assert want in names
    rules = dict(candidates(EPS, 6, [1, 2, 3, 4, 5], {CPU: 1 << 30, A: 1 << 30, B: 3 << 30},
                            {CPU: 1.0, A: 1.0, B: 2.0}))
    assert [str(r) for r in rules["experts split over the workers by speed (expert parallel)"].override_tensor] == [
        f"exps={A}:1,{B}:2"]
    by_layer = [str(r) for r in rules["experts by layer ranges over the workers by memory"].override_tensor]
    assert by_layer == [rf"^blk\.(1)\.ffn_.*_exps={A}", rf"^blk\.(2|3|4|5)\.ffn_.*_exps={B}"]
    dense = [n for n, _ in candidates(EPS, 6, [], {}, {CPU: 1.0, A: 1.0, B: 1.0})]
    assert not any("experts" in n for n in dense)


def test_a_worker_without_a_speed_is_not_used(model) -> None:  # type: ignore[no-untyped-def]
    total, _ = sizes(model[0])
    m = measured(cpu=total // 10, workers=4 * total, rtt=0.0004, gbps={A: 0.0})
    choice = run(model, m)
    assert A not in choice.chosen.rules.flags()[0]
    assert any(c.problem == f"{A} has no measured speed" for c in choice.weighed)

