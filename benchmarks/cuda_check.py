"""Device check of the CUDA backend: GPU against CPU on generated models, the card's memory bandwidth, the decode
kernels' weight-read speed, and TG/PP of the benchmark model with `ikctl bench`, as one table.

Legend: R rows, C columns, T tokens, TG token generation (decode), PP prompt processing (prefill).

    python benchmarks/cuda_check.py [--device 0] [--time-limit 270] [--dir DIR]

Parts run in order, each in its own try/except (a failure is a table row, the rest still runs), each skipped
when the time limit would be passed; the table is printed at the end (and on Ctrl-C). Generated models are
written to --dir (default: a temp dir) and reused from there on a rerun. Targets of issue 7: decode reads the
benchmark model's weights at >= 50% of the measured bandwidth, and PP >= 20x TG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHECK_DTYPES = ("Q8_0", "Q4_K", "Q5_K", "Q6_K")
KERNEL_TYPES = ("Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "F32")
# Decode (matvec kernels, f32 activations) should agree with the CPU to rounding; prefill rounds activations and
# weight tiles to f16 for cuBLAS, so it is allowed more.
DECODE_REL_TOL = 1e-3
PREFILL_REL_TOL = 2e-2
BW_TARGET = 0.5
PP_TG_TARGET = 20.0


@dataclasses.dataclass
class Row:
    part: str
    measure: str
    value: str
    target: str = ""
    verdict: str = ""


class Check:
    """The rows collected so far and the time budget."""

    def __init__(self, time_limit: float) -> None:
        self.rows: list[Row] = []
        self.deadline = time.monotonic() + time_limit
        self.facts: dict[str, Any] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, part: str, measure: str, value: str, target: str = "", ok: bool | None = None) -> None:
        verdict = "" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append(Row(part, measure, value, target, verdict))
        print(f"  {part}: {measure} = {value} {target} {verdict}".rstrip(), flush=True)

    def run(self, part: str, needs_s: float, fn: Callable[[], None]) -> None:
        if self.left() < needs_s:
            self.add(part, "skipped", f"{self.left():.0f} s left, needs ~{needs_s:.0f} s")
            return
        print(f"[{part}] ({self.left():.0f} s left)", flush=True)
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:
            self.add(part, "ERROR", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160], ok=False)
            traceback.print_exc()
        print(f"[{part}] {time.monotonic() - t0:.1f} s", flush=True)

    def table(self) -> str:
        head = Row("part", "measure", "value", "target", "verdict")
        rows = [head, *self.rows]
        w = [max(len(getattr(r, f)) for r in rows) for f in ("part", "measure", "value", "target", "verdict")]

        def line(r: Row) -> str:
            cells = (r.part, r.measure, r.value, r.target, r.verdict)
            return "| " + " | ".join(c.ljust(n) for c, n in zip(cells, w, strict=True)) + " |"

        rule = "|" + "|".join("-" * (n + 2) for n in w) + "|"
        return "\n".join([line(head), rule, *(line(r) for r in self.rows)])


# ---- parts ---------------------------------------------------------------------------------------------------


def part_environment(c: Check, device: int) -> None:
    from engine.cuda import available

    why = available(device)
    if why is not None:
        raise RuntimeError(why)
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    with cupy.cuda.Device(device):
        free, total = cupy.cuda.runtime.memGetInfo()
    c.facts["gpu"] = name
    c.add("environment", "GPU", f"{name} (sm_{props['major']}{props['minor']}), {total / 2**30:.1f} GiB, "
          f"{free / 2**30:.1f} GiB free")
    c.add("environment", "CuPy / CUDA runtime / driver",
          f"{cupy.__version__} / {cupy.cuda.runtime.runtimeGetVersion()} / {cupy.cuda.runtime.driverGetVersion()}")


_READ_KERNEL = r"""
extern "C" __global__ void read_sum(const float4* __restrict__ a, long long n4, float* out) {
    float s = 0.0f;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += step) {
        const float4 v = a[i];
        s += v.x + v.y + v.z + v.w;
    }
    if (s == 123.456f) out[0] = s;  /* keeps the loads alive; practically never taken */
}
"""


def _time_ms(fn: Callable[[], None], repeats: int) -> float:
    """Best time of `repeats` calls in ms (CUDA events on the current stream)."""
    import cupy

    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, end))
    return best


def _bandwidths(device: int, n_bytes: int) -> tuple[float, float]:
    """(copy, read) GB/s over n_bytes buffers: cudaMemcpy device to device counts read + write bytes."""
    import cupy

    src = cupy.ones(n_bytes // 4, np.float32)
    dst = cupy.empty_like(src)
    copy_ms = _time_ms(lambda: cupy.cuda.runtime.memcpy(dst.data.ptr, src.data.ptr, n_bytes, 3), 5)
    kern = cupy.RawKernel(_READ_KERNEL, "read_sum")
    out = cupy.zeros(1, np.float32)
    sms = cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"]
    read_ms = _time_ms(lambda: kern((sms * 8,), (512,), (src, np.int64(n_bytes // 16), out)), 5)
    return 2 * n_bytes / copy_ms / 1e6, n_bytes / read_ms / 1e6


def part_bandwidth(c: Check, device: int) -> None:
    import cupy

    with cupy.cuda.Device(device):
        copy_gbs, read_gbs = _bandwidths(device, 2 << 30)
        cupy.get_default_memory_pool().free_all_blocks()
    c.facts["bandwidth_gbs"] = max(copy_gbs, read_gbs)
    c.add("bandwidth", "device-to-device copy (read + write)", f"{copy_gbs:.0f} GB/s")
    c.add("bandwidth", "read kernel (float4, 2 GiB)", f"{read_gbs:.0f} GB/s")
    c.add("bandwidth", "reference (the larger)", f"{c.facts['bandwidth_gbs']:.0f} GB/s")


def _quantized(values: np.ndarray, name: str) -> np.ndarray:
    from engine import synth

    return np.ascontiguousarray(synth.encode(values, name))


def part_kernels(c: Check, device: int) -> None:
    """Each kernel against gguf's decoder / a float64 product on the CPU."""
    import cupy
    import gguf

    from engine.cuda.tensors import CudaTensor
    from engine.quant import QTensor

    rng = np.random.default_rng(7)
    R, C = 300, 1024
    for name in KERNEL_TYPES:
        qtype = int(gguf.GGMLQuantizationType[name])
        values = rng.standard_normal((4, R, C)).astype(np.float32)
        raw = _quantized(values, name)
        q = QTensor("w", raw, qtype, (4, R, C))
        ref = q.dequantize().astype(np.float64)  # gguf-exact (engine.kernels is bit-identical to gguf)
        with cupy.cuda.Device(device):
            g = CudaTensor.upload(q, device)
            deq = g.dequantize().get()
            worst = float(np.abs(deq - ref).max() / np.abs(ref).max())
            errs = []
            for T in (1, 5, 8, 40):  # t1 kernel, t8 kernel with T < 8, t8 full, prefill tiles + cuBLAS
                x = rng.standard_normal((T, C)).astype(np.float32)
                y = g[1].matmul_t(x).get()
                yr = x.astype(np.float64) @ ref[1].T
                errs.append(float(np.abs(y - yr).max() / np.abs(yr).max()))
            ids = np.array([3, 0, 3, 2])
            x = rng.standard_normal((4, C)).astype(np.float32)
            y = g.gather_matmul_t(ids, x).get()
            yr = np.stack([x[n].astype(np.float64) @ ref[e].T for n, e in enumerate(ids)])
            gather = float(np.abs(y - yr).max() / np.abs(yr).max())
            rows2 = CudaTensor.upload(q[2], device).rows(np.array([5, 0, 299])).get()
            rows_err = float(np.abs(rows2 - ref[2][[5, 0, 299]]).max() / np.abs(ref).max())
        decode_ok = max([*errs[:3], gather, worst, rows_err]) <= DECODE_REL_TOL
        c.add("kernels", f"{name} dequantize / rows / matvec T=1,5,8 / gather (rel)",
              f"{worst:.1e} / {rows_err:.1e} / {errs[0]:.1e}, {errs[1]:.1e}, {errs[2]:.1e} / {gather:.1e}",
              f"<= {DECODE_REL_TOL:g}", decode_ok)
        c.add("kernels", f"{name} prefill T=40 (f16 tiles, rel)", f"{errs[3]:.1e}", f"<= {PREFILL_REL_TOL:g}",
              errs[3] <= PREFILL_REL_TOL)


