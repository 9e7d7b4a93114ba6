"""The rpcnode worker: its state (the device it owns, held tensors, segment programs and KV caches, its counters)
and the requests peers make of it (`Connection`: handshake, then each request read within its limits, checked,
charged, executed and answered).

rpcnode.server accepts the connections and runs each on its own thread; computation (defining, running and
clearing segments) holds the compute lock, so it runs one request at a time. Between a segment and the next
request from a peer on another machine, the connection's thread spins briefly on the socket (see
protocol.poll_readable and --poll).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import platform
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from engine import calibration, kernels
from engine.batch import SeqRun
from engine.cuda import CudaUnavailable, require
from engine.cuda import kernels as cuda_kernels
from engine.cuda.devices import list_devices
from engine.forward_pass import ordered_state
from engine.segments import (
    KVOutOfMemory,
    SegmentRunner,
    UnknownSequence,
    parse_program,
    program_host_bytes,
    program_kv_bytes,
)
from engine.threads import compute_threads
from engine.user_cache import cache_dir
from rpcnode import protocol as P
from rpcnode.cache import CacheError, DigestMismatch, DiskFailed, DiskFull, TensorCache, Writer
from rpcnode.errors import IkctlError
from rpcnode.model_index import ModelIndex

log = logging.getLogger("rpcnode")
E = P.ErrorCode

# Frame bodies being received take up to this many bytes in all beyond -m (part of the worker's stated overhead),
# so that a decode step or a prefill batch never competes with the tensors a plan filled -m with; bodies beyond
# it are charged to -m, and refused when that is full.
RECEIVE_POOL_BYTES = 64 << 20
# A running segment's activations (SegmentRunner.scratch_bytes; one segment runs at a time) take up to this many
# bytes beyond -m, part of the stated overhead; a bigger batch is charged to -m for the rest, refused when full.
SCRATCH_POOL_BYTES = 512 << 20
# Decoded metadata (Python objects) takes up to this many times its msgpack bytes; a body is charged that much.
META_EXPANSION = 16
# The kinds a peer may send with a payload (RunReply carries one too, but a worker never asks for it).
REQUEST_PAYLOAD_KINDS = frozenset({P.Kind.UPLOAD_TENSOR, P.Kind.RUN_SEGMENT, P.Kind.CALIBRATE})
CALIBRATION_FILE = "calibration.json"  # in the cache dir, beside the tensor cache's entries
# A frame body may take --stall-timeout plus its size at this rate: slower than any LAN, so only a peer that
# trickles bytes to hold its reservation reaches the deadline.
MIN_BODY_RATE = 1 << 20  # bytes per second
HANDSHAKE_FACTOR = 4  # connections still in their handshake, per --max-connections, before new ones get BUSY
MAPPED_PAYLOAD_BYTES = 1 << 20  # bigger payloads are received into an anonymous map: pages exist once bytes do
SKIP_CHUNK = 1 << 16

def fail(code: P.ErrorCode, message: str) -> P.ProtocolError:
    return P.ProtocolError(code, message)


def cache_fail(e: CacheError, what: str) -> P.ProtocolError:
    """A refusal of the tensor cache as the peer's error: a full disk is not a lack of memory."""
    codes = ((DiskFull, E.DISK_FULL), (DiskFailed, E.DISK_FAILED))
    return fail(next((code for kind, code in codes if isinstance(e, kind)), E.OUT_OF_MEMORY), f"{what}: {e}")


@dataclass
class Upload:
    writer: Writer
    nbytes: int
    received: int = 0


@dataclass
class Config:
    """What the command line sets."""

    host: str = "127.0.0.1"
    port: int = 50052
    threads: int | None = None
    cache_dir: Path | None = None
    cache_limit: int = 1 << 40
    mem_bytes: int | None = None  # None: the machine's RAM
    token: str | None = None
    models: list[Path] = field(default_factory=list)
    cuda_device: int | None = None  # None: the CPU; else this GPU holds the segments' weights and KV caches
    poll_ms: float = 10.0  # spin this long for a remote peer's next segment (0: always block)
    handshake_timeout_s: float = 30.0  # a peer that has not said hello (and proved the token) by then is dropped
    max_connections: int = 32  # authenticated peers at once; one more is answered BUSY
    idle_timeout_s: float = 600.0  # an authenticated peer that sends nothing for this long is closed
    stall_timeout_s: float = 60.0  # a frame or an upload that makes no progress for this long is dropped


def _gpu(index: int) -> Any:
    """engine.cuda.devices.CudaDevice `index`; CudaUnavailable (an IkctlError) without CuPy or that GPU."""
    require(index)
    found = [d for d in list_devices() if d.index == index]
    if not found:
        raise CudaUnavailable(f"no CUDA device {index}")
    return found[0]


class StartError(IkctlError):
    """The worker cannot start (before it listens); the message is its one-line reason."""


