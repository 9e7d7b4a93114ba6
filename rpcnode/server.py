"""The rpcnode server: asyncio connections (handshake, then requests in order) to one Worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from rpcnode import protocol as P
from rpcnode.cache import CacheError
from rpcnode.worker import Config, StartError, Upload, Worker, fail

log = logging.getLogger("rpcnode")
E = P.ErrorCode


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


class Connection:
    """One peer: handshake, then requests answered in order."""

    def __init__(self, worker: Worker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.w, self.reader, self.writer = worker, reader, writer
        peer = writer.get_extra_info("peername") or ("?", "?")
        self.peer = f"{peer[0]}:{peer[1]}"
        self.uploads: dict[str, Upload] = {}
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
            raise fail(E.UNKNOWN_KIND, f"{type(m).__name__} is not a request")
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