def part_kernel_bandwidth(c: Check, device: int) -> None:
    """Weight bytes read per second by the decode kernel (T = 1) on matrices far larger than L2."""
    import cupy
    import gguf

    from engine.cuda import kernels
    from engine.cuda.tensors import CudaTensor

    R, C = 16384, 16384
    ref = c.facts.get("bandwidth_gbs")
    with cupy.cuda.Device(device):
        x = cupy.asarray(np.random.default_rng(1).standard_normal((1, C)).astype(np.float32))
        for name in CHECK_DTYPES:
            qtype = int(gguf.GGMLQuantizationType[name])
            t = kernels.TYPES[qtype]
            # random blocks: the timing does not depend on the values (NaN scales included)
            data = cupy.random.randint(0, 256, (R, C // t.qk * t.block_bytes), dtype=np.uint8)
            w = CudaTensor("bw", data, qtype, (R, C), device)
            ms = _time_ms(lambda w=w: w.matmul_t(x), 10)
            gbs = data.nbytes / ms / 1e6
            frac = f" = {100 * gbs / ref:.0f}% of {ref:.0f}" if ref else ""
            c.add("decode kernel", f"{name} matvec {R}x{C} ({data.nbytes / 2**20:.0f} MiB)", f"{gbs:.0f} GB/s{frac}",
                  f">= {100 * BW_TARGET:.0f}%", (gbs / ref >= BW_TARGET) if ref else None)
            del data, w
        cupy.get_default_memory_pool().free_all_blocks()


def _check_spec(dtype: str) -> Any:
    from engine.synth import DEFAULT_SPEC

    # the embedded model's shape with rows of 256 where the K-quants need them (k_b/v_b keep their fallbacks)
    return dataclasses.replace(DEFAULT_SPEC, dtype=dtype, expert_ffn=256, q_lora_rank=256, name=f"cuda-check-{dtype}")


def _model_file(directory: Path, dtype: str) -> Path:
    from engine.synth import spec_digest, write_model

    spec = _check_spec(dtype)
    path = directory / f"cuda-check-{dtype.lower()}-{spec_digest(spec)}.gguf"
    if not path.exists():
        write_model(path, spec)
    return path


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def part_models(c: Check, device: int, directory: Path, dtype: str) -> None:
    """The same generated model on the CPU and with every layer on the GPU (-ngl 99): prefill and decode logits."""
    from engine import load_model

    path = _model_file(directory, dtype)
    cpu = load_model(path, ctx_size=256)
    # -ngl 99: every layer and the head on CUDA0 (token_embd stays on the CPU, as in llama.cpp); another device
    # takes everything by an -ot rule
    place: dict[str, Any] = {"override_tensor": [f".=CUDA{device}"]} if device else {"n_gpu_layers": 99}
    gpu = load_model(path, ctx_size=256, **place)
    n_gpu = len(getattr(gpu.net, "gpu", {}))
    if n_gpu == 0:
        raise RuntimeError("-ngl 99 placed nothing on a GPU (no CUDA device in the plan?)")
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, cpu.n_vocab, 32)]
    pre_c, pre_g = cpu.logits(prompt), gpu.logits(prompt)  # T = 32: f16 tiles + cuBLAS on the GPU
    pre = _rel(pre_g, pre_c)
    top1 = float((pre_g.argmax(-1) == pre_c.argmax(-1)).mean())
    dec = []
    for m in (cpu, gpu):  # a 5-token batch (t8 matvec), then single tokens (t1 matvec, absorbed MLA decode)
        cache = m.new_cache(64)
        m.eval(prompt[:8], cache)
        outs = [m.eval(prompt[8:13], cache, all_logits=True)]
        outs += [m.eval([t], cache) for t in prompt[13:21]]
        dec.append(np.concatenate(outs, axis=0))
    decode = _rel(dec[1], dec[0])
    c.add(f"model {dtype}", f"prefill T=32 logits vs CPU (rel), top-1 agree ({n_gpu} GPU segment(s))",
          f"{pre:.1e}, {100 * top1:.0f}%", f"<= {PREFILL_REL_TOL:g}", pre <= PREFILL_REL_TOL)
    c.add(f"model {dtype}", "decode T=5 then 8 x T=1 logits vs CPU (rel)", f"{decode:.1e}", f"<= {DECODE_REL_TOL:g}",
          decode <= DECODE_REL_TOL)


