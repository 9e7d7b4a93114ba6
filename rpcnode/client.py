"""A small blocking client of one rpcnode worker: auth, tensors by digest, segment programs, runs, KV, telemetry."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rpcnode import protocol as P
from rpcnode.endpoint import Endpoint
from rpcnode.errors import IkctlError
from rpcnode.protocol import rpc_device

CHUNK_BYTES = 16 << 20  # upload chunk size (the protocol's recommendation)
CONNECT_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 600.0  # a long prefill on a slow worker may take minutes; a dead worker shows as EOF at once
# A frozen worker (SIGSTOP, a host gone without a reset) keeps its connection open and silent. A reply later than
# its patience (REPLY_FLOOR_S, or DEADLINE_FACTOR x what the worker's runs took so far, if more) sends a liveness
# probe on a second connection: a worker that answers is busy (a long prefill, compiling kernels) and is waited
# for; one that does not answer within PROBE_TIMEOUT_S is named as frozen.
REPLY_FLOOR_S = 10.0
PROBE_TIMEOUT_S = 20.0
DEADLINE_FACTOR = 10.0
# A calibration measures each type for about 0.15 s, after compiling or loading its kernel (seconds, once).
CALIBRATE_TIMEOUT_S = 600.0
# measure_link: an upload time this close to the round trip is below what the clock and the scheduler resolve;
# such a link is reported at LINK_FLOOR_BPS (faster than any LAN) instead of a quotient of noise.
LINK_RESOLUTION_S = 50e-6
LINK_FLOOR_BPS = 1e11


class RPCError(IkctlError):
    """A worker refused a request or died; the message starts with the worker's name, RPC[host:port]."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class WorkerGone(RPCError):
    """The connection broke: the worker died, closed, or did not answer in time. `device`: RPC[host:port]."""

    def __init__(self, message: str, device: str | None = None) -> None:
        super().__init__(message)
        self.device = device


@dataclass(frozen=True)
class OfferSpec:
    """One tensor to offer: its digest, size, GGML type, GGUF shape (ne0 first), name, and a way to read it."""

    digest: str
    nbytes: int
    ggml_type: int
    shape: Sequence[int]
    name: str
    data: Callable[[], Any]  # returns a bytes-like object of nbytes (read only on a miss)
    part_of: str | None = None  # the bytes are part_offset.. of the tensor with this digest (split experts)
    part_offset: int = 0


