"""ik_llama.cpp-only quant types: sizes, decoders bit-identical to ik_llama.cpp, products, GGUF loading.

The reference files in ik_refs/ were made by ik_llama.cpp's own quantizer and dequantizer (ik_refs/README.md).
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from engine import kernels
from engine.errors import ModelFileError
from engine.gguf_file import GGUFFile
from engine.ik_decoders import IK_DECODED
from engine.ik_types import IK_IDS, IK_TYPES, quant_type, type_id, type_name
from engine.quant import QTensor, can_dequantize

REFS = Path(__file__).parent / "ik_refs"
_CASE = re.compile(r"(?P<name>\w+)-(?P<rows>\d+)x(?P<cols>\d+)\.q$")


def _cases() -> list[tuple[str, int, int]]:
    out = []
    for p in sorted(REFS.glob("*.q")):
        m = _CASE.match(p.name)
        assert m, p.name
        out.append((m["name"], int(m["rows"]), int(m["cols"])))
    return out


CASES = _cases()
DECODED_CASES = [c for c in CASES if IK_IDS[c[0]] in IK_DECODED]


def _ref(name: str, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(encoded bytes [rows, row bytes], ik_llama.cpp's decoded float32 [rows, cols])."""
    stem = REFS / f"{name}-{rows}x{cols}"
    raw = np.fromfile(stem.with_suffix(".q"), np.uint8).reshape(rows, -1)
    want = np.frombuffer(gzip.decompress(stem.with_suffix(".f32.gz").read_bytes()), "<f4").reshape(rows, cols)
    return raw, want


def _case_id(c: tuple[str, int, int]) -> str:
    return f"{c[0]}-{c[1]}x{c[2]}"


def test_every_decoded_type_has_references() -> None:
    have = {IK_IDS[name] for name, _, _ in CASES}
    assert have >= IK_DECODED, [IK_TYPES[q].name for q in IK_DECODED - have]
    assert len(IK_DECODED) >= 18


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_row_bytes_match_ik_llama(case: tuple[str, int, int]) -> None:
    name, rows, cols = case
    raw, _ = _ref(name, rows, cols)
    qt = IK_TYPES[IK_IDS[name]]
    assert raw.shape[1] == qt.row_bytes(cols) == kernels.row_bytes(IK_IDS[name], cols)
    assert rows % qt.group == 0


def test_type_names_and_ids() -> None:
    assert type_name(144) == "IQ4_KS" and type_id("IQ4_KS") == 144
    assert type_name(12) == "Q4_K" and type_id("Q4_K") == 12
    assert quant_type(144).meta == 4 and quant_type(208).group == 8  # type: ignore[union-attr]
    assert quant_type(9999) is None and type_name(9999) == "type 9999"
    for q, t in IK_TYPES.items():  # no ik id shadows a mainline one
        with pytest.raises(ValueError):
            gguf.GGMLQuantizationType(q)
        assert type_name(q) == t.name


@pytest.mark.parametrize("case", DECODED_CASES, ids=_case_id)
def test_decoder_is_bit_identical(case: tuple[str, int, int]) -> None:
    name, rows, cols = case
    raw, want = _ref(name, rows, cols)
    got = kernels.dequantize_rows(raw, IK_IDS[name], (rows, cols))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), np.argwhere(got != want)[:5]
    tensor = QTensor("w", raw, IK_IDS[name], (rows, cols))
    assert np.array_equal(tensor.dequantize().view(np.uint32), want.view(np.uint32))