class Worker:
    """State shared by all connections: held tensors, segments, counters; compute holds the compute lock."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        root = cfg.cache_dir or cache_dir() / "rpcnode-cache"
        index = ModelIndex(cfg.models, root / "local-models.json") if cfg.models else None
        for problem in index.problems if index is not None else ():
            log.warning("--models %s; left out", problem)
        self.cache = TensorCache(root, cfg.cache_limit, models=index)
        self.gpu = _gpu(cfg.cuda_device) if cfg.cuda_device is not None else None
        default_mem = self.gpu.total_bytes if self.gpu is not None else psutil.virtual_memory().total
        self.mem_total = cfg.mem_bytes if cfg.mem_bytes is not None else default_mem
        self.threads = cfg.threads or os.cpu_count() or 1
        self.held: dict[str, np.ndarray] = {}
        self.segments: dict[int, Any] = {}  # id -> engine.segments.SegmentRunner
        self.started = time.monotonic()
        self.busy_seconds = 0.0
        self.bytes_in = self.bytes_out = 0
        self.hits = self.misses = 0
        self.reserved = 0  # bytes of uploads in progress
        self.receiving = 0  # bytes charged for frame bodies being received and handled (see RECEIVE_POOL_BYTES)
        self.scratch_over = 0  # bytes of the running segment's activations beyond SCRATCH_POOL_BYTES
        self.calibrating = 0  # bytes of the calibration's scratch matrix while it exists (charged to -m)
        self.calibration = calibration.CalibrationCache(root / CALIBRATION_FILE)
        self._kv: dict[int, int] = {}  # segment id -> KV bytes charged (updated around runs, under self.lock)
        self._programs: dict[int, int] = {}  # segment id -> its runner's own bytes (segments.program_host_bytes)
        # connections run on threads of their own; this guards the tensor bookkeeping they share
        self.lock = threading.RLock()
        self._traffic_lock = threading.Lock()  # `+=` from several threads would lose counts
        self._receive_lock = threading.Lock()
        self.compute_lock = threading.Lock()
        self._define_lock = threading.Lock()
        self._set_threads = threading.local()
        self.compute_lock.acquire()  # held by the warm-up: the first request waits for it
        threading.Thread(target=self._warm_up, name="rpcnode-warm-up", daemon=True).start()

    def count_traffic(self, bytes_in: int = 0, bytes_out: int = 0) -> None:
        with self._traffic_lock:
            self.bytes_in += bytes_in
            self.bytes_out += bytes_out

    @contextmanager
    def computing(self) -> Iterator[None]:
        """Hold the compute lock, with the kernels' thread count set for the calling thread (numba keeps one per
        thread). One segment at a time: two would split the cores, and each connection's thread has its own
        OpenMP team, which must not run at once."""
        with self.compute_lock:
            if not getattr(self._set_threads, "done", False):
                kernels.set_threads(self.threads)
                self._set_threads.done = True
            yield

    def _warm_up(self) -> None:
        try:
            self._compile_cuda_kernels()
        finally:
            self.compute_lock.release()

    def _compile_cuda_kernels(self) -> None:
        """Now, not during the first model load (NVRTC takes seconds; CuPy caches them on disk)."""
        if self.gpu is not None:
            try:
                cuda_kernels.function("dq_q8_0", self.gpu.index)
            except Exception:
                log.exception("compiling the CUDA kernels failed")

    @property
    def device(self) -> str:
        return "cpu" if self.gpu is None else f"cuda:{self.gpu.index} ({self.gpu.name})"

    def vram(self) -> tuple[int, int]:
        """(total, free) bytes of this worker's GPU as the driver reports them now; (0, 0) on a CPU worker."""
        if self.gpu is None:
            return 0, 0
        # cupy: optional, loaded only where a GPU is used
        import cupy

        with cupy.cuda.Device(self.gpu.index):
            free, total = cupy.cuda.runtime.memGetInfo()
        return int(total), int(free)

    @property
    def bytes_held(self) -> int:
        return sum(a.nbytes for a in self.held.values())

    @property
    def kv_bytes(self) -> int:
        return sum(self._kv.values())

    @property
    def mem_free(self) -> int:
        over_pool = max(0, self.receiving - RECEIVE_POOL_BYTES)
        programs = sum(self._programs.values())
        return max(0, self.mem_total - self.bytes_held - self.reserved - self.kv_bytes - programs - over_pool
                   - self.scratch_over - self.calibrating)

    def charge_receive(self, nbytes: int, what: str) -> None:
        """Charge a frame body before any of it is stored; OUT_OF_MEMORY if neither the receive pool nor -m has
        room for it. The caller releases the charge once the request is answered."""
        with self._receive_lock:  # within the pool: no wait behind an offer that hashes a file under self.lock
            if self.receiving + nbytes <= RECEIVE_POOL_BYTES:
                self.receiving += nbytes
                return
        with self.lock, self._receive_lock:
            over = min(nbytes, self.receiving + nbytes - RECEIVE_POOL_BYTES)
            if over > self.mem_free:
                raise fail(E.OUT_OF_MEMORY, f"{what} of {nbytes} bytes does not fit: {self.mem_free} of "
                           f"{self.mem_total} bytes free, {self.receiving} bytes of other frames in flight")
            self.receiving += nbytes

    def release_receive(self, nbytes: int) -> None:
        if nbytes:
            with self._receive_lock:
                self.receiving -= nbytes

    def device_info(self) -> P.DeviceInfo:
        st = self.cache.stats()
        if self.gpu is not None:
            return P.DeviceInfo(device="cuda", index=self.gpu.index, name=self.gpu.name[:256],
                                mem_total_bytes=self.mem_total, mem_free_bytes=self.mem_free, threads=self.threads,
                                cache_entries=st.entries, cache_bytes=st.bytes)
        return P.DeviceInfo(device="cpu", name=(platform.processor() or platform.machine())[:256],
                            mem_total_bytes=self.mem_total, mem_free_bytes=self.mem_free, threads=self.threads,
                            cache_entries=st.entries, cache_bytes=st.bytes)

    def telemetry(self) -> P.Telemetry:
        vram_total, vram_free = self.vram()
        return P.Telemetry(rss_bytes=psutil.Process().memory_info().rss, busy_seconds=self.busy_seconds,
                           uptime_seconds=time.monotonic() - self.started, bytes_in=self.bytes_in,
                           bytes_out=self.bytes_out, cache_hits=self.hits, cache_misses=self.misses,
                           tensors_held=len(self.held), bytes_held=self.bytes_held, mem_free_bytes=self.mem_free,
                           kv_bytes=self.kv_bytes, vram_total_bytes=vram_total, vram_free_bytes=vram_free)

    # ---- calibration --------------------------------------------------------------------------------------------
    def calibrate(self, m: P.Calibrate) -> P.CalibrateReply:
        """Decode speed per requested type: from the cache file unless refreshed or missing, else measured under the
        compute lock (a segment running meanwhile would share the cores and the memory bandwidth)."""
        types = [int(t) for t in m.ggml_types]
        if not types or self.gpu is not None:
            # empty: a link timing, answered at once. A GPU worker's segments do not run on the CPU kernels, so
            # their speed says nothing about it: 0.0 for all (placement measures a GPU otherwise)
            return P.CalibrateReply(gbps=[0.0] * len(types), cached=False, threads=self.threads,
                                    machine=calibration.machine_id(), cores=os.cpu_count() or 1)
        def measure(missing: list[int]) -> dict[int, float]:
            with self.computing():
                return self._measure(missing)

        known, cached = self.calibration.figures(calibration.machine_key(self.threads), types, m.refresh, measure)
        return P.CalibrateReply(gbps=[known[t] for t in types], cached=cached, threads=self.threads,
                                machine=calibration.machine_id(), cores=os.cpu_count() or 1)

    def _measure(self, types: list[int]) -> dict[int, float]:
        """calibration.calibrate with its scratch matrix charged to -m while it exists; the caller holds
        `computing()`. OUT_OF_MEMORY when -m has no room for it."""
        need = calibration.MATRIX_BYTES if any(calibration.supported(t) for t in types) else 0
        with self.lock:
            if need > self.mem_free:
                raise fail(E.OUT_OF_MEMORY, f"calibration needs {need} bytes of scratch, {self.mem_free} of "
                           f"{self.mem_total} bytes free; free a model or raise -m")
            self.calibrating = need
        t0 = time.perf_counter()
        try:
            return calibration.calibrate(types)
        finally:
            with self.lock:
                self.calibrating = 0
            self.busy_seconds += time.perf_counter() - t0

    # ---- tensors ------------------------------------------------------------------------------------------------
    def offer(self, m: P.OfferTensor, uploads: dict[str, Upload]) -> P.OfferReply:
        with self.lock:
            return self._offer(m, uploads)

    def _offer(self, m: P.OfferTensor, uploads: dict[str, Upload]) -> P.OfferReply:
        # A held tensor is a map of a file that may have been written to since it was verified: the cache checks
        # the file's stat (and hashes it again if it changed); a changed one is dropped and fetched anew.
        held = self.held.get(m.digest)
        if held is None and m.nbytes > self.mem_free:
            raise fail(E.OUT_OF_MEMORY, f"tensor {m.name or m.digest[:16]} needs {m.nbytes} bytes, {self.mem_free} "
                        f"of {self.mem_total} free (busy with another model? raise -m or free it)")
        arr = self.cache.lookup(m.digest, m.nbytes, m.name or None, m.part_of, m.part_offset)
        if arr is not None and (arr.nbytes == m.nbytes or held is not None):
            self.held[m.digest] = arr
            self.hits += 1
            return P.OfferReply(digest=m.digest, status="hit")
        if held is not None:
            del self.held[m.digest]
            log.warning("tensor %s… changed on disk after it was verified; fetching it again", m.digest[:16])
        self.misses += 1
        old = uploads.pop(m.digest, None)
        if old is not None:
            self._drop_upload(old)
        try:
            writer = self.cache.begin(m.digest, m.nbytes)
        except CacheError as e:
            raise cache_fail(e, f"the tensor cache cannot take {m.nbytes} bytes") from None
        uploads[m.digest] = Upload(writer, m.nbytes)
        self.reserved += m.nbytes
        return P.OfferReply(digest=m.digest, status="miss")

    def _drop_upload(self, up: Upload) -> None:
        up.writer.abort()
        with self.lock:
            self.reserved -= up.nbytes

    def upload(self, m: P.UploadTensor, payload: memoryview, uploads: dict[str, Upload]) -> P.UploadReply:
        up = uploads.get(m.digest)
        if up is None:
            raise fail(E.UNKNOWN_TENSOR, f"upload of {m.digest[:16]}… without an offer that answered miss")
        if m.offset != up.received or up.received + payload.nbytes > up.nbytes:
            raise fail(E.BAD_UPLOAD, f"chunk at {m.offset} (+{payload.nbytes}) but {up.received} of {up.nbytes} "
                        "bytes were received")
        try:
            up.writer.write(m.offset, payload)
        except CacheError:  # the writer aborted (a full disk): the upload is over, its reservation released
            del uploads[m.digest]
            self._drop_upload(up)
            raise
        up.received += payload.nbytes
        if not m.final:
            return P.UploadReply(digest=m.digest, received=up.received)
        del uploads[m.digest]
        with self.lock:
            self.reserved -= up.nbytes
        if up.received != up.nbytes:
            up.writer.abort()
            raise fail(E.DIGEST_MISMATCH, f"{up.received} bytes uploaded, {up.nbytes} offered")
        try:
            up.writer.commit()
        except DigestMismatch as e:
            raise fail(E.DIGEST_MISMATCH, str(e)) from None
        arr = self.cache.get(m.digest)
        if arr is None:
            raise fail(E.INTERNAL, f"tensor {m.digest[:16]}… vanished from the cache after its upload")
        with self.lock:
            self.held[m.digest] = arr
        return P.UploadReply(digest=m.digest, received=up.received, verified=True)

    # ---- segments -----------------------------------------------------------------------------------------------
    def define(self, m: P.DefineSegment) -> P.DefineReply:
        records = [(r.op, dict(r.args)) for r in m.ops]
        sid = m.segment_id
        with self._define_lock:  # one runner built at a time: what it allocates was charged first
            try:
                program = parse_program(records)
                missing = [n for n, ref in program.tensors.items() if ref[0] not in self.held]
                if missing:
                    raise fail(E.UNKNOWN_TENSOR, f"segment {sid} names {len(missing)} tensors not held here, "
                                f"e.g. {missing[0]}; offer them first")
                kv, host = program_kv_bytes(program), program_host_bytes(program)
                with self.lock:  # a redefinition gives back what the segment it replaces was charged
                    free = self.mem_free + self._kv.get(sid, 0) + self._programs.get(sid, 0)
                if kv + host > free:
                    raise fail(E.OUT_OF_MEMORY, f"segment {sid}: its KV cache for {program.n_ctx} positions "
                                f"({program.cache_type}, {kv} bytes) and its program ({host} bytes) need "
                                f"{kv + host} bytes, {free} of {self.mem_total} free; lower -c, use -ctk q8_0, "
                                "or raise -m")
                with self.lock:
                    self.segments.pop(sid, None)
                    self._kv[sid], self._programs[sid] = kv, host
                runner = SegmentRunner(program, self.held.get, cuda_device=self.cfg.cuda_device)
            except (IkctlError, ValueError, KeyError) as e:  # engine errors about shapes/types are ValueErrors too
                if isinstance(e, P.ProtocolError):  # refused above with its own code, before anything was charged
                    raise
                with self.lock:
                    if sid not in self.segments:
                        self._kv.pop(sid, None)
                        self._programs.pop(sid, None)
                raise fail(E.BAD_PROGRAM, f"segment {sid}: {e}") from None
            with self.lock:  # both again: a Free of everything may have run meanwhile
                self.segments[sid] = runner
                self._kv[sid], self._programs[sid] = runner.kv_accounted_bytes, host
        return P.DefineReply(segment_id=sid, n_ops=len(program.ops))

    def segment(self, segment_id: int | None) -> Any:
        runner = self.segments.get(segment_id) if segment_id is not None else None
        if runner is None:
            raise fail(E.UNKNOWN_SEGMENT, f"segment {segment_id} is not defined here")
        return runner

    def run(self, m: P.RunSegment, payload: memoryview) -> tuple[P.RunReply, list[Any]]:
        """Run a segment for one sequence or several (m.seqs); the caller holds `computing()`."""
        runner = self.segment(m.segment_id)
        seqs = [SeqRun(s.seq_id, s.pos_start, s.n_tokens) for s in m.seqs] or \
            [SeqRun(m.seq_id, m.pos_start, m.n_tokens)]
        arrays = P.unpack_arrays(m.sections, payload)
        state = {spec.name: arr for spec, arr in zip(m.sections, arrays, strict=True)}
        if "n_out" in state:
            state["n_out"] = np.asarray(state["n_out"])
        t0 = time.perf_counter()
        try:
            runner.check_inputs(seqs, state)  # everything from the peer, before anything is sized by it
            self._charge_scratch(runner, m, seqs, state)
            if runner.kv_grows(seqs):  # each sequence's KV rows charged to -m before they grow
                with self.lock:
                    self._kv[m.segment_id] = runner.fit_kv(seqs, self.mem_free)
            with compute_threads(self.threads, m.n_tokens):
                out = runner.run_batch(seqs, state)
        except KVOutOfMemory as e:
            raise fail(E.OUT_OF_MEMORY, f"segment {m.segment_id}: {e}") from None
        except IkctlError as e:  # an unknown sequence, a full context
            if isinstance(e, P.ProtocolError):  # refused above with its own code (no memory for the run)
                raise
            code = E.UNKNOWN_SEQUENCE if isinstance(e, UnknownSequence) else E.BAD_PROGRAM
            raise fail(code, f"segment {m.segment_id}: {e}") from None
        except (KeyError, ValueError, IndexError) as e:
            raise fail(E.BAD_ARRAY, f"segment {m.segment_id}: inputs do not fit its ops ({e!r:.200})") from None
        finally:
            with self.lock:
                self.scratch_over = 0
                if self.segments.get(m.segment_id) is runner:
                    self._kv[m.segment_id] = runner.kv_accounted_bytes
        dt = time.perf_counter() - t0
        self.busy_seconds += dt
        specs, parts = P.pack_arrays(ordered_state(out))
        return P.RunReply(segment_id=m.segment_id, seq_id=m.seq_id, compute_seconds=dt, sections=specs), parts

    def _charge_scratch(self, runner: Any, m: P.RunSegment, seqs: list[SeqRun], state: dict[str, Any]) -> None:
        """Count the run's scratch before it exists (engine.segments.run_scratch_bytes, an upper bound): beyond
        SCRATCH_POOL_BYTES against -m, or OUT_OF_MEMORY. The caller sets scratch_over back to 0 after the run."""
        n_out = state.get("n_out")
        try:
            n_out = int(n_out) if n_out is not None and np.ndim(n_out) == 0 else m.n_tokens
        except (TypeError, ValueError, OverflowError):  # run refuses it
            n_out = m.n_tokens
        need = runner.scratch_bytes(seqs, n_out)
        with self.lock:
            over = max(0, need - SCRATCH_POOL_BYTES)
            if over > self.mem_free:
                where = f"at position {seqs[0].pos_start}" if len(seqs) == 1 else f"in {len(seqs)} sequences"
                raise fail(E.OUT_OF_MEMORY, f"segment {m.segment_id}: a run of {m.n_tokens} tokens {where} needs up "
                           f"to {need} bytes of scratch, {SCRATCH_POOL_BYTES} beyond -m and {over} of -m, which has "
                           f"{self.mem_free} of {self.mem_total} bytes free; send fewer tokens per run (-ub) on the "
                           "coordinator, or raise -m")
            self.scratch_over = over

    def kv(self, m: P.KVOp) -> P.KVReply:
        runners = [self.segment(m.segment_id)] if m.segment_id is not None else list(self.segments.values())
        n = 0
        for r in runners:
            n = max(n, r.kv(m.op, m.seq_id, m.n))
        return P.KVReply(seq_id=m.seq_id, n_tokens=n)

    def free(self, m: P.Free) -> P.FreeReply:
        with self.lock:
            return self._free(m)

    def _free(self, m: P.Free) -> P.FreeReply:
        before = self.bytes_held
        if m.segment_id is not None:
            self.segment(m.segment_id)
            del self.segments[m.segment_id]
            self._kv.pop(m.segment_id, None)
            self._programs.pop(m.segment_id, None)
            freed = 0
        else:
            self.segments.clear()
            self._kv.clear()
            self._programs.clear()
            self.held.clear()
            freed = before
        return P.FreeReply(bytes_freed=freed, tensors_held=len(self.held), bytes_held=self.bytes_held)


