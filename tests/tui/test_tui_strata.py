"""The import graph keeps its strata: engine, rpcnode and the headless CLI never load textual."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]; " \
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'textual_plotext')))"


@pytest.mark.parametrize("modules", [
    ["engine", "engine.placement", "engine.bench", "engine.generate", "engine.synth"],
    ["rpcnode", "rpcnode.server", "rpcnode.client"],
    ["tui.cli", "tui.formatting", "tui.layer_map", "tui.plan_flags", "tui.bench_results", "tui.settings"],
])
def test_headless_modules_do_not_import_textual(modules: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"{modules} pulled in {out.stdout.strip()}"


def test_the_app_module_does() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, "tui.app"], capture_output=True, text=True, check=True)
    assert "'textual'" in out.stdout
