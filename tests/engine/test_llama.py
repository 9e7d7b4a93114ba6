"""The llama forward pass on SmolLM2-135M-Instruct (Q4_1) against an independent float64 NumPy reference."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from engine import Model, load_model
from engine.llama import Llama, rope_head
from engine.rope import apply_rope

# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" in SmolLM2's
# vocabulary (checked against llama.cpp's tokenizer); used only as input.
CHAT_IDS = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
REPO = Path(__file__).resolve().parents[2]


# ---- independent reference: float64, straight from gguf's reader, no engine code ------------------
def _weights(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader.tensors}


def _w(tensors: dict[str, gguf.ReaderTensor], name: str) -> np.ndarray:
    t = tensors[name]
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)


def _meta(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, pos: int, base: float) -> np.ndarray:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of one head by pos * base^(-2i/d)."""
    d = len(x)
    out = x.copy()
    for i in range(d // 2):
        theta = pos * base ** (-2.0 * i / d)
        c, s = math.cos(theta), math.sin(theta)
        out[2 * i] = x[2 * i] * c - x[2 * i + 1] * s
        out[2 * i + 1] = x[2 * i] * s + x[2 * i + 1] * c
    return out


def reference_logits(path: Path, ids: list[int]) -> np.ndarray:
    """float64 logits [T, V] of a dense llama with tied or untied output head."""
    reader = gguf.GGUFReader(path)
    W = _weights(reader)
    n_layers = int(_meta(reader, "llama.block_count"))
    H = int(_meta(reader, "llama.attention.head_count"))
    Hkv = int(_meta(reader, "llama.attention.head_count_kv"))
    eps = float(_meta(reader, "llama.attention.layer_norm_rms_epsilon"))
    base = float(_meta(reader, "llama.rope.freq_base"))
    emb = _w(W, "token_embd.weight")  # [V, D]
    x = emb[ids]  # [T, D]
    T, D = x.shape
    hd = D // H
    for layer in range(n_layers):
        p = f"blk.{layer}."
        h = _rms_norm(x, _w(W, p + "attn_norm.weight"), eps)
        q = (h @ _w(W, p + "attn_q.weight").T).reshape(T, H, hd)
        k = (h @ _w(W, p + "attn_k.weight").T).reshape(T, Hkv, hd)
        v = (h @ _w(W, p + "attn_v.weight").T).reshape(T, Hkv, hd)
        for t in range(T):
            q[t] = [_rope(q[t, j], t, base) for j in range(H)]
            k[t] = [_rope(k[t, j], t, base) for j in range(Hkv)]
        o = np.zeros((T, H, hd))
        for j in range(H):
            kv = j // (H // Hkv)
            for t in range(T):
                scores = k[: t + 1, kv] @ q[t, j] / math.sqrt(hd)
                w = np.exp(scores - scores.max())
                o[t, j] = (w / w.sum()) @ v[: t + 1, kv]
        x = x + o.reshape(T, D) @ _w(W, p + "attn_output.weight").T
        h = _rms_norm(x, _w(W, p + "ffn_norm.weight"), eps)
        g = h @ _w(W, p + "ffn_gate.weight").T
        u = h @ _w(W, p + "ffn_up.weight").T
        x = x + (g / (1.0 + np.exp(-g)) * u) @ _w(W, p + "ffn_down.weight").T
    out = _w(W, "output.weight") if "output.weight" in W else emb
    return _rms_norm(x, _w(W, "output_norm.weight"), eps) @ out.T


# ---- tests --------------------------------------------------------------------------------------
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def model(smollm2_path: Path) -> Model:
    return load_model(smollm2_path, cache_type_k="f32", float_activations=True)  # exact: the float64 reference


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_config_and_tied_head(model: Model) -> None:
    assert isinstance(model.net, Llama)
    c = model.net.cfg
    assert (c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert model.net.output is model.net.token_embd  # SmolLM2 ties the output head to the embedding


def test_partial_rope_leaves_the_tail_alone() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 8)).astype(np.float32)  # [T, H, hd]
    theta = rng.standard_normal((3, 2))  # [T, n_rot / 2] for n_rot = 4
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    y = rope_head(x, 4, cos, sin)
    np.testing.assert_array_equal(y[..., 4:], x[..., 4:])
    np.testing.assert_array_equal(y[..., :4], apply_rope(np.ascontiguousarray(x[..., :4]), cos, sin))