def _close(got: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    """got == x @ w.T up to float32 rounding of the sums (bounded by |x| @ |w|.T)."""
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    bound = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
    assert np.all(np.abs(got - exact) <= 1e-5 * bound + 1e-30)


@pytest.mark.parametrize("case", DECODED_CASES, ids=_case_id)
def test_products(case: tuple[str, int, int]) -> None:
    name, rows, cols = case
    q = IK_IDS[name]
    raw, w = _ref(name, rows, cols)
    rng = np.random.default_rng(rows * cols)
    for T in (1, 3, kernels.MATVEC_MAX_T + 5):  # matvec and the tiled prefill path (test_ik_kernels: int8)
        x = rng.standard_normal((T, cols)).astype(np.float32)
        with kernels.activations(int8=False):
            _close(kernels.matmul_t(raw, q, (rows, cols), x), w, x)
    # a stacked [E, R, C] expert tensor: expert 1 holds the row groups in reverse order
    g = kernels.group_rows(q)
    flipped = raw.reshape(-1, g, raw.shape[1])[::-1].reshape(raw.shape)
    w1 = w.reshape(-1, g, cols)[::-1].reshape(w.shape)
    stacked = np.stack([raw, flipped])
    experts = np.array([1, 0, 1])
    x = rng.standard_normal((3, cols)).astype(np.float32)
    with kernels.activations(int8=False):
        got = kernels.gather_matvec(stacked, q, (2, rows, cols), experts, x)
    for n, e in enumerate(experts):
        _close(got[n : n + 1], (w, w1)[e], x[n : n + 1])


@pytest.mark.parametrize("case", [c for c in DECODED_CASES if IK_TYPES[IK_IDS[c[0]]].group > 1], ids=_case_id)
def test_rows_of_interleaved_types(case: tuple[str, int, int]) -> None:
    """Embedding-style row lookups decode the groups that hold the rows."""
    name, rows, cols = case
    raw, w = _ref(name, rows, cols)
    t = QTensor("w", raw, IK_IDS[name], (rows, cols))
    index = np.array([rows - 1, 0, 3, rows - 1])
    assert np.array_equal(t.rows(index), w[index])
    with pytest.raises(ValueError, match="interleaved"):
        t[0]


def _write_gguf(path: Path, name: str, raw: np.ndarray, qtype: int, cols: int) -> None:
    """A GGUF with one tensor of an ik type. gguf's writer knows no ik ids, so the tensor is written as I8 bytes
    [rows, row bytes] and its header entry patched to (ne0 = cols, qtype): the data bytes are the same."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.I8)
    w.add_tensor("norm", np.ones(cols, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(path.read_bytes())
    key = len(name).to_bytes(8, "little") + name.encode()
    at = data.index(key) + len(key)
    assert int.from_bytes(data[at : at + 4], "little") == 2
    data[at + 4 : at + 12] = cols.to_bytes(8, "little")
    data[at + 20 : at + 24] = qtype.to_bytes(4, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["IQ4_KS", "Q8_0_R8", "IQ1_S_R4", "BF16_R16"])
def test_gguf_with_ik_tensor_loads(tmp_path: Path, name: str) -> None:
    rows, cols = next((r, c) for n, r, c in DECODED_CASES if n == name and c > 256)
    raw, want = _ref(name, rows, cols)
    path = tmp_path / "m.gguf"
    _write_gguf(path, "blk.0.ffn_down.weight", raw, IK_IDS[name], cols)
    f = GGUFFile(path)
    info = f.tensors["blk.0.ffn_down.weight"]
    assert (info.shape, info.qtype_name, info.n_bytes) == ((rows, cols), name, raw.nbytes)
    data = f.raw("blk.0.ffn_down.weight")
    assert data.shape == raw.shape and np.array_equal(data, raw)
    t = QTensor(info.name, data, info.qtype, info.shape)
    assert np.array_equal(t.dequantize().view(np.uint32), want.view(np.uint32))


def test_truncated_ik_tensor_names_it(tmp_path: Path) -> None:
    rows, cols = next((r, c) for n, r, c in DECODED_CASES if n == "IQ4_KS")
    raw, _ = _ref("IQ4_KS", rows, cols)
    path = tmp_path / "m.gguf"
    _write_gguf(path, "blk.0.ffn_down.weight", raw, IK_IDS["IQ4_KS"], cols)
    info = GGUFFile(path).tensors["blk.0.ffn_down.weight"]
    with open(path, "r+b") as fh:  # cut the ik tensor's last byte (and the norm after it)
        fh.truncate(info.offset + info.n_bytes - 1)
    with pytest.raises(ModelFileError) as e:
        GGUFFile(path)
    msg = str(e.value)
    assert "truncated" in msg and "'blk.0.ffn_down.weight'" in msg and "\n" not in msg


def test_interleaved_rows_must_fill_groups(tmp_path: Path) -> None:
    rows, cols = next((r, c) for n, r, c in DECODED_CASES if n == "Q8_0_R8")
    raw, _ = _ref("Q8_0_R8", rows, cols)
    path = tmp_path / "m.gguf"
    _write_gguf(path, "blk.0.attn_q.weight", raw[:-1], IK_IDS["Q8_0_R8"], cols)  # 15 rows: not whole groups of 8
    with pytest.raises(ModelFileError, match=r"'blk\.0\.attn_q\.weight'.*interleaves"):
        GGUFFile(path)


def test_unknown_type_id_names_the_tensor(tmp_path: Path) -> None:
    raw = np.zeros((2, 64), np.uint8)
    path = tmp_path / "m.gguf"
    _write_gguf(path, "blk.0.attn_k.weight", raw, 1234, 64)
    with pytest.raises(ModelFileError, match=r"'blk\.0\.attn_k\.weight' has type id 1234"):
        GGUFFile(path)


def test_every_ik_type_in_the_table_decodes() -> None:
    assert set(IK_TYPES) == IK_DECODED, sorted(IK_TYPES[q].name for q in set(IK_TYPES) - IK_DECODED)


@pytest.mark.parametrize("name", ["Q8_K", "Q8_1"])  # types neither ikctl's kernels nor the gguf package decode
def test_types_without_a_decoder_are_refused_by_name(name: str) -> None:
    q = type_id(name)
    assert not can_dequantize(q)
    qt = quant_type(q)
    assert qt is not None
    raw = np.zeros((2, qt.row_bytes(256)), np.uint8)
    with pytest.raises(ModelFileError, match=rf"tensor 'blk\.0\.ffn_up\.weight' has type {name}, which ikctl cannot "
                                             "decode"):
        QTensor("blk.0.ffn_up.weight", raw, q, (raw.shape[0], 256))
