"""A TCP proxy that holds every chunk for a fixed time in each direction: round-trip latency without netem.

    python benchmarks/delay_proxy.py proxy --forward LISTEN_HOST:PORT=TARGET_HOST:PORT [--forward ...] [--delay-ms D]
    python benchmarks/delay_proxy.py echo --listen HOST:PORT

`proxy` forwards each listening address to its target. Every chunk read from one side is written to the other
`D` ms (one way) after it was read, so a request and its reply gain 2*D; order is kept and large streams flow
(the delay is per chunk, from a timestamp queue, never per connection). The one-way delay can change at runtime:
write `delay <seconds>` on stdin, the proxy answers `ok <seconds>` on stdout. It prints `listening HOST:PORT`
per forward once it accepts connections. `echo` is a small echo server (for ping-pong measurements) that prints
`listening HOST:PORT`. `pingpong()` measures round trips of small messages. Reader and writer are plain threads
with blocking sockets: one wake-up per chunk and no event loop in the path, which adds less jitter than asyncio.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

CHUNK = 256 << 10  # bytes per read
MAX_QUEUED = 64  # chunks held per direction (<= 16 MiB): backpressure when the far side is slower than 1 Gbit/s


def split_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _nodelay(sock: socket.socket) -> None:
    # Each forwarded chunk must leave at once: Nagle would hold a small reply behind an unacknowledged one.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _fine_timers() -> None:
    """Timer slack 1 ns for this process (default 50 us) so that sleeps end when asked (Linux only), and real-time
    priority where allowed (root): the proxy stands for the wire, which needs no CPU, so it must not wait for one
    behind the busy processes it carries traffic for (threads started later inherit the policy)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))


class DelayProxy:
    """Forwards listening sockets to targets, holding each chunk `delay` seconds (one way; settable any time)."""

    def __init__(self, forwards: Sequence[tuple[tuple[str, int], tuple[str, int]]], delay: float = 0.0) -> None:
        self.delay = delay
        self._closed = threading.Event()
        self._listeners: list[tuple[socket.socket, tuple[str, int]]] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        for listen, target in forwards:
            ls = socket.create_server(listen, reuse_port=False)
            self._listeners.append((ls, target))

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [ls.getsockname()[:2] for ls, _ in self._listeners]

    def start(self) -> None:
        for ls, target in self._listeners:
            threading.Thread(target=self._accept, args=(ls, target), daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            for s in [ls for ls, _ in self._listeners] + self._conns:
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self, ls: socket.socket, target: tuple[str, int]) -> None:
        while not self._closed.is_set():
            try:
                a, _ = ls.accept()
            except OSError:
                if self._closed.is_set():
                    return
                continue
            try:
                b = socket.create_connection(target)
            except OSError:
                a.close()  # the target is down: the client sees the connection close at once
                continue
            for s in (a, b):
                _nodelay(s)
            with self._lock:
                self._conns += [a, b]
            self._pipe(a, b)
            self._pipe(b, a)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        link = _Link(src, dst)
        threading.Thread(target=self._read, args=(link,), daemon=True).start()
        threading.Thread(target=self._write, args=(link,), daemon=True).start()

    def _read(self, link: _Link) -> None:
        try:
            while True:
                data = link.src.recv(CHUNK)
                delay = self.delay
                with link.lock:
                    # No hold and nothing queued: send from this thread, saving a thread hand-off (~30 us) per
                    # chunk. Order holds because the writer only sends what was queued before, under the lock.
                    if delay <= 0 and link.pending == 0 and data:
                        link.dst.sendall(data)
                        continue
                    link.pending += 1
                # The deadline is taken when the chunk arrived, so waiting behind a big upload adds no extra hold.
                link.q.put((time.monotonic() + delay, data))
                if not data:
                    return
        except OSError:
            link.q.put((0.0, b""))

    def _write(self, link: _Link) -> None:
        try:
            while True:
                deadline, data = link.q.get()
                wait = deadline - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    link.dst.shutdown(socket.SHUT_WR)
                    return
                with link.lock:
                    link.dst.sendall(data)
                    link.pending -= 1
        except OSError:
            for s in (link.src, link.dst):
                with contextlib.suppress(OSError):
                    s.close()


