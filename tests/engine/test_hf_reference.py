"""The deepseek2 engine against Hugging Face transformers' DeepseekV2/V3 modelling code (CPU, float32).

Tiny random HF models (every parameter and buffer drawn from a seeded torch generator, including
`e_score_correction_bias` and the RMSNorm weights) are converted to GGUF the way llama.cpp's converter does
(tests/engine/hf_convert.py), run through `engine.load_model(..., cache_type_k="f32", mla=M)`, and their
logits for 32 tokens are compared with `model(ids).logits`: ||ours - ref|| / ||ref|| <= 1e-4
(observed 4e-7 .. 1.3e-6, the same as HF float32 vs HF float64).

Router near-ties: every test first checks that the smallest top-k gap (and group-selection gap) of every MoE
layer, recomputed in float64 from HF's router logits, is at least 1e-4, which is far above the ~1e-6 float32
difference between the two implementations. A seed that fails this check fails the test loudly (pick another
seed); the logits tolerance is never loosened.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

import engine
from engine.gguf_file import GGUFFile
from engine.moe import route

try:
    from tests.engine.hf_convert import convert, gguf_tensors
except ImportError:  # pytest's rootdir-less "prepend" import mode puts tests/engine itself on sys.path
    from hf_convert import convert, gguf_tensors  # type: ignore[no-redef]

REL_TOL = 1e-4
MIN_MARGIN = 1e-4  # smallest allowed router gap (float64), ~100x the float32 noise between HF and the engine
N_TOKENS = 32
MLA = (0, 1, 2, 3)


@dataclass(frozen=True)
class Case:
    name: str
    version: int  # 2 or 3
    config: dict[str, Any]
    seed: int  # weights
    ids_seed: int = 7
    forms: tuple[str, ...] = ("split", "legacy")
    notes: str = field(default="", compare=False)


_COMMON = dict(
    vocab_size=300,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_rope_head_dim=8,
    rms_norm_eps=1e-6,
    attn_implementation="eager",
    experts_implementation="eager",  # the plain per-expert loop of the modelling file, not torch grouped_mm
)

CASES = {
    c.name: c
    for c in (
        Case(
            "v2",
            2,
            dict(
                hidden_size=64,
                num_hidden_layers=2,
                intermediate_size=96,
                moe_intermediate_size=32,
                first_k_dense_replace=0,
                n_routed_experts=8,
                num_experts_per_tok=2,
                n_shared_experts=2,
                q_lora_rank=None,
                qk_nope_head_dim=16,
                v_head_dim=12,
                topk_method="greedy",
                norm_topk_prob=False,
                routed_scaling_factor=1.0,
                max_position_embeddings=512,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0),
            ),
            seed=19,
            forms=("legacy", "split"),
            notes="V2-Lite style: softmax, greedy top-k, no q-LoRA, no rope scaling, all layers MoE",
        ),
        Case(
            "v2-groups-yarn",
            2,
            dict(
                hidden_size=64,
                num_hidden_layers=3,
                intermediate_size=96,
                moe_intermediate_size=24,
                first_k_dense_replace=1,
                n_routed_experts=8,
                num_experts_per_tok=3,
                n_shared_experts=1,
                q_lora_rank=40,
                qk_nope_head_dim=16,
                v_head_dim=20,
                topk_method="group_limited_greedy",
                n_group=4,
                topk_group=2,
                norm_topk_prob=False,  # HF's V2 router ignores it; V2 configs set it false
                routed_scaling_factor=4.0,
                tie_word_embeddings=True,
                max_position_embeddings=163840,
                rope_parameters=dict(
                    rope_type="yarn",
                    rope_theta=10000.0,
                    factor=40.0,
                    original_max_position_embeddings=4096,
                    mscale=0.707,
                    mscale_all_dim=0.707,
                    beta_fast=32,
                    beta_slow=1,
                ),
            ),
            seed=33,
            forms=("split",),
            notes="V2-236B style: group_limited_greedy (max per group), scale, q-LoRA, YaRN 0.707, tied",
        ),
        Case(
            "v3",
            3,
            dict(
                hidden_size=128,
                num_hidden_layers=3,
                intermediate_size=160,
                moe_intermediate_size=32,
                first_k_dense_replace=1,
                n_routed_experts=16,
                num_experts_per_tok=3,
                n_shared_experts=1,
                q_lora_rank=48,
                qk_nope_head_dim=24,
                v_head_dim=16,
                n_group=4,
                topk_group=2,
                norm_topk_prob=True,
                routed_scaling_factor=2.5,
                max_position_embeddings=32768,
                rope_interleave=True,
                rope_parameters=dict(
                    rope_type="yarn",
                    rope_theta=10000.0,
                    factor=8.0,
                    original_max_position_embeddings=4096,
                    mscale=1.0,
                    mscale_all_dim=1.0,
                    beta_fast=32,
                    beta_slow=1,
                ),
            ),
            seed=54,
            forms=("split", "legacy"),
            notes="V3 style: sigmoid + bias, noaux_tc groups, norm + scale, q-LoRA, YaRN 1.0, dense layer 0",
        ),
    )
}
FORM_CASES = [(c.name, form) for c in CASES.values() for form in c.forms]


# ---- HF side ------------------------------------------------------------------------------------------
def randomize_(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Overwrite every parameter and persistent buffer in place from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    D = model.config.hidden_size
    done: set[int] = set()
    for name in sorted(sd):
        t = sd[name]
        if t.data_ptr() in done:  # tied weights
            continue
        done.add(t.data_ptr())
        n = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if "norm" in name:
            v = 1.0 + 0.1 * n  # so that swapping two norm tensors cannot go unnoticed
        elif name.endswith("e_score_correction_bias"):
            v = 0.1 * n  # transformers inits it to 0, which would hide a bias that is ignored or misused
        elif "embed_tokens" in name:
            v = n
        elif name.endswith("mlp.gate.weight"):
            v = n * (2.0 / D**0.5)  # router logits of O(1) spread the scores: clear top-k margins
        else:
            v = n / t.shape[-1] ** 0.5  # fan-in scaling keeps activations O(1) in float32
        t.copy_(v)
    return sd


@dataclass
class HFRun:
    case: Case
    model: torch.nn.Module
    config: Any
    state_dict: dict[str, torch.Tensor]
    ids: list[int]
    logits: np.ndarray  # [T, V] float32
    router_logits: dict[int, np.ndarray]  # layer -> [T, E] float32, as HF computed them
    router_choice: dict[int, tuple[np.ndarray, np.ndarray]]  # layer -> (ids [T, K], weights [T, K])


def build_hf(case: Case) -> HFRun:
    if case.version == 2:
        config = DeepseekV2Config(**{**_COMMON, **case.config})
        model = DeepseekV2ForCausalLM(config)
    else:
        config = DeepseekV3Config(**{**_COMMON, **case.config})
        model = DeepseekV3ForCausalLM(config)
    model = model.eval().to(torch.float32)
    assert config._attn_implementation == "eager" and config._experts_implementation == "eager"
    with torch.no_grad():
        sd = randomize_(model, case.seed)
    ids = torch.randint(
        0, config.vocab_size, (N_TOKENS,), generator=torch.Generator().manual_seed(case.ids_seed)
    )
    router_logits: dict[int, np.ndarray] = {}
    router_choice: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if isinstance(gate, torch.nn.Module) and hasattr(gate, "top_k"):

            def hook(_m, _inp, out, i=i):
                router_logits[i] = out[0].detach().numpy().copy()
                router_choice[i] = (out[2].detach().numpy().copy(), out[1].detach().numpy().copy())

            hooks.append(gate.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(ids[None]).logits[0].float().numpy()
    finally:
        for h in hooks:
            h.remove()
    return HFRun(case, model, config, sd, ids.tolist(), logits, router_logits, router_choice)


def router_margins(run: HFRun) -> tuple[float, float]:
    """Smallest (top-k gap, group gap) over all MoE layers and tokens (float64, HF's selection rule)."""
    cfg = run.config
    k = cfg.num_experts_per_tok
    min_k, min_g = np.inf, np.inf
    for i, z32 in run.router_logits.items():
        z = z32.astype(np.float64)
        T, E = z.shape
        if run.case.version == 3:
            probs = 1.0 / (1.0 + np.exp(-z))
            bias = run.model.model.layers[i].mlp.gate.e_score_correction_bias.double().numpy()
            sel = probs + bias
            G, Gk = cfg.n_group, cfg.topk_group
            gscore = -np.sort(-sel.reshape(T, G, E // G), axis=-1)[..., :2].sum(-1)
            fill = -np.inf
        else:
            sel = np.exp(z - z.max(-1, keepdims=True))
            sel /= sel.sum(-1, keepdims=True)
            grouped = cfg.topk_method == "group_limited_greedy"
            G, Gk = (cfg.n_group, cfg.topk_group) if grouped else (1, 1)
            gscore = sel.reshape(T, G, E // G).max(-1)
            fill = 0.0
        if G > 1:
            gs = -np.sort(-gscore, axis=-1)
            min_g = min(min_g, float((gs[:, Gk - 1] - gs[:, Gk]).min()))
            keep = np.argsort(-gscore, axis=-1)[:, :Gk]
            mask = np.ones((T, G), bool)
            np.put_along_axis(mask, keep, False, axis=-1)
            sel = np.where(np.repeat(mask, E // G, axis=-1), fill, sel)
        s = -np.sort(-sel, axis=-1)
        min_k = min(min_k, float((s[:, k - 1] - s[:, k]).min()))
    return min_k, min_g


# ---- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_runs() -> dict[str, HFRun]:
    return {name: build_hf(case) for name, case in CASES.items()}


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf_gguf")


@pytest.fixture(scope="module")
def gguf_paths(hf_runs: dict[str, HFRun], gguf_dir: Path) -> dict[tuple[str, str], Path]:
    paths = {}
    for name, form in FORM_CASES:
        run = hf_runs[name]
        p = gguf_dir / f"{name}-{form}.gguf"
        convert(run.state_dict, run.config, p, kv_b_form=form, name=f"hf-{name}")
        paths[(name, form)] = p
    return paths


def engine_logits(path: Path, ids: list[int], mla: int) -> np.ndarray:
    m = engine.load_model(path, cache_type_k="f32", mla=mla, ctx_size=64)
    out = m.logits(ids)
    assert out.dtype == np.float32 and out.shape == (len(ids), m.n_vocab)
    return out


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours.astype(np.float64) - ref) / np.linalg.norm(ref.astype(np.float64)))


# ---- tests --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_seed_has_clear_router_margins(hf_runs: dict[str, HFRun], name: str) -> None:
    run = hf_runs[name]
    assert run.router_logits, "no MoE layer was hooked"
    min_k, min_g = router_margins(run)
    assert min_k >= MIN_MARGIN, f"{name}: top-k near-tie {min_k:.2e}; pick another seed"
    assert min_g >= MIN_MARGIN, f"{name}: group near-tie {min_g:.2e}; pick another seed"


@pytest.mark.parametrize("name", list(CASES))
def test_routing_matches_hf(
    hf_runs: dict[str, HFRun], gguf_paths: dict[tuple[str, str], Path], name: str
) -> None:
    """engine.moe.route on HF's own router logits picks the same experts with the same weights as HF."""
    run = hf_runs[name]
    from engine.deepseek2 import DeepSeek2

    net = DeepSeek2(GGUFFile(gguf_paths[(name, CASES[name].forms[0])]), mla=3)
    assert set(run.router_logits) == {i for i in range(net.cfg.n_layers) if net.cfg.is_moe_layer(i)}
    for i, z in run.router_logits.items():
        idx, w = route(net.router, z, net.layers[i].probs_bias)
        ref_idx, ref_w = run.router_choice[i]
        o, ro = np.argsort(idx, axis=-1), np.argsort(ref_idx, axis=-1)
        np.testing.assert_array_equal(np.take_along_axis(idx, o, -1), np.take_along_axis(ref_idx, ro, -1))
        np.testing.assert_allclose(
            np.take_along_axis(w, o, -1), np.take_along_axis(ref_w, ro, -1), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("mla", MLA)
@pytest.mark.parametrize(("name", "form"), FORM_CASES)
def test_logits_match_hf(
    hf_runs: dict[str, HFRun], gguf_paths: dict[tuple[str, str], Path], name: str, form: str, mla: int
) -> None:
    run = hf_runs[name]
    ours = engine_logits(gguf_paths[(name, form)], run.ids, mla)
    err = rel_err(ours, run.logits)
    assert err <= REL_TOL, f"{name}/{form}/mla={mla}: relative error {err:.3e} > {REL_TOL}"


@pytest.mark.parametrize("mla", (0, 1, 3))
@pytest.mark.parametrize(("name", "form"), FORM_CASES)
def test_incremental_decode_matches_hf(
    hf_runs: dict[str, HFRun], gguf_paths: dict[tuple[str, str], Path], name: str, form: str, mla: int
) -> None:
    """Prefill 20 tokens, then decode the other 12 one at a time (mla=3 switches to absorbed decode)."""
    run = hf_runs[name]
    m = engine.load_model(gguf_paths[(name, form)], cache_type_k="f32", mla=mla, ctx_size=64)
    cache = m.new_cache(64)
    rows = [m.eval(run.ids[:20], cache, all_logits=True)]
    rows += [m.eval([t], cache, all_logits=True) for t in run.ids[20:]]
    ours = np.concatenate(rows, axis=0)
    err = rel_err(ours, run.logits)
    assert err <= REL_TOL, f"{name}/{form}/mla={mla} incremental: relative error {err:.3e} > {REL_TOL}"


# ---- negative checks: the comparison must notice broken math ---------------------------------------------
def _perturb_one(src: Path, dst: Path, tensor: str, index: int, delta: float) -> None:
    shutil.copyfile(src, dst)
    info = GGUFFile(src).tensors[tensor]
    assert info.qtype == 0, "expects an F32 tensor"
    mm = np.memmap(dst, dtype=np.float32, mode="r+", offset=info.offset, shape=(info.n_bytes // 4,))
    mm[index] += np.float32(delta)
    mm.flush()
    del mm


@pytest.mark.parametrize(
    ("name", "form", "tensor", "index", "delta"),
    [
        ("v3", "split", "blk.2.exp_probs_b.bias", 5, 0.3),  # selection-only bias: changes expert choices
        ("v3", "split", "blk.1.attn_k_b.weight", 17, 0.5),
        ("v3", "split", "blk.0.attn_q_a_norm.weight", 3, 0.5),
        ("v2", "legacy", "blk.1.attn_kv_b.weight", 40, 0.5),
        ("v2", "legacy", "blk.0.ffn_down_exps.weight", 100, 0.5),
        ("v2-groups-yarn", "split", "blk.1.attn_kv_a_mqa.weight", 64 * 35 + 2, 0.5),  # a k_pe row (rope part)
    ],
)
def test_perturbed_gguf_weight_is_detected(
    hf_runs: dict[str, HFRun],
    gguf_paths: dict[tuple[str, str], Path],
    gguf_dir: Path,
    name: str,
    form: str,
    tensor: str,
    index: int,
    delta: float,
) -> None:
    run = hf_runs[name]
    bad = gguf_dir / f"perturbed-{tensor}.gguf"
    _perturb_one(gguf_paths[(name, form)], bad, tensor, index, delta)
    for mla in (0, 3):
        err = rel_err(engine_logits(bad, run.ids, mla), run.logits)
        assert err > 10 * REL_TOL, (
            f"perturbing {tensor}[{index}] went unnoticed (rel err {err:.2e}, mla={mla})"
        )


def _permute_rope_rows(w: torch.Tensor, n_blocks: int, block: int, start: int, dr: int) -> torch.Tensor:
    """De-interleave (NEOX order) the dr rope rows at `start` of each of n_blocks blocks of `block` rows."""
    w = w.clone()
    perm = torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)])
    for b in range(n_blocks):
        rows = slice(b * block + start, b * block + start + dr)
        w[rows] = w[rows][perm]
    return w


def test_rope_layout_matters(hf_runs: dict[str, HFRun], gguf_dir: Path) -> None:
    """Converting with a (wrong) llama-style permutation of the rope rows of q and k_pe breaks the match."""
    run = hf_runs["v3"]
    c = run.config
    dk, dr, r = c.qk_nope_head_dim + c.qk_rope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
    sd = dict(run.state_dict)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        sd[p + "q_b_proj.weight"] = _permute_rope_rows(
            sd[p + "q_b_proj.weight"], c.num_attention_heads, dk, c.qk_nope_head_dim, dr
        )
        sd[p + "kv_a_proj_with_mqa.weight"] = _permute_rope_rows(
            sd[p + "kv_a_proj_with_mqa.weight"], 1, r + dr, r, dr
        )
    p = gguf_dir / "v3-permuted-rope.gguf"
    convert(sd, c, p)
    err = rel_err(engine_logits(p, run.ids, 3), run.logits)
    assert err > 10 * REL_TOL, f"a permuted rope layout went unnoticed (rel err {err:.2e})"


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("v3", {"routed_scaling_factor": 1.0}),
        ("v3", {"norm_topk_prob": False}),
        ("v3", {"n_group": 1, "topk_group": 1}),
        ("v3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
        (
            "v2-groups-yarn",
            {
                "rope_parameters": {
                    **CASES["v2-groups-yarn"].config["rope_parameters"],
                    "mscale_all_dim": 1.0,
                    "mscale": 1.0,
                }
            },
        ),
        ("v2-groups-yarn", {"topk_method": "greedy", "n_group": None, "topk_group": None}),
    ],
)
def test_wrong_metadata_is_detected(
    hf_runs: dict[str, HFRun], gguf_dir: Path, name: str, change: dict[str, Any]
) -> None:
    """The same weights written with one hyper-parameter changed no longer match HF: each key is honoured."""
    run = hf_runs[name]
    cfg = {**run.config.to_dict(), **change}
    p = gguf_dir / f"{name}-wrong-{'-'.join(change)}.gguf"
    convert(run.state_dict, cfg, p)
    err = rel_err(engine_logits(p, run.ids, 3), run.logits)
    assert err > 10 * REL_TOL, f"{name} with {change} went unnoticed (rel err {err:.2e})"


# ---- the converter itself ----------------------------------------------------------------------------
def test_converter_metadata_and_shapes(
    hf_runs: dict[str, HFRun], gguf_paths: dict[tuple[str, str], Path]
) -> None:
    """Keys and tensor layouts as llama.cpp's converter writes them (spec §1)."""
    c = hf_runs["v3"].config
    H, r, dn, dr, dv = (
        c.num_attention_heads,
        c.kv_lora_rank,
        c.qk_nope_head_dim,
        c.qk_rope_head_dim,
        c.v_head_dim,
    )
    E, Fe, D = c.n_routed_experts, c.moe_intermediate_size, c.hidden_size
    split, legacy = GGUFFile(gguf_paths[("v3", "split")]), GGUFFile(gguf_paths[("v3", "legacy")])
    a = "deepseek2."
    m = split.metadata
    assert split.architecture == "deepseek2"
    assert m[a + "attention.head_count_kv"] == 1
    assert (m[a + "attention.key_length"], m[a + "attention.value_length"]) == (r + dr, r)
    assert (m[a + "attention.key_length_mla"], m[a + "attention.value_length_mla"]) == (dn + dr, dv)
    assert m[a + "expert_gating_func"] == 2 and m[a + "expert_weights_norm"] is True
    assert m[a + "expert_weights_scale"] == pytest.approx(2.5)
    assert (m[a + "expert_group_count"], m[a + "expert_group_used_count"]) == (c.n_group, c.topk_group)
    assert m[a + "leading_dense_block_count"] == 1 and m[a + "attention.q_lora_rank"] == c.q_lora_rank
    assert m[a + "rope.scaling.type"] == "yarn" and m[a + "rope.scaling.factor"] == pytest.approx(8.0)
    assert m[a + "rope.scaling.original_context_length"] == 4096
    assert m[a + "rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * 1.0)
    assert m["tokenizer.ggml.model"] == "gpt2" and len(m["tokenizer.ggml.tokens"]) == c.vocab_size
    t = split.tensors
    assert t["blk.1.attn_k_b.weight"].shape == (H, r, dn)
    assert t["blk.1.attn_v_b.weight"].shape == (H, dv, r)
    assert "blk.1.attn_kv_b.weight" not in t
    assert t["blk.1.ffn_gate_exps.weight"].shape == (E, Fe, D)
    assert t["blk.1.ffn_down_exps.weight"].shape == (E, D, Fe)
    assert t["blk.1.exp_probs_b.bias"].shape == (E,)
    assert "blk.0.ffn_gate_inp.weight" not in t and t["blk.0.ffn_gate.weight"].shape == (
        c.intermediate_size,
        D,
    )
    lm = legacy.metadata
    assert lm[a + "attention.head_count_kv"] == H and a + "attention.key_length_mla" not in lm
    assert (lm[a + "attention.key_length"], lm[a + "attention.value_length"]) == (dn + dr, dv)
    assert legacy.tensors["blk.1.attn_kv_b.weight"].shape == (H * (dn + dv), r)
    # V2 tied embeddings: no output.weight, and V2-236B's yarn multiplier 0.1 * 0.707
    g = GGUFFile(gguf_paths[("v2-groups-yarn", "split")])
    assert "output.weight" not in g.tensors
    assert g.metadata[a + "rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707)
    assert g.metadata[a + "expert_gating_func"] == 1


def test_converter_accepts_per_expert_checkpoint_names(hf_runs: dict[str, HFRun]) -> None:
    """Checkpoint / transformers 4.x names `mlp.experts.{e}.{gate,up,down}_proj.weight` give the same GGUF."""
    run = hf_runs["v3"]
    F = run.config.moe_intermediate_size
    per_expert: dict[str, torch.Tensor] = {}
    for name, t in run.state_dict.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                per_expert[f"{base}{e}.gate_proj.weight"] = t[e, :F]
                per_expert[f"{base}{e}.up_proj.weight"] = t[e, F:]
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                per_expert[f"{base}{e}.down_proj.weight"] = t[e]
        else:
            per_expert[name] = t
    fused = gguf_tensors(run.state_dict, run.config)
    unfused = gguf_tensors(per_expert, run.config)
    assert sorted(fused) == sorted(unfused)
    for k, v in fused.items():
        np.testing.assert_array_equal(unfused[k], v, err_msg=k)
