"""Workers size ik_llama.cpp-type tensors like any other: the worker's GGUF table reader (which does not import the
engine) agrees with the engine's reader on every ik type, through the one shared size table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.gguf_file import GGUFFile
from engine.ik_types import IK_IDS
from rpcnode.ggml_types import IK_TYPES
from rpcnode.gguf_table import read_tensor_table
from tests.engine.test_ik_types import CASES, _ref, _write_gguf


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
