"""What automatic placement measures before it plans: each device's decode speed per weight type (calibrated once,
kept in a cache file: this machine's under the user cache dir, a worker's in its own cache dir; measured again on
request), each worker's link (round-trip time and bandwidth, at connect), and the memory each device offers."""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from engine.architectures import load_network
from engine.auto_placement import Measured
from engine.calibration import CalibrationCache, calibrate, machine_id, machine_key
from engine.errors import IkctlError
from engine.gguf_file import GGUFFile
from engine.kernels import activations, get_threads
from engine.placement_rules import CPU
from engine.speed_model import Host, Link
from engine.synth import SynthSpec, write_model
from engine.threads import compute_threads
from engine.user_cache import cache_dir
from rpcnode.client import Client, RPCError, WorkerGone


def local_gbps(qtypes: Iterable[int], threads: int | None, refresh: bool = False) -> dict[int, float]:
    """This machine's decode GB/s per type with `threads` threads, from the cache file unless missing or refresh."""
    with compute_threads(threads, 1):
        cache = CalibrationCache(cache_dir() / "calibration.json")
        known, _ = cache.figures(machine_key(get_threads()), qtypes, refresh, calibrate)
    return known


@functools.cache
def software_seconds(cfg: Any, threads: int | None, tokens: int = 12) -> float:
    """Seconds one decoded token spends beyond reading weights, on this machine: every op's Python, norms, rope,
    the router and attention over a short context. Measured on a tiny model of the same architecture and op
    structure (layers, dense layers, experts, top-k), whose weights read in microseconds: its decode time is
    that cost. 0.0 for an architecture engine.synth does not write (deepseek2 only)."""
    if not hasattr(cfg, "first_k_dense_replace"):
        return 0.0
    spec = SynthSpec(layers=int(cfg.n_layers), dense_layers=min(int(cfg.first_k_dense_replace), int(cfg.n_layers)),
                     experts=max(int(cfg.n_routed_experts), 1), top_k=max(min(int(cfg.n_experts_per_tok),
                                                                               int(cfg.n_routed_experts)), 1),
                     shared_experts=int(cfg.n_shared_experts), dtype="Q8_0", seed=1)
    with tempfile.TemporaryDirectory(prefix="ikctl-overhead-") as tmp:
        net = load_network(GGUFFile(write_model(Path(tmp) / "tiny.gguf", spec)), 3, 256 << 20)
        cache = net.new_cache(64, "f16")
        with compute_threads(threads, 1), activations(True):
            net.forward(np.arange(1, 5), cache)
            net.forward(np.array([5]), cache)  # compiled and warm
            t0 = time.perf_counter()
            for k in range(tokens):
                net.forward(np.array([6 + k]), cache)
            return (time.perf_counter() - t0) / tokens


def measure(cfg: Any, clients: Mapping[str, Client], capacities: Mapping[str, int], qtypes: Iterable[int],
            threads: int | None, refresh: bool = False) -> Measured:
    """Speeds, links and capacities of this machine (CPU) and the connected workers, and the model's software
    cost per token (cfg: its config). `capacities`: what the workers report or what was given (a CPU entry
    overrides this machine's available memory)."""
    types = sorted(set(qtypes))
    gbps: dict[str, Mapping[int, float]] = {CPU: local_gbps(types, threads, refresh)}
    with compute_threads(threads, 1):
        hosts = {CPU: Host(machine_id(), os.cpu_count() or 1, get_threads())}
    links: dict[str, Link] = {}
    for device, client in clients.items():
        try:
            reply = client.calibrate(types, refresh=refresh)
        except WorkerGone:
            raise
        except RPCError as e:  # an older worker, or one short of memory for the calibration
            raise IkctlError(f"--auto: {e}") from None
        gbps[device] = dict(zip(types, reply.gbps, strict=True))
        if reply.machine:
            hosts[device] = Host(reply.machine, reply.cores or 1, reply.threads or 1)
        rtt, bandwidth = client.measure_link()
        links[device] = Link(rtt, bandwidth)
    here = psutil.virtual_memory().available  # MemAvailable: free memory plus what the page cache would give back
    return Measured({CPU: here, **capacities}, gbps, links, software_seconds(cfg, threads), hosts)
