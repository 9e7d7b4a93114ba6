"""The rpcnode worker's state: the device it owns, held tensors, segment programs and KV caches, its counters.

Requests reach it through rpcnode.server's connections, each on its own thread; computation (defining, running
and clearing segments) holds the compute lock, so it runs one request at a time.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from engine import kernels
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
                   - self.scratch_over)

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
        arr = self.cache.lookup(m.digest, m.nbytes, m.name or None)
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
