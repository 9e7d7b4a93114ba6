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
import mmap
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rpcnode import protocol as P
from rpcnode.cache import CacheError
from rpcnode.worker import META_EXPANSION, Config, StartError, Upload, Worker, cache_fail, fail

log = logging.getLogger("rpcnode")
E = P.ErrorCode
LINGER_S = 2.0  # how long a closing connection reads on, unkept, so that the peer can take its last reply

# The kinds a peer may send with a payload (RunReply carries one too, but a worker never asks for it).
REQUEST_PAYLOAD_KINDS = frozenset({P.Kind.UPLOAD_TENSOR, P.Kind.RUN_SEGMENT})
# A frame body may take --stall-timeout plus its size at this rate: slower than any LAN, so only a peer that
# trickles bytes to hold its reservation reaches the deadline.
MIN_BODY_RATE = 1 << 20  # bytes per second
HANDSHAKE_FACTOR = 4  # connections still in their handshake, per --max-connections, before new ones get BUSY
MAPPED_PAYLOAD_BYTES = 1 << 20  # bigger payloads are received into an anonymous map: pages exist once bytes do
SKIP_CHUNK = 1 << 16
REAP_MAX = 256  # connections refused at accept whose reply is still being delivered (see _Reaper)


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


class _Reaper:
    """Connections refused at accept, on the event loop and without a thread: their BUSY reply sent and their
    side ended, what the peer sends (a hello it sent before reading) is read and discarded until it closes, at
    most LINGER_S, because closing on unread input resets the connection under the reply. At most REAP_MAX at
    once; beyond that a refused connection is closed at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.socks: dict[socket.socket, asyncio.TimerHandle] = {}

    def add(self, sock: socket.socket) -> None:
        if len(self.socks) >= REAP_MAX:
            sock.close()
            return
        try:
            sock.shutdown(socket.SHUT_WR)
            self.loop.add_reader(sock, self._drain, sock)
        except OSError:  # the peer is gone already
            sock.close()
            return
        self.socks[sock] = self.loop.call_later(LINGER_S, self._close, sock)

    def _drain(self, sock: socket.socket) -> None:
        try:
            if sock.recv(SKIP_CHUNK):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        handle = self.socks.pop(sock, None)
        if handle is not None:
            handle.cancel()
            self.loop.remove_reader(sock)
            sock.close()

    def close_all(self) -> None:
        for sock in list(self.socks):
            self._close(sock)


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
            close_gently(self.sock)

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
            if not self._covered_by_upload(message, header.payload_len):
                charged += self._charge(header.payload_len, "a payload", header, deadline, skip=header.payload_len)
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
    slots = Slots(cfg.max_connections)

    def run(sock: socket.socket) -> None:
        try:
            Connection(worker, sock, slots).serve()
        finally:
            live.discard(sock)

    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    reaper = _Reaper(loop)
    try:
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as e:  # out of file descriptors, say: keep serving the connections there are
                log.warning("accepting a connection failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            if not slots.enter():  # refused without a thread: one small write the socket buffer takes at once
                log.warning("connection refused: %d peers still in their handshake", slots.handshaking)
                with contextlib.suppress(OSError):
                    sock.send(P.encode_frame(P.error_reply(P.ProtocolError(
                        E.BUSY, f"{slots.handshaking} peers are in their handshake; try again shortly",
                        fatal=True)), 0))
                reaper.add(sock)
                continue
            sock.setblocking(True)
            live.add(sock)
            threading.Thread(target=run, args=(sock,), name=f"rpcnode-conn-{sock.fileno()}", daemon=True).start()
    finally:
        listener.close()
        reaper.close_all()
        for sock in list(live):  # wake the connection threads out of their blocking reads
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
