"""Sweep benchmark like ik_llama.cpp's llama-sweep-bench: PP and TG speed as the context fills up."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from engine.calibration import cpu_model
from engine.errors import IkctlError
from engine.kernels import fused, get_threads
from engine.threads import blas

if TYPE_CHECKING:
    from engine.gguf_file import GGUFFile
    from engine.model import Model

HEADER = "|    PP |     TG |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |"
RULE = "|-------|--------|--------|----------|----------|----------|----------|"


@dataclass(frozen=True)
class SweepRow:
    """One step, with the keys of llama-sweep-bench's JSONL output."""

    n_kv: int
    pp: int
    tg: int
    t_pp: float
    speed_pp: float
    t_tg: float
    speed_tg: float

    def table_line(self) -> str:
        return (f"| {self.pp:5d} | {self.tg:6d} | {self.n_kv:6d} | {self.t_pp:8.3f} | {self.speed_pp:8.2f} | "
                f"{self.t_tg:8.3f} | {self.speed_tg:8.2f} |")


def sweep_steps(n_ctx: int, ubatch: int, n_gen: int) -> list[int]:
    """The N_KV of each step: 0, ub, 2ub, ... while the step's prompt batch still fits the context."""
    if ubatch <= 0 or n_gen < 0:
        raise IkctlError(f"-ub {ubatch} must be positive and -n {n_gen} >= 0")
    steps = list(range(0, n_ctx - max(ubatch, n_gen) + 1, ubatch))
    if not steps:
        raise IkctlError(f"context {n_ctx} is smaller than one step of -ub {ubatch} / -n {n_gen}; raise -c")
    return steps


