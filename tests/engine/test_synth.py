"""The synthetic deepseek2 generator (engine.synth) against the reference GGUFs and through the engine."""

from __future__ import annotations

import dataclasses
import hashlib
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from engine import synth, user_cache
from engine.config import GATING_SIGMOID, GATING_SOFTMAX, DeepSeek2Config
from engine.deepseek2 import DeepSeek2
from engine.gguf_file import GGUFFile
from tests.refs import REFS

COMMON = [
    "--hidden", "128", "--layers", "3", "--dense-layers", "1", "--heads", "4", "--kv-lora-rank", "32",
    "--qk-nope", "24", "--qk-rope", "8", "--v-head", "16", "--experts", "8", "--top-k", "2",
    "--shared-experts", "1", "--expert-ffn", "48", "--dense-ffn", "192", "--vocab", "288",
]
# The command lines and sha256 values of shared/refs/README.md ("Regenerating the GGUFs").
REF_ARGS = {
    "open-v3": ["--seed", "20251", "--name", "open-ds2-v3", *COMMON, "--q-lora-rank", "48",
                "--gating", "sigmoid", "--expert-groups", "2", "--expert-groups-used", "1",
                "--expert-weights-norm", "--expert-weights-scale", "1.5", "--yarn", "--yarn-factor", "8",
                "--yarn-orig-ctx", "2048", "--yarn-mscale-all-dim", "1.0", "--kv-b-form", "split",
                "--dtype", "F32"],
    "open-v2": ["--seed", "20252", "--name", "open-ds2-v2", *COMMON, "--q-lora-rank", "0",
                "--gating", "softmax", "--kv-b-form", "legacy", "--dtype", "F32"],
}
REF_SHA256 = {
    "open-v3": "1a0225a2983ec076c2fbf90bbb30be1de3603f9a2965c623d7c5157ae6698eaa",
    "open-v2": "274fe744122a33817fe713ae6295f09f31f4df565cdfefdc2a2cd92147bcc289",
}
REF_PARAMS = {"open-v3": 574_592, "open-v2": 586_720}
# Small V3-style model for engine round trips: rows of 96 / 64 / 32 / 128 exercise the K-quant fallbacks.
SMALL = dataclasses.replace(synth.DEFAULT_SPEC, layers=3, vocab=400, seed=5, name="small")


def ref_spec(name: str) -> synth.SynthSpec:
    return synth.spec_from_args(synth._parser().parse_args(["out.gguf", *REF_ARGS[name]]))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fields(path: Path) -> dict[str, object]:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape), np.array(t.data)) for t in r.tensors}


def logits(path: Path, n: int = 8) -> np.ndarray:
    m = DeepSeek2(GGUFFile(path))
    cache = m.new_cache(64, "f32")
    return m.forward(np.arange(n) * 37 % m.cfg.n_vocab, cache, all_logits=True)


@pytest.fixture(scope="module")
def small_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("small")
    return {dt: synth.write_model(d / f"{dt}.gguf", dataclasses.replace(SMALL, dtype=dt))
            for dt in ("F32", "Q8_0", "Q4_K", "Q5_K", "Q6_K")}


# ---- the reference files -----------------------------------------------------------------------------------


def test_refs_are_present() -> None:
    assert (REFS / "open-v3.gguf").is_file(), f"missing {REFS}"


