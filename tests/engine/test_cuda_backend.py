"""The CUDA backend's CPU-testable parts: availability messages (CuPy or GPU missing) through the real CLI, CUDA
devices in the planner, `--device` names, and the model, segment and in-process GPU paths run on a strict
NumPy-backed CuPy stand-in (tests/engine/strict_cupy.py), which must give the CPU path's logits bit for bit.

Legend: T tokens, R rows, C columns.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import load_model
from engine.config import DeepSeek2Config
from engine.cuda import available, device_count
from engine.cuda.devices import CudaDevice, list_devices, parse_device, planner_devices
from engine.cuda.local import gpu_runners, local_gpus
from engine.errors import IkctlError
from engine.gguf_file import GGUFFile
from engine.kv_cache import KVCache
from engine.model import Options
from engine.moe import Router, route
from engine.placement import Device, PlacementError, PlacementRules, Segment, devices_for, layer_ops, plan
from engine.quant import QTensor
from engine.segments import ProgramError, SegmentRunner
from engine.synth import SynthSpec, write_model
from rpcnode import protocol as P
from tests.engine import strict_cupy
from tests.engine.test_ik_model import MODEL as IK_MODEL

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30


# ---- availability and the CLI ----------------------------------------------------------------------------------


def _ikctl(*args: str, hide_cupy: bool = False) -> subprocess.CompletedProcess[str]:
    """The real `ikctl` main in a fresh interpreter; hide_cupy makes `import cupy` fail as on a machine without it."""
    hide = "sys.modules['cupy'] = None; " if hide_cupy else ""
    code = f"import sys; {hide}from tui.cli import main; sys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cpu_path_never_imports_cupy(tmp_path: Path) -> None:
    """CuPy is optional and slow to import: the engine, the worker and a CPU forward pass leave it alone."""
    model = write_model(tmp_path / "m.gguf", SynthSpec(layers=2, dense_layers=1))
    code = ("import sys; import engine.cuda, engine.cuda.kernels, engine.cuda.tensors, engine.cuda.devices, "
            "engine.cuda.local, engine.distributed, rpcnode.server, tui.cli; from engine import load_model; "
            f"m = load_model({str(model)!r}, ctx_size=32); m.logits([1, 2, 3]); print('cupy' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_rpcnode_cuda_without_cupy_is_one_line() -> None:
    r = _ikctl("rpcnode", "--device", "cuda:0", "--port", "0", hide_cupy=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["rpcnode: error: --device cuda:0: CuPy is not installed (pip install "
                                             "'ikctl[cuda13]', or 'ikctl[cuda12]' for a CUDA 12 driver)"]


def test_rpcnode_cuda_without_gpu_is_one_line() -> None:
    """With the test extra's CuPy and no GPU (CI), the driver's reason; on a GPU machine, a device past the last."""
    n, _ = device_count()
    index = n  # one past the last device: missing everywhere
    r = _ikctl("rpcnode", "--device", f"cuda:{index}", "--port", "0")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    expected = f"rpcnode: error: --device cuda:{index}: {available(index)}"
    assert r.stderr.strip() == expected
    assert ("no CUDA device" in expected) or ("CuPy is not installed" in expected)


def test_rpcnode_bad_device_name() -> None:
    r = _ikctl("rpcnode", "--device", "gpu7", "--port", "0")
    assert r.returncode == 1
    assert r.stderr.strip() == "rpcnode: error: --device 'gpu7' is not cpu or cuda:N (e.g. --device cuda:0)"


def test_availability_reasons() -> None:
    n, why = device_count()
    if n == 0:  # CI: CuPy from the test extra, no driver
        assert why is not None and available(0) == why
        assert why.startswith(("no CUDA device: ", "CuPy is not installed ("))
        assert list_devices() == [] and planner_devices() == []
    else:
        assert why is None and available(0) is None
        assert available(n) == f"no CUDA device {n}: this machine has {n} (cuda:0{f'..cuda:{n - 1}' if n > 1 else ''})"


def test_plan_ngl_without_gpu_keeps_everything_on_cpu_or_rpc(tmp_path: Path) -> None:
    if device_count()[0]:
        pytest.fail("this test describes a machine without a GPU (the CI machine)")
    model = write_model(tmp_path / "m.gguf", SynthSpec(layers=2, dense_layers=1))
    r = _ikctl("plan", "-m", str(model), "-ngl", "99")
    assert r.returncode == 0, r.stderr
    assert "CUDA" not in r.stdout and "-ngl 99 but no GPU or RPC device" in _ikctl(
        "plan", "-m", str(model), "-ngl", "99", "-v").stdout
    bad = _ikctl("plan", "-m", str(model), "--device-mem", "CUDA0=8GiB", "-ngl", "99")
    assert bad.returncode == 1
    assert "--device-mem names CUDA0, which is not a device here (CPU); no such GPU here" in bad.stderr


@pytest.mark.parametrize(("text", "index"), [("cpu", None), ("CPU", None), ("cuda", 0), ("cuda:0", 0),
                                             ("cuda:3", 3), ("cuda2", 2), ("CUDA1", 1), (" cuda:1 ", 1)])
def test_parse_device(text: str, index: int | None) -> None:
    assert parse_device(text) == index


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:-1", "rocm:0", "cuda:1x", ""])
def test_parse_device_refuses(text: str) -> None:
    with pytest.raises(IkctlError, match="is not cpu or cuda:N"):
        parse_device(text)


def test_telemetry_carries_vram() -> None:
    t = P.Telemetry(rss_bytes=1, busy_seconds=0.5, bytes_in=2, bytes_out=3, cache_hits=4, cache_misses=5,
                    tensors_held=6, bytes_held=7, vram_total_bytes=80 * GiB, vram_free_bytes=3 * GiB)
    frame = P.encode_frame(t, 9)
    header = P.parse_header(frame[: P.HEADER_SIZE])
    back = P.decode_body(header, frame[P.HEADER_SIZE : P.HEADER_SIZE + header.meta_len], b"").message
    assert back == t and back.vram_total_bytes == 80 * GiB and back.vram_free_bytes == 3 * GiB
    old = P.Telemetry(rss_bytes=1, busy_seconds=0.5, bytes_in=2, bytes_out=3, cache_hits=4, cache_misses=5,
                      tensors_held=6, bytes_held=7)
    assert old.vram_total_bytes == old.vram_free_bytes == 0  # CPU workers, and peers before the fields existed


# ---- the planner with CUDA devices ----------------------------------------------------------------------------

RECORDS = [("token_embd.weight", 10), *((f"blk.{i}.attn_q.weight", 100) for i in range(8)),
           *((f"blk.{i}.ffn_up_exps.weight", 300) for i in range(8)), ("output.weight", 50)]


def test_planner_devices_use_free_memory() -> None:
    found = [CudaDevice(0, "NVIDIA H100 80GB HBM3", 80 * GiB, 79 * GiB), CudaDevice(1, "RTX 3090", 24 * GiB, GiB)]
    assert planner_devices(found) == [Device("CUDA0", "cuda", 79 * GiB), Device("CUDA1", "cuda", GiB)]


def test_devices_for_adds_cuda_after_rpc_with_overrides() -> None:
    cuda = [Device("CUDA0", "cuda", 8 * GiB), Device("CUDA1", "cuda", 24 * GiB)]
    devs = devices_for(["10.0.0.2:50052"], {"CUDA1": 4 * GiB}, cuda)
    assert [(d.name, d.capacity_bytes) for d in devs] == [("CPU", None), ("RPC[10.0.0.2:50052]", None),
                                                          ("CUDA0", 8 * GiB), ("CUDA1", 4 * GiB)]
    with pytest.raises(PlacementError, match=r"names CUDA2, which is not a device here .*no such GPU here"):
        devices_for([], {"CUDA2": GiB}, cuda)


def test_ngl_splits_layers_over_gpus_by_free_memory() -> None:
    cuda = [Device("CUDA0", "cuda", 10_000), Device("CUDA1", "cuda", 30_000)]
    p = plan(RECORDS, 8, devices_for([], None, cuda), PlacementRules(n_gpu_layers=99))
    # 9 offloaded layers (8 + output), split points 1/4 and 1: layer il goes to CUDA0 while il / 9 < 1/4
    assert p.layers_of("CUDA0") == [0, 1, 2] and p.layers_of("CUDA1") == [3, 4, 5, 6, 7]
    assert p.device_of["output.weight"] == "CUDA1" and p.device_of["token_embd.weight"] == "CPU"
    assert p.bytes_per_device == {"CPU": 10, "CUDA0": 1200, "CUDA1": 2050}
    assert "capacity split" in p.reason_of["blk.0.attn_q.weight"]


def test_rpc_devices_come_before_gpus_and_ot_keeps_experts_on_cpu() -> None:
    rules = PlacementRules.from_flags(["exps=CPU"], n_gpu_layers=4, tensor_split="1,1", rpc="10.0.0.2:50052")
    p = plan(RECORDS, 8, devices_for(rules.rpc, None, [Device("CUDA0", "cuda", 10_000)]), rules)
    assert p.layers_of("RPC[10.0.0.2:50052]") == [4, 5] and p.layers_of("CUDA0") == [6, 7]
    assert all(p.device_of[f"blk.{i}.ffn_up_exps.weight"] == "CPU" for i in range(8))
    assert p.explain("blk.7.attn_q.weight").startswith("blk.7.attn_q.weight → CUDA0 (-ngl 4")


def test_gpu_overflow_names_device_and_bytes() -> None:
    with pytest.raises(PlacementError, match=r"CUDA0 would hold .* but has") as e:
        plan(RECORDS, 8, devices_for([], None, [Device("CUDA0", "cuda", 1000)]), PlacementRules(n_gpu_layers=99))
    assert e.value.device == "CUDA0" and e.value.capacity_bytes == 1000 and e.value.need_bytes == 3250


def test_local_gpus_are_queried_only_when_flags_can_use_them(monkeypatch: pytest.MonkeyPatch) -> None:
    with strict_cupy.installed(monkeypatch):
        assert local_gpus(PlacementRules.from_flags(["exps=CPU"])) == []
        assert local_gpus(PlacementRules(n_gpu_layers=1)) == [Device("CUDA0", "cuda", 6 * GiB)]
        assert local_gpus(PlacementRules.from_flags(["attn=CUDA0"])) == [Device("CUDA0", "cuda", 6 * GiB)]
        assert list_devices() == [CudaDevice(0, "Stand-in GPU", 8 * GiB, 6 * GiB)]


# ---- the model on device arrays (strict stand-in) --------------------------------------------------------------


class StandInWeight:
    """A weight "on the device" for the stand-in: it takes and gives device arrays (expert/row ids stay host
    arrays, as CudaTensor takes them) and computes with the QTensor, so results equal the CPU path's."""

    def __init__(self, t: QTensor) -> None:
        self.t, self.name, self.qtype, self.shape = t, t.name, t.qtype, t.shape

    @staticmethod
    def _host(x: Any) -> np.ndarray:
        assert isinstance(x, strict_cupy.ndarray), f"a host array reached a device weight: {type(x)}"
        return x.get()

    def dequantize(self) -> Any:
        return strict_cupy.asarray(self.t.dequantize())

    def rows(self, index: Any) -> Any:
        assert isinstance(index, np.ndarray)
        return strict_cupy.asarray(self.t.rows(index))

    def matmul_t(self, x: Any) -> Any:
        return strict_cupy.asarray(self.t.matmul_t(self._host(x)))

    def gather_matmul_t(self, experts: Any, x: Any) -> Any:
        assert isinstance(experts, np.ndarray)
        return strict_cupy.asarray(self.t.gather_matmul_t(experts, self._host(x)))

    def __getitem__(self, index: int) -> StandInWeight:
        return StandInWeight(self.t[index])


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """`import cupy` gives the stand-in; GPU uploads wrap the QTensors as StandInWeight."""
    import engine.cuda.tensors

    def upload_getter(get: Any, device: int) -> Any:
        assert device == 0
        return lambda name: None if (t := get(name)) is None else StandInWeight(t)

    monkeypatch.setattr(engine.cuda.tensors, "upload_getter", upload_getter)
    with strict_cupy.installed(monkeypatch) as module:
        yield module