class _TimedOut(Exception):
    """The peer was idle, or stalled mid-frame, past the worker's limits; the message says which."""


class Slots:
    """Connections at once: `limit` authenticated sessions, HANDSHAKE_FACTOR times that still in their handshake
    (each holds a thread)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.handshaking = self.sessions = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.handshaking >= HANDSHAKE_FACTOR * self.limit:
                return False
            self.handshaking += 1
            return True

    def promote(self) -> bool:
        """From handshake to session; False (and the connection holds no slot) when the sessions are full."""
        with self._lock:
            self.handshaking -= 1
            if self.sessions >= self.limit:
                return False
            self.sessions += 1
            return True

    def leave(self, state: str) -> None:
        with self._lock:
            if state == "handshake":
                self.handshaking -= 1
            elif state == "session":
                self.sessions -= 1

    def busy_error(self) -> P.ProtocolError:
        return P.ProtocolError(E.BUSY, f"{self.sessions} peers are connected, the most this worker serves at once "
                               f"(its --max-connections {self.limit}); try again when one disconnects", fatal=True)


@dataclass
class _LoadLog:
    """A model load seen on one connection (offers, uploads, segment definitions), logged as one line when done."""

    model: str = ""
    started: float = field(default_factory=time.monotonic)
    offers: int = 0
    hits: int = 0
    uploaded: int = 0
    segments: int = 0
    ops: int = 0

    def line(self, held: int) -> str:
        what = f"model load: {self.model or 'tensors'}" + (f", {self.segments} segments of {self.ops} ops"
                                                         if self.segments else "")
        return (f"{what}, {self.offers} tensors offered ({self.hits} held or cached, {self.offers - self.hits} "
                f"uploaded: {self.uploaded / 2**20:.1f} MiB) in {time.monotonic() - self.started:.2f} s; "
                f"{held / 2**20:.1f} MiB held")


def loggable(text: str, limit: int = 200) -> str:
    """A peer's string as it may appear in a log line: control and other unprintable characters escaped (a
    newline in a model name must not forge a log line of its own), at most `limit` characters kept."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[:limit])
    return out + ("…" if len(text) > limit else "")


