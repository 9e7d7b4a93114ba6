"""A run says which tests were skipped and why, even under -q (the SSH tests skip as a group without sshd)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SKIPPING = '''
import pytest

@pytest.fixture(scope="session")
def cluster():
    pytest.skip("SSH cluster tests skipped: sshd is not installed (apt-get install openssh-server)")

def test_a(cluster): pass
def test_b(cluster): pass
def test_c(): pytest.skip("no GPU")
def test_d(): pass
'''


def test_quiet_run_names_each_skip_reason(tmp_path: Path) -> None:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    # the real tests/conftest.py, as a plugin of a run outside tests/
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                        "--rootdir", str(tmp_path), str(tmp_path / "test_skipping.py")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    heading = next(i for i, ln in enumerate(lines) if "skipped, and why" in ln)
    assert lines[heading + 1:heading + 3] == [
        "2 tests skipped: SSH cluster tests skipped: sshd is not installed (apt-get install openssh-server)",
        "1 test skipped: no GPU",
    ]