SPEC = SynthSpec(layers=3, dense_layers=1, q_lora_rank=16, gating="sigmoid", expert_groups=2, expert_groups_used=1,
                 expert_weights_norm=True, yarn=True, dtype="Q8_0", seed=11)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("cuda") / "m.gguf", SPEC)


def _runner(path: Path, ops: list[tuple[int, str]], mla: int, cache_type: str, gpu: bool) -> SegmentRunner:
    f = GGUFFile(path)
    cfg = DeepSeek2Config.from_gguf(f)
    opts = Options(mla=mla, cache_type_k=cache_type, float_activations=True)  # the GPU kernels multiply in f32
    runners = gpu_runners(f, cfg, [Segment("CUDA0" if gpu else "CPU", tuple(ops))], opts, n_ctx=64)
    if gpu:
        return runners[0]
    assert runners == {}  # a CPU segment is not a GPU runner; build the CPU twin the same way
    gpu_like = gpu_runners(f, cfg, [Segment("CUDA0", tuple(ops))], opts, 64)
    return SegmentRunner(gpu_like[0].program, lambda name: f.raw(name).reshape(-1).view(np.uint8))


@pytest.mark.parametrize(("mla", "cache_type"), [(3, "f16"), (1, "q8_0"), (0, "f32")])
def test_segment_on_device_arrays_equals_cpu(model_path: Path, stand_in: Any, mla: int, cache_type: str) -> None:
    ops = layer_ops(GGUFFile(model_path).tensors, SPEC.layers)
    cpu = _runner(model_path, ops, mla, cache_type, gpu=False)
    gpu = _runner(model_path, ops, mla, cache_type, gpu=True)
    assert gpu.net.xp is stand_in and cpu.net.xp is np
    ids = np.random.default_rng(0).integers(0, SPEC.vocab, 12)
    pos = 0
    for n in (7, 1, 2, 1):  # prefill, then decode steps (T = 2 takes the gathered-experts path too)
        state = {"ids": ids[pos : pos + n], "n_out": np.asarray(n)}
        a, b = cpu.run(5, pos, n, dict(state)), gpu.run(5, pos, n, dict(state))
        assert set(b) == {"logits"} and isinstance(b["logits"], np.ndarray)
        assert np.array_equal(a["logits"], b["logits"])
        pos += n
    assert gpu.kv("truncate", 5, 3) == 3  # then a rerun from position 3 matches again
    state = {"ids": ids[3:5], "n_out": np.asarray(2)}
    assert np.array_equal(cpu.run(5, 3, 2, dict(state))["logits"], gpu.run(5, 3, 2, dict(state))["logits"])


