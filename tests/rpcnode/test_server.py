"""The worker process itself: startup rules, memory limits between clients, local models, and fuzzed frames."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import IkctlError, load_model
from engine.synth import SynthSpec, write_model
from rpcnode import protocol as P
from rpcnode.client import Client, RPCError
from tests.rpcnode.conftest import WorkerProc, start_worker


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("m") / "small.gguf", SynthSpec(layers=2, dense_layers=1, seed=3))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("m") / "other.gguf", SynthSpec(layers=2, dense_layers=1, seed=4))


def test_non_loopback_needs_a_token(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rpcnode", "--host", "0.0.0.0", "--port", "0", "-c", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "--token-file" in proc.stderr



@pytest.mark.parametrize(("content", "mode", "says"), [
    (b"\n", 0o600, "is empty"),
    (b"a-long-enough-token-0123456789\n", 0o644, "is readable by others (mode 0644); chmod 600"),
    (b"a-long-enough-token-0123456789\n", 0o640, "is readable by others (mode 0640)"),
    (b"short-token\n", 0o600, "has 11 characters; use at least 16"),
    (b"\xff\xfe not text at all, long enough", 0o600, "is not UTF-8 text"),
])
def test_token_files_that_must_not_be_used(tmp_path: Path, content: bytes, mode: int, says: str) -> None:
    """As ssh with a private key: only the owner may read the token; it must be text and long enough to guess."""
    path = tmp_path / "token"
    path.write_bytes(content)
    path.chmod(mode)
    proc = subprocess.run([sys.executable, "-m", "rpcnode", "--port", "0", "-c", str(tmp_path / "c"),
                           "--token-file", str(path)], capture_output=True, text=True, timeout=30)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("rpcnode: error: --token-file: ") and str(path) in lines[0] and says in lines[0]


@pytest.mark.parametrize("value", ["-1", "1001", "nan"])
def test_poll_out_of_range_is_refused(tmp_path: Path, value: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "rpcnode", "--port", "0", "-c", str(tmp_path), "--poll", value],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and f"rpcnode: error: --poll {value} must be 0..1000 milliseconds" in proc.stderr


def test_rpc_poll_out_of_range_is_refused(small_model: Path) -> None:
    with pytest.raises(IkctlError, match=r"--rpc-poll -2 must be 0\.\.1000 milliseconds"):
        load_model(small_model, rpc="127.0.0.1:9", rpc_poll=-2)
    proc = subprocess.run([sys.executable, "-m", "tui.cli", "run", "-m", str(small_model), "-n", "2", "--rpc",
                           "127.0.0.1:9", "-ngl", "99", "--rpc-poll", "2000"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == "ikctl: error: --rpc-poll 2000 must be 0..1000 milliseconds"


def test_second_client_beyond_memory_gets_out_of_memory(workers: Callable[..., WorkerProc], small_model: Path,
                                                        other_model: Path) -> None:
    size = small_model.stat().st_size
    w = workers("-m", str(int(size * 1.2)))
    first = load_model(small_model, rpc=w.endpoint, n_gpu_layers=99, ctx_size=64)
    with pytest.raises(RPCError, match=rf"RPC\[{w.endpoint}\]: OUT_OF_MEMORY: .*needs \d+ bytes, \d+ of \d+ free"):
        load_model(other_model, rpc=w.endpoint, n_gpu_layers=99, ctx_size=64)
    cache = first.new_cache(32)
    first.eval([1, 2, 3], cache)  # the first client is unaffected
    with Client.connect(w.endpoint) as c:
        assert c.free().tensors_held == 0  # Free(nil) drops everything
    load_model(other_model, rpc=w.endpoint, n_gpu_layers=99, ctx_size=64)


def test_worker_reads_tensors_from_its_local_models(workers: Callable[..., WorkerProc], small_model: Path) -> None:
    w = workers("--models", str(small_model.parent))
    model = load_model(small_model, rpc=w.endpoint, n_gpu_layers=99)
    assert model.net.load_stats.tensors_offered > 0 and model.net.load_stats.bytes_uploaded == 0
    ref = load_model(small_model)
    assert (model.logits([5, 6, 7]) == ref.logits([5, 6, 7])).all()


# ---- fuzzed frames against a live worker ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProc]:
    w = start_worker(tmp_path_factory.mktemp("fuzz"), "-m", "64MiB")
    yield w
    w.kill()


def _hello() -> bytes:
    return P.encode_frame(P.Hello(), 1)


_KINDS = st.sampled_from([int(k) for k in P.Kind] + [0, 0x33, 0x7F, 0xFE])
_SIZES = st.one_of(st.integers(0, 64), st.sampled_from([4096, 1 << 20, (1 << 20) + 1, 1 << 31, (1 << 64) - 1]))


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    """A header with random kind/flags/lengths, then metadata that may be valid, random or truncated."""
    kind = draw(_KINDS)
    flags = draw(st.sampled_from([0, 0, 0, 1]))
    meta = draw(st.one_of(st.binary(max_size=64), st.sampled_from([
        P._ENCODER.encode(P.OfferTensor(digest="ab" * 32, nbytes=1 << 40, ggml_type=0, shape=[1 << 62, 4])),
        P._ENCODER.encode(P.RunSegment(segment_id=1, pos_start=0, n_tokens=1,
                                       sections=[P.ArraySpec(dtype="f32", shape=[1 << 40, 1 << 40])])),
        P._ENCODER.encode(P.UploadTensor(digest="cd" * 32, offset=(1 << 63) - 1)),
        P._ENCODER.encode(P.DefineSegment(segment_id=1, ops=[P.OpRecord(op="attn", args={"layer": 10**9})])),
        P._ENCODER.encode(P.KVOp(op="truncate", n=5, segment_id=7)),
    ])))
    meta_len = draw(st.one_of(st.just(len(meta)), _SIZES)) & 0xFFFF_FFFF
    payload_len = draw(st.one_of(st.just(0), _SIZES)) & ((1 << 64) - 1)
    body = meta + draw(st.binary(max_size=64))
    cut = draw(st.integers(0, len(body)))
    head = P.HEADER.pack(P.MAGIC, 1, 0, kind & 0xFFFF, flags, 9, meta_len, payload_len)
    return head + body[:cut]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(frames=st.lists(_frames(), min_size=1, max_size=3), authed=st.booleans())
def test_fuzzed_frames_never_break_the_worker(fuzz_worker: WorkerProc, frames: list[bytes], authed: bool) -> None:
    host, _, port = fuzz_worker.endpoint.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.settimeout(0.3)
        try:
            s.sendall((_hello() if authed else b"") + b"".join(frames))
            while s.recv(65536):  # replies until the worker closes or waits for bytes that never come
                pass
        except OSError:
            pass
    assert fuzz_worker.proc.poll() is None, fuzz_worker.log_text()[-2000:]
    with Client.connect(fuzz_worker.endpoint, timeout=5) as c:  # still serving, nothing held from the garbage
        t = c.telemetry()
        assert t.bytes_held == 0
    assert psutil.Process(fuzz_worker.proc.pid).memory_info().rss < 1 << 30


def test_silent_connection_is_dropped_and_stopping_closes_the_rest(tmp_path: Path) -> None:
    """In-process server: a peer that never says hello is closed after the handshake timeout, an authenticated
    one keeps its connection, and cancelling serve() closes every connection."""
    import asyncio
    import contextlib
    import threading

    from rpcnode.server import serve
    from rpcnode.worker import Config

    loop = asyncio.new_event_loop()
    ready: asyncio.Future[tuple[str, int]] = loop.create_future()
    task = loop.create_task(serve(Config(port=0, cache_dir=tmp_path, handshake_timeout_s=0.5), ready))

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    host, port = asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(ready), 30), loop).result(35)
    silent = socket.create_connection((host, port))
    client = Client(host, port)
    with silent, client:
        silent.settimeout(20)
        assert silent.recv(1) == b""  # closed by the server, long before our timeout
        assert client.device_info().mem_total_bytes > 0  # past the handshake: no timeout applies
        loop.call_soon_threadsafe(task.cancel)
        thread.join(20)
        assert not thread.is_alive()
        with pytest.raises(RPCError, match=r"closed the connection|connection lost"):
            client.device_info()
