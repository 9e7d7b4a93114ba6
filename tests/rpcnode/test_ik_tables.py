"""Workers treat ik_llama.cpp-type tensors like any other: the worker's GGUF table reader (which does not import
the engine) sizes them as the engine does, through the one shared size table, so a worker given --models loads
them from its own disk, and a model quantized by ik_llama.cpp gives the same logits on a worker as locally."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engine import load_model
from engine.gguf_file import GGUFFile
from engine.ik_types import IK_IDS
from rpcnode.ggml_types import IK_TYPES
from rpcnode.gguf_table import read_tensor_table
from tests.engine.test_ik_model import MODEL, ik_tokens
from tests.engine.test_ik_types import CASES, _ref, _write_gguf
from tests.rpcnode.conftest import WorkerProc


@pytest.mark.parametrize("name", sorted({c[0] for c in CASES}))
def test_table_reader_sizes_ik_tensors_as_the_engine(tmp_path: Path, name: str) -> None:
    rows, cols = next((r, c) for n, r, c in CASES if n == name and c > 256)  # several blocks behind row headers
    raw, _ = _ref(name, rows, cols)
    path = tmp_path / "m.gguf"
    _write_gguf(path, "blk.0.ffn_down_exps.weight", raw, IK_IDS[name], cols)
    table = {e.name: (e.offset, e.nbytes) for e in read_tensor_table(path)}
    engine = {n: (t.offset, t.n_bytes) for n, t in GGUFFile(path).tensors.items()}
    assert table == engine and table["blk.0.ffn_down_exps.weight"][1] == raw.nbytes


def test_table_reader_refuses_partial_interleave_groups(tmp_path: Path) -> None:
    rows, cols = next((r, c) for n, r, c in CASES if n == "Q4_0_R8")
    raw, _ = _ref("Q4_0_R8", rows, cols)
    path = tmp_path / "m.gguf"
    _write_gguf(path, "blk.0.attn_q.weight", raw[:-1], IK_IDS["Q4_0_R8"], cols)
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q\.weight' has \d+ rows, not whole groups of 8"):
        read_tensor_table(path)


def test_unknown_type_ids_are_still_left_out(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _write_gguf(path, "blk.0.attn_k.weight", np.zeros((2, 64), np.uint8), 1234, 64)
    assert [e.name for e in read_tensor_table(path)] == ["norm"]


def test_size_table_imports_no_engine() -> None:
    code = ("import sys, rpcnode.gguf_table, rpcnode.ggml_types; "
            "sys.exit(any(m == 'engine' or m.startswith('engine.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0
    assert len(IK_TYPES) >= 40


def test_ik_model_on_a_worker_reading_its_own_disk(workers: Callable[..., WorkerProc], tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(MODEL, models / MODEL.name)
    ik_names = {n for n, t in GGUFFile(MODEL).tensors.items() if t.qtype in IK_TYPES}
    assert {e.name for e in read_tensor_table(models / MODEL.name)} >= ik_names
    w = workers("--models", str(models))
    remote = load_model(MODEL, rpc=w.endpoint, n_gpu_layers=99, ctx_size=512)
    stats = remote.net.load_stats
    # every layer (so every ik tensor) is on the worker, and it found all of them on its disk: nothing uploaded
    assert stats.tensors_offered >= len(ik_names) and stats.bytes_uploaded == 0
    tokens = ik_tokens()[:64]
    assert np.array_equal(remote.logits(tokens), load_model(MODEL, ctx_size=512).logits(tokens))
