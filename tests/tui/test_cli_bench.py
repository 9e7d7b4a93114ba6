"""`ikctl bench`: the sweep table, the JSON file, and the step plan."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.bench import decoder_path_tensors, sweep_steps
from engine.errors import IkctlError
from engine.gguf_file import GGUFFile
from engine.ik_types import IK_IDS, is_ik
from engine.kernels import fused
from engine.threads import blas, blas_note
from tests.engine.test_ik_model import MODEL
from tests.engine.test_ik_types import _ref, _write_gguf

ROW_KEYS = {"n_kv", "pp", "tg", "t_pp", "speed_pp", "t_tg", "speed_tg"}


def test_sweep_steps() -> None:
    assert sweep_steps(128, 32, 8) == [0, 32, 64, 96]
    assert sweep_steps(100, 32, 8) == [0, 32, 64]
    assert sweep_steps(64, 16, 40) == [0, 16]  # the TG tokens must fit after N_KV too
    with pytest.raises(IkctlError, match="raise -c"):
        sweep_steps(16, 32, 8)


def test_bench_on_the_embedded_model(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    env = {**os.environ, "IKCTL_CACHE": str(tmp_path / "cache")}
    exe = shutil.which("ikctl")
    assert exe
    proc = subprocess.run([exe, "bench", "-c", "128", "-ub", "32", "-n", "4", "-t", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "|    PP |     TG |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |" in lines
    table = [ln for ln in lines if ln.startswith("|") and ln.split("|")[1].strip().isdigit()]
    assert [int(ln.split("|")[3]) for ln in table] == [0, 32, 64, 96]
    # stderr is not a terminal here: a line per step, no carriage-return frames
    assert "\r" not in proc.stderr and "ikctl bench: 1/4 steps" in proc.stderr.splitlines()
    assert "ikctl bench: 4/4 steps" in proc.stderr.splitlines()
    doc = json.loads(out.read_text())
    for key in ("model", "quant", "threads", "placement", "host", "ikctl_version", "n_ctx", "n_ubatch", "mla"):
        assert key in doc
    assert doc["threads"] == 1 and doc["n_ctx"] == 128 and "Q8_0" in doc["quant"]
    assert doc["activations"] == "int8" and doc["kernels"] == "fused"
    assert doc["host"]["cores"] >= 1
    # the BLAS prefill runs on, and the one-line note where it leaves AVX-512 unused (this process's env is the same)
    assert doc["blas"] == dataclasses.asdict(blas())
    note = blas_note()
    assert note in proc.stderr.splitlines() if note else "OPENBLAS_CORETYPE" not in proc.stderr
    rows = doc["rows"]
    assert [r["n_kv"] for r in rows] == [0, 32, 64, 96]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["pp"] == 32 and r["tg"] == 4
        assert r["t_pp"] > 0 and abs(r["speed_pp"] - 32 / r["t_pp"]) < 1e-6 * r["speed_pp"]
        assert r["t_tg"] > 0 and abs(r["speed_tg"] - 4 / r["t_tg"]) < 1e-6 * r["speed_tg"]


def test_sweep_warms_up_the_prefill_and_the_decode_kernels_before_timing(tmp_path: Path) -> None:
    """The first row must not time loading (or compiling) the decode kernels: the warm-up runs a prompt batch
    and a decode step on a cache of its own before anything is timed."""
    from engine import load_model
    from engine.bench import sweep
    from engine.synth import SynthSpec, write_model

    model = load_model(write_model(tmp_path / "m.gguf", SynthSpec(layers=2, dense_layers=1, seed=3)), ctx_size=64)
    calls: list[tuple[int, int]] = []
    real = model.eval

    def recording(ids, cache, all_logits=False):  # type: ignore[no-untyped-def]
        calls.append((len(ids), id(cache)))
        return real(ids, cache, all_logits)

    model.eval = recording  # type: ignore[method-assign]
    row = next(sweep(model, 64, 16, 2))
    assert row.n_kv == 0 and [n for n, _ in calls] == [16, 1, 1, 1, 16]
    warm, timed = {c for _, c in calls[:2]}, {c for _, c in calls[2:]}
    assert len(warm) == 1 and len(timed) == 1 and warm != timed


def test_bench_rejects_a_context_smaller_than_a_step(tmp_path: Path) -> None:
    env = {**os.environ, "IKCTL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([shutil.which("ikctl") or "ikctl", "bench", "-c", "16", "-ub", "32"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("ikctl: error: context 16 is smaller")


def test_bench_json_has_no_decoder_path_for_an_ik_llama_model(tmp_path: Path) -> None:
    """A model quantized by ik_llama.cpp with a mixed recipe (IQ4_KS, IQ2_K_R4, Q6_0_R4, Q4_0_R8, IQ4_NL_R4, ...):
    every tensor has a fused kernel, so the JSON's decoder path is empty and bench says nothing about it."""
    out = tmp_path / "sweep.json"
    env = {**os.environ, "IKCTL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "tui.cli", "bench", "-m", str(MODEL), "-c", "64", "-ub", "32",
                           "-n", "2", "-t", "1", "--json", str(out)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    ik = {t.qtype_name for t in GGUFFile(MODEL).tensors.values() if is_ik(t.qtype)}
    assert {"IQ4_KS", "IQ2_K_R4", "Q6_0_R4"} <= ik
    assert doc["decoder_path"] == {}
    assert "decoder path" not in proc.stderr


def test_bench_names_the_tensors_without_a_fused_kernel(tmp_path: Path) -> None:
    """BF16_R16 (16 interleaved bf16 rows) has a decoder but no fused kernel: bench's decoder path names it."""
    raw, _ = _ref("BF16_R16", 32, 512)
    path = tmp_path / "m.gguf"
    _write_gguf(path, "blk.0.ffn_down.weight", raw, IK_IDS["BF16_R16"], 512)
    assert not fused(IK_IDS["BF16_R16"])
    assert decoder_path_tensors(GGUFFile(path)) == {"blk.0.ffn_down.weight": "BF16_R16"}