def test_split_segments_hand_host_arrays_across(model_path: Path, stand_in: Any) -> None:
    """A MoE layer's ffn op on the GPU and its experts elsewhere: h, idx, w and shared leave as host arrays."""
    ffn_ops = [(-1, "embd"), (0, "attn"), (0, "ffn"), (1, "attn"), (1, "ffn")]
    gpu = _runner(model_path, ffn_ops, 3, "f16", gpu=True)
    cpu = _runner(model_path, ffn_ops, 3, "f16", gpu=False)
    state = {"ids": np.array([3, 1, 4, 1, 5])}
    a, b = cpu.run(1, 0, 5, dict(state)), gpu.run(1, 0, 5, dict(state))
    assert set(b) == {"x", "h", "idx", "w", "shared"}
    assert all(isinstance(v, np.ndarray) for v in b.values())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    experts = _runner(model_path, [(1, "moe_experts")], 3, "f16", gpu=True)
    y = experts.run(1, 0, 5, {"h": b["h"], "idx": b["idx"], "w": b["w"]})
    y_cpu = _runner(model_path, [(1, "moe_experts")], 3, "f16", gpu=False).run(1, 0, 5,
                                                                              {k: a[k] for k in ("h", "idx", "w")})
    assert np.array_equal(y["y"], y_cpu["y"])