def sweep(
    model: Model,
    n_ctx: int,
    ubatch: int,
    n_gen: int,
    seed: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> Iterator[SweepRow]:
    """At each N_KV: time n_gen single-token decodes, drop them, then time one `ubatch`-token prompt batch."""
    steps = sweep_steps(n_ctx, ubatch, n_gen)
    rng = np.random.default_rng(seed)
    cache = model.new_cache(n_ctx)
    # warm-up: load (or compile) the prefill and the decode kernels, and page in every expert (a decode touches
    # only K of E of them), so that the first row times neither
    warm = model.new_cache(ubatch + 1)
    model.eval(rng.integers(0, model.n_vocab, ubatch).tolist(), warm)
    model.eval([int(rng.integers(0, model.n_vocab))], warm)
    for k, n_kv in enumerate(steps):
        cache.truncate(n_kv)
        t0 = time.perf_counter()
        for _ in range(n_gen):
            model.eval([int(rng.integers(0, model.n_vocab))], cache)
        t_tg = time.perf_counter() - t0
        cache.truncate(n_kv)
        batch = rng.integers(0, model.n_vocab, ubatch).tolist()
        t0 = time.perf_counter()
        model.eval(batch, cache)
        t_pp = time.perf_counter() - t0
        if on_step:
            on_step(k + 1, len(steps))
        yield SweepRow(n_kv, ubatch, n_gen, t_pp, ubatch / t_pp, t_tg, n_gen / t_tg if t_tg > 0 else 0.0)


def active_weight_bytes(model: Model) -> int:
    """Weight bytes one decoded token reads: every matrix once, K of E experts, one embedding row, the head."""
    cfg = model.config
    k, e = getattr(cfg, "n_experts_per_tok", 0), getattr(cfg, "n_routed_experts", 0)
    total = 0
    for t in model.gguf.tensors.values():
        if t.name == "token_embd.weight":
            total += t.n_bytes // t.shape[0]
            if "output.weight" not in model.gguf.tensors:  # tied head: the whole matrix is read too
                total += t.n_bytes
        elif "_exps." in t.name and e:
            total += t.n_bytes * k // e
        else:
            total += t.n_bytes
    return total


def host_info() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def bench_settings(model: Model, n_ctx: int, ubatch: int, n_gen: int, kernels: bool = True) -> dict[str, Any]:
    try:
        pkg = version("ikctl")
    except PackageNotFoundError:
        pkg = "unknown"
    types = sorted({t.qtype_name for t in model.gguf.tensors.values()})
    return {
        "model": str(model.path),
        "model_name": model.gguf.get("general.name", model.path.stem),
        "model_bytes": model.gguf.file_bytes,
        "active_weight_bytes": active_weight_bytes(model),
        "arch": model.arch,
        "quant": types,
        "n_ctx": n_ctx,
        "n_ubatch": ubatch,
        "n_gen": n_gen,
        "threads": model.options.threads or get_threads(),
        "cache_type_k": model.options.cache_type_k,
        "mla": model.options.mla if model.arch == "deepseek2" else None,
        "kernels": "fused" if kernels else "generic",
        "activations": "float32" if model.options.float_activations or not kernels else "int8",
        "placement": placement_bytes(model),
        "decoder_path": decoder_path_tensors(model.gguf),
        "host": host_info(),
        "blas": asdict(blas()),
        "ikctl_version": pkg,
    }


def rows_as_dicts(rows: list[SweepRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def decoder_path_tensors(gguf: GGUFFile) -> dict[str, str]:
    """Weight matrices whose products decode rows to float32 and then multiply, with no fused kernel for their
    type: ik_llama.cpp's types without one (engine.kernels.fused) and types the kernels do not know.
    Name -> type name."""
    return {name: t.qtype_name for name, t in gguf.tensors.items()
            if len(t.shape) >= 2 and not fused(t.qtype)}


def placement_bytes(model: Model) -> dict[str, int]:
    """Weight bytes per device (CPU, RPC[host:port], CUDA0...)."""
    placement = getattr(model.net, "placement", None)
    if placement is None:
        return {"CPU": model.gguf.file_bytes}
    return {d: n for d, n in placement.bytes_per_device.items() if n}  # split experts: each device's range


@dataclass(frozen=True)
class WorkerTraffic:
    """One worker's part of a benchmark: its round trips, what they cost beyond its compute, the bytes.

    A round trip is timed from sending the segment to reading its reply; when the coordinator is still computing
    the layer's shared experts as the reply arrives, that wait counts too (it is not the network's)."""

    device: str
    round_trips: int
    run_seconds: float  # sending a segment to reading its reply, summed
    worker_seconds: float  # the worker's own compute within those
    bytes_sent: int
    bytes_received: int

    def line(self) -> str:
        beyond = (self.run_seconds - self.worker_seconds) / max(self.round_trips, 1)
        return (f"{self.device}: {self.round_trips} round trips, {beyond * 1e3:.3f} ms each beyond the worker's "
                f"compute (network, both sides' overheads), worker computing {self.worker_seconds:.2f} s, "
                f"{self.bytes_sent / 1e6:.2f} MB sent, {self.bytes_received / 1e6:.2f} MB received")


def worker_traffic(model: Model, since: list[WorkerTraffic] | None = None) -> list[WorkerTraffic]:
    """Each worker's counters so far (empty for a local model), or since an earlier call's."""
    clients = getattr(model.net, "clients", {})
    now = [WorkerTraffic(d, c.counters.runs, c.counters.run_seconds, c.counters.worker_seconds,
                         c.counters.bytes_sent, c.counters.bytes_received) for d, c in clients.items()]
    if since is None:
        return now
    before = {t.device: t for t in since}
    zero = WorkerTraffic("", 0, 0.0, 0.0, 0, 0)
    return [WorkerTraffic(t.device, t.round_trips - b.round_trips, t.run_seconds - b.run_seconds,
                          t.worker_seconds - b.worker_seconds, t.bytes_sent - b.bytes_sent,
                          t.bytes_received - b.bytes_received)
            for t in now for b in [before.get(t.device, zero)]]
