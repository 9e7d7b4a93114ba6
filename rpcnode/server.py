"""The rpcnode server: a thread per connection (handshake, then requests in order) over one Worker.

Blocking threads, not an event loop: a decode step is a chain of small round trips, and each hand-off between an
event loop and a compute thread costs a wake-up (0.2-0.5 ms each on a VM, measured), more than the request's own
Python. The connection that asks for a segment runs it on its own thread; the worker's compute lock keeps
segments one at a time. Between a segment and the next request from a peer on another machine, the thread
spins briefly on the socket (see protocol.poll_readable and --poll).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rpcnode import protocol as P
from rpcnode.cache import CacheError
from rpcnode.worker import Config, StartError, Upload, Worker, cache_fail, fail

log = logging.getLogger("rpcnode")
E = P.ErrorCode
LINGER_S = 2.0  # how long a closing connection reads on, unkept, so that the peer can take its last reply


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


def close_gently(sock: socket.socket, linger_s: float = LINGER_S) -> None:
    """Close a connection so that the peer gets its last reply: closing with unread input makes the kernel send
    a reset, which makes the peer's send fail and can destroy the reply (the error saying why) before it is
    read. So: end our side (FIN after the reply), read and discard until the peer closes too, at most linger_s."""
    with contextlib.suppress(OSError):  # TimeoutError included: a peer that keeps sending gets the reset after all
        sock.shutdown(socket.SHUT_WR)
        deadline, scratch = time.monotonic() + linger_s, bytearray(1 << 16)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv_into(scratch):
                break
    sock.close()


class Connection:
    """One peer: handshake, then requests answered in order, on the calling thread."""

    def __init__(self, worker: Worker, sock: socket.socket) -> None:
        self.w, self.sock = worker, sock
        peer = sock.getpeername()
        self.peer = f"{peer[0]}:{peer[1]}"
        # spin for the next request only across a network: a peer on this machine needs its cores
        self.poll_s = 0.0 if P.peer_is_loopback(sock) else worker.cfg.poll_ms / 1000
        self.uploads: dict[str, Upload] = {}
        self._rid = 0  # the request being answered, for error replies
        self._load: _LoadLog | None = None
        self._handshake_lock, self._handshake_over = threading.Lock(), False

    def serve(self) -> None:
        P.set_nodelay(self.sock)
        log.info("connection from %s%s", self.peer,
                 f" (between segments it polls up to {self.poll_s * 1e3:g} ms)" if self.poll_s else "")
        # a connection that never authenticates must not hold a thread for ever (a total deadline, not one per
        # read, which a peer sending a byte at a time would stretch)
        deadline = threading.Timer(self.w.cfg.handshake_timeout_s, self._handshake_too_slow)
        deadline.start()
        try:
            authenticated = self._handshake()
            with self._handshake_lock:
                self._handshake_over = True
            deadline.cancel()
            while authenticated and self._one():
                pass
        except (EOFError, OSError):  # the peer closed (IncompleteReadError is an EOFError) or the server stops
            pass
        except Exception:  # a worker fault must not take the server down
            log.exception("connection from %s dropped after an internal error", self.peer)
        finally:
            deadline.cancel()
            self._log_load()
            for up in self.uploads.values():
                self.w._drop_upload(up)
            self.uploads.clear()
            close_gently(self.sock)

    def _handshake_too_slow(self) -> None:
        with self._handshake_lock:
            if self._handshake_over:  # it finished just as the timer fired
                return
            log.warning("connection from %s: no handshake within %g s, closed", self.peer,
                        self.w.cfg.handshake_timeout_s)
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns: EOF

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

    def _read(self, limits: P.Limits, allowed: Any = None) -> P.Frame:
        """One frame; a decode error is raised as ProtocolError carrying the request id (0 before the header)."""
        head = P.recv_exactly(self.sock, P.HEADER_SIZE)
        self.w.count_traffic(bytes_in=P.HEADER_SIZE)
        try:
            header = P.parse_header(head, limits, allowed)
        except P.ProtocolError as e:
            e.request_id = 0  # type: ignore[attr-defined]
            raise
        meta = P.recv_exactly(self.sock, header.meta_len)
        payload = P.recv_exactly(self.sock, header.payload_len)
        self.w.count_traffic(bytes_in=header.meta_len + header.payload_len)
        try:
            return P.decode_body(header, meta, payload, limits)
        except P.ProtocolError as e:
            e.request_id = header.request_id  # type: ignore[attr-defined]
            raise

    def _send(self, message: P.Message, request_id: int, payload: P.Payload = b"") -> None:
        self.w.count_traffic(bytes_out=P.send_frame(self.sock, message, request_id, payload))

    def _error(self, e: P.ProtocolError) -> bool:
        """Answer an error; whether the connection stays open."""
        self._send(P.error_reply(e), getattr(e, "request_id", self._rid))
        return not e.fatal

    def _handshake(self) -> bool:
        token = self.w.cfg.token
        try:
            frame = self._read(P.PREAUTH_LIMITS, {P.Kind.HELLO})
            hello = frame.message
            nonce = P.make_challenge() if token else b""
            self._send(P.HelloReply(auth_required=token is not None, server="rpcnode", nonce=nonce),
                       frame.header.request_id)
            if token is None:
                return True
            frame = self._read(P.PREAUTH_LIMITS, {P.Kind.AUTH})
            if not isinstance(frame.message, P.Auth) or not P.verify(token, nonce, frame.message.mac, "client"):
                log.warning("connection from %s: authentication failed", self.peer)
                err = P.ProtocolError(E.AUTH_FAILED, "wrong token", fatal=True)
                err.request_id = frame.header.request_id  # type: ignore[attr-defined]
                return self._error(err)
            mac = P.sign(token, hello.nonce, "server") if hello.nonce else b""
            self._send(P.AuthReply(mac=mac), frame.header.request_id)
            return True
        except P.ProtocolError as e:
            if e.code in (E.BAD_METADATA, E.KIND_MISMATCH, E.UNKNOWN_KIND):
                e.fatal = True  # one try before authentication
            self._error(e)
            return False

    def _one(self) -> bool:
        """Read and answer one request; whether to go on."""
        try:
            frame = self._read(P.DEFAULT_LIMITS)
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
        except (EOFError, ConnectionError):  # the peer is gone; other OSErrors (a full disk) are answered below
            raise
        except Exception as e:  # a worker fault costs this request an INTERNAL error, not the connection
            log.exception("request from %s", self.peer)
            return self._error(P.ProtocolError(E.INTERNAL, f"{type(e).__name__}: {e}"))

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
            return w.upload(m, frame.payload, self.uploads), b""
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
    """Listen until cancelled, a thread per connection; logs the bound address (port 0 picks a free one)."""
    try:
        worker = Worker(cfg)
    except OSError as e:  # the cache dir (or a --models dir) is unusable: not a listening problem
        where = f"{e.filename}: " if e.filename else ""
        raise StartError(f"cannot use {where}{e.strerror or e}") from None
    infos = await asyncio.get_running_loop().getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    listener = socket.create_server(addr[:2], family=family, backlog=64)
    host, port = listener.getsockname()[:2]
    log.info("listening on %s:%d (device %s, %d threads, memory %d bytes, cache %s, auth %s)", host, port,
             worker.device, worker.threads, worker.mem_total, worker.cache.root, "on" if cfg.token else "off")
    if ready is not None:
        ready.set_result((host, port))
    live: set[socket.socket] = set()

    def run(sock: socket.socket) -> None:
        try:
            Connection(worker, sock).serve()
        finally:
            live.discard(sock)

    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as e:  # out of file descriptors, say: keep serving the connections there are
                log.warning("accepting a connection failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(True)
            live.add(sock)
            threading.Thread(target=run, args=(sock,), name=f"rpcnode-conn-{sock.fileno()}", daemon=True).start()
    finally:
        listener.close()
        for sock in list(live):  # wake the connection threads out of their blocking reads
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
