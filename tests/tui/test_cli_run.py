"""`ikctl run` end to end, as a user runs it: the installed console script in a subprocess."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SPEED = re.compile(
    r"prompt: (\d+) tokens in [\d.]+ s \([\d.]+ t/s\) \| generation: (\d+) tokens in [\d.]+ s \([\d.]+ t/s\)"
)


def ikctl(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("ikctl")
    assert exe, "the ikctl console script is not installed (pip install -e .)"
    env = {**os.environ, "IKCTL_CACHE": str(cache)}
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ikctl-cache")


def test_embedded_default_model(cache_dir: Path) -> None:
    proc = ikctl("run", "-p", "Hello there", "-n", "12", "--seed", "3", cache=cache_dir)
    assert proc.returncode == 0, proc.stderr
    m = SPEED.search(proc.stderr)
    assert m, proc.stderr
    assert int(m.group(1)) > 2 and int(m.group(2)) == 12
    assert proc.stdout.strip()
    assert list(cache_dir.glob("*.gguf")), "the embedded model was not generated into IKCTL_CACHE"
    again = ikctl("run", "-p", "Hello there", "-n", "12", "--seed", "3", cache=cache_dir)
    assert again.stdout == proc.stdout  # same seed, same text; the cached model is reused
    other = ikctl("run", "-p", "Hello there", "-n", "12", "--seed", "4", cache=cache_dir)
    assert other.stdout != proc.stdout


def test_raw_prompt_is_echoed_and_n_zero_generates_nothing(cache_dir: Path) -> None:
    proc = ikctl("run", "-no-cnv", "-p", "Once upon", "-n", "0", cache=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Once upon\n"
    m = SPEED.search(proc.stderr)
    assert m and m.group(2) == "0"


def test_smollm2_answers_the_capital_of_france(smollm2_path: Path, cache_dir: Path) -> None:
    proc = ikctl("run", "-m", str(smollm2_path), "-p", "What is the capital of France?", "-n", "24", "--temp", "0",
                 cache=cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert SPEED.search(proc.stderr)