@dataclass
class Counters:
    """What this client sent and received; `runs` counts RunSegment round trips, `run_seconds` their time from
    sending to the reply read, of which the worker computed `worker_seconds` (the rest: network and overheads)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    tensor_bytes_sent: int = 0
    runs: int = 0
    run_seconds: float = 0.0
    worker_seconds: float = 0.0
    requests: int = 0
    offers_hit: int = 0
    offers_missed: int = 0


@dataclass(frozen=True)
class _Run:
    """A RunSegment sent and not yet answered: when it was sent and how many tokens it carries."""

    started: float
    n_tokens: int


class Client:
    """One connection to a worker. Not thread-safe: one request (or pipelined batch) at a time; several runs may be
    outstanding (start_segment), their replies taken in the order they were sent (finish_segment)."""

    def __init__(self, host: str, port: int, token: str | None = None, *, name: str = "ikctl",
                 timeout: float = CALL_TIMEOUT_S, run_timeout: float = RUN_TIMEOUT_S, poll_ms: float = 0.0,
                 reply_floor: float = REPLY_FLOOR_S, probe_timeout: float = PROBE_TIMEOUT_S) -> None:
        self.host, self.port = host, int(port)
        self.label = rpc_device(f"{host}:{port}")
        self.timeout, self.run_timeout = timeout, run_timeout
        self.reply_floor, self.probe_timeout = reply_floor, probe_timeout
        self._session = False  # handshake done: waits past reply_floor probe the worker
        self.minor = 0  # the session's minor version: min(ours, the worker's)
        # the fastest run so far: seconds outside the worker's compute (network, overheads) and compute per token
        self._fastest: tuple[float, float] | None = None
        self.counters = Counters()
        self._next_id = 1
        self._runs: dict[int, _Run] = {}  # request id -> run, in the order sent (the worker answers in order)
        self._token, self._name = token, name
        self._waiting = 0  # requests sent and not yet answered
        self._sock = self._connect(CONNECT_TIMEOUT_S)
        # spin for segment replies only across a network: a worker on this machine needs the cores we would burn
        self.poll_s = 0.0 if P.peer_is_loopback(self._sock) else poll_ms / 1000
        try:
            self._handshake(token, name)
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, endpoint: str, token: str | None = None, **kwargs: Any) -> Client:
        """`host:port` (IPv6 hosts in brackets) -> an authenticated client."""
        ep = Endpoint(endpoint)
        return cls(ep.host, ep.port, token, **kwargs)

    # ---- plumbing ---------------------------------------------------------------------------------------------
    def _connect(self, timeout: float) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as e:
            raise WorkerGone(f"{self.label}: cannot connect: {e.strerror or e}; is `ikctl rpcnode` running "
                             "there?", self.label) from None
        P.set_nodelay(sock)
        return sock

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        sock, self._sock = getattr(self, "_sock", None), None
        self._waiting = 0
        self._runs = {}
        if sock is not None:
            sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reconnect_if_timed_out(self) -> None:
        """A worker closes a connection idle past its --idle-timeout, saying so first; its tensors, segments and
        KV caches belong to the worker, not the connection, so a fresh connection carries on where this one was.
        (A worker that died is left to the request to find out and name.)"""
        if self._sock is None or self._waiting:
            return
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        if not poller.poll(0):
            return
        try:
            self._sock.settimeout(self.timeout)
            if not self._sock.recv(1, socket.MSG_PEEK):
                return
            frame = P.recv_frame(self._sock)
        except (OSError, EOFError, P.ProtocolError):
            return
        msg = frame.message
        if not isinstance(msg, P.ErrorReply) or msg.code != P.ErrorCode.TIMED_OUT:
            self._broken(f"sent {type(msg).__name__} unasked")
        self.close()
        self._sock = self._connect(CONNECT_TIMEOUT_S)
        try:
            self._handshake(self._token, self._name)
        except BaseException:
            self.close()
            raise

    def _send(self, message: P.Message, payload: P.Payload = b"") -> int:
        if not isinstance(message, P.Hello | P.Auth):
            self._reconnect_if_timed_out()
        if self._sock is None:
            raise WorkerGone(f"{self.label}: the connection is closed", self.label)
        rid, self._next_id = self._next_id, self._next_id + 1
        parts = P.encode_frame_parts(message, rid, payload)
        n = sum(len(p) if not isinstance(p, memoryview) else p.nbytes for p in parts)
        try:
            if n <= 1 << 16:  # a small frame in one write: one TCP segment instead of four, half the latency
                parts = [b"".join(parts)]
            for part in parts:
                self._write(part)
        except OSError as e:
            self._broken(f"send failed ({e.strerror or e})")
        self.counters.bytes_sent += n
        self.counters.requests += 1
        self._waiting += 1
        return rid

    def _recv(self, rid: int, expect: type, timeout: float, patience: float | None = None) -> Any:
        return self._recv_frame(rid, expect, timeout, patience).message

    def _recv_frame(self, rid: int, expect: type, timeout: float, patience: float | None = None) -> P.Frame:
        """The reply to request `rid` (the next one to come: the worker answers in order)."""
        if self._sock is None:
            raise WorkerGone(f"{self.label}: the connection is closed", self.label)
        self._waiting -= 1
        started = time.monotonic()
        if self._session:
            self._await_reply(timeout, self.reply_floor if patience is None else patience)
        self._sock.settimeout(max(timeout - (time.monotonic() - started), 0.001))
        try:
            frame = P.recv_frame(self._sock)
        except TimeoutError:
            self._broken(f"no reply within {timeout:g} s")
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            what = "closed the connection" if isinstance(e, EOFError) else f"connection lost ({e})"
            self._broken(what)
        except P.ProtocolError as e:
            self._broken(f"sent a malformed reply ({e})")
        h = frame.header
        self.counters.bytes_received += P.HEADER_SIZE + h.meta_len + h.payload_len
        msg = frame.message
        if isinstance(msg, P.ErrorReply):
            if msg.fatal:
                self.close()
            code = P.ErrorCode(msg.code).name if msg.code in P.ErrorCode._value2member_map_ else str(msg.code)
            raise RPCError(f"{self.label}: {code}: {msg.message}", msg.code)
        if h.request_id != rid or not isinstance(msg, expect):
            self._broken(f"answered request {h.request_id} with {type(msg).__name__}, expected {expect.__name__} "
                         f"for request {rid}")
        return frame

    def _write(self, data: P.Payload) -> None:
        """Send all of `data`. A worker that takes no bytes for reply_floor seconds (its buffers are full: it is
        busy with what came before, or frozen) is probed, as a late reply is; a frozen one ends the request."""
        assert self._sock is not None
        if not self._session:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(data)
            return
        view = memoryview(data).cast("B")
        stalled_since = time.monotonic()
        while view.nbytes:
            # a timed socket waits for room, then sends what fits: a timeout means nothing of this call was sent
            self._sock.settimeout(self.reply_floor)
            try:
                sent = self._sock.send(view)
            except TimeoutError:
                stalled = time.monotonic() - stalled_since
                if stalled >= self.run_timeout:
                    self._broken(f"took no bytes of a request for {stalled:.1f} s")
                self._check_alive(f"took no bytes of a request for {stalled:.1f} s")
                continue
            view = view[sent:]
            stalled_since = time.monotonic()

    def _check_alive(self, late: str, reply_came: Callable[[], bool] = lambda: False) -> None:
        """Probe the worker on a second connection; WorkerGone (the connection closed) if it does not answer
        within probe_timeout and nothing came meanwhile on this one (`reply_came`)."""
        why = probe(self.host, self.port, self.probe_timeout)
        if why is not None and not reply_came():
            self._broken(f"{late} and {why}: it is frozen (stopped, or swapping) or its host is gone")

    def _await_reply(self, timeout: float, patience: float) -> None:
        """Return once the connection has something to read (a reply, or its end) or `timeout` has passed. Each
        `patience` seconds without a byte, probe the worker on a second connection: one that does not answer
        within probe_timeout is frozen or gone, and waiting on for the rest of `timeout` would only hang."""
        assert self._sock is not None
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        start = time.monotonic()
        end, probe_at = start + timeout, start + patience
        while (now := time.monotonic()) < end:
            if poller.poll(max(1, int((min(probe_at, end) - now) * 1000) + 1)):
                return
            if time.monotonic() < probe_at or time.monotonic() >= end:
                continue
            self._check_alive(f"sent no reply for {time.monotonic() - start:.1f} s", lambda: bool(poller.poll(0)))
            probe_at = time.monotonic() + patience

    def _broken(self, what: str) -> None:
        self.close()
        raise WorkerGone(f"{self.label}: worker {what}; check that it is still running", self.label)

    def _call(self, message: P.Message, expect: type, payload: P.Payload = b"", timeout: float | None = None) -> Any:
        if self._runs:  # its reply would come after theirs
            raise RPCError(f"{self.label}: {type(message).__name__} sent while {len(self._runs)} runs await replies")
        rid = self._send(message, payload)
        return self._recv(rid, expect, self.timeout if timeout is None else timeout)

    def _handshake(self, token: str | None, name: str) -> None:
        nonce = P.make_challenge() if token else b""
        hello = self._call(P.Hello(client=name[:256], want_auth=token is not None, nonce=nonce), P.HelloReply)
        self.server = hello.server
        self.minor = min(P.PROTOCOL_MINOR, hello.minor)
        if not hello.auth_required:
            if token:
                self._broken("does not ask for authentication although a token was given (a different worker?)")
            self._session = True
            return
        if not token:
            self.close()
            raise RPCError(f"{self.label}: the worker requires a token; set IKCTL_RPC_TOKEN_FILE (or "
                           "IKCTL_RPC_TOKEN) to the worker's --token-file")
        reply = self._call(P.Auth(mac=P.sign(token, hello.nonce, "client")), P.AuthReply)
        if not P.verify(token, nonce, reply.mac, "server"):
            self._broken("failed to prove it knows the token")
        self._session = True

    # ---- requests ---------------------------------------------------------------------------------------------
    def device_info(self) -> P.DeviceInfo:
        return self._call(P.DeviceInfoRequest(), P.DeviceInfo)

    def telemetry(self) -> P.Telemetry:
        return self._call(P.TelemetryRequest(), P.Telemetry)

    def calibrate(self, ggml_types: Sequence[int], refresh: bool = False) -> P.CalibrateReply:
        """The worker's decode speed (GB/s of weights read per token) for each GGML type, in order; 0.0 where it
        cannot run one. From the worker's cache file unless `refresh`; a measurement takes about 0.15 s a type."""
        self._need_minor(3, "calibration")
        types = list(ggml_types)
        return self._call(P.Calibrate(ggml_types=types, refresh=refresh), P.CalibrateReply,
                          timeout=max(self.timeout, CALIBRATE_TIMEOUT_S))

    def measure_link(self, payload_bytes: int = 1 << 20, rounds: int = 3) -> tuple[float, float]:
        """(round-trip seconds, bytes per second to the worker): the fastest of `rounds` empty Calibrate round trips,
        then of `rounds` carrying `payload_bytes` (which the worker reads and discards). A payload time within
        LINK_RESOLUTION_S of the round trip reports LINK_FLOOR_BPS rather than dividing by almost nothing."""
        self._need_minor(3, "measuring the link")
        if not 0 <= payload_bytes <= P.DEFAULT_LIMITS.max_payload_bytes:
            raise ValueError(f"payload_bytes {payload_bytes} is not within 0..{P.DEFAULT_LIMITS.max_payload_bytes}")
        empty = P.Calibrate(ggml_types=[])
        payload = bytes(payload_bytes)
        rtt = min(self._timed(empty) for _ in range(max(1, rounds)))
        if not payload_bytes:  # nothing to time the bandwidth with
            return rtt, LINK_FLOOR_BPS
        loaded = min(self._timed(empty, payload) for _ in range(max(1, rounds)))
        extra = loaded - rtt
        return rtt, (payload_bytes / extra if extra >= LINK_RESOLUTION_S else LINK_FLOOR_BPS)

    def _timed(self, message: P.Message, payload: P.Payload = b"") -> float:
        t0 = time.perf_counter()
        self._call(message, P.CalibrateReply, payload)
        return time.perf_counter() - t0

    def _need_minor(self, minor: int, what: str) -> None:
        if self.minor < minor:
            raise RPCError(f"{self.label}: the worker speaks protocol {P.PROTOCOL_MAJOR}.{self.minor}; {what} needs "
                           f"{P.PROTOCOL_MAJOR}.{minor} (update ikctl there)")

    def offer(self, specs: Iterable[OfferSpec],
              on_tensor: Callable[[OfferSpec, str], None] | None = None) -> dict[str, str]:
        """Offer tensors (pipelined), upload the misses in chunks; digest -> "hit" | "uploaded".
        `on_tensor(spec, status)` is called after each tensor is settled (for progress bars)."""
        specs = list(specs)
        ids = [self._send(P.OfferTensor(digest=s.digest, nbytes=s.nbytes, ggml_type=s.ggml_type,
                                        shape=list(s.shape), name=s.name[:256],
                                        **({"part_of": s.part_of, "part_offset": s.part_offset}
                                           if s.part_of and self.minor >= 2 else {}))) for s in specs]
        replies = [self._recv(rid, P.OfferReply, self.timeout) for rid in ids]
        out = {}
        for spec, reply in zip(specs, replies, strict=True):
            if reply.status == "hit":
                self.counters.offers_hit += 1
                out[spec.digest] = "hit"
            else:
                self.counters.offers_missed += 1
                self.upload(spec.digest, spec.data())
                out[spec.digest] = "uploaded"
            if on_tensor is not None:
                on_tensor(spec, out[spec.digest])
        return out

    def upload(self, digest: str, data: Any) -> None:
        """Stream a tensor's bytes in CHUNK_BYTES chunks (pipelined); the last reply confirms the digest."""
        view = memoryview(data).cast("B")
        n = view.nbytes
        ids, offset = [], 0
        while True:
            chunk = view[offset : offset + CHUNK_BYTES]
            final = offset + chunk.nbytes >= n
            ids.append(self._send(P.UploadTensor(digest=digest, offset=offset, final=final), chunk))
            self.counters.tensor_bytes_sent += chunk.nbytes
            offset += chunk.nbytes
            if final:
                break
        replies = [self._recv(rid, P.UploadReply, self.timeout) for rid in ids]
        if not replies[-1].verified:
            raise RPCError(f"{self.label}: upload of {digest[:16]}… was not verified")

    def define_segment(self, segment_id: int, records: Sequence[tuple[str, dict[str, Any]]]) -> int:
        ops = [P.OpRecord(op=op, args=args) for op, args in records]
        return self._call(P.DefineSegment(segment_id=segment_id, ops=ops), P.DefineReply).n_ops

    def run_segment(self, segment_id: int, pos_start: int, n_tokens: int, arrays: Sequence[tuple[str, np.ndarray]],
                    seq_id: int = 0) -> dict[str, np.ndarray]:
        """One round trip: named arrays in (the hidden state first), the segment's named arrays out."""
        return self.finish_segment(self.start_segment(segment_id, [(seq_id, pos_start, n_tokens)], arrays))

    def start_segment(self, segment_id: int, seqs: Sequence[tuple[int, int, int]],
                      arrays: Sequence[tuple[str, np.ndarray]]) -> int:
        """Send a RunSegment and return at once (the caller computes meanwhile); finish_segment gets the reply.
        seqs: each sequence's (seq_id, pos_start, n_tokens), its rows following the previous one's in the arrays.
        One sequence goes in the 1.0 form; several need a worker speaking 1.1."""
        spans = [P.SeqSpan(seq_id=i, pos_start=p, n_tokens=n) for i, p, n in seqs]
        if len(spans) > 1 and self.minor < 1:
            raise RPCError(f"{self.label}: the worker speaks protocol {P.PROTOCOL_MAJOR}.{self.minor}; running "
                           "several sequences in one pass needs 1.1 (update ikctl there)")
        first, n_tokens = spans[0], sum(s.n_tokens for s in spans)
        specs, parts = P.pack_arrays(arrays)
        msg = P.RunSegment(segment_id=segment_id, seq_id=first.seq_id, pos_start=first.pos_start, n_tokens=n_tokens,
                           sections=specs, seqs=spans if len(spans) > 1 else [])
        self.counters.runs += 1
        started = time.perf_counter()
        rid = self._send(msg, parts)
        self._runs[rid] = _Run(started, max(1, n_tokens))
        return rid

    def run_patience(self, n_tokens: int) -> float:
        """Seconds to wait for a run's reply before probing the worker: DEADLINE_FACTOR x what the fastest run so
        far says n_tokens take (its time outside the worker's compute + compute per token x n_tokens), at least
        reply_floor."""
        if self._fastest is None:
            return self.reply_floor
        overhead, per_token = self._fastest
        return max(self.reply_floor, DEADLINE_FACTOR * (overhead + per_token * n_tokens))

    @property
    def runs_outstanding(self) -> int:
        """Runs sent whose replies finish_segment has not taken yet."""
        return len(self._runs)

    def finish_segment(self, request_id: int) -> dict[str, np.ndarray]:
        """The reply to a start_segment: the oldest run outstanding (replies come in the order sent)."""
        oldest = next(iter(self._runs), None)
        if request_id != oldest:
            raise RPCError(f"{self.label}: run {request_id} finished out of order (the oldest outstanding is "
                           f"{oldest})")
        run = self._runs.pop(request_id)
        if self._sock is not None:
            P.poll_readable(self._sock, self.poll_s)
        frame = self._recv_frame(request_id, P.RunReply, self.run_timeout, self.run_patience(run.n_tokens))
        reply = frame.message
        # from sending: a run sent behind others waited for them too, so the fastest (not the sum) is what counts
        took = time.perf_counter() - run.started
        overhead, per_token = max(0.0, took - reply.compute_seconds), reply.compute_seconds / run.n_tokens
        fastest = self._fastest or (overhead, per_token)
        self._fastest = min(fastest[0], overhead), min(fastest[1], per_token)
        self.counters.run_seconds += took
        self.counters.worker_seconds += reply.compute_seconds
        out = P.unpack_arrays(reply.sections, frame.payload)
        return {spec.name: arr for spec, arr in zip(reply.sections, out, strict=True)}

    def drop_runs(self) -> None:
        """Take and discard the replies of the runs still outstanding (a pass abandoned for another device's
        error), so that the connection's next request gets its own reply; a broken connection just forgets them."""
        while self._runs and self._sock is not None:
            with contextlib.suppress(RPCError):
                self.finish_segment(next(iter(self._runs)))
        self._runs = {}

    def kv_op(self, op: str, seq_id: int = 0, n: int = 0, segment_id: int | None = None) -> int:
        return self._call(P.KVOp(op=op, seq_id=seq_id, n=n, segment_id=segment_id), P.KVReply).n_tokens

    def free(self, segment_id: int | None = None) -> P.FreeReply:
        return self._call(P.Free(segment_id=segment_id), P.FreeReply)


def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Whether a worker is alive, asked on a connection of its own: None if it answers a Hello within `timeout`
    (any reply counts, BUSY included: a thread of it runs), else why it did not. No token is needed: the probe
    stops at the worker's first reply."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            P.set_nodelay(sock)
            sock.sendall(P.encode_frame(P.Hello(client="ikctl liveness probe", want_auth=False), 1))
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            P.recv_frame(sock)
    except TimeoutError:
        return f"did not answer a liveness probe within {timeout:g} s"
    except P.ProtocolError:  # a malformed reply is still a reply
        return None
    except (OSError, EOFError) as e:
        what = "closed the probe's connection" if isinstance(e, EOFError) else (e.strerror or str(e))
        return f"did not answer a liveness probe ({what})"
    return None


def wait_until_up(endpoint: str, timeout: float = 10.0) -> None:
    """Poll until a TCP connection to the endpoint succeeds (a worker just started); RPCError on timeout."""
    ep = Endpoint(endpoint)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((ep.host, ep.port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                device = rpc_device(endpoint)
                raise WorkerGone(f"{device}: not reachable after {timeout:g} s", device) from None
            time.sleep(0.05)
