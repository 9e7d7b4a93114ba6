"""The placement planner: table-driven cases from data/placement_cases.json, plus the parsers and the table."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from engine.errors import IkctlError
from engine.gguf_file import GGUFFile, TensorInfo
from engine.placement import (
    Device,
    Op,
    OverrideRule,
    Placement,
    PlacementError,
    PlacementRules,
    devices_for,
    format_table,
    layer_ops,
    op_part,
    parse_device_mem,
    parse_override,
    plan,
)
from tests.refs import V3

DATA = json.loads((Path(__file__).parent / "data" / "placement_cases.json").read_text())
CASES = DATA["cases"]


def model_records(spec: dict[str, Any]) -> list[tuple[str, int]]:
    """(name, n_bytes) records of a model spec: explicit `tensors`, or DeepSeek-like layers built from parts."""
    if "tensors" in spec:
        return [(name, n) for name, n in spec["tensors"]]
    records = list(spec["global"].items())
    for i in range(spec["n_layers"]):
        ffn = {**spec["moe"], **spec["experts"]} if i >= spec["first_dense"] else spec["dense"]
        records += [(f"blk.{i}.{suffix}", n) for suffix, n in {**spec["attn"], **ffn}.items()]
    return records


def parse_op(text: str, n_layers: int) -> Op:
    if text in ("embd", "output"):
        return (-1 if text == "embd" else n_layers, text)
    layer, part = text.split(".")
    return int(layer), part


def run_case(case: dict[str, Any]) -> tuple[Placement, list[tuple[str, int]]]:
    spec = DATA["models"][case.get("model", "moe4")]
    records = model_records(spec)
    r = case["rules"]
    rules = PlacementRules.from_flags(r.get("ot", []), r.get("ngl", 0), r.get("ts"), r.get("rpc"))
    devices = [Device(**d) for d in case["devices"]] if "devices" in case else devices_for(rules.rpc)
    placement = plan(records, spec["n_layers"], devices, rules)
    if "ops" in case:
        ops = (layer_ops(placement.device_of, spec["n_layers"]) if case["ops"] == "all"
               else [parse_op(t, spec["n_layers"]) for t in case["ops"]])
        placement.segments(ops)  # errors surface here
    return placement, records


def matching(names: list[str], pattern: str) -> list[str]:
    hits = [n for n in names if re.search(pattern, n)]
    assert hits, f"pattern {pattern!r} matches no tensor: fix the case"
    return hits


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case(case: dict[str, Any]) -> None:
    expect = case["expect"]
    if "error" in expect:
        with pytest.raises(PlacementError) as info:
            run_case(case)
        for needle in expect["error"]:
            assert needle in str(info.value)
        assert "\n" not in str(info.value)
        return
    placement, records = run_case(case)
    names = [n for n, _ in records]
    assert set(placement.device_of) == set(names) == set(placement.reason_of)
    assert sum(placement.bytes_per_device.values()) == sum(n for _, n in records)
    for device, n_bytes in expect.get("bytes", {}).items():
        assert placement.bytes_per_device[device] == n_bytes, device
    for pattern, device in expect.get("device_of", {}).items():
        for name in matching(names, pattern):
            assert placement.device_of[name] == device, placement.explain(name)
    for pattern, needle in expect.get("reason_of", {}).items():
        for name in matching(names, pattern):
            assert needle in placement.reason_of[name], placement.explain(name)
    for device, layers in expect.get("layers_of", {}).items():
        assert placement.layers_of(device) == layers, device
    for needle in expect.get("warnings", []):
        assert any(needle in w for w in placement.warnings), placement.warnings
    if "segments" in expect:
        n_layers = DATA["models"][case.get("model", "moe4")]["n_layers"]
        got = placement.segments(layer_ops(names, n_layers))
        want = [(dev, tuple(parse_op(t, n_layers) for t in ops.split())) for dev, ops in expect["segments"]]
        assert [(s.device, s.ops) for s in got] == want


def test_every_case_name_is_unique() -> None:
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names))


def test_plan_is_deterministic_and_independent_of_input_order() -> None:
    case = next(c for c in CASES if c["name"].startswith("-ngl 4 -ts 3,1"))
    first, records = run_case(case)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    rules = PlacementRules.from_flags([], 4, "3,1", "127.0.0.1:50052,127.0.0.1:50053")
    again = plan(shuffled, 4, devices_for(rules.rpc), rules)
    assert again.device_of == first.device_of and again.reason_of == first.reason_of
    assert again.bytes_per_device == first.bytes_per_device


def test_explain_reads_as_a_sentence() -> None:
    rules = PlacementRules.from_flags(["exps=RPC[10.0.0.2:50052]"], rpc="10.0.0.2:50052")
    p = plan([("blk.12.ffn_up_exps.weight", 10), ("token_embd.weight", 5), ("blk.12.attn_q.weight", 3)], 13,
             devices_for(rules.rpc), rules)
    assert p.explain("blk.12.ffn_up_exps.weight") == (
        "blk.12.ffn_up_exps.weight → RPC[10.0.0.2:50052] by rule 1 (-ot exps=RPC[10.0.0.2:50052])")
    assert p.explain("token_embd.weight") == "token_embd.weight → CPU (token_embd stays on CPU)"
    assert p.explain("blk.12.attn_q.weight") == "blk.12.attn_q.weight → CPU (default: CPU)"
    with pytest.raises(PlacementError, match="no tensor named 'nope'"):
        p.explain("nope")


def test_overflow_error_carries_the_numbers() -> None:
    rules = PlacementRules.from_flags(["blk=RPC[127.0.0.1:50052]"], rpc="127.0.0.1:50052")
    devices = devices_for(rules.rpc, {"RPC[127.0.0.1:50052]": 512 << 20})
    records = [("blk.0.ffn_up_exps.weight", 851_863_142)]
    with pytest.raises(PlacementError) as info:
        plan(records, 1, devices, rules)
    assert isinstance(info.value, IkctlError)  # the CLI prints it as one line
    e = info.value
    assert (e.device, e.need_bytes, e.capacity_bytes) == ("RPC[127.0.0.1:50052]", 851_863_142, 512 << 20)
    # a caller such as the TUI can still get the plan and show the overflow
    p = plan(records, 1, devices, rules, check_capacity=False)
    assert p.overflows() == [("RPC[127.0.0.1:50052]", 851_863_142, 512 << 20)]


def test_plan_takes_tensor_infos_from_a_gguf_header() -> None:
    f = GGUFFile(V3)
    rules = PlacementRules.from_flags(["exps=RPC[127.0.0.1:50052]"], rpc="127.0.0.1:50052")
    p = plan(f.tensors.values(), int(f.get("deepseek2.block_count")), devices_for(rules.rpc), rules)
    exps = [t for t in f.tensors.values() if "_exps." in t.name]
    assert len(exps) == 6
    assert p.bytes_per_device["RPC[127.0.0.1:50052]"] == sum(t.n_bytes for t in exps)
    assert isinstance(next(iter(f.tensors.values())), TensorInfo)


def test_tensor_past_the_layer_count_is_an_error() -> None:
    with pytest.raises(PlacementError, match="layer 2, past the model's 2 layers"):
        plan([("blk.2.attn_q.weight", 1)], 2, devices_for([]), PlacementRules())


def test_devices_must_match_rpc() -> None:
    rules = PlacementRules.from_flags(rpc="127.0.0.1:50052")
    with pytest.raises(PlacementError, match=re.escape("no device RPC[127.0.0.1:50052] was given")):
        plan([], 0, [Device("CPU", "cpu")], rules)
    with pytest.raises(PlacementError, match=re.escape("device RPC[h:1] is not in --rpc")):
        plan([], 0, [*devices_for(rules.rpc), Device("RPC[h:1]", "rpc")], rules)
    with pytest.raises(PlacementError, match="include CPU exactly once"):
        plan([], 0, [Device("RPC[127.0.0.1:50052]", "rpc")], rules)


@pytest.mark.parametrize(("name", "kind", "needle"), [
    ("GPU0", "cuda", "unknown device 'GPU0'"),
    ("CUDA0", "rpc", "a rpc device is named RPC[host:port]"),
    ("CPU", "npu", "kind 'npu' is not cpu, rpc or cuda"),
])
def test_device_names_follow_llama_cpp(name: str, kind: str, needle: str) -> None:
    with pytest.raises(PlacementError, match=re.escape(needle)):
        Device(name, kind)  # type: ignore[arg-type]


def test_parse_override_lists_and_regexes() -> None:
    assert [str(r) for r in parse_override(r"blk\.[0-9]{1,2}\.=CPU,exps=RPC0[h:1]")] == [
        r"blk\.[0-9]{1,2}\.=CPU", "exps=RPC[h:1]"]
    assert str(OverrideRule.parse("a=b=CPU")) == "a=b=CPU"  # the last '=' splits: regexes may hold '='
    assert OverrideRule("exps", "CPU").matches("blk.3.ffn_up_exps.weight")  # search, not fullmatch
    with pytest.raises(PlacementError, match="empty regex"):
        OverrideRule.parse("=CPU")
    with pytest.raises(PlacementError, match="owns one device"):
        OverrideRule.parse("exps=RPC1[h:1]")


def test_device_mem() -> None:
    assert parse_device_mem("RPC[127.0.0.1:50052]=512MiB") == ("RPC[127.0.0.1:50052]", 512 << 20)
    assert parse_device_mem("CPU=64GiB") == ("CPU", 64 << 30)
    for bad, needle in [("512MiB", "needs DEV=SIZE"), ("RPC[x]=1G", "'x' is not host:port"),
                        ("CPU=lots", "'lots' is not a size")]:
        with pytest.raises(PlacementError, match=re.escape(needle)):
            parse_device_mem(bad)
    with pytest.raises(PlacementError, match="not a device here"):
        devices_for(["127.0.0.1:50052"], {"RPC[127.0.0.1:50099]": 1})


def test_op_parts_of_deepseek_tensors() -> None:
    assert op_part("token_embd.weight") == "embd"
    assert op_part("output_norm.weight") == op_part("output.weight") == "output"
    assert op_part("blk.3.attn_kv_a_mqa.weight") == op_part("blk.3.attn_norm.weight") == "attn"
    assert op_part("blk.3.ffn_gate_inp.weight") == op_part("blk.3.exp_probs_b.bias") == "ffn"
    assert op_part("blk.3.ffn_down_shexp.weight") == "ffn"
    assert op_part("blk.3.ffn_down_exps.weight") == "moe_experts"
    assert op_part("blk.3.nextn.eh_proj.weight") is None


def test_format_table() -> None:
    rules = PlacementRules.from_flags(["exps=RPC[127.0.0.1:50052]"], rpc="127.0.0.1:50052")
    devices = devices_for(rules.rpc, {"RPC[127.0.0.1:50052]": 4 << 20})
    records = [("token_embd.weight", 1 << 20), ("blk.0.attn_q.weight", 1 << 20), ("blk.0.ffn_up_exps.weight", 2 << 20),
               ("output.weight", 1 << 20)]
    lines = format_table(plan(records, 1, devices, rules), devices).splitlines()
    assert lines[0].split() == ["device", "tensors", "bytes", "capacity", "use", "layers"]
    assert lines[2].split() == ["CPU", "3", "3.0", "MiB", "-", "-", "embd", "0", "output"]
    assert lines[3].split() == ["RPC[127.0.0.1:50052]", "1", "2.0", "MiB", "4.0", "MiB", "50%", "0"]
    assert lines[4].split() == ["total", "4", "5.0", "MiB"]


# ---- expert tensors split over devices (-ot REGEX=DEV1,DEV2) ------------------------------------------------------

A, B = "RPC[10.0.0.1:50052]", "RPC[10.0.0.2:50052]"
SPLIT_RULES = dict(rpc="10.0.0.1:50052,10.0.0.2:50052")


def split_plan(ot: str, n_experts: int = 8, **kw: Any) -> Placement:
    records = [("token_embd.weight", 100), ("output.weight", 100), ("blk.0.attn_q.weight", 10),
               ("blk.0.ffn_gate_inp.weight", 4), *((f"blk.0.ffn_{p}_exps.weight", 80 * n_experts)
                                                   for p in ("gate", "up", "down"))]
    rules = PlacementRules.from_flags([ot], **SPLIT_RULES)
    return plan(records, 1, devices_for(rules.rpc, kw.pop("capacities", None)), rules, n_experts=n_experts, **kw)


def test_a_rule_with_several_devices_splits_experts_evenly() -> None:
    p = split_plan(f"exps={A},{B}")
    name = "blk.0.ffn_up_exps.weight"
    assert [(s.device, s.first, s.count) for s in p.experts_of[name]] == [(A, 0, 4), (B, 4, 4)]
    assert p.devices_of(name) == (A, B)
    assert p.bytes_per_device[A] == p.bytes_per_device[B] == 3 * 80 * 4
    assert name in p.tensors_on(A) and name in p.tensors_on(B)
    assert p.explain(name) == f"{name} → experts 0-3 on {A}, experts 4-7 on {B} by rule 1 (-ot exps={A},{B})"
    segs = p.segments(layer_ops(p.device_of, 1))
    split = [s for s in segs if s.experts]
    assert len(split) == 1 and split[0].ops == ((0, "moe_experts"),)


def test_shares_size_the_ranges_and_cpu_may_hold_one() -> None:
    p = split_plan(f"exps=CPU:1,{A}:3,{B}:4", n_experts=16)
    assert [(s.device, s.first, s.count) for s in p.experts_of["blk.0.ffn_gate_exps.weight"]] == [
        ("CPU", 0, 2), (A, 2, 6), (B, 8, 8)]
    assert p.devices_used() == {"CPU", A, B}


def test_split_ranges_count_against_capacities() -> None:
    with pytest.raises(PlacementError, match=re.escape(B)):
        split_plan(f"exps={A}:1,{B}:3", capacities={B: 3 * 80 * 5})  # B takes 6 experts of 8
    split_plan(f"exps={A}:1,{B}:1", capacities={B: 3 * 80 * 5})  # 4 of 8 fit


@pytest.mark.parametrize("ot, needle", [
    (f"attn={A},{B}", "only expert tensors"),
    (f"exps={A}:1,{B}", "give every device a share"),
    (f"exps={A},{A}", "twice"),
    (f"exps={A}:0,{B}:1", "> 0"),
    (f"exps={A}:x,{B}:1", "must be a number"),
])
def test_bad_splits_are_one_line(ot: str, needle: str) -> None:
    with pytest.raises(PlacementError, match=needle) as e:
        split_plan(ot)
    assert "\n" not in str(e.value)


def test_more_devices_than_experts_is_refused() -> None:
    with pytest.raises(PlacementError, match=r"leave .* none"):
        split_plan(f"exps=CPU,{A},{B}", n_experts=2)


def test_split_rules_read_like_llama_cpp_lists() -> None:
    rules = parse_override(f"exps={A},{B},attn=CPU")
    assert [(r.pattern, r.devices, r.shares) for r in rules] == [("exps", (A, B), None), ("attn", ("CPU",), None)]
    assert str(OverrideRule.parse(f"exps={A}:3,{B}:1")) == f"exps={A}:3,{B}:1"
