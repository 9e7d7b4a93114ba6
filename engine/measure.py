"""What automatic placement measures before it plans: each device's decode speed per weight type (calibrated once,
kept in a cache file: this machine's under the user cache dir, a worker's in its own cache dir; measured again on
request), each worker's link (round-trip time and bandwidth, at connect), and the memory each device offers."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from engine.auto_placement import Measured
from engine.calibration import CalibrationCache, calibrate, machine_key
from engine.errors import IkctlError
from engine.kernels import get_threads
from engine.placement_rules import CPU
from engine.speed_model import Link
from engine.threads import compute_threads
from engine.user_cache import cache_dir
from rpcnode.client import Client, RPCError, WorkerGone


def available_memory() -> int:
    """This machine's memory available for the model (MemAvailable: free plus what the page cache gives back)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def local_gbps(qtypes: Iterable[int], threads: int | None, refresh: bool = False) -> dict[int, float]:
    """This machine's decode GB/s per type with `threads` threads, from the cache file unless missing or refresh."""
    with compute_threads(threads, 1):
        key = machine_key(get_threads())
        cache = CalibrationCache(cache_dir() / "calibration.json")
        known = {} if refresh else cache.load(key)
        wanted = sorted(set(qtypes))
        missing = [t for t in wanted if t not in known]
        if missing:
            measured = calibrate(missing)
            try:
                known = cache.store(key, measured)
            except OSError:  # an unwritable cache costs a calibration next time, nothing else
                known = {**known, **measured}
    return {t: known.get(t, 0.0) for t in wanted}


def measure(clients: Mapping[str, Client], capacities: Mapping[str, int], qtypes: Iterable[int],
            threads: int | None, refresh: bool = False) -> Measured:
    """Speeds, links and capacities of this machine (CPU) and the connected workers. `capacities`: what the
    workers report or what was given (a CPU entry overrides this machine's available memory)."""
    types = sorted(set(qtypes))
    gbps: dict[str, Mapping[int, float]] = {CPU: local_gbps(types, threads, refresh)}
    links: dict[str, Link] = {}
    for device, client in clients.items():
        try:
            reply = client.calibrate(types, refresh=refresh)
        except WorkerGone:
            raise
        except RPCError as e:  # an older worker, or one short of memory for the calibration
            raise IkctlError(f"--auto: {e}") from None
        gbps[device] = dict(zip(types, reply.gbps, strict=True))
        rtt, bandwidth = client.measure_link()
        links[device] = Link(rtt, bandwidth)
    return Measured({CPU: available_memory(), **capacities}, gbps, links)
