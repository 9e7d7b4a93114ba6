"""The int8-activation kernels (engine.simd_int8, int8_decoders, q8_activations) against NumPy references.

Legend: R rows, C columns, T tokens, E experts.

The reference quantizes activations with its own NumPy code (one scale per 32 values, round half to even) and
multiplies gguf's float64 dequantized weights with those dequantized activations: the kernels must agree to
float32 rounding. A wrong code, scale, group or lane would be off by >= 1e-3. The portable (non-VNNI) build is
checked by running these tests and the float kernels' again with numba compiling for an AVX2-only CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import block_decoders as D
from engine import kernels as K
from engine.block_dots import BLOCK_DOT_TYPES
from engine.int8_decoders import INT8_TYPES
from engine.q8_activations import quantize_rows
from engine.simd_int8 import instruction_set
from tests.engine.int8_reference import RTOL, q8_reference, rel, tokens
from tests.engine.test_ik_kernels import ik_products
from tests.engine.test_kernels import F16_FIELDS, columns, name, random_rows, reference

INT8 = sorted(F16_FIELDS)
ROOT = Path(__file__).resolve().parents[2]


def test_every_quantized_type_has_an_int8_decoder() -> None:
    assert set(INT8) == set(INT8_TYPES)
    assert instruction_set() in ("avx512vnni", "portable")


def test_activation_codes_and_scales() -> None:
    x = tokens(3, 96)
    q = quantize_rows(x)
    assert q.x16.shape == (3, 128) and q.xd.shape == q.xs.shape == (3, 8)  # padded to 64-value steps
    # each step holds its even-indexed values, then its odd-indexed ones
    natural = q.x16.reshape(3, 2, 2, 32).transpose(0, 1, 3, 2).reshape(3, 128)
    assert not natural[:, 96:].any() and not q.xd[:, 6:].any() and not q.xs[:, 6:].any()
    value, hi, lo = q8_reference(x)
    np.testing.assert_array_equal(natural[:, :96], 256 * hi + lo)
    codes = natural[:, :96].astype(np.float64)
    np.testing.assert_array_equal(np.repeat(q.xd[:, :6].astype(np.float64), 16, axis=1) * codes, value)
    np.testing.assert_allclose(q.xs[:, :6], q.xd[:, :6] * codes.reshape(3, 6, 16).sum(-1), rtol=1e-6)
    assert np.abs(value - x).max() <= np.abs(x).max() * 2.0**-15  # 16-bit codes
    with pytest.raises(ValueError, match="multiple of the 32-value"):
        quantize_rows(np.ones((1, 40), np.float32))


@pytest.mark.parametrize("large", [False, True], ids=["C1chunk", "C2chunks"])
@pytest.mark.parametrize("qtype", INT8, ids=name)
def test_matvec_equals_the_int8_reference(qtype: int, large: bool) -> None:
    R, C = 37, columns(qtype, large)
    raw = random_rows(qtype, R, C)
    w = reference(raw, qtype, R, C).astype(np.float64)
    for T in (1, 3, K.MATVEC_MAX_T):
        x = tokens(T, C)
        with K.activations(int8=True):
            y = K.matmul_t(raw, qtype, (R, C), x)
        assert rel(y, q8_reference(x)[0] @ w.T) < RTOL, T
        with K.activations(int8=False):  # the exact path is still there, and differs by the activation rounding
            exact = K.matmul_t(raw, qtype, (R, C), x)
        assert 1e-9 < rel(y, exact) < 1e-4


@pytest.mark.parametrize("qtype", sorted(t for t in BLOCK_DOT_TYPES if t in D.BLOCK), ids=name)
def test_long_rows_meet_the_tokens_a_span_at_a_time(qtype: int) -> None:
    """Rows past kernels._LONG_ROW are summed over column spans: the spans' partial sums add up (the last span
    short and, for the 32-value types, an odd number of blocks), for token counts around the 8-token tiles."""
    qk = D.BLOCK[qtype][0]
    R, C = 21, qk * (K._LONG_ROW // qk + K._COL_SPAN // qk // 2 + 1)
    assert C > K._LONG_ROW and (C // qk) % (K._COL_SPAN // qk) % 2 == 1
    raw = random_rows(qtype, R, C)
    w = reference(raw, qtype, R, C).astype(np.float64)
    for T in (1, 9):
        x = tokens(T, C)
        with K.activations(int8=True):
            y = K.matmul_t(raw, qtype, (R, C), x)
        assert rel(y, q8_reference(x)[0] @ w.T) < RTOL, T


@pytest.mark.parametrize("qtype", INT8, ids=name)
def test_gathered_experts_equal_the_int8_reference(qtype: int) -> None:
    E, R, C = 4, 19, columns(qtype, False)
    stacked = np.stack([random_rows(qtype, R, C, seed=e) for e in range(E)])
    ids = np.array([3, 0, 3, 1, 2])
    x = tokens(len(ids), C)
    with K.activations(int8=True):
        y = K.gather_matvec(stacked, qtype, (E, R, C), ids, x)
    xr = q8_reference(x)[0]
    ref = np.stack([xr[n] @ reference(stacked[e], qtype, R, C).astype(np.float64).T for n, e in enumerate(ids)])
    assert rel(y, ref) < RTOL


def test_activations_choice_is_per_thread_and_restored() -> None:
    import threading

    seen = {}
    with K.activations(int8=False):
        assert not K.int8_enabled()
        t = threading.Thread(target=lambda: seen.setdefault("other", K.int8_enabled()))
        t.start()
        t.join()
        with K.activations(int8=True):
            assert K.takes_int8(D.Q4_K) and not K.takes_int8(D.F16)
        assert not K.takes_int8(D.Q4_K)
    assert K.int8_enabled() and seen["other"] is True


def _products() -> dict[str, list]:
    """Every type's int8 matvec and gathered product on fixed inputs, as lists (for the cross-build check)."""
    out = {}
    for qtype in INT8:
        C = columns(qtype, True)
        raw = random_rows(qtype, 5, C)
        with K.activations(int8=True):
            out[name(qtype)] = K.matmul_t(raw, qtype, (5, C), tokens(2, C)).tolist()
            out[name(qtype) + "/gather"] = K.gather_matvec(raw[None], qtype, (1, 5, C), np.zeros(2, np.int64),
                                                           tokens(2, C)).tolist()
    return out | ik_products()