@pytest.mark.parametrize("flags", [{"n_gpu_layers": 99}, {"n_gpu_layers": 99, "override_tensor": ["exps=CPU"]},
                                   {"override_tensor": ["blk\\.1\\.=CUDA0"]}])
def test_in_process_gpu_segments_equal_cpu(model_path: Path, stand_in: Any, flags: dict[str, Any]) -> None:
    cpu = load_model(model_path, ctx_size=64, float_activations=True)  # as the GPU kernels: f32 activations
    gpu = load_model(model_path, ctx_size=64, float_activations=True, **flags)
    assert gpu.net.gpu and not gpu.net.clients  # segments on CUDA0 run here, nothing goes over the network
    prompt = [5, 9, 2, 7, 7, 1]
    assert np.array_equal(cpu.logits(prompt), gpu.logits(prompt))
    caches = [cpu.new_cache(32), gpu.new_cache(32)]
    outs = [[m.eval(prompt, c), m.eval([3], c)] for m, c in zip((cpu, gpu), caches, strict=True)]
    for c in caches:
        c.truncate(4)  # reaches the GPU runners' caches
    outs = [[*o, m.eval([8, 8], c)] for o, m, c in zip(outs, (cpu, gpu), caches, strict=True)]
    assert all(np.array_equal(a, b) for a, b in zip(*outs, strict=True))


