"""A worker against peers past the handshake that try to take its memory or its threads: frame bodies are charged
to -m before they are stored, KV caches of every sequence count, connections are bounded, idle and stalled
peers are closed and what they reserved is released. Real worker processes on loopback, small timeouts."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest

from engine import load_model
from engine.config import DeepSeek2Config
from engine.gguf_file import GGUFFile
from engine.model import Model
from engine.segments import MAX_AMB_BYTES, parse_program, segment_records
from engine.synth import SynthSpec, write_model
from rpcnode import protocol as P
from rpcnode.client import Client, RPCError
from rpcnode.digest import digest_of
from tests.rpcnode.conftest import WorkerProc
from tests.rpcnode.test_distributed import PROMPT, _worker_need

MiB = 1 << 20


@pytest.fixture(scope="module")
def synth_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("synth") / "synth.gguf", SynthSpec(layers=2, dense_layers=1, seed=5))


def _authed_socket(endpoint: str) -> socket.socket:
    """A raw connection past the (token-less) handshake."""
    host, _, port = endpoint.rpartition(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(P.encode_frame(P.Hello(want_auth=False), 1))
    assert isinstance(P.recv_frame(s).message, P.HelloReply)
    return s


def _run_segment_head(payload_len: int, request_id: int = 7) -> bytes:
    """Header and metadata of a RunSegment whose one f32 section declares `payload_len` bytes (payload not sent)."""
    meta = P._ENCODER.encode(P.RunSegment(segment_id=1, pos_start=0, n_tokens=1,
                                          sections=[P.ArraySpec(name="h", dtype="f32", shape=[payload_len // 4])]))
    return P.HEADER.pack(P.MAGIC, 1, 0, int(P.Kind.RUN_SEGMENT), 0, request_id, len(meta), payload_len) + meta


def _rss(w: WorkerProc) -> int:
    return psutil.Process(w.proc.pid).memory_info().rss


def _wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_declared_payloads_are_charged_to_memory_not_allocated(workers: Callable[..., WorkerProc]) -> None:
    """Frames declaring 60 MiB bodies and sending none used to get 60 MiB each, zeroed, outside -m: now the
    first is charged (receive pool + -m) and backed by pages only as bytes arrive, the next ones are refused
    OUT_OF_MEMORY before anything is stored, and the stalled ones are closed, their charge released."""
    w = workers("-m", "16MiB", "--stall-timeout", "2")
    with Client.connect(w.endpoint) as c:
        c.telemetry()  # warm: the first request imports the engine
        free_before = c.telemetry().mem_free_bytes
    rss_before = _rss(w)
    flood = [_authed_socket(w.endpoint) for _ in range(6)]
    try:
        for s in flood:
            s.sendall(_run_segment_head(60 * MiB))
        time.sleep(0.5)
        grown = _rss(w) - rss_before
        assert grown < 30 * MiB, f"RSS grew {grown / MiB:.0f} MiB under 6 x 60 MiB declared"
        # one more that does send its body is refused, answered, and its connection stays usable
        s = _authed_socket(w.endpoint)
        with s:
            s.sendall(_run_segment_head(30 * MiB, request_id=9))
            s.sendall(bytes(30 * MiB))
            reply = P.recv_frame(s)
            assert reply.header.request_id == 9 and reply.message.code == P.ErrorCode.OUT_OF_MEMORY
            assert not reply.message.fatal and "does not fit" in reply.message.message
            P.send_frame(s, P.TelemetryRequest(), 10)
            assert isinstance(P.recv_frame(s).message, P.Telemetry)
        # the stalled ones are told and closed; everything they were charged is free again
        for s in flood:
            s.settimeout(10)
            reply = P.recv_frame(s)
            assert reply.message.code == P.ErrorCode.TIMED_OUT and reply.message.fatal
            assert s.recv(1) == b""
    finally:
        for s in flood:
            s.close()
    with Client.connect(w.endpoint) as c:
        _wait_for(lambda: c.telemetry().mem_free_bytes == free_before)
    assert "Traceback" not in w.log_text()


def one_context_worker(workers: Callable[..., WorkerProc], synth_model: Path,
                       ctx: int) -> tuple[WorkerProc, Model, int]:
    """A worker whose -m holds every layer's weights and one sequence's whole context (f32 KV) and no more, the
    model loaded on it (planned past that, so that the worker's own limit is what refuses), and that context's
    KV bytes."""
    weights, kv, programs = _worker_need(synth_model, ctx, rpc="127.0.0.1:1", n_gpu_layers=99, cache_type_k="f32")
    flags = {"ctx_size": ctx, "n_gpu_layers": 99, "cache_type_k": "f32"}
    roomy = workers("-m", str(weights + kv + programs))  # the plan is an upper bound: find its slack
    loaded = load_model(synth_model, rpc=roomy.endpoint, **flags)
    with Client.connect(roomy.endpoint) as c:
        slack = c.telemetry().mem_free_bytes
    loaded.net.close()
    w = workers("-m", str(weights + kv + programs - slack))
    return w, load_model(synth_model, rpc=w.endpoint, device_mem=[f"{w.device}=1GiB"], **flags), kv


def test_kv_caches_of_every_sequence_count(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    """-m holds the weights and one sequence's whole context: a second sequence used to get a second cache past
    -m; now it takes the room of the least recently used one, which the worker then no longer knows."""
    w, model, kv = one_context_worker(workers, synth_model, 256)
    first, second = model.new_cache(256), model.new_cache(256)
    want = load_model(synth_model, ctx_size=256, cache_type_k="f32").logits(PROMPT)[-1:]
    assert np.allclose(model.eval(PROMPT, first), want, rtol=1e-5, atol=1e-5)
    assert np.allclose(model.eval(PROMPT, second), want, rtol=1e-5, atol=1e-5)
    with Client.connect(w.endpoint) as c:
        t = c.telemetry()
    assert t.kv_bytes == kv and t.mem_free_bytes == 0
    with pytest.raises(RPCError, match=r"UNKNOWN_SEQUENCE.*unknown here"):
        model.eval([3], first)
    model.eval([3], second)  # the sequence that kept its cache goes on


def test_connections_beyond_the_limit_get_busy(workers: Callable[..., WorkerProc]) -> None:
    w = workers("--max-connections", "2")
    a, b = Client.connect(w.endpoint), Client.connect(w.endpoint)
    with a, b:
        with pytest.raises(RPCError, match=r"BUSY: 2 peers are connected.*--max-connections 2"):
            Client.connect(w.endpoint)
        a.close()
        _wait_for(lambda: "BUSY" not in _try_connect(w.endpoint))
        assert b.device_info().device == "cpu"


def test_handshakes_beyond_the_limit_get_busy_without_a_thread(workers: Callable[..., WorkerProc]) -> None:
    """Peers that connect and say nothing hold a handshake slot each (4 per --max-connections) until the
    handshake timeout; one more is answered BUSY at once, and the worker keeps serving."""
    w = workers("--max-connections", "1")
    host, _, port = w.endpoint.rpartition(":")
    silent = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
    try:
        _wait_for(lambda: w.log_text().count("connection from") >= 4)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            reply = P.recv_frame(s)
            assert reply.message.code == P.ErrorCode.BUSY and "in their handshake" in reply.message.message
    finally:
        for s in silent:
            s.close()
    _wait_for(lambda: _try_connect(w.endpoint) == "ok")


def _try_connect(endpoint: str) -> str:
    try:
        with Client.connect(endpoint) as c:
            c.telemetry()
        return "ok"
    except RPCError as e:
        return str(e)


def test_idle_peers_are_closed_and_clients_reconnect(workers: Callable[..., WorkerProc], synth_model: Path) -> None:
    w = workers("--idle-timeout", "1")
    s = _authed_socket(w.endpoint)
    with s:
        s.settimeout(10)
        reply = P.recv_frame(s)  # nothing sent: the worker says why it closes, then closes
        assert reply.message.code == P.ErrorCode.TIMED_OUT and "--idle-timeout" in reply.message.message
        assert s.recv(1) == b""
    # a loaded model left idle carries on: its client reconnects, the worker kept its segments and KV cache
    model = load_model(synth_model, rpc=w.endpoint, n_gpu_layers=99)
    cache = model.new_cache(64)
    model.eval(PROMPT, cache)
    time.sleep(1.5)
    want = load_model(synth_model)
    ref = want.new_cache(64)
    want.eval(PROMPT, ref)
    assert np.allclose(model.eval([3], cache), want.eval([3], ref), rtol=1e-5, atol=1e-5)
    assert "idle-timeout" in w.log_text() and "Traceback" not in w.log_text()


def test_stalled_uploads_release_their_reservation(workers: Callable[..., WorkerProc]) -> None:
    """An offer answered miss reserves its bytes; a peer that never uploads them (but stays connected, even
    busy with other requests) used to hold them for ever, and others got OUT_OF_MEMORY."""
    w = workers("-m", "1MiB", "--stall-timeout", "1")
    data = np.random.default_rng(0).integers(0, 255, 900 * 1024, dtype=np.uint8).tobytes()
    offer = P.OfferTensor(digest=digest_of(data), nbytes=len(data), ggml_type=0, shape=[len(data) // 4])
    with Client.connect(w.endpoint) as staller, Client.connect(w.endpoint) as other:
        assert staller._call(offer, P.OfferReply).status == "miss"
        with pytest.raises(RPCError, match="OUT_OF_MEMORY"):
            other._call(offer, P.OfferReply)
        for _ in range(15):  # busy, but not with its upload
            staller.telemetry()
            time.sleep(0.1)
        assert other._call(offer, P.OfferReply).status == "miss"  # the reservation was released
        other.upload(offer.digest, data)
        with pytest.raises(RPCError, match=r"TIMED_OUT: the upload of .* stalled .* offer it again"):
            staller.upload(offer.digest, data)
        assert staller.telemetry().tensors_held == 1
    assert "uploads stalled for 1 s" in w.log_text()


def test_a_stalled_frame_is_dropped_with_its_upload(workers: Callable[..., WorkerProc]) -> None:
    """Half a chunk, then silence: the connection is closed after --stall-timeout and its upload released."""
    w = workers("-m", "4MiB", "--stall-timeout", "1")
    data = bytes(3 * MiB)
    with Client.connect(w.endpoint) as c:
        free = c.telemetry().mem_free_bytes
        offer = P.OfferTensor(digest=digest_of(data), nbytes=len(data), ggml_type=0, shape=[len(data)])
        assert c._call(offer, P.OfferReply).status == "miss"
        assert c.telemetry().mem_free_bytes == free - len(data)
        frame = P.encode_frame(P.UploadTensor(digest=offer.digest, offset=0, final=True), 5, data)
        c._sock.sendall(frame[: len(frame) // 2])  # type: ignore[union-attr]
        c._sock.settimeout(10)  # type: ignore[union-attr]
        reply = P.recv_frame(c._sock)  # type: ignore[arg-type]
        assert reply.message.code == P.ErrorCode.TIMED_OUT and "stalled" in reply.message.message
    with Client.connect(w.endpoint) as c:
        _wait_for(lambda: c.telemetry().mem_free_bytes == free)


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--max-connections", "0", "--max-connections 0 must be at least 1"),
    ("--idle-timeout", "0", "--idle-timeout 0 must be"),
    ("--stall-timeout", "nan", "--stall-timeout nan must be"),
])
def test_limit_flags_out_of_range_are_refused(tmp_path: Path, flag: str, value: str, says: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "rpcnode", "--port", "0", "-c", str(tmp_path), flag, value],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and f"rpcnode: error: {says}" in proc.stderr and "Traceback" not in proc.stderr


def test_a_programs_attention_scratch_is_capped(synth_model: Path) -> None:
    """-amb sizes the attention score blocks; a peer's 2**60 would make one block of any size."""
    cfg = DeepSeek2Config.from_gguf(GGUFFile(synth_model))
    records = segment_records(cfg, [], {}, mla=3, amb_bytes=1 << 60, cache_type="f16", n_ctx=64)
    assert parse_program(records).amb_bytes == MAX_AMB_BYTES


def _peak_rss(w: WorkerProc) -> int:
    """The worker's high-water RSS (VmHWM), in bytes."""
    for line in Path(f"/proc/{w.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


def test_a_runs_scratch_is_charged_before_it_runs(workers: Callable[..., WorkerProc], tmp_path: Path) -> None:
    """A program whose FFN is 32768 wide over a hidden state of 64 holds 6 MiB of weights, but a batch of 4096
    tokens through it needs 1.5 GiB of activations: those used to be allocated outside -m (the worker's peak RSS
    went past 1.6 GiB under -m 64MiB). The run's scratch is counted first now: past the fixed scratch pool it is
    charged to -m, and a batch that does not fit is answered OUT_OF_MEMORY, naming the tokens and the bytes; a
    batch that fits still runs."""
    wide = write_model(tmp_path / "wide.gguf", SynthSpec(layers=1, dense_layers=1, hidden=64, dense_ffn=32768,
                                                         vocab=512, dtype="Q8_0", seed=3))
    w = workers("-m", "64MiB")
    model = load_model(wide, ctx_size=4096, ubatch_size=4096, rpc=w.endpoint, n_gpu_layers=99)
    tokens = [int(t) for t in np.random.default_rng(0).integers(1, 500, 4096)]
    try:
        model.eval(tokens, model.new_cache(4096))
        refusal = ""
    except RPCError as e:
        refusal = str(e)
    peak = _peak_rss(w)
    assert peak < 64 * MiB + 700 * MiB, f"peak RSS {peak / MiB:.0f} MiB"  # -m + process, receive and scratch pools
    assert re.search(r"OUT_OF_MEMORY: segment \d+: a run of 4096 tokens at position 0 needs up to \d+ bytes of "
                     r"scratch.*send fewer tokens per run \(-ub\)", refusal), refusal
    small = model.with_options(ubatch_size=256)
    want = load_model(wide, ctx_size=4096, ubatch_size=256)
    got = small.eval(tokens[:600], small.new_cache(4096))
    assert np.allclose(got, want.eval(tokens[:600], want.new_cache(4096)), rtol=1e-4, atol=1e-4)
    with Client.connect(w.endpoint) as c:
        assert c.telemetry().mem_free_bytes > 0
    assert "Traceback" not in w.log_text()


def test_a_busy_refusal_at_accept_arrives_after_the_peers_hello(workers: Callable[..., WorkerProc]) -> None:
    """A peer refused at accept (the handshakes are full) that has already sent its hello used to get a reset,
    not BUSY: the worker closed the socket with the hello unread. Now the worker ends its side and a reaper on
    its event loop (no thread) reads on until the peer closes, so the reply is read whenever the peer reads."""
    w = workers("--max-connections", "1")
    host, _, port = w.endpoint.rpartition(":")
    silent = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
    try:
        _wait_for(lambda: w.log_text().count("connection from") >= 4)
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(P.encode_frame(P.Hello(want_auth=False), 1))
                time.sleep(0.3)  # the worker has refused it and closed its side by now
                reply = P.recv_frame(s)
                assert reply.message.code == P.ErrorCode.BUSY and "in their handshake" in reply.message.message
                assert s.recv(1) == b""
    finally:
        for s in silent:
            s.close()
    _wait_for(lambda: _try_connect(w.endpoint) == "ok")
    assert "Traceback" not in w.log_text()


def test_a_prefills_attention_scratch_stays_within_what_is_counted(workers: Callable[..., WorkerProc],
                                                                    tmp_path: Path) -> None:
    """The fuzz campaign's OOM kill: one 8192-token batch through the small MLA model of the campaign was counted
    at 528 MiB of scratch (16 MiB beyond the 512 MiB pool, charged to -m), but the worker's RSS grew by 600 MiB:
    the attention's score chunk is copied once more (transposed, by NumPy's matmul with V), and BLAS and the
    allocator add their own. Whatever a run is let through, its growth stays within the scratch pool and -m."""
    small = write_model(tmp_path / "small.gguf", SynthSpec(layers=2, dense_layers=1, seed=3))
    w = workers("-m", "64MiB")
    base = _rss(w)
    for n in (2048, 8192):  # the first fits; the second may be refused
        model = load_model(small, ctx_size=n, ubatch_size=n, rpc=w.endpoint, n_gpu_layers=99)
        tokens = [int(t) for t in np.random.default_rng(n).integers(1, 200, n)]
        try:
            model.eval(tokens, model.new_cache(n))
        except RPCError as e:
            assert n > 2048 and "OUT_OF_MEMORY" in str(e) and f"a run of {n} tokens" in str(e), str(e)
        finally:
            model.net.close()
        grown = _peak_rss(w) - base
        assert grown < 512 * MiB + 64 * MiB, f"{n} tokens: peak RSS {grown / MiB:.0f} MiB above the idle worker's"
    assert "Traceback" not in w.log_text()
