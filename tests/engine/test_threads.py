"""Which BLAS NumPy's products run on, and the note when it leaves an AVX-512 CPU's float speed unused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.threads import Blas, blas, cpu_has_avx512


def test_note_names_the_forced_core_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    note = Blas("openblas", "Haswell").note(cpu_has_avx512=True)
    assert note is not None and "Haswell" in note and "OPENBLAS_CORETYPE=Haswell" in note
    assert note.endswith("set OPENBLAS_CORETYPE=SkylakeX") and "\n" not in note
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert "OpenBLAS's CPU detection" in (Blas("openblas", "Zen").note(cpu_has_avx512=True) or "")


@pytest.mark.parametrize(("library", "core", "avx512"), [
    ("openblas", "SkylakeX", True), ("openblas", "SapphireRapids", True), ("openblas", "Cooperlake", True),
    ("openblas", "Haswell", False), ("mkl", "", True), ("", "", True),
])
def test_no_note_where_nothing_is_left_unused(library: str, core: str, avx512: bool) -> None:
    assert Blas(library, core).note(cpu_has_avx512=avx512) is None


def _blas_in_subprocess(coretype: str) -> dict[str, str]:
    env = dict(os.environ, OPENBLAS_CORETYPE=coretype)
    code = "import dataclasses, json; from engine.threads import blas; print(json.dumps(dataclasses.asdict(blas())))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_the_loaded_openblas_reports_the_core_it_runs() -> None:
    if blas().library != "openblas":
        pytest.fail(f"NumPy's BLAS here is {blas()}; these tests expect the OpenBLAS NumPy wheels ship")
    assert _blas_in_subprocess("Haswell") == {"library": "openblas", "core": "Haswell"}
    if cpu_has_avx512():  # the core the note asks for really loads here
        assert _blas_in_subprocess("SkylakeX") == {"library": "openblas", "core": "SkylakeX"}
