"""The rpcnode worker: an asyncio server owning one device, its tensors, segment programs and KV caches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from rpcnode import protocol as P
from rpcnode.cache import CacheError, DigestMismatch, TensorCache, Writer
from rpcnode.model_index import ModelIndex

log = logging.getLogger("rpcnode")
E = P.ErrorCode


def _fail(code: P.ErrorCode, message: str) -> P.ProtocolError:
    return P.ProtocolError(code, message)


@dataclass
class _Upload:
    writer: Writer
    nbytes: int
    received: int = 0


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


def _gpu(index: int) -> Any:
    """engine.cuda.devices.CudaDevice `index`; CudaUnavailable (an IkctlError) without CuPy or that GPU."""
    from engine.cuda import CudaUnavailable, require
    from engine.cuda.devices import list_devices

    require(index)
    found = [d for d in list_devices() if d.index == index]
    if not found:
        raise CudaUnavailable(f"no CUDA device {index}")
    return found[0]


class StartError(Exception):
    """The worker cannot start (before it listens); the message is its one-line reason."""


class Worker:
    """State shared by all connections: held tensors, segments, counters; compute runs on one executor thread."""

    def __init__(self, cfg: Config) -> None:
        from engine.synth import cache_dir

        self.cfg = cfg
        root = cfg.cache_dir or cache_dir() / "rpcnode-cache"
        index = ModelIndex(cfg.models, root / "local-models.json") if cfg.models else None
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
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rpcnode-compute")
        # offers and uploads run on I/O threads (hashing and disk writes must not stall telemetry); this guards
        # the tensor bookkeeping they share
        self.lock = threading.RLock()
        self.compute.submit(self._init_compute_thread)

    def _init_compute_thread(self) -> None:
        # import the engine (and its compiled kernels) now, not during the first model load
        import engine.segments  # noqa: F401
        from engine import kernels

        kernels.set_threads(self.threads)
        if self.gpu is not None:  # compile the CUDA kernels now (NVRTC takes seconds; CuPy caches them on disk)
            from engine.cuda import kernels as cuda_kernels

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
        import cupy

        with cupy.cuda.Device(self.gpu.index):
            free, total = cupy.cuda.runtime.memGetInfo()
        return int(total), int(free)

    @property
    def bytes_held(self) -> int:
        return sum(a.nbytes for a in self.held.values())

    @property
    def kv_bytes(self) -> int:
        return sum(r.kv_accounted_bytes for r in self.segments.values())

    @property
    def mem_free(self) -> int:
        return max(0, self.mem_total - self.bytes_held - self.reserved - self.kv_bytes)

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
    def offer(self, m: P.OfferTensor, uploads: dict[str, _Upload]) -> P.OfferReply:
        with self.lock:
            return self._offer(m, uploads)

    def _offer(self, m: P.OfferTensor, uploads: dict[str, _Upload]) -> P.OfferReply:
        if m.digest in self.held:
            self.hits += 1
            return P.OfferReply(digest=m.digest, status="hit")
        if m.nbytes > self.mem_free:
            raise _fail(E.OUT_OF_MEMORY, f"tensor {m.name or m.digest[:16]} needs {m.nbytes} bytes, {self.mem_free} "
                        f"of {self.mem_total} free (busy with another model? raise -m or free it)")
        arr = self.cache.lookup(m.digest, m.nbytes, m.name or None)
        if arr is not None and arr.nbytes == m.nbytes:
            self.held[m.digest] = arr
            self.hits += 1
            return P.OfferReply(digest=m.digest, status="hit")
        self.misses += 1
        old = uploads.pop(m.digest, None)
        if old is not None:
            self._drop_upload(old)
        try:
            writer = self.cache.begin(m.digest, m.nbytes)
        except CacheError as e:
            raise _fail(E.OUT_OF_MEMORY, f"the tensor cache cannot take {m.nbytes} bytes: {e}") from None
        uploads[m.digest] = _Upload(writer, m.nbytes)
        self.reserved += m.nbytes
        return P.OfferReply(digest=m.digest, status="miss")

    def _drop_upload(self, up: _Upload) -> None:
        up.writer.abort()
        with self.lock:
            self.reserved -= up.nbytes

    def upload(self, m: P.UploadTensor, payload: memoryview, uploads: dict[str, _Upload]) -> P.UploadReply:
        up = uploads.get(m.digest)
        if up is None:
            raise _fail(E.UNKNOWN_TENSOR, f"upload of {m.digest[:16]}… without an offer that answered miss")
        if m.offset != up.received or up.received + payload.nbytes > up.nbytes:
            raise _fail(E.BAD_UPLOAD, f"chunk at {m.offset} (+{payload.nbytes}) but {up.received} of {up.nbytes} "
                        "bytes were received")
        up.writer.write(m.offset, payload)
        up.received += payload.nbytes
        if not m.final:
            return P.UploadReply(digest=m.digest, received=up.received)
        del uploads[m.digest]
        with self.lock:
            self.reserved -= up.nbytes
        if up.received != up.nbytes:
            up.writer.abort()
            raise _fail(E.DIGEST_MISMATCH, f"{up.received} bytes uploaded, {up.nbytes} offered")
        try:
            up.writer.commit()
        except DigestMismatch as e:
            raise _fail(E.DIGEST_MISMATCH, str(e)) from None
        arr = self.cache.get(m.digest)
        if arr is None:
            raise _fail(E.INTERNAL, f"tensor {m.digest[:16]}… vanished from the cache after its upload")
        with self.lock:
            self.held[m.digest] = arr
        return P.UploadReply(digest=m.digest, received=up.received, verified=True)

    # ---- segments -----------------------------------------------------------------------------------------------
    def define(self, m: P.DefineSegment) -> P.DefineReply:
        from engine.errors import IkctlError
        from engine.segments import SegmentRunner, parse_program

        records = [(r.op, dict(r.args)) for r in m.ops]
        try:
            program = parse_program(records)
            missing = [n for n, ref in program.tensors.items() if ref[0] not in self.held]
            if missing:
                raise _fail(E.UNKNOWN_TENSOR, f"segment {m.segment_id} names {len(missing)} tensors not held here, "
                            f"e.g. {missing[0]}; offer them first")
            runner = SegmentRunner(program, self.held.get, cuda_device=self.cfg.cuda_device)
        except (IkctlError, ValueError, KeyError) as e:  # engine errors about shapes/types are ValueErrors too
            raise _fail(E.BAD_PROGRAM, f"segment {m.segment_id}: {e}") from None
        with self.lock:
            old = self.segments.pop(m.segment_id, None)
            if runner.kv_reserved_bytes > self.mem_free:
                if old is not None:
                    self.segments[m.segment_id] = old
                raise _fail(E.OUT_OF_MEMORY, f"segment {m.segment_id}: its KV cache for {program.n_ctx} positions "
                            f"({program.cache_type}) needs {runner.kv_reserved_bytes} bytes, {self.mem_free} of "
                            f"{self.mem_total} free; lower -c, use -ctk q8_0, or raise -m")
            self.segments[m.segment_id] = runner
        return P.DefineReply(segment_id=m.segment_id, n_ops=len(program.ops))

    def segment(self, segment_id: int | None) -> Any:
        runner = self.segments.get(segment_id) if segment_id is not None else None
        if runner is None:
            raise _fail(E.UNKNOWN_SEGMENT, f"segment {segment_id} is not defined here")
        return runner

    def run(self, m: P.RunSegment, payload: memoryview) -> tuple[P.RunReply, list[Any]]:
        """Runs on the compute thread."""
        from engine.errors import IkctlError
        from engine.segments import ProgramError, ordered_state
        from engine.threads import compute_threads

        runner = self.segment(m.segment_id)
        arrays = P.unpack_arrays(m.sections, payload)
        state = {spec.name: arr for spec, arr in zip(m.sections, arrays, strict=True)}
        if "n_out" in state:
            state["n_out"] = np.asarray(state["n_out"])
        t0 = time.perf_counter()
        try:
            with compute_threads(self.threads, m.n_tokens):
                out = runner.run(m.seq_id, m.pos_start, m.n_tokens, state)
        except IkctlError as e:  # an unknown sequence, a full context
            code = E.UNKNOWN_SEQUENCE if isinstance(e, ProgramError) and "sequence" in str(e) else E.BAD_PROGRAM
            raise _fail(code, f"segment {m.segment_id}: {e}") from None
        except (KeyError, ValueError, IndexError) as e:
            raise _fail(E.BAD_ARRAY, f"segment {m.segment_id}: inputs do not fit its ops ({e!r:.200})") from None
        dt = time.perf_counter() - t0
        self.busy_seconds += dt
        specs, parts = P.pack_arrays(ordered_state(out))
        return P.RunReply(segment_id=m.segment_id, seq_id=m.seq_id, compute_seconds=dt, sections=specs), parts

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
            freed = 0
        else:
            self.segments.clear()
            self.held.clear()
            freed = before
        return P.FreeReply(bytes_freed=freed, tensors_held=len(self.held), bytes_held=self.bytes_held)


class Connection:
    """One peer: handshake, then requests answered in order."""

    def __init__(self, worker: Worker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.w, self.reader, self.writer = worker, reader, writer
        peer = writer.get_extra_info("peername") or ("?", "?")
        self.peer = f"{peer[0]}:{peer[1]}"
        self.uploads: dict[str, _Upload] = {}
        self._rid = 0  # the request being answered, for error replies
        self._load: _LoadLog | None = None

    async def serve(self) -> None:
        P.set_nodelay(self.writer)
        log.info("connection from %s", self.peer)
        try:
            if await self._handshake():
                while await self._one():
                    pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:  # a worker fault must not take the server down
            log.exception("connection from %s dropped after an internal error", self.peer)
        finally:
            self._log_load()
            for up in self.uploads.values():
                self.w._drop_upload(up)
            self.uploads.clear()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

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
            load.model = name if isinstance(name, str) else load.model

    async def _read(self, limits: P.Limits, allowed: Any = None) -> P.Frame:
        """One frame; a non-fatal decode error is answered here and None... raised as ProtocolError with the id."""
        head = await self.reader.readexactly(P.HEADER_SIZE)
        self.w.bytes_in += P.HEADER_SIZE
        try:
            header = P.parse_header(head, limits, allowed)
        except P.ProtocolError as e:
            e.request_id = 0  # type: ignore[attr-defined]
            raise
        meta = await self.reader.readexactly(header.meta_len)
        payload = await self.reader.readexactly(header.payload_len)
        self.w.bytes_in += header.meta_len + header.payload_len
        try:
            return P.decode_body(header, meta, payload, limits)
        except P.ProtocolError as e:
            e.request_id = header.request_id  # type: ignore[attr-defined]
            raise

    async def _send(self, message: P.Message, request_id: int, payload: P.Payload = b"") -> None:
        parts = P.encode_frame_parts(message, request_id, payload)
        self.w.bytes_out += sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts)
        self.writer.writelines(parts)
        await self.writer.drain()

    async def _error(self, e: P.ProtocolError) -> bool:
        """Answer an error; whether the connection stays open."""
        await self._send(P.error_reply(e), getattr(e, "request_id", self._rid))
        return not e.fatal

    async def _handshake(self) -> bool:
        token = self.w.cfg.token
        try:
            frame = await self._read(P.PREAUTH_LIMITS, {P.Kind.HELLO})
            hello = frame.message
            nonce = P.make_challenge() if token else b""
            await self._send(P.HelloReply(auth_required=token is not None, server="rpcnode", nonce=nonce),
                             frame.header.request_id)
            if token is None:
                return True
            frame = await self._read(P.PREAUTH_LIMITS, {P.Kind.AUTH})
            if not isinstance(frame.message, P.Auth) or not P.verify(token, nonce, frame.message.mac, "client"):
                log.warning("connection from %s: authentication failed", self.peer)
                err = P.ProtocolError(E.AUTH_FAILED, "wrong token", fatal=True)
                err.request_id = frame.header.request_id  # type: ignore[attr-defined]
                return await self._error(err)
            mac = P.sign(token, hello.nonce, "server") if hello.nonce else b""
            await self._send(P.AuthReply(mac=mac), frame.header.request_id)
            return True
        except P.ProtocolError as e:
            if e.code in (E.BAD_METADATA, E.KIND_MISMATCH, E.UNKNOWN_KIND):
                e.fatal = True  # one try before authentication
            await self._error(e)
            return False

    async def _one(self) -> bool:
        """Read and answer one request; whether to go on."""
        try:
            frame = await self._read(P.DEFAULT_LIMITS)
            reply, payload = await self._dispatch(frame)
            self._note_load(frame.message, reply, frame.header.payload_len)
            await self._send(reply, frame.header.request_id, payload)
            return True
        except P.ProtocolError as e:
            return await self._error(e)
        except CacheError as e:
            return await self._error(P.ProtocolError(E.OUT_OF_MEMORY, f"tensor cache: {e}"))
        except (asyncio.IncompleteReadError, ConnectionError):
            raise
        except Exception as e:  # a worker fault costs this request an INTERNAL error, not the connection
            log.exception("request from %s", self.peer)
            return await self._error(P.ProtocolError(E.INTERNAL, f"{type(e).__name__}: {e}"))

    async def _dispatch(self, frame: P.Frame) -> tuple[P.Message, Any]:
        m, w = frame.message, self.w
        self._rid = frame.header.request_id
        loop = asyncio.get_running_loop()
        if isinstance(m, P.RunSegment):
            # Every computation runs on the one compute thread: a second thread running numba's parallel kernels
            # would give OpenMP a second team, and more threads than cores makes it sleep between regions
            # (~200 context switches per decoded token, 0.7x local on 2 cores instead of ~1x).
            return await loop.run_in_executor(w.compute, w.run, m, frame.payload)
        if isinstance(m, P.DefineSegment):
            return await loop.run_in_executor(w.compute, w.define, m), b""
        if isinstance(m, P.KVOp):
            return await loop.run_in_executor(w.compute, w.kv, m), b""
        if isinstance(m, P.OfferTensor):
            return await asyncio.get_running_loop().run_in_executor(None, w.offer, m, self.uploads), b""
        if isinstance(m, P.UploadTensor):
            return await asyncio.get_running_loop().run_in_executor(None, w.upload, m, frame.payload,
                                                                    self.uploads), b""
        handlers = {
            P.DeviceInfoRequest: lambda: w.device_info(),
            P.TelemetryRequest: lambda: w.telemetry(),
            P.Free: lambda: w.free(m),
        }
        handler = handlers.get(type(m))
        if handler is None:
            raise _fail(E.UNKNOWN_KIND, f"{type(m).__name__} is not a request")
        return handler(), b""


async def serve(cfg: Config, ready: asyncio.Future[tuple[str, int]] | None = None) -> None:
    """Listen until cancelled; logs the bound address (port 0 picks a free one)."""
    try:
        worker = Worker(cfg)
    except OSError as e:  # the cache dir (or a --models dir) is unusable: not a listening problem
        where = f"{e.filename}: " if e.filename else ""
        raise StartError(f"cannot use {where}{e.strerror or e}") from None

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Connection(worker, reader, writer).serve()

    server = await asyncio.start_server(on_connect, cfg.host, cfg.port, limit=1 << 20)
    host, port = server.sockets[0].getsockname()[:2]
    log.info("listening on %s:%d (device %s, %d threads, memory %d bytes, cache %s, auth %s)", host, port,
             worker.device, worker.threads, worker.mem_total, worker.cache.root, "on" if cfg.token else "off")
    if ready is not None:
        ready.set_result((host, port))
    async with server:
        await server.serve_forever()
