"""The placement map's model (tensor kinds per layer) and the form's flags, without a terminal."""

from __future__ import annotations

import pytest

from engine.placement import PlacementError, PlacementRules
from tui.layer_map import KINDS, MIXED, build_rows, device_tags, kinds_present, placement_rows, tensor_kind
from tui.plan_flags import ModelHeader, PlanFlags
from tui.widgets.placement_map import render_map

RPC = "RPC[127.0.0.1:50052]"
TENSORS = [("token_embd.weight", 100), ("output_norm.weight", 1), ("output.weight", 100),
           ("blk.0.attn_norm.weight", 1), ("blk.0.attn_q.weight", 10), ("blk.0.ffn_norm.weight", 1),
           ("blk.0.ffn_up.weight", 20), ("blk.0.ffn_down.weight", 20),
           ("blk.1.attn_q.weight", 10), ("blk.1.ffn_norm.weight", 1), ("blk.1.ffn_gate_inp.weight", 2),
           ("blk.1.exp_probs_b.bias", 1), ("blk.1.ffn_up_exps.weight", 80), ("blk.1.ffn_down_exps.weight", 80),
           ("blk.1.ffn_up_shexp.weight", 10)]
HEADER = ModelHeader("m.gguf", "deepseek2", 2, tuple(TENSORS))


@pytest.mark.parametrize(("name", "moe", "kind"), [
    ("blk.3.attn_kv_a_mqa.weight", True, "attn"), ("blk.3.ffn_gate_inp.weight", True, "router"),
    ("blk.3.exp_probs_b.bias", True, "router"), ("blk.3.ffn_gate_exps.weight", True, "experts"),
    ("blk.3.ffn_down_shexp.weight", True, "shexp"), ("blk.0.ffn_gate.weight", False, "dense"),
    ("blk.0.ffn_norm.weight", False, "dense"), ("blk.3.ffn_norm.weight", True, "router"),
    ("token_embd.weight", False, None),
])
def test_tensor_kind(name: str, moe: bool, kind: str | None) -> None:
    assert tensor_kind(name, moe) == kind


def test_rows_group_by_layer_and_kind() -> None:
    device_of = {n: "CPU" for n, _ in TENSORS} | {"blk.1.ffn_up_exps.weight": RPC, "blk.1.ffn_down_exps.weight": RPC}
    rows = build_rows(device_of, 2)
    assert [r.label for r in rows] == ["embd", "0", "1", "output"]
    assert rows[1].cells == ("CPU", None, None, None, "CPU")
    assert rows[2].cells == ("CPU", "CPU", RPC, "CPU", None)
    assert rows[0].cells[0] == "CPU" and rows[3].cells[0] == "CPU"
    assert kinds_present(rows) == [True] * len(KINDS)


def test_a_split_group_is_mixed() -> None:
    device_of = {n: "CPU" for n, _ in TENSORS} | {"blk.1.ffn_up_exps.weight": RPC}
    assert build_rows(device_of, 2)[2].cells[KINDS.index("experts")] == MIXED


def test_device_tags() -> None:
    assert device_tags(["CPU", RPC, "RPC[h:2]", "CUDA0"]) == {"CPU": "CPU", RPC: "R1", "RPC[h:2]": "R2",
                                                              "CUDA0": "G0"}


def test_flags_plan_and_errors() -> None:
    flags = PlanFlags(override_tensor="exps=RPC[127.0.0.1:50052]\n\n", rpc="127.0.0.1:50052")
    p = flags.plan(HEADER)
    assert p.bytes_per_device[RPC] == 160
    assert p.bytes_per_device["CPU"] == sum(n for _, n in TENSORS) - 160
    with pytest.raises(PlacementError, match="not a valid regex"):
        PlanFlags(override_tensor="exps(=CPU").plan(HEADER)
    with pytest.raises(PlacementError, match="-ngl 'x' is not a whole number"):
        PlanFlags(n_gpu_layers="x").plan(HEADER)
    over = PlanFlags(override_tensor=flags.override_tensor, rpc=flags.rpc, device_mem=f"{RPC}=100")
    with pytest.raises(PlacementError, match=r"would hold 160 B but has 100 B"):
        over.plan(HEADER)
    assert over.plan(HEADER, check_capacity=False).overflows() == [(RPC, 160, 100)]


def test_flags_round_trip_rules() -> None:
    rules = PlacementRules.from_flags(["exps=CPU", "attn=RPC[h:1]"], 3, "2,1", "h:1")
    flags = PlanFlags.from_rules(rules, {"RPC[h:1]": 1 << 30})
    assert flags.rules() == rules
    assert flags.capacities() == {"RPC[h:1]": 1 << 30}
    assert flags.command_line("m.gguf") == ("ikctl plan -m m.gguf --rpc h:1 -ot exps=CPU -ot 'attn=RPC[h:1]' "
                                            "-ngl 3 -ts 2,1 --device-mem 'RPC[h:1]=1GiB'")
    assert PlanFlags.from_rules(None) == PlanFlags()


@pytest.mark.parametrize(("n", "text"), [
    (6 << 20, "6MiB"), (1 << 30, "1GiB"), (3072, "3KiB"), (1536, "1.5KiB"), (1000, "1000"), (0, "0"),
    (24683584 << 10, "23.5GiB"),  # a worker's reported RAM: human units, not 24683584KiB
    ((1 << 30) - 1, "1023.9MiB"), (5 << 40, "5TiB"),
])
def test_size_flag_is_human_and_never_claims_more(n: int, text: str) -> None:
    from engine.byte_sizes import parse_size
    from tui.formatting import size_flag

    assert size_flag(n) == text
    back = parse_size(text)
    assert back <= n and n - back < max(1, n // 100)


def test_experts_split_over_devices_show_each_device() -> None:
    flags = PlanFlags(override_tensor=f"exps=CPU,{RPC}", rpc="127.0.0.1:50052")
    header = ModelHeader("m.gguf", "deepseek2", 2, tuple(TENSORS), n_experts=8)
    rows = placement_rows(flags.plan(header))
    assert rows[2].cells[KINDS.index("experts")] == ("CPU", RPC)
    text = render_map(rows, ["CPU", RPC]).plain
    assert "CPUR1" in text.replace(" ", "")
