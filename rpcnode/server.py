"""The rpcnode server: listens, admits connections (BUSY beyond --max-connections) and gives each its thread.

Blocking threads, not an event loop: a decode step is a chain of small round trips, and each hand-off between an
event loop and a compute thread costs a wake-up (0.2-0.5 ms each on a VM, measured), more than the request's own
Python. A connection (rpcnode.worker.Connection) answers its peer's requests on its own thread; the worker's
compute lock keeps segments one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time

from rpcnode import protocol as P
from rpcnode.worker import SKIP_CHUNK, Config, Connection, Slots, StartError, Worker

log = logging.getLogger("rpcnode")
E = P.ErrorCode
LINGER_S = 2.0  # how long a closing connection reads on, unkept, so that the peer can take its last reply
REAP_MAX = 256  # connections refused at accept whose reply is still being delivered (see _Reaper)


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
            close_gently(sock)
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