@pytest.mark.slow
def test_logits_match_float64_reference(model: Model, smollm2_path: Path) -> None:
    ref = reference_logits(smollm2_path, CHAT_IDS)
    ours = model.logits(CHAT_IDS)
    assert ours.shape == ref.shape == (len(CHAT_IDS), model.n_vocab) and ours.dtype == np.float32
    # float32 vs float64 through 30 layers: measured 1.5e-6 of the largest |logit| (5e-5 absolute of 36)
    assert _rel_err(ours, ref) <= 1e-5
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
def test_batched_prefill_equals_token_by_token(model: Model, smollm2_path: Path) -> None:
    ids = CHAT_IDS[:8]  # each single-token step re-decodes every weight, so keep this short
    batch = model.logits(ids)
    cache = model.new_cache()
    steps = np.concatenate([model.eval([t], cache) for t in ids])
    assert cache.n_past == len(ids)
    assert _rel_err(steps, batch) <= 1e-5
    # micro-batches of 3 (positions continue across forward calls) give the same logits
    chunked = load_model(smollm2_path, cache_type_k="f32", ubatch_size=3, float_activations=True).logits(ids)
    assert _rel_err(chunked, batch) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(("cache_type", "tol"), [("f16", 1e-3), ("q8_0", 3e-2)])
def test_quantized_caches_stay_close(model: Model, smollm2_path: Path, cache_type: str, tol: float) -> None:
    # measured: f16 4.9e-4, q8_0 1.4e-2 of the largest |logit|
    ours = load_model(smollm2_path, cache_type_k=cache_type, float_activations=True).logits(CHAT_IDS)
    assert _rel_err(ours, model.logits(CHAT_IDS)) <= tol


@pytest.mark.slow
def test_greedy_chat_answer_names_paris(model: Model) -> None:
    assert model.tokenize(PROMPT) == CHAT_IDS
    out = [t.id for t in model.generate(CHAT_IDS, n_predict=12, temp=0.0) if t.id >= 0]
    text = model.detokenize(out)
    assert "Paris" in text, text


_RSS_SCRIPT = """
import json, resource, sys
from engine.gguf_file import GGUFFile
from engine.llama import Llama, rope_head
from engine.rope import apply_rope

def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def file_resident_kib(path):
    # resident pages of the file's own memory mapping(s), from /proc/self/smaps
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and ":" not in head[0]:  # a mapping header: address perms offset dev inode [path]
            inside = line.rstrip().endswith(path)
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total

start = peak_kib()
f = GGUFFile(sys.argv[1])
opened = peak_kib()
net = Llama(f)
loaded = peak_kib()
print(json.dumps({"metadata_kib": opened - start, "weights_kib": loaded - opened,
                  "file_resident_kib": file_resident_kib(sys.argv[1])}))
"""


def test_load_is_memory_mapped(smollm2_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(smollm2_path.resolve())],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=120,
    )
    r = json.loads(out.stdout)
    size_kib = smollm2_path.stat().st_size // 1024
    # Building the network reads only the norm vectors, and the file's pages are not touched: the quantized
    # weights stay in the page cache. (Opening the file costs more, ~160 MiB here, all in the gguf reader's
    # per-token metadata arrays of the 49k vocabulary; that is GGUFFile's business, not the weights'.)
    assert r["weights_kib"] < size_kib / 20, r
    assert 0 < r["file_resident_kib"] < size_kib / 10, r  # > 0: the mapping was found at all