def test_route_takes_device_logits(stand_in: Any) -> None:
    rng = np.random.default_rng(2)
    logits, bias = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    router = Router(n_experts_per_tok=2, gating_func=2, n_group=2, topk_group=1, norm_topk_prob=True)
    host = route(router, logits, bias)
    dev = route(router, stand_in.asarray(logits), stand_in.asarray(bias))
    assert all(isinstance(a, np.ndarray) and np.array_equal(a, b) for a, b in zip(dev, host, strict=True))


@pytest.mark.parametrize("cache_type", ["f32", "f16", "q8_0"])
def test_kv_cache_on_device(stand_in: Any, cache_type: str) -> None:
    rows = np.random.default_rng(4).standard_normal((300, 40)).astype(np.float32)
    host, dev = KVCache(1, {"ckv": 40}, 512, cache_type), KVCache(1, {"ckv": 40}, 512, cache_type, stand_in)
    for c in (host, dev):
        c.reserve(300)
        c.write(0, "ckv", 0, rows[:250] if c is host else stand_in.asarray(rows[:250]))
        c.write(0, "ckv", 250, rows[250:] if c is host else stand_in.asarray(rows[250:]))
    back = dev.read(0, "ckv", 300)
    assert isinstance(back, stand_in.ndarray) and np.array_equal(back.get(), host.read(0, "ckv", 300))
    assert dev.nbytes == host.nbytes


def test_stand_in_is_strict(stand_in: Any) -> None:
    """The stand-in refuses what CuPy refuses, so the equalities above mean the crossings are explicit."""
    a = stand_in.asarray(np.ones(3, np.float32))
    for bad in (lambda: np.asarray(a), lambda: a + np.ones(3), lambda: np.exp(a), lambda: a[np.array([0])],
                lambda: np.concatenate([a, a])):
        with pytest.raises(TypeError):
            bad()
    assert isinstance(np.float32(2) * a, stand_in.ndarray) and isinstance(a.get(), np.ndarray)


def test_gpu_worker_reports_its_device(stand_in: Any, tmp_path: Path) -> None:
    from rpcnode.worker import Config, Worker

    w = Worker(Config(cache_dir=tmp_path, cuda_device=0))
    try:
        info = w.device_info()
        assert (info.device, info.index, info.name, info.mem_total_bytes) == ("cuda", 0, "Stand-in GPU", 8 * GiB)
        t = w.telemetry()
        assert (t.vram_total_bytes, t.vram_free_bytes) == (8 * GiB, 6 * GiB)
        assert w.device == "cuda:0 (Stand-in GPU)"
    finally:
        with w.computing():  # the warm-up (compiling with the stand-in) is over
            pass
    cpu = Worker(Config(cache_dir=tmp_path / "cpu"))
    try:
        assert cpu.device_info().device == "cpu" and cpu.telemetry().vram_total_bytes == 0
    finally:
        with cpu.computing():
            pass


def test_spec_is_a_moe_model() -> None:
    assert dataclasses.asdict(SPEC)["layers"] > SPEC.dense_layers  # the tests above cross MoE layers


def test_ik_types_are_refused_on_a_gpu_with_the_tensor_named(stand_in: Any) -> None:
    """No CUDA kernel runs ik_llama.cpp's types: a GPU segment holding one is refused in one line, before any
    upload; the same model's attention (Q8_0 here) still goes to the GPU."""
    f = GGUFFile(IK_MODEL)
    cfg = DeepSeek2Config.from_gguf(f)
    opts = Options(mla=0, float_activations=True)
    with pytest.raises(ProgramError) as e:
        gpu_runners(f, cfg, [Segment("CUDA0", ((1, "attn"), (1, "ffn")))], opts, n_ctx=64)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == ("tensor 'blk.1.ffn_down_shexp.weight' has type IQ4_NL_R4 (ik_llama.cpp), which ikctl cannot run "
                   "on a GPU (3 such tensors here); keep them on the CPU or on CPU workers "
                   "(-ot 'blk.1.ffn_down_shexp.weight=CPU')"), msg
    runner = gpu_runners(f, cfg, [Segment("CUDA0", ((1, "attn"),))], opts, n_ctx=64)[0]
    assert runner.net.xp is stand_in