class _Link:
    """One direction of a proxied connection: the chunks read but not yet written, in arrival order."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.q: queue.Queue[tuple[float, bytes]] = queue.Queue(MAX_QUEUED)
        self.lock = threading.Lock()
        self.pending = 0


def serve_echo(listen: tuple[str, int]) -> None:
    """Echo every byte back on each connection (one thread per connection); prints `listening HOST:PORT`."""
    ls = socket.create_server(listen)
    print("listening {}:{}".format(*ls.getsockname()[:2]), flush=True)

    def echo(c: socket.socket) -> None:
        _nodelay(c)
        with c:
            while data := c.recv(CHUNK):
                c.sendall(data)

    while True:
        c, _ = ls.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()


def pingpong(addr: tuple[str, int], n: int = 300, size: int = 64) -> list[float]:
    """Round-trip times (seconds) of n `size`-byte messages sent one at a time to an echo server."""
    msg = b"p" * size
    times = []
    with socket.create_connection(addr) as s:
        _nodelay(s)
        for k in range(n + 20):
            t0 = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < size:
                got += len(s.recv(size - got))
            if k >= 20:  # the first exchanges warm up the path (connection, threads, caches)
                times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict[str, float]:
    """Median, 10th and 90th percentile in milliseconds."""
    q = statistics.quantiles(times, n=10)
    return {"median_ms": statistics.median(times) * 1e3, "p10_ms": q[0] * 1e3, "p90_ms": q[-1] * 1e3}


class ProxyProcess:
    """`delay_proxy.py proxy` as a child process (its own interpreter: no GIL shared with the caller's compute)."""

    def __init__(self, forwards: Sequence[tuple[str, str]], delay: float = 0.0) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "proxy", "--delay-ms", str(delay * 1e3)]
        for listen, target in forwards:
            cmd += ["--forward", f"{listen}={target}"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.addresses: list[str] = []
        self.delay = delay
        assert self.proc.stdout is not None
        for _ in forwards:
            line = self.proc.stdout.readline()
            if not line.startswith("listening "):
                self.close()
                raise RuntimeError(f"the delay proxy did not start: {line!r}")
            self.addresses.append(line.split()[1])

    def set_delay(self, seconds: float) -> None:
        """The one-way hold for chunks read from now on."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"delay {seconds!r}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer.startswith("ok "):
            raise RuntimeError(f"the delay proxy answered {answer!r}")
        self.delay = seconds

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("proxy")
    pp.add_argument("--forward", action="append", required=True, metavar="LISTEN=TARGET")
    pp.add_argument("--delay-ms", type=float, default=0.0, help="one-way hold per chunk (a round trip gains 2x)")
    pe = sub.add_parser("echo")
    pe.add_argument("--listen", required=True, metavar="HOST:PORT")
    args = p.parse_args(argv)
    _fine_timers()
    if args.cmd == "echo":
        with contextlib.suppress(KeyboardInterrupt):
            serve_echo(split_addr(args.listen))
        return 0
    forwards = [(split_addr(a), split_addr(b)) for a, _, b in (f.partition("=") for f in args.forward)]
    proxy = DelayProxy(forwards, args.delay_ms / 1e3)
    proxy.start()
    for host, port in proxy.addresses:
        print(f"listening {host}:{port}", flush=True)
    try:
        for line in sys.stdin:  # control: `delay <seconds>`; EOF (the parent went away) ends the proxy
            words = line.split()
            if len(words) == 2 and words[0] == "delay":
                proxy.delay = max(0.0, float(words[1]))
                print(f"ok {proxy.delay!r}", flush=True)
            elif words:
                print(f"error: unknown command {line.strip()!r}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