class Connection:
    """One peer: handshake, then requests answered in order, on the calling thread.

    Every read has a deadline: the handshake as a whole, the wait for the next request (--idle-timeout), and each
    frame body and upload in progress (--stall-timeout), so a silent or stalled peer releases its thread, its
    connection slot and what it reserved."""

    def __init__(self, worker: Worker, sock: socket.socket, slots: Slots | None = None) -> None:
        self.w, self.sock = worker, sock
        self.slots = slots or Slots(worker.cfg.max_connections)
        peer = sock.getpeername()
        self.peer = f"{peer[0]}:{peer[1]}"
        # spin for the next request only across a network: a peer on this machine needs its cores
        self.poll_s = 0.0 if P.peer_is_loopback(sock) else worker.cfg.poll_ms / 1000
        self.uploads: dict[str, Upload] = {}
        self._upload_progress = 0.0  # monotonic time of the last offer answered miss or chunk received
        self._dropped: set[str] = set()  # digests of uploads dropped as stalled, to say so if they go on
        self._rid = 0  # the request being answered, for error replies
        self._load: _LoadLog | None = None
        self._slot = "handshake"

    def serve(self) -> None:
        P.set_nodelay(self.sock)
        log.info("connection from %s%s", self.peer,
                 f" (between segments it polls up to {self.poll_s * 1e3:g} ms)" if self.poll_s else "")
        try:
            if self._handshake():
                while self._one():
                    pass
        except _TimedOut as e:
            log.warning("connection from %s: %s; closed", self.peer, e)
            with contextlib.suppress(OSError):
                self._send(P.ErrorReply(code=int(E.TIMED_OUT), message=f"{e}; closed", fatal=True), 0)
        except (EOFError, OSError):  # the peer closed (IncompleteReadError is an EOFError) or the server stops
            pass
        except Exception:  # a worker fault must not take the server down
            log.exception("connection from %s dropped after an internal error", self.peer)
        finally:
            self.slots.leave(self._slot)
            self._log_load()
            self._drop_uploads()

    def _drop_uploads(self) -> int:
        n = sum(up.nbytes for up in self.uploads.values())
        for up in self.uploads.values():
            self.w._drop_upload(up)
        self._dropped.update(self.uploads)
        self.uploads.clear()
        return n

    def _drop_stalled_uploads(self) -> None:
        """Uploads that saw no offer or chunk on this connection for --stall-timeout release their reservation."""
        if self.uploads and time.monotonic() - self._upload_progress >= self.w.cfg.stall_timeout_s:
            count = len(self.uploads)
            log.warning("connection from %s: %d uploads stalled for %g s, dropped (%d bytes released)", self.peer,
                        count, self.w.cfg.stall_timeout_s, self._drop_uploads())

    def _log_load(self) -> None:
        if self._load is not None and (self._load.offers or self._load.segments):
            log.info("%s: %s", self.peer, self._load.line(self.w.bytes_held))
        self._load = None

    def _note_load(self, m: P.Message, reply: P.Message, payload_len: int) -> None:
        """Count what a load sends; the first other request ends the load and logs it."""
        if not isinstance(m, P.OfferTensor | P.UploadTensor | P.DefineSegment):
            self._log_load()
            return
        load = self._load = self._load or _LoadLog()
        if isinstance(reply, P.OfferReply):
            load.offers += 1
            load.hits += reply.status == "hit"
        elif isinstance(m, P.UploadTensor):
            load.uploaded += payload_len
        elif isinstance(reply, P.DefineReply):
            load.segments += 1
            load.ops += reply.n_ops
            name = m.ops[0].args.get("model") if m.ops else None
            load.model = loggable(name) if isinstance(name, str) else load.model

    # ---- reading with deadlines ---------------------------------------------------------------------------------
    def _recv_into(self, view: memoryview, deadline: float, what: str) -> None:
        """Fill `view`; _TimedOut when no byte comes for --stall-timeout or the deadline passes."""
        got, n, stall = 0, view.nbytes, self.w.cfg.stall_timeout_s
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _TimedOut(f"{what}: {got} of {n} bytes arrived in time")
            self.sock.settimeout(min(left, stall))
            try:
                k = self.sock.recv_into(view[got:])
            except TimeoutError:
                raise _TimedOut(f"{what}: stalled at {got} of {n} bytes") from None
            if k == 0:
                raise asyncio.IncompleteReadError(b"", n)
            got += k

    def _recv(self, n: int, deadline: float, what: str) -> bytearray:
        buf = bytearray(n)  # n was checked against the limits (and charged, if large) before this is called
        self._recv_into(memoryview(buf), deadline, what)
        return buf

    def _skip(self, n: int, deadline: float, what: str) -> None:
        """Read and discard a body the worker refused, so the stream stays in sync; nothing is kept."""
        scratch = memoryview(bytearray(min(n, SKIP_CHUNK)))
        while n > 0:
            k = min(n, scratch.nbytes)
            self._recv_into(scratch[:k], deadline, what)
            n -= k

    def _next_header(self) -> bytearray:
        """The next request's header; waits up to --idle-timeout for its first byte (dropping this connection's
        uploads once they stall meanwhile), then --stall-timeout for the rest."""
        head = bytearray(P.HEADER_SIZE)
        idle_s, stall_s = self.w.cfg.idle_timeout_s, self.w.cfg.stall_timeout_s
        idle_until = time.monotonic() + idle_s
        while True:
            now = time.monotonic()
            wake = idle_until if not self.uploads else min(idle_until, self._upload_progress + stall_s)
            if now >= idle_until:
                raise _TimedOut(f"no request for {idle_s:g} s (--idle-timeout)")
            self.sock.settimeout(max(wake - now, 0.001))
            try:
                k = self.sock.recv_into(head)
            except TimeoutError:
                self._drop_stalled_uploads()
                continue
            if k == 0:
                raise asyncio.IncompleteReadError(b"", P.HEADER_SIZE)
            break
        self._recv_into(memoryview(head)[k:], time.monotonic() + stall_s, "a frame header")
        return head

    def _read_handshake(self, deadline: float, allowed: Any) -> P.Frame:
        """One small frame before authentication, within the handshake's total deadline."""
        what = f"no handshake within {self.w.cfg.handshake_timeout_s:g} s"
        header = self._parse(self._recv(P.HEADER_SIZE, deadline, what), P.PREAUTH_LIMITS, allowed)
        meta = self._recv(header.meta_len, deadline, what)
        self.w.count_traffic(bytes_in=P.HEADER_SIZE + header.meta_len)
        try:
            return P.decode_body(header, meta, b"", P.PREAUTH_LIMITS)
        except P.ProtocolError as e:
            e.request_id = header.request_id  # type: ignore[attr-defined]
            raise

    def _parse(self, head: bytearray, limits: P.Limits, allowed: Any = None) -> P.Header:
        try:
            return P.parse_header(head, limits, allowed)
        except P.ProtocolError as e:
            e.request_id = 0  # type: ignore[attr-defined]
            raise

    def _read_request(self) -> tuple[P.Frame, int]:
        """One request and the bytes charged to the worker's memory for it (the caller releases them once it is
        answered). Its metadata is decoded and checked before a byte of its payload is stored; a body the worker
        refuses (malformed, or more than its memory has room for) is read past, unkept, and answered."""
        header = self._parse(self._next_header(), P.DEFAULT_LIMITS)
        self._rid = header.request_id  # an error from here on answers this request, not the one before
        self.w.count_traffic(bytes_in=P.HEADER_SIZE)
        if header.payload_len and header.kind not in REQUEST_PAYLOAD_KINDS:
            err = P.ProtocolError(E.BAD_HEADER, f"kind {header.kind:#04x} is not a request with a payload, header "
                                  f"declares {header.payload_len} bytes", fatal=True)
            err.request_id = header.request_id  # type: ignore[attr-defined]
            raise err
        body = header.meta_len + header.payload_len
        deadline = time.monotonic() + self.w.cfg.stall_timeout_s + body / MIN_BODY_RATE
        charged = 0
        try:
            charged = self._charge(header.meta_len * META_EXPANSION, "metadata", header, deadline)
            meta = self._recv(header.meta_len, deadline, "a frame's metadata")
            try:
                message = P.decode_meta(header, meta, P.DEFAULT_LIMITS)
            except P.ProtocolError:
                self._skip(header.payload_len, deadline, "a refused frame's payload")
                raise
            del meta
            if isinstance(message, P.Calibrate):  # bytes for the peer to time its upload with: read past, unkept
                self._skip(header.payload_len, deadline, "a CALIBRATE payload")
                payload: bytes | bytearray | mmap.mmap = b""
            else:
                if not self._covered_by_upload(message, header.payload_len):
                    charged += self._charge(header.payload_len, "a payload", header, deadline,
                                            skip=header.payload_len)
                payload = self._payload_buffer(header.payload_len)
                self._recv_into(memoryview(payload), deadline, f"a {P.Kind(header.kind).name} payload")
        except P.ProtocolError as e:
            self.w.release_receive(charged)
            e.request_id = header.request_id  # type: ignore[attr-defined]
            raise
        except BaseException:
            self.w.release_receive(charged)
            raise
        self.w.count_traffic(bytes_in=body)
        return P.Frame(header, message, memoryview(payload).toreadonly()), charged

    def _charge(self, nbytes: int, what: str, header: P.Header, deadline: float, skip: int | None = None) -> int:
        """Charge a body part to the worker's memory; if it does not fit, read past the body unkept and refuse."""
        if not nbytes:
            return 0
        try:
            self.w.charge_receive(nbytes, what)
        except P.ProtocolError:
            self._skip(header.meta_len + header.payload_len if skip is None else skip, deadline, "a refused frame")
            raise
        return nbytes

    def _covered_by_upload(self, m: P.Message, nbytes: int) -> bool:
        """A chunk of an upload in progress: its bytes are within what the offer reserved (they are not held
        yet), so its buffer needs no charge of its own."""
        up = self.uploads.get(m.digest) if isinstance(m, P.UploadTensor) else None
        return up is not None and m.offset == up.received and up.received + nbytes <= up.nbytes

    @staticmethod
    def _payload_buffer(n: int) -> bytearray | mmap.mmap:
        # bytearray(n) zeroes n bytes at once; an anonymous map gets its pages as the bytes arrive
        return bytearray(n) if n <= MAPPED_PAYLOAD_BYTES else mmap.mmap(-1, n)

    # ---- replies ------------------------------------------------------------------------------------------------
    def _send(self, message: P.Message, request_id: int, payload: P.Payload = b"") -> None:
        # a peer that stops reading its replies must not hold this thread for ever
        self.sock.settimeout(self.w.cfg.stall_timeout_s)
        self.w.count_traffic(bytes_out=P.send_frame(self.sock, message, request_id, payload))

    def _error(self, e: P.ProtocolError) -> bool:
        """Answer an error; whether the connection stays open."""
        self._send(P.error_reply(e), getattr(e, "request_id", self._rid))
        return not e.fatal

    def _handshake(self) -> bool:
        token = self.w.cfg.token
        deadline = time.monotonic() + self.w.cfg.handshake_timeout_s
        try:
            frame = self._read_handshake(deadline, {P.Kind.HELLO})
            hello = frame.message
            if token is None:
                return self._open_session(P.HelloReply(auth_required=False, server="rpcnode"),
                                          frame.header.request_id)
            nonce = P.make_challenge()
            self._send(P.HelloReply(auth_required=True, server="rpcnode", nonce=nonce), frame.header.request_id)
            frame = self._read_handshake(deadline, {P.Kind.AUTH})
            if not isinstance(frame.message, P.Auth) or not P.verify(token, nonce, frame.message.mac, "client"):
                log.warning("connection from %s: authentication failed", self.peer)
                err = P.ProtocolError(E.AUTH_FAILED, "wrong token", fatal=True)
                err.request_id = frame.header.request_id  # type: ignore[attr-defined]
                return self._error(err)
            mac = P.sign(token, hello.nonce, "server") if hello.nonce else b""
            return self._open_session(P.AuthReply(mac=mac), frame.header.request_id)
        except _TimedOut as e:  # before authentication a peer is told nothing
            log.warning("connection from %s: %s, closed", self.peer, str(e).split(":")[0])
            return False
        except P.ProtocolError as e:
            if e.code in (E.BAD_METADATA, E.KIND_MISMATCH, E.UNKNOWN_KIND):
                e.fatal = True  # one try before authentication
            self._error(e)
            return False

    def _open_session(self, reply: P.Message, request_id: int) -> bool:
        """The handshake's last reply, or BUSY when the worker has --max-connections sessions already."""
        self._slot = "session" if self.slots.promote() else "none"
        if self._slot == "none":
            err = self.slots.busy_error()
            log.warning("connection from %s refused: %s", self.peer, err.message)
            err.request_id = request_id  # type: ignore[attr-defined]
            return self._error(err)
        self._send(reply, request_id)
        return True

    def _one(self) -> bool:
        """Read and answer one request; whether to go on."""
        charged = 0
        try:
            frame, charged = self._read_request()
            if isinstance(frame.message, P.OfferTensor | P.UploadTensor):
                self._upload_progress = time.monotonic()
            self._drop_stalled_uploads()  # a peer busy with other requests still loses the uploads it left
            reply, payload = self._dispatch(frame)
            self._note_load(frame.message, reply, frame.header.payload_len)
            self._send(reply, frame.header.request_id, payload)
            if isinstance(reply, P.RunReply):  # mid-generation: the next segment is likely a few ms away
                P.poll_readable(self.sock, self.poll_s)
            return True
        except P.ProtocolError as e:
            return self._error(e)
        except CacheError as e:
            return self._error(cache_fail(e, "tensor cache"))
        except (EOFError, ConnectionError, _TimedOut, TimeoutError):  # the peer is gone or stalled
            raise
        except Exception as e:  # a worker fault costs this request an INTERNAL error, not the connection
            log.exception("request from %s", self.peer)
            return self._error(P.ProtocolError(E.INTERNAL, f"{type(e).__name__}: {e}"))
        finally:
            self.w.release_receive(charged)

    def _dispatch(self, frame: P.Frame) -> tuple[P.Message, Any]:
        m, w = frame.message, self.w
        self._rid = frame.header.request_id
        if isinstance(m, P.RunSegment):
            with w.computing():
                return w.run(m, frame.payload)
        if isinstance(m, P.DefineSegment):
            with w.computing():
                return w.define(m), b""
        if isinstance(m, P.KVOp):
            with w.computing():
                return w.kv(m), b""
        if isinstance(m, P.OfferTensor):
            return w.offer(m, self.uploads), b""
        if isinstance(m, P.UploadTensor):
            if m.digest in self._dropped and m.digest not in self.uploads:
                raise fail(E.TIMED_OUT, f"the upload of {m.digest[:16]}… stalled for over "
                           f"{w.cfg.stall_timeout_s:g} s and was dropped; offer it again")
            return w.upload(m, frame.payload, self.uploads), b""
        handlers = {
            P.DeviceInfoRequest: lambda: w.device_info(),
            P.TelemetryRequest: lambda: w.telemetry(),
            P.Free: lambda: w.free(m),
            P.Calibrate: lambda: w.calibrate(m),
        }
        handler = handlers.get(type(m))
        if handler is None:
            raise fail(E.UNKNOWN_KIND, f"{type(m).__name__} is not a request")
        return handler(), b""