@pytest.mark.parametrize("name", sorted(REF_ARGS))
def test_reproduces_reference_metadata_and_tensors(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.gguf"
    assert synth.main([str(out), *REF_ARGS[name]]) == 0
    ref = REFS / f"{name}.gguf"
    ours_kv, ref_kv = fields(out), fields(ref)
    assert list(ours_kv) == list(ref_kv)  # same keys in the same order
    assert ours_kv == ref_kv
    ours_t, ref_t = tensors(out), tensors(ref)
    assert list(ours_t) == list(ref_t)
    for t, (qtype, shape, data) in ref_t.items():
        assert ours_t[t][:2] == (qtype, shape), t
        assert np.array_equal(ours_t[t][2], data), t  # exact: max abs difference 0
    assert synth.param_count(ref_spec(name)) == REF_PARAMS[name]


@pytest.mark.parametrize("name", sorted(REF_ARGS))
def test_reproduces_reference_bytes(name: str, tmp_path: Path) -> None:
    out = synth.write_model(tmp_path / "m.gguf", ref_spec(name))
    assert sha256(out) == REF_SHA256[name] == sha256(REFS / f"{name}.gguf")


@pytest.mark.parametrize("name", sorted(REF_ARGS))
def test_quantized_file_keeps_the_reference_key_set(name: str, tmp_path: Path) -> None:
    out = synth.write_model(tmp_path / "q.gguf", dataclasses.replace(ref_spec(name), dtype="Q8_0"))
    ours, ref = fields(out), fields(REFS / f"{name}.gguf")
    assert set(ours) == set(ref) | {"general.quantization_version"}
    assert ours["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    types = {t: v[0] for t, v in tensors(out).items()}
    assert types["blk.1.ffn_gate_inp.weight"] == types["blk.1.ffn_norm.weight"] == "F32"
    assert types["blk.1.ffn_up_exps.weight"] == types["token_embd.weight"] == "Q8_0"
    if name == "open-v3":  # attn_k_b rows are qk_nope = 24 long: not a Q8_0 block, so F16 as in convert
        assert types["blk.0.attn_k_b.weight"] == "F16" and types["blk.1.exp_probs_b.bias"] == "F32"


def test_reference_logits_through_the_engine(tmp_path: Path) -> None:
    out = synth.write_model(tmp_path / "v3.gguf", ref_spec("open-v3"))
    ids = np.array([286, 126, 45, 155, 167, 69, 235, 81])
    m = DeepSeek2(GGUFFile(out))
    ours = m.forward(ids, m.new_cache(64, "f32"), all_logits=True)
    ref = np.load(REFS / "open-v3.logits.batch.npy")[: len(ids)]  # causal: the first 8 rows see only 8 tokens
    assert np.abs(ours - ref).max() < 1e-4


# ---- engine round trips ------------------------------------------------------------------------------------


def test_config_reads_the_requested_hyper_parameters(small_paths: dict[str, Path]) -> None:
    c = DeepSeek2Config.from_gguf(GGUFFile(small_paths["Q8_0"]))
    s = SMALL
    assert (c.n_vocab, c.hidden_size, c.n_layers, c.n_heads) == (s.vocab, s.hidden, s.layers, s.heads)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim) == (96, 64, 32, 16)
    assert (c.v_head_dim, c.n_routed_experts, c.n_experts_per_tok, c.n_shared_experts) == (32, 16, 4, 1)
    assert c.moe_intermediate_size == 128
    assert (c.intermediate_size, c.first_k_dense_replace, c.n_group, c.topk_group) == (512, 1, 4, 2)
    assert c.gating_func == GATING_SIGMOID and c.norm_topk_prob and c.routed_scaling_factor == 2.5
    assert c.context_length == 16384 and c.rope.is_yarn and c.rope.factor == 4.0 and c.rope.orig_ctx == 4096
    assert c.rope.yarn_log_multiplier == pytest.approx(0.1)


def test_legacy_form_without_lora_and_groups(tmp_path: Path) -> None:
    spec = dataclasses.replace(SMALL, q_lora_rank=0, kv_b_form="legacy", gating="softmax", expert_groups=1,
                               expert_weights_norm=False, expert_weights_scale=1.0, yarn=False)
    f = GGUFFile(synth.write_model(tmp_path / "legacy.gguf", spec))
    c = DeepSeek2Config.from_gguf(f)
    assert c.q_lora_rank == 0 and c.gating_func == GATING_SOFTMAX and c.n_group == 1 and not c.rope.is_yarn
    assert (c.qk_nope_head_dim, c.v_head_dim, c.context_length) == (32, 32, 4096)
    assert f.tensors["blk.0.attn_kv_b.weight"].shape == (8 * 64, 64)
    assert "blk.0.attn_k_b.weight" not in f.tensors
    assert "blk.1.exp_probs_b.bias" not in f.tensors and "deepseek2.expert_weights_scale" not in f.metadata


def test_split_and_legacy_forms_compute_the_same_function(tmp_path: Path) -> None:
    split = synth.write_model(tmp_path / "s.gguf", dataclasses.replace(SMALL, dtype="F32"))
    legacy_spec = dataclasses.replace(SMALL, dtype="F32", kv_b_form="legacy")
    legacy = synth.write_model(tmp_path / "l.gguf", legacy_spec)
    assert np.abs(logits(split) - logits(legacy)).max() < 1e-4


def test_k_quant_fallback_types(small_paths: dict[str, Path]) -> None:
    types = {n: t.qtype_name for n, t in GGUFFile(small_paths["Q4_K"]).tensors.items()}
    assert types["blk.1.ffn_gate_exps.weight"] == types["blk.0.attn_output.weight"] == "Q4_K"
    # rows of 96 (attn_q_b), 32 (attn_k_b), 64 (attn_v_b) and 128 (ffn_down_exps) are not multiples of 256
    for t in ("blk.0.attn_q_b", "blk.0.attn_k_b", "blk.0.attn_v_b", "blk.1.ffn_down_exps"):
        assert types[t + ".weight"] == "Q5_0", t
    assert types["blk.1.ffn_gate_inp.weight"] == types["blk.1.exp_probs_b.bias"] == "F32"
    assert GGUFFile(small_paths["Q5_K"]).tensors["blk.0.attn_k_b.weight"].qtype_name == "Q5_1"
    assert GGUFFile(small_paths["Q6_K"]).tensors["blk.0.attn_k_b.weight"].qtype_name == "Q8_0"


@pytest.mark.parametrize("dtype", ["Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_quantized_weights_match_the_f32_draw(dtype: str, small_paths: dict[str, Path]) -> None:
    f32, q = GGUFFile(small_paths["F32"]), GGUFFile(small_paths[dtype])
    bound = {"Q8_0": 0.01, "Q4_K": 0.08, "Q5_K": 0.045, "Q6_K": 0.03}[dtype]  # Q6_K files hold Q8_0 fallbacks
    for name, info in q.tensors.items():
        ref = np.asarray(f32.raw(name))
        got = gguf.quants.dequantize(np.asarray(q.raw(name)), gguf.GGMLQuantizationType(info.qtype))
        got = got.reshape(ref.shape)
        err = np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2))
        assert err < bound, (name, info.qtype_name, err)


@pytest.mark.parametrize("dtype", ["Q8_0", "Q4_K"])
def test_quantized_model_runs_a_forward(dtype: str, small_paths: dict[str, Path]) -> None:
    out = logits(small_paths[dtype])
    ref = logits(small_paths["F32"])
    assert out.shape == (8, SMALL.vocab) and np.isfinite(out).all()
    # a random MoE is chaotic (routing flips), so only a loose bound: unrelated logits would give ~1.4
    rel = np.sqrt(np.mean((out - ref) ** 2)) / ref.std()
    assert rel < {"Q8_0": 0.2, "Q4_K": 0.6}[dtype], rel


# ---- determinism, streaming, atomic writes -----------------------------------------------------------------


def test_same_seed_same_bytes(tmp_path: Path, small_paths: dict[str, Path]) -> None:
    again = synth.write_model(tmp_path / "again.gguf", dataclasses.replace(SMALL, dtype="Q4_K"))
    assert sha256(again) == sha256(small_paths["Q4_K"])
    other = synth.write_model(tmp_path / "other.gguf", dataclasses.replace(SMALL, dtype="Q4_K", seed=6))
    assert sha256(other) != sha256(again) and other.stat().st_size == again.stat().st_size


def test_writes_one_tensor_at_a_time(tmp_path: Path) -> None:
    spec = synth.SynthSpec(hidden=256, layers=4, experts=16, expert_ffn=256, dense_ffn=256, seed=1)
    biggest = max(int(np.prod(t.shape)) for t in synth.tensor_plan(spec)) * 4
    total = synth.param_count(spec) * 4
    tracemalloc.start()
    try:
        synth.write_model(tmp_path / "m.gguf", spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total > 10 * biggest and peak < 4 * biggest, (peak, biggest, total)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(spec: synth.SynthSpec, t: synth.TensorPlan) -> np.ndarray:
        if t.name.startswith("blk.1."):
            raise RuntimeError("disk full")
        return real(spec, t)

    real = synth.tensor_values
    monkeypatch.setattr(synth, "tensor_values", boom)
    with pytest.raises(RuntimeError):
        synth.write_model(tmp_path / "m.gguf", synth.SynthSpec())
    assert list(tmp_path.iterdir()) == []


# ---- tokenizer ---------------------------------------------------------------------------------------------


def hf_tokenizer(v: synth.Vocab) -> Tokenizer:
    merges = [tuple(m.split(" ")) for m in v.merges]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(v.tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_vocabulary_layout(small_paths: dict[str, Path]) -> None:
    f = GGUFFile(small_paths["Q8_0"])
    toks, types = f.get("tokenizer.ggml.tokens"), f.get("tokenizer.ggml.token_type")
    merges = f.get("tokenizer.ggml.merges")
    bos, eos = f.get("tokenizer.ggml.bos_token_id"), f.get("tokenizer.ggml.eos_token_id")
    assert len(toks) == len(types) == SMALL.vocab == f.get("deepseek2.vocab_size")
    assert toks[:256] == list(synth.byte_tokens()) and toks[ord("A")] == "A" and toks[ord(" ")] == "Ġ"
    assert merges[:30] == list(synth.bpe_merges()[:30])
    assert (bos, eos) == (256 + len(merges), 257 + len(merges))
    assert [m.replace(" ", "") for m in merges] == toks[256:bos]  # one new token per merge, in merge order
    assert (toks[bos], toks[eos], types[bos], types[eos]) == (synth.BOS_TEXT, synth.EOS_TEXT, 3, 3)
    assert f.get("tokenizer.ggml.padding_token_id") == eos and f.get("tokenizer.ggml.add_bos_token") is True
    assert f.get("tokenizer.ggml.pre") == "default" and f.get("tokenizer.ggml.model") == "gpt2"
    assert len(set(toks)) == len(toks)


def test_vocabulary_pads_past_the_learned_merges() -> None:
    v = synth.make_vocab(2000)
    n = len(synth.bpe_merges())
    assert len(v.tokens) == 2000 and len(v.merges) == n and v.bos == 256 + n
    assert v.tokens[v.eos + 1] == f"[PAD{v.eos + 1}]" and v.types[v.eos + 1:] == [5] * (1999 - v.eos)


def test_merges_shorten_english() -> None:
    tok = hf_tokenizer(synth.make_vocab(synth.DEFAULT_SPEC.vocab))
    text = "The weather in the town is cold, and the children are playing near the river."
    enc = tok.encode(text)
    assert tok.decode(enc.ids) == text
    assert len(enc.ids) < len(text.encode()) / 3
    assert tok.token_to_id("Ġthe") == 261  # the reference vocabulary's sixth merge


def test_default_model_chat_template_renders() -> None:
    import jinja2

    text = jinja2.Environment().from_string(synth.DEFAULT_SPEC.chat_template).render(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
        add_generation_prompt=True)
    eos = synth.EOS_TEXT
    assert text == f"Be brief.\n\n<｜User｜>Hi<｜Assistant｜>Hello{eos}<｜User｜>Bye<｜Assistant｜>"


# ---- the embedded default model, presets, validation -------------------------------------------------------


def test_default_model_path_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IKCTL_CACHE", str(tmp_path / "cache"))
    p = synth.default_model_path()
    assert p.parent == tmp_path / "cache" and p.suffix == ".gguf"
    stamp = p.stat().st_mtime_ns
    assert synth.default_model_path() == p and p.stat().st_mtime_ns == stamp
    assert [q.name for q in p.parent.iterdir()] == [p.name]  # no temp file left
    f = GGUFFile(p)
    assert f.get("tokenizer.chat_template") == synth.CHAT_TEMPLATE_V3
    assert f.get("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    c = DeepSeek2Config.from_gguf(f)
    assert (c.hidden_size, c.n_layers, c.n_heads, c.n_routed_experts, c.n_group) == (256, 4, 8, 16, 4)


def test_cache_dir_fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IKCTL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache.cache_dir() == tmp_path / "ikctl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache.cache_dir() == tmp_path / "home" / ".cache" / "ikctl"


def test_bench_spec_is_a_small_v2_lite() -> None:
    s = synth.BENCH_SPEC
    assert synth.param_count(s) == 704_114_688  # ~0.70B
    assert (s.hidden, s.layers, s.heads, s.q_lora_rank, s.kv_lora_rank, s.experts, s.top_k) == (
        1024, 12, 16, 0, 256, 32, 6)
    assert s.n_ctx_train == 163840


def test_cli_presets_and_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d.gguf"
    assert synth.main([str(out), "--preset", "default", "--layers", "2", "--dtype", "F16", "--no-yarn"]) == 0
    assert "parameters" in capsys.readouterr().out
    c = DeepSeek2Config.from_gguf(GGUFFile(out))
    assert c.n_layers == 2 and c.hidden_size == 256 and not c.rope.is_yarn
    assert GGUFFile(out).tensors["blk.0.attn_q_a.weight"].qtype_name == "F16"
    with pytest.raises(SystemExit):
        synth.main([str(tmp_path / "x.gguf"), "--vocab", "100"])
    with pytest.raises(SystemExit):
        synth.main([str(tmp_path / "x.gguf"), "--dtype", "Q3_K"])


@pytest.mark.parametrize("bad", [
    {"vocab": 287}, {"qk_rope": 7}, {"dense_layers": 4}, {"gating": "relu"}, {"kv_b_form": "ik"},
    {"dtype": "IQ4_XS"}, {"expert_groups": 3}, {"expert_groups": 4, "expert_groups_used": 1, "top_k": 3},
    {"top_k": 9}, {"yarn": True, "yarn_factor": 1.0},
])
def test_spec_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="SynthSpec"):
        synth.SynthSpec(**bad)  # type: ignore[arg-type]