def part_bench(c: Check, device: int, directory: Path) -> None:
    """`ikctl bench -ngl 99` on the benchmark model (BENCH_SPEC, Q8_0); in-process sweep if the CLI cannot run."""
    from engine.synth import bench_model

    path = bench_model(directory, "Q8_0")
    out = directory / "cuda-bench.json"
    out.unlink(missing_ok=True)
    args = ["-m", str(path), "-ngl", "99", "-c", "1024", "-ub", "512", "-n", "64", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if device:
        env["CUDA_VISIBLE_DEVICES"] = str(device)  # the bench's CUDA0 is this device
    timeout = max(10.0, c.left() - 5)
    proc = subprocess.run([sys.executable, "-m", "tui.cli", "bench", *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n", flush=True)
    how = "ikctl bench"
    if proc.returncode != 0 or not out.exists():
        how = "in-process sweep (ikctl bench failed: see above)"
        result = _sweep_in_process(path)
    else:
        result = json.loads(out.read_text())
    row = result["rows"][0]  # N_KV = 0
    tg, pp = float(row["speed_tg"]), float(row["speed_pp"])
    active = int(result["active_weight_bytes"])
    gbs = active * tg / 1e9
    ref = c.facts.get("bandwidth_gbs")
    c.add("bench", f"TG / PP at N_KV 0 ({how}, -ub 512, -n 64)", f"{tg:.1f} / {pp:.1f} t/s")
    frac = f" = {100 * gbs / ref:.1f}% of {ref:.0f}" if ref else ""
    c.add("bench", f"decode weight reads ({active / 2**20:.0f} MiB per token x TG)", f"{gbs:.1f} GB/s{frac}",
          f">= {100 * BW_TARGET:.0f}%", (gbs / ref >= BW_TARGET) if ref else None)
    c.add("bench", "PP / TG", f"{pp / tg:.1f}x", f">= {PP_TG_TARGET:g}x", pp / tg >= PP_TG_TARGET)
    for r in result["rows"][1:]:
        c.add("bench", f"TG / PP at N_KV {r['n_kv']}", f"{float(r['speed_tg']):.1f} / {float(r['speed_pp']):.1f} t/s")


def _sweep_in_process(path: Path) -> dict[str, Any]:
    from engine import load_model
    from engine.bench import active_weight_bytes, rows_as_dicts, sweep

    model = load_model(path, ctx_size=1024, ubatch_size=512, n_gpu_layers=99)
    rows = list(sweep(model, 1024, 512, 64))
    return {"rows": rows_as_dicts(rows), "active_weight_bytes": active_weight_bytes(model)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    p.add_argument("--time-limit", type=float, default=270.0, help="seconds for the whole run (default 270)")
    p.add_argument("--dir", type=Path, default=None, help="where generated models are written and reused")
    args = p.parse_args(argv)
    directory = args.dir or Path(tempfile.mkdtemp(prefix="ikctl-cuda-check-"))
    directory.mkdir(parents=True, exist_ok=True)
    c = Check(args.time_limit)
    d = args.device
    try:
        c.run("environment", 1, lambda: part_environment(c, d))
        c.run("bandwidth", 5, lambda: part_bandwidth(c, d))
        c.run("kernels", 20, lambda: part_kernels(c, d))
        c.run("decode kernel", 10, lambda: part_kernel_bandwidth(c, d))
        for dtype in CHECK_DTYPES:
            c.run(f"model {dtype}", 15, lambda dtype=dtype: part_models(c, d, directory, dtype))
        c.run("bench", 60, lambda: part_bench(c, d, directory))
    except KeyboardInterrupt:
        c.add("run", "interrupted", "Ctrl-C")
    print()
    print(f"ikctl CUDA check: {c.facts.get('gpu', 'no GPU')}, models in {directory}")
    print(c.table())
    failed = [r for r in c.rows if r.verdict == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
