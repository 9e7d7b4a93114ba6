"""Segment programs: config as flat scalars, program records, op-by-op execution equal to the whole forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine import load_model
from engine.config import DeepSeek2Config
from engine.deepseek2 import DeepSeek2, gguf_getter
from engine.gguf_file import GGUFFile
from engine.placement import layer_ops
from engine.segments import (
    ProgramError,
    SegmentRunner,
    UnknownSequence,
    config_args,
    config_from_args,
    parse_program,
    qtensor_from_bytes,
    segment_records,
)
from engine.synth import SynthSpec, write_model
from tests.refs import V3

REF_MODEL = V3


@pytest.fixture(scope="module")
def yarn_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SynthSpec(layers=3, dense_layers=1, yarn=True, gating="sigmoid", q_lora_rank=16, dtype="Q8_0", seed=5)
    return write_model(tmp_path_factory.mktemp("seg") / "yarn.gguf", spec)


def _refs(f: GGUFFile) -> dict[str, tuple[str, int, tuple[int, ...]]]:
    return {n: (f"{i:064x}", t.qtype, t.shape) for i, (n, t) in enumerate(f.tensors.items())}


@pytest.mark.parametrize("which", ["ref", "yarn"])
def test_config_round_trips_as_scalars(which: str, yarn_model: Path) -> None:
    f = GGUFFile(REF_MODEL if which == "ref" else yarn_model)
    cfg = DeepSeek2Config.from_gguf(f)
    args = config_args(cfg)
    assert all(isinstance(v, str | int | float | bool) for v in args.values())
    assert config_from_args(args) == cfg


def test_program_records_round_trip_and_refusals() -> None:
    f = GGUFFile(REF_MODEL)
    cfg = DeepSeek2Config.from_gguf(f)
    ops = layer_ops(f.tensors, cfg.n_layers)
    records = segment_records(cfg, ops, _refs(f), mla=3, amb_bytes=1 << 20, cache_type="q8_0", n_ctx=64)
    program = parse_program(records)
    assert program.ops == tuple(ops) and program.cache_type == "q8_0" and set(program.tensors) == set(f.tensors)
    assert program.int8  # integer activations unless the coordinator says otherwise
    assert not parse_program(segment_records(cfg, ops, _refs(f), mla=3, amb_bytes=1 << 20, cache_type="q8_0",
                                             n_ctx=64, int8=False)).int8
    with pytest.raises(ProgramError, match="'int8' must be true or false"):
        parse_program([("config", {**records[0][1], "int8": 1}), *records[1:]])
    with pytest.raises(ProgramError, match="starts with"):
        parse_program(records[1:])
    with pytest.raises(ProgramError, match="cache type"):
        parse_program([("config", {**records[0][1], "cache_type": "q4_0"}), *records[1:]])
    with pytest.raises(ProgramError, match="layer 99"):
        parse_program([records[0], ("attn", {"layer": 99})])
    moe = next(i for i, part in ops if part == "moe_experts")
    for part in ("shared_experts", "moe_combine"):  # the coordinator's own parts: never a worker's
        with pytest.raises(ProgramError, match=f"bad op record '{part}'"):
            parse_program([records[0], (part, {"layer": moe})])
    with pytest.raises(ProgramError, match="digest, ggml_type"):
        parse_program([records[0], ("attn", {"layer": 0, "t.x": ["d", "q"]})])
    with pytest.raises(ProgramError, match="model config"):
        parse_program([("config", {k: v for k, v in records[0][1].items() if k != "cfg.n_heads"})])
    # a peer's hyper-parameters size lists and caches on the worker: bounded and typed before anything is built
    for key, value in (("cfg.n_layers", 10**9), ("cfg.n_vocab", 1 << 40), ("cfg.hidden_size", -1),
                       ("cfg.hidden_size", "4096"), ("cfg.norm_topk_prob", 1), ("cfg.rope.factor", float("nan")),
                       ("cfg.rope.scaling_type", "y" * 100), ("cfg.rope", 3), ("cfg.n_heads", True)):
        with pytest.raises(ProgramError, match=f"model config {key} = .* out of bounds or not a"):
            parse_program([("config", {**records[0][1], key: value}), *records[1:]])
    with pytest.raises(ProgramError, match="bad model config"):
        parse_program([("config", {**records[0][1], "cfg.unknown": 1}), *records[1:]])


def test_qtensor_from_bytes_matches_the_file(yarn_model: Path) -> None:
    f = GGUFFile(yarn_model)
    for name, t in f.tensors.items():
        q = qtensor_from_bytes(name, f.raw(name).reshape(-1).view(np.uint8), t.qtype, t.shape)
        assert q.shape == t.shape and np.array_equal(q.dequantize(), gguf_getter(f)(name).dequantize())
    t = f.tensors["output.weight"]
    with pytest.raises(ProgramError, match="do not hold"):
        qtensor_from_bytes("x", f.raw("output.weight").reshape(-1).view(np.uint8)[:-1], t.qtype, t.shape)


def test_a_runner_over_every_op_equals_the_forward_pass(yarn_model: Path) -> None:
    model = load_model(yarn_model)
    f = model.gguf
    cfg = model.config
    ops = layer_ops(f.tensors, cfg.n_layers)[1:]  # all but embd: the runner gets the hidden state
    refs = {n: (n, t.qtype, t.shape) for n, t in f.tensors.items()}  # "digest" = name: looked up below
    program = parse_program(segment_records(cfg, ops, refs, mla=3, amb_bytes=256 << 20, cache_type="f16",
                                            n_ctx=64))
    runner = SegmentRunner(program, lambda name: f.raw(name).reshape(-1).view(np.uint8))
    assert isinstance(runner.net, DeepSeek2)
    ids = [3, 1, 4, 1, 5, 9]
    want = model.logits(ids)
    x = model.net.token_embd.rows(np.asarray(ids))
    got = runner.run(1, 0, len(ids), {"x": x, "n_out": np.asarray(len(ids))})["logits"]
    assert np.array_equal(got, want)
    # a decode continues the sequence; going back to an earlier position truncates implicitly
    cache = model.new_cache(64)
    model.eval(ids, cache)
    step = model.eval([7], cache)
    out = runner.run(1, len(ids), 1, {"x": model.net.token_embd.rows(np.asarray([7])), "n_out": np.asarray(1)})
    assert np.array_equal(out["logits"], step)
    with pytest.raises(UnknownSequence, match="cannot start at 40"):  # the worker's UNKNOWN_SEQUENCE
        runner.run(1, 40, 1, {"x": x[:1], "n_out": np.asarray(1)})
    with pytest.raises(UnknownSequence, match="unknown here"):
        runner.run(2, 3, 1, {"x": x[:1], "n_out": np.asarray(1)})
    assert runner.kv("truncate", 1, 2) == 2 and runner.kv("clear", 1, 0) == 0


def test_llama_programs_round_trip_and_run_op_by_op(smollm2_path: Path) -> None:
    """A llama model's segment program carries its config and arch; runners over its ops (a first half and a
    second half, each with its own KV cache) give the forward pass's logits; a GPU runner is refused."""
    from engine.config import LlamaConfig

    f = GGUFFile(smollm2_path)
    cfg = LlamaConfig.from_gguf(f)
    assert config_from_args(config_args(cfg), "llama") == cfg
    ops = layer_ops(f.tensors, cfg.n_layers)
    assert {p for _, p in ops} == {"embd", "attn", "ffn", "output"}
    refs = _refs(f)
    digest_to_name = {ref[0]: n for n, ref in refs.items()}
    half = len(ops) // 2
    programs = [parse_program(segment_records(cfg, part, refs, mla=3, amb_bytes=1 << 20, cache_type="f16",
                                              n_ctx=64)) for part in (ops[:half], ops[half:])]
    assert all(isinstance(p.cfg, LlamaConfig) for p in programs)
    with pytest.raises(ProgramError, match="moe_experts"):
        parse_program([segment_records(cfg, ops[:1], refs, mla=3, amb_bytes=1, cache_type="f16", n_ctx=8)[0],
                       ("moe_experts", {"layer": 0})])

    def lookup(digest: str) -> np.ndarray:
        return f.raw(digest_to_name[digest]).reshape(-1).view(np.uint8)

    runners = [SegmentRunner(p, lookup) for p in programs]
    with pytest.raises(ProgramError, match="cannot run on a GPU"):
        SegmentRunner(programs[0], lookup, cuda_device=0)
    model = load_model(smollm2_path, ctx_size=64)
    ids = [1, 504, 3250, 28, 253]
    cache = model.new_cache(64)
    want = [model.eval(ids, cache, all_logits=True), model.eval([30], cache)]
    got = []
    for pos, step in ((0, ids), (len(ids), [30])):
        state: dict[str, np.ndarray] = {"ids": np.asarray(step), "n_out": np.asarray(len(step) if pos == 0 else 1)}
        for r in runners:
            state = r.run(seq_id=3, pos_start=pos, n_tokens=len(step), state=state)
        got.append(state["logits"])
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and np.array_equal(g, w)
