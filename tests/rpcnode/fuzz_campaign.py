"""A fuzz campaign against a live worker: mutated requests of recorded sessions (session_fuzz.Mutator), pipelined
in batches over many connections at once, each reply checked (never INTERNAL) and each frame held to a deadline
(a reply, or the worker closing the connection on purpose). The CI test runs a few thousand frames;
benchmarks/fuzz_worker.py runs a million with the worker in a memory cgroup."""

from __future__ import annotations

import contextlib
import random
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine import load_model
from rpcnode import protocol as P
from tests.rpcnode.session_fuzz import Fuzzed, Mutator

SAMPLES = 20  # INTERNAL replies and hangs kept for the report, each
PROMPT = [1, 5, 9, 20, 33]  # the recorded sessions' prompt, and the legitimate client's before and after


def logits_through(model_path: Path, endpoint: str) -> np.ndarray:
    """A legitimate client's logits of PROMPT with every layer on the worker at endpoint."""
    model = load_model(model_path, rpc=endpoint, n_gpu_layers=99, ctx_size=64)
    try:
        return model.logits(PROMPT)
    finally:
        model.net.close()


@dataclass(frozen=True)
class Plan:
    """How hard to push: frames in all, connections at once, frames per batch (sent before reading replies), how
    long a frame may wait for its reply, the worker's --stall-timeout (a frame cut short is answered TIMED_OUT
    after it), and the share of cut frames left open (the rest are followed by closing our side)."""

    frames: int
    connections: int = 8
    max_batch: int = 32
    frames_per_connection: int = 400
    deadline_s: float = 60.0
    stall_s: float = 2.0
    left_open: float = 0.05
    max_seconds: float = float("inf")
    seed: int = 0


