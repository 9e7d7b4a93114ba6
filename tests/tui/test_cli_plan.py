"""`ikctl plan` end to end: the installed console script on the open-v3 reference model."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.gguf_file import GGUFFile
from tests.refs import V3

RPC_A, RPC_B = "127.0.0.1:50052", "127.0.0.1:50053"


def ikctl(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("ikctl")
    assert exe, "the ikctl console script is not installed (pip install -e .)"
    env = {**os.environ, **({"IKCTL_CACHE": str(cache)} if cache else {})}
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, env=env)


def table_row(stdout: str, device: str) -> list[str]:
    rows = [ln.split() for ln in stdout.splitlines() if ln.split()[:1] == [device]]
    assert len(rows) == 1, stdout
    return rows[0]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ikctl: error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_experts_on_a_worker_verbose() -> None:
    proc = ikctl("plan", "-m", str(V3), "--rpc", RPC_A, "-ot", f"exps=RPC[{RPC_A}]", "-v")
    assert proc.returncode == 0, proc.stderr
    # nothing listens there: the plan says so, plainly, instead of planning as if it had asked
    (warning,) = proc.stderr.splitlines()
    assert warning.startswith(f"ikctl: warning: RPC[{RPC_A}] was not asked its memory (") and "refused" in warning
    out = proc.stdout
    assert out.splitlines()[0] == "model: open-v3.gguf (deepseek2, 3 layers, 52 tensors, 2.2 MiB)"
    # attention stays here, and with it the KV cache: 3 layers x 4096 positions x (32 latent + 8 rope) x f16
    assert table_row(out, f"RPC[{RPC_A}]") == [f"RPC[{RPC_A}]", "6", "1.1", "MiB", "0", "B", "-", "-", "1-2"]
    assert table_row(out, "CPU") == ["CPU", "46", "1.1", "MiB", "960.0", "KiB", "-", "-", "embd", "0-2", "output"]
    assert table_row(out, "total") == ["total", "52", "2.2", "MiB", "960.0", "KiB"]
    # -v: one line per tensor, in file order, each with its size, device and rule
    tensors = list(GGUFFile(V3).tensors.values())
    lines = [ln for ln in out.splitlines() if " → " in ln]
    assert [ln.split()[2] for ln in lines] == [t.name for t in tensors]
    for t, line in zip(tensors, lines, strict=True):
        if "_exps." in t.name:
            assert line.endswith(f"{t.name} → RPC[{RPC_A}] by rule 1 (-ot exps=RPC[{RPC_A}])"), line
        else:
            assert f"{t.name} → CPU (" in line, line
    assert lines[0].split() == ["144.0", "KiB", "token_embd.weight", "→", "CPU", "(token_embd", "stays", "on", "CPU)"]
    assert re.search(r"192\.0 KiB  blk\.1\.ffn_up_exps\.weight → RPC", out)


def test_ngl_and_tensor_split_over_two_workers() -> None:
    proc = ikctl("plan", "-m", str(V3), "--rpc", f"{RPC_A},{RPC_B}", "-ngl", "99", "-ts", "2,1", "-v")
    assert proc.returncode == 0, proc.stderr
    # 3 layers + output = 4 offloaded slots; split points 2/3, 1: layers 0-2 → A, the output layer → B
    assert table_row(proc.stdout, f"RPC[{RPC_A}]")[-1] == "0-2"
    assert table_row(proc.stdout, f"RPC[{RPC_B}]")[-1] == "output"
    assert table_row(proc.stdout, "CPU")[1:2] == ["1"]  # token_embd only
    assert f"blk.2.attn_q_a.weight → RPC[{RPC_A}] (-ngl 99: layer 2 → RPC[{RPC_A}] by -ts 2,1)" in proc.stdout


def test_capacity_from_device_mem() -> None:
    proc = ikctl("plan", "-m", str(V3), "--rpc", RPC_A, "-ot", f"exps=RPC[{RPC_A}]",
                 "--device-mem", f"RPC[{RPC_A}]=4MiB")
    assert proc.returncode == 0, proc.stderr
    assert table_row(proc.stdout, f"RPC[{RPC_A}]")[6:9] == ["4.0", "MiB", "40%"]  # weights and 2 layers' programs


def test_kv_cache_counts_where_attention_runs() -> None:
    args = ["plan", "-m", str(V3), "--rpc", RPC_A, "-ngl", "99", "--device-mem", f"RPC[{RPC_A}]=5MiB"]
    proc = ikctl(*args, "-c", "8192", "-ctk", "q8_0")
    assert proc.returncode == 0, proc.stderr
    # q8_0 rows of 40 values pad to 64: 64 + 2 x 2 bytes of scales per position and layer
    assert table_row(proc.stdout, f"RPC[{RPC_A}]")[1:9] == ["51", "2.1", "MiB", "1.6", "MiB", "5.0", "MiB", "92%"]
    assert_one_line_error(ikctl(*args, "-c", "32768"), f"RPC[{RPC_A}] would hold 10.5 MiB (2.1 MiB weights + "
                          "7.5 MiB KV cache for -c + 957.5 KiB programs) but has 5.0 MiB")


def test_overflow_is_one_error_line() -> None:
    proc = ikctl("plan", "-m", str(V3), "--rpc", RPC_A, "-ot", f"exps=RPC[{RPC_A}]",
                 "--device-mem", f"RPC[{RPC_A}]=1MiB")
    assert_one_line_error(proc, f"RPC[{RPC_A}] would hold 1.6 MiB (1.1 MiB weights + 478.7 KiB programs) but has "
                          "1.0 MiB; "
                          "move tensors elsewhere with -ot or lower -ngl")
    assert proc.stdout == ""


@pytest.mark.parametrize(("args", "needle"), [
    (["-ot", "blk.[=CPU"], "not a valid regex"),
    (["-ot", "exps=GPU0"], "unknown device 'GPU0'"),
    (["--rpc", RPC_A, "-ot", f"exps=RPC[{RPC_B}]"], f"unknown device RPC[{RPC_B}]"),
    (["--rpc", "localhost"], "'localhost' is not host:port"),
    (["--rpc", f"{RPC_A},{RPC_A}"], "twice"),
    (["--rpc", RPC_A, "-ngl", "3", "-ts", "1,1"], "-ts has 2 values but there is 1 RPC/GPU device"),
    (["--device-mem", "RPC[10.0.0.9:50052]=1G"], "not a device here"),
])
def test_bad_flags_are_one_error_line(args: list[str], needle: str) -> None:
    assert_one_line_error(ikctl("plan", "-m", str(V3), *args), needle)


def test_missing_model_file(tmp_path: Path) -> None:
    assert_one_line_error(ikctl("plan", "-m", str(tmp_path / "nope.gguf")), "not found")


def test_useless_flags_warn() -> None:
    proc = ikctl("plan", "-m", str(V3), "-ngl", "10", "-ot", "nothing_matches=CPU")
    assert proc.returncode == 0
    assert "ikctl: warning: -ngl 10 has no effect" in proc.stderr
    assert "ikctl: warning: -ot rule 1 (nothing_matches=CPU) placed no tensor" in proc.stderr


def test_embedded_default_model(tmp_path: Path) -> None:
    proc = ikctl("plan", "--rpc", RPC_A, "-ngl", "99", cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "using the embedded deepseek2 model" in proc.stderr
    assert proc.stdout.startswith("model: ikctl-")
    assert table_row(proc.stdout, "CPU")[-1] == "embd"
