"""`ikctl run` on bad input: one clear error line, exit status 1, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_rewrite import rewrite_gguf

from tests.refs import V3


def run_ikctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ikctl: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def _with_type_id(src: Path, dst: Path, tensor: str, type_id: int) -> Path:
    """Patch one tensor's type id in the header."""
    data = bytearray(src.read_bytes())
    name = tensor.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    at += 4 + 8 * n_dims
    data[at : at + 4] = type_id.to_bytes(4, "little")
    dst.write_bytes(bytes(data))
    return dst


def test_wrong_path(tmp_path: Path) -> None:
    assert_one_line_error(run_ikctl("run", "-m", str(tmp_path / "nope.gguf"), "-n", "2"), "not found", "nope.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_text("hello world")
    assert_one_line_error(run_ikctl("run", "-m", str(p), "-n", "2"), "not a GGUF file")


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.999])
def test_truncated_gguf(tmp_path: Path, keep: float) -> None:
    data = V3.read_bytes()
    p = tmp_path / "trunc.gguf"
    p.write_bytes(data[: int(len(data) * keep)])
    assert_one_line_error(run_ikctl("run", "-m", str(p), "-n", "2"), "trunc.gguf", "truncated")


def test_unsupported_architecture(tmp_path: Path) -> None:
    p = rewrite_gguf(V3, tmp_path / "arch.gguf", meta={"general.architecture": "mamba"})
    assert_one_line_error(run_ikctl("run", "-m", str(p), "-n", "2"), "architecture 'mamba' is not supported")


def test_type_the_reader_does_not_know(tmp_path: Path) -> None:
    p = _with_type_id(V3, tmp_path / "odd.gguf", "blk.0.ffn_gate.weight", 1234)  # neither ggml's nor ik_llama.cpp's
    assert_one_line_error(run_ikctl("run", "-m", str(p), "-n", "2"), "blk.0.ffn_gate.weight", "type id 1234")


def test_ik_type_whose_block_does_not_fit_the_rows(tmp_path: Path) -> None:
    p = _with_type_id(V3, tmp_path / "ik.gguf", "blk.0.ffn_gate.weight", 137)  # IQ2_K: 256-value blocks
    assert_one_line_error(run_ikctl("run", "-m", str(p), "-n", "2"), "blk.0.ffn_gate.weight", "IQ2_K's block of 256")


def test_type_we_cannot_decode(tmp_path: Path) -> None:
    # Q8_1 is an activation-only type: valid in the format, but no weight decoder exists for it
    raw = np.zeros((192, 128 // 32 * 40), np.uint8)
    q81 = {"blk.0.ffn_gate.weight": (raw, gguf.GGMLQuantizationType.Q8_1)}
    p = rewrite_gguf(V3, tmp_path / "q81.gguf", tensors=q81)
    assert_one_line_error(run_ikctl("run", "-m", str(p), "-n", "2"), "blk.0.ffn_gate.weight", "Q8_1")


def test_bad_flag_values() -> None:
    assert_one_line_error(run_ikctl("run", "-m", str(V3), "-n", "2", "--top-p", "0"), "--top-p")
    assert_one_line_error(run_ikctl("run", "-m", str(V3), "-n", "2", "-c", "4", "-p", "a long prompt here"), "-c")


def test_negative_counts_other_than_minus_one_are_refused() -> None:
    assert_one_line_error(run_ikctl("run", "-m", str(V3), "-n", "-5"), "-n -5", "-1")


def test_a_system_prompt_that_would_be_dropped_is_refused() -> None:
    assert_one_line_error(run_ikctl("run", "-m", str(V3), "-n", "2", "-sys", "be brief", "-no-cnv"), "-sys", "-no-cnv")
    # the llama.cpp reference model has no chat template
    assert_one_line_error(run_ikctl("run", "-m", str(V3), "-n", "2", "-sys", "be brief"), "-sys", "chat template")


def test_a_full_context_is_said() -> None:
    proc = run_ikctl("run", "-m", str(V3), "-c", "16", "-n", "-1", "--temp", "0", "-p", "one two three")
    assert proc.returncode == 0, proc.stderr
    assert "generation stopped: the context of 16 tokens is full; raise -c" in proc.stderr
    fits = run_ikctl("run", "-m", str(V3), "-c", "64", "-n", "3", "--temp", "0", "-p", "one two three")
    assert fits.returncode == 0 and "context" not in fits.stderr


def test_help_names_the_app_and_its_flags() -> None:
    top = run_ikctl("--help")
    assert top.returncode == 0 and "opens the terminal app" in top.stdout and "ikctl app -h" in top.stdout
    app = run_ikctl("app", "-h")
    assert app.returncode == 0 and "--hosts FILE" in app.stdout and "--float-activations" in app.stdout