@dataclass
class Tally:
    """What a campaign saw; `merge` adds another thread's."""

    frames: int = 0  # frames sent
    replies: int = 0
    connections: int = 0
    closes: int = 0  # connections the worker ended (a fatal reply, a timeout, our side closed mid-frame)
    resets: int = 0  # ... of which with a reset instead of an orderly close
    unanswered: int = 0  # frames sent after one the worker refused fatally: never read, by design
    out_of_order: int = 0  # replies whose request id is not the frame's
    codes: Counter[str] = field(default_factory=Counter)  # reply kinds and error codes
    strategies: Counter[str] = field(default_factory=Counter)
    internal: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    n_internal: int = 0
    n_hangs: int = 0

    def merge(self, other: Tally) -> None:
        for name in ("frames", "replies", "connections", "closes", "resets", "unanswered", "out_of_order",
                     "n_internal", "n_hangs"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.codes.update(other.codes)
        self.strategies.update(other.strategies)
        self.internal.extend(other.internal[: SAMPLES - len(self.internal)])
        self.hangs.extend(other.hangs[: SAMPLES - len(self.hangs)])


def _take_frames(buf: bytearray) -> list[P.Frame]:
    """The complete frames at the start of buf (removed from it)."""
    out = []
    while len(buf) >= P.HEADER_SIZE:
        h = P.parse_header(bytes(buf[:P.HEADER_SIZE]))
        end = P.HEADER_SIZE + h.meta_len + h.payload_len
        if len(buf) < end:
            break
        out.append(P.decode_body(h, bytes(buf[P.HEADER_SIZE:P.HEADER_SIZE + h.meta_len]),
                                 bytes(buf[P.HEADER_SIZE + h.meta_len:end])))
        del buf[:end]
    return out


@dataclass
class _Pumped:
    replies: list[P.Frame]
    eof: bool = False
    reset: bool = False
    late: bool = False  # the deadline passed first


def pump(sock: socket.socket, data: bytes, done: Callable[[list[P.Frame]], bool], deadline: float,
         shut: bool) -> _Pumped:
    """Send data (then end our side, if `shut`) while reading replies, until `done(replies)`, the worker closes,
    or the deadline; reading as we send, so neither side blocks on a full socket buffer."""
    view, pos, buf = memoryview(data), 0, bytearray()
    out = _Pumped([])
    while True:
        if pos == len(data) and shut:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            shut = False
        left = deadline - time.monotonic()
        if left <= 0:
            out.late = True
            return out
        readable, writable, _ = select.select([sock], [sock] if pos < len(data) else [], [], left)
        if writable:
            try:
                pos += sock.send(view[pos:pos + (1 << 20)])
            except BlockingIOError:
                pass
            except OSError:  # the worker closed (after a fatal reply): read what it said
                pos = len(data)
        if readable:
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                out.reset = True
                return out
            if not chunk:
                out.eof = True
                return out
            buf += chunk
            out.replies.extend(_take_frames(buf))
            if done(out.replies):
                return out


def _describe(f: Fuzzed) -> str:
    return f"{f.strategy}: {f.data[:160].hex()}{'…' if len(f.data) > 160 else ''} ({len(f.data)} bytes)"


class _Runner:
    """One thread's connections, one after another, until the campaign has sent its frames."""

    def __init__(self, endpoint: str, mutator: Mutator, plan: Plan, shared: _Shared, seed: int) -> None:
        self.endpoint, self.plan, self.shared = endpoint, plan, shared
        self.mut = mutator.fork(seed)
        self.rng = random.Random(seed)
        self.tally = Tally()

    def run(self) -> None:
        while self.shared.claim(0):
            self.connection()

    def connection(self) -> None:
        host, _, port = self.endpoint.rpartition(":")
        plan, t = self.plan, self.tally
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=plan.deadline_s)
        except OSError as e:
            t.codes[f"connect failed: {type(e).__name__}"] += 1
            if isinstance(e, ConnectionRefusedError):  # the worker is gone: the campaign is over
                self.shared.stop()
            time.sleep(0.1)
            return
        with sock:
            t.connections += 1
            sock.sendall(P.encode_frame(P.Hello(client="fuzz"), 1))
            try:
                hello = P.recv_frame(sock).message
            except (OSError, EOFError, P.ProtocolError) as e:
                t.n_hangs += isinstance(e, TimeoutError)
                t.codes[f"handshake: {type(e).__name__}"] += 1
                return
            if isinstance(hello, P.ErrorReply):  # BUSY: connections still closing hold their slots a moment
                t.codes[P.ErrorCode(hello.code).name] += 1
                time.sleep(0.05)
                return
            sock.setblocking(False)
            budget = self.rng.randint(1, 2 * plan.frames_per_connection)
            while budget > 0:
                batch: list[Fuzzed] = []
                size = self.rng.randint(1, plan.max_batch)
                while len(batch) < size and batch[-1:] == [f for f in batch[-1:] if f.framed]:
                    batch.extend(self.mut.bundle())
                if not self.shared.claim(len(batch)):
                    return
                budget -= len(batch)
                if not self.exchange(sock, batch):
                    return

    def exchange(self, sock: socket.socket, batch: list[Fuzzed]) -> bool:
        """Send a batch pipelined and check its replies; whether the connection can go on."""
        plan, t = self.plan, self.tally
        t.frames += len(batch)
        t.strategies.update(f.strategy for f in batch)
        framed = batch[-1].framed
        owed = len(batch) if framed else len(batch) - 1
        left_open = not framed and self.rng.random() < plan.left_open
        if left_open:  # nothing more comes: the worker must answer, or time the frame out, within --stall-timeout
            deadline = time.monotonic() + plan.stall_s + plan.deadline_s / 4
            done: Callable[[list[P.Frame]], bool] = lambda rs: len(rs) > owed or _fatal(rs)  # noqa: E731
        elif framed:
            deadline = time.monotonic() + plan.deadline_s
            done = lambda rs: len(rs) >= owed or _fatal(rs)  # noqa: E731
        else:  # our side ends after the cut frame: the worker must close the connection
            deadline = time.monotonic() + plan.deadline_s
            done = lambda rs: False  # noqa: E731
        got = pump(sock, b"".join(f.data for f in batch), done, deadline, shut=not framed and not left_open)
        t.replies += len(got.replies)
        for i, reply in enumerate(got.replies):
            m = reply.message
            t.codes[P.ErrorCode(m.code).name if isinstance(m, P.ErrorReply) else type(m).__name__] += 1
            fatal = isinstance(m, P.ErrorReply) and m.fatal  # header refusals answer request id 0
            if i < owed and not fatal and reply.header.request_id != P.HEADER.unpack_from(batch[i].data)[5]:
                t.out_of_order += 1
            if isinstance(m, P.ErrorReply) and m.code == P.ErrorCode.INTERNAL:
                t.n_internal += 1
                if len(t.internal) < SAMPLES:
                    t.internal.append(f"{m.message[:300]} <- {_describe(batch[min(i, len(batch) - 1)])}")
        if _fatal(got.replies) or got.eof or got.reset:
            t.closes += 1
            t.resets += got.reset
            t.unanswered += max(0, owed - len(got.replies))
            return False
        if got.late:  # neither a reply nor a close in time
            t.n_hangs += 1
            if len(t.hangs) < SAMPLES:
                first = batch[min(len(got.replies), len(batch) - 1)]
                t.hangs.append(f"{len(got.replies)} of {owed} replies in time; first unanswered {_describe(first)}")
            return False
        return framed


def _fatal(replies: list[P.Frame]) -> bool:
    return bool(replies) and isinstance(replies[-1].message, P.ErrorReply) and replies[-1].message.fatal


class _Shared:
    """Frames claimed by the runners so far, against the campaign's total and its time limit."""

    def __init__(self, plan: Plan, progress: Callable[[int], None] | None) -> None:
        self.plan, self.progress = plan, progress
        self.claimed = 0
        self.until = time.monotonic() + plan.max_seconds
        self._lock = threading.Lock()
        self._next_report = 0

    def stop(self) -> None:
        self.until = 0.0

    def claim(self, n: int) -> bool:
        with self._lock:
            if self.claimed >= self.plan.frames or time.monotonic() >= self.until:
                return False
            self.claimed += n
            if self.progress is not None and self.claimed >= self._next_report:
                self._next_report = self.claimed + max(self.plan.frames // 100, 1000)
                self.progress(self.claimed)
            return True


def run_campaign(endpoint: str, mutator: Mutator, plan: Plan,
                 progress: Callable[[int], None] | None = None) -> Tally:
    """Send plan.frames mutated frames to the worker over plan.connections connections at once (each thread
    opens one after another); what came back."""
    shared = _Shared(plan, progress)
    runners = [_Runner(endpoint, mutator, plan, shared, plan.seed * 1000 + i) for i in range(plan.connections)]
    threads = [threading.Thread(target=r.run, name=f"fuzz-{i}", daemon=True) for i, r in enumerate(runners)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    total = Tally()
    for r in runners:
        total.merge(r.tally)
    return total