# What numba compiles for on an AVX2-only Haswell (no AVX-512, no VNNI).
HASWELL = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,"
           "+fxsr,+lzcnt,+mmx,+movbe,+pclmul,+popcnt,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave"}


@pytest.mark.slow
def test_an_avx2_build_passes_the_kernel_tests_with_the_same_bits(tmp_path: Path) -> None:
    """numba compiling for Haswell takes the portable integer dot and the AVX2 permute of the float decoders:
    the kernel tests pass there, and the integer products equal this build's bit for bit (integer sums are
    exact, the float steps run in the same order)."""
    env = {**os.environ, **HASWELL, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    code = ("import json, sys; sys.path[:0] = [sys.argv[1]]; from engine.simd_int8 import instruction_set; "
            "from engine.simd import _PERMUTE; from tests.engine.test_int8_kernels import _products; "
            "print(json.dumps({'isa': instruction_set(), 'permute': _PERMUTE, 'products': _products()}))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    there = json.loads(proc.stdout.splitlines()[-1])
    assert (there["isa"], there["permute"]) == ("portable", "avx2")
    assert there["products"] == _products()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                            str(ROOT / "tests" / "engine" / "test_kernels.py"),
                            str(ROOT / "tests" / "engine" / "test_ik_kernels.py"), "-k", "not avx2_build"], env=env,
                           capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert " passed" in tests.stdout and "skipped" not in tests.stdout
