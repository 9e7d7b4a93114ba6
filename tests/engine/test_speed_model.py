"""The decode speed model: its arithmetic on hand-sized models and the planner's segments."""

from __future__ import annotations

import math

import pytest

from engine.placement import CPU, PlacementRules, Segment, devices_for, layer_ops, plan
from engine.speed_model import MESSAGE_BYTES, Host, Link, crowded, model_shape, predict

W1, W2 = "RPC[10.0.0.2:50052]", "RPC[10.0.0.3:50052]"
D, E, K, V = 64, 16, 4, 100
SIZES = {"token_embd.weight": 10_000, "output.weight": 5_000, "output_norm.weight": 10,
         **{f"blk.{i}.{n}": b for i in range(3) for n, b in (("attn_q.weight", 2_000), ("ffn_norm.weight", 10))},
         "blk.0.ffn_up.weight": 3_000,
         **{f"blk.{i}.{n}": b for i in (1, 2) for n, b in (("ffn_gate_inp.weight", 100), ("ffn_up_shexp.weight", 400),
                                                           ("ffn_up_exps.weight", 16_000))}}
SHAPE = model_shape(SIZES, 3, E, K, D, V)
GBPS = 1e-3  # a million bytes per second: bytes / 1e6 are seconds
LINK = Link(0.5e-3, 1e6)


def segments(*ot: str) -> list[Segment]:
    rules = PlacementRules.from_flags(list(ot), rpc="10.0.0.2:50052,10.0.0.3:50052")
    placement = plan(SIZES.items(), 3, devices_for(rules.rpc), rules, n_experts=E)
    return placement.segments(layer_ops(SIZES, 3))


def test_all_here_reads_every_active_byte_once() -> None:
    p = predict(segments(), SHAPE, {CPU: GBPS}, {})
    active = 5_010 + 3 * 2_010 + 3_000 + 2 * (100 + 400 + 16_000 * K / E)
    assert p.seconds == pytest.approx(active / 1e6)
    assert p.round_trips == 0 and p.wire_bytes == 0


def test_experts_on_a_worker_pay_a_round_trip_per_layer_and_overlap_the_shared_experts() -> None:
    p = predict(segments(f"exps={W1}"), SHAPE, {CPU: GBPS, W1: GBPS}, {W1: LINK})
    wire = 4 * D + 12 * K + 4 * D + MESSAGE_BYTES
    expert = LINK.rtt_s + wire / LINK.bytes_per_s + 4_000 / 1e6
    here = (5_010 + 3 * 2_010 + 3_000 + 2 * 100) / 1e6
    assert p.seconds == pytest.approx(here + 2 * max(expert, 400 / 1e6))
    assert p.round_trips == 2 and p.wire_bytes == pytest.approx(2 * wire)


def test_a_split_contacts_each_device_as_often_as_routing_picks_it_and_halves_the_expert_reads() -> None:
    one = predict(segments(f"exps={W1}"), SHAPE, {CPU: GBPS, W1: GBPS, W2: GBPS}, {W1: Link(0, 1e12)})
    two = predict(segments(f"exps={W1},{W2}"), SHAPE, {CPU: GBPS, W1: GBPS, W2: GBPS},
                  {W1: Link(0, 1e12), W2: Link(0, 1e12)})
    p_contact = 1 - math.comb(8, K) / math.comb(16, K)  # some of K picks among a device's 8 experts
    assert two.round_trips == pytest.approx(2 * 2 * p_contact, rel=0.03)
    assert two.seconds < one.seconds
    # the slower half reads between K/2 and K experts' bytes per layer
    here = one.seconds - 2 * 4_000 / 1e6
    assert here + 2 * 2_000 / 1e6 < two.seconds < one.seconds


def test_devices_that_share_cores_work_one_after_the_other() -> None:
    """Two workers on one 2-core machine with a thread each compute a split at once; with 2 threads each (or the
    coordinator's shared experts on the same cores) they take turns: the parts (and the shared experts) add."""
    speeds = {CPU: GBPS, W1: GBPS, W2: GBPS}
    links = {W1: Link(0, 1e12), W2: Link(0, 1e12)}
    split = segments(f"exps={W1},{W2}")
    apart = predict(split, SHAPE, speeds, links)
    roomy = {CPU: Host("other", 8, 1), W1: Host("m", 2, 1), W2: Host("m", 2, 1)}
    assert predict(split, SHAPE, speeds, links, hosts=roomy).seconds == pytest.approx(apart.seconds)
    tight = {CPU: Host("other", 8, 1), W1: Host("m", 2, 2), W2: Host("m", 2, 2)}
    crowded_split = predict(split, SHAPE, speeds, links, hosts=tight)
    # each layer: the two parts add up to all K picked experts' bytes, as one device would read them
    one = predict(segments(f"exps={W1}"), SHAPE, speeds, links)
    assert crowded_split.seconds == pytest.approx(one.seconds, rel=0.01)
    assert crowded([W1, W2], tight) and not crowded([W1, W2], roomy) and not crowded([CPU, W1], tight)
    shared_cores = {CPU: Host("m", 2, 1), W1: Host("m", 2, 2)}
    remote = segments(f"exps={W1}")
    overlapped, serial = predict(remote, SHAPE, speeds, links), predict(remote, SHAPE, speeds, links,
                                                                         hosts=shared_cores)
    assert serial.seconds == pytest.approx(overlapped.seconds + 2 * 400 / 1e6)  # the shared experts no longer hide
