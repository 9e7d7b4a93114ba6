"""Wire format tests: a round trip per message kind, header and limit refusals, strict decoding, arrays, HMAC, fuzz."""

from __future__ import annotations

import asyncio
import socket
import struct
import tracemalloc

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rpcnode import protocol as p

DIGEST = "ab" * 32
TIMEOUT_S = 5.0


def _x(*shape: int) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


def _sample(kind: p.Kind) -> tuple[p.Message, bytes]:
    """One message of each kind, with a payload where the kind carries one."""
    run_specs, run_parts = p.pack_arrays([("hidden", _x(3, 8)), ("expert_ids", np.arange(6, dtype=np.int32))])
    out_spec, out_data = p.pack_array(_x(3, 8).astype(np.float16), "hidden")
    samples: dict[p.Kind, tuple[p.Message, bytes]] = {
        p.Kind.HELLO: (p.Hello(client="test", want_auth=True, nonce=p.make_challenge()), b""),
        p.Kind.HELLO_REPLY: (p.HelloReply(server="w0", auth_required=True, nonce=p.make_challenge()), b""),
        p.Kind.AUTH: (p.Auth(mac=p.sign("tok", b"n" * 32)), b""),
        p.Kind.AUTH_REPLY: (p.AuthReply(mac=p.sign("tok", b"m" * 32, "server")), b""),
        p.Kind.DEVICE_INFO_REQUEST: (p.DeviceInfoRequest(), b""),
        p.Kind.DEVICE_INFO: (p.DeviceInfo(device="cuda", index=1, name="RTX 3090", mem_total_bytes=24 << 30,
                                          mem_free_bytes=20 << 30, threads=16, cache_entries=3, cache_bytes=1 << 30),
                             b""),
        p.Kind.OFFER_TENSOR: (p.OfferTensor(digest=DIGEST, nbytes=4096, ggml_type=12, shape=[256, 16],
                                            name="blk.0.ffn_up_exps.weight"), b""),
        p.Kind.OFFER_REPLY: (p.OfferReply(digest=DIGEST, status="miss"), b""),
        p.Kind.UPLOAD_TENSOR: (p.UploadTensor(digest=DIGEST, offset=0, final=True), bytes(range(256)) * 4),
        p.Kind.UPLOAD_REPLY: (p.UploadReply(digest=DIGEST, received=1024, verified=True), b""),
        p.Kind.DEFINE_SEGMENT: (p.DefineSegment(segment_id=2, ops=[
            p.OpRecord(op="attn_mla", args={"layer": 3, "wq": DIGEST, "eps": 1e-6, "dims": [1, 2, 3], "fused": True}),
            p.OpRecord(op="moe", args={"experts": [DIGEST, DIGEST], "scale": 2.5})]), b""),
        p.Kind.DEFINE_REPLY: (p.DefineReply(segment_id=2, n_ops=2), b""),
        p.Kind.RUN_SEGMENT: (p.RunSegment(segment_id=2, seq_id=1, pos_start=10, n_tokens=3, sections=run_specs),
                             b"".join(bytes(b) for b in run_parts)),
        p.Kind.RUN_REPLY: (p.RunReply(segment_id=2, seq_id=1, compute_seconds=0.25, sections=[out_spec]),
                           bytes(out_data)),
        p.Kind.KV_OP: (p.KVOp(op="truncate", seq_id=1, n=7, segment_id=None), b""),
        p.Kind.KV_REPLY: (p.KVReply(seq_id=1, n_tokens=7), b""),
        p.Kind.TELEMETRY_REQUEST: (p.TelemetryRequest(), b""),
        p.Kind.TELEMETRY: (p.Telemetry(rss_bytes=1 << 30, busy_seconds=1.5, uptime_seconds=9.0, bytes_in=10,
                                       bytes_out=20, cache_hits=3, cache_misses=1, tensors_held=4, bytes_held=1 << 20,
                                       mem_free_bytes=5 << 30), b""),
        p.Kind.FREE: (p.Free(segment_id=2), b""),
        p.Kind.FREE_REPLY: (p.FreeReply(bytes_freed=100, tensors_held=0, bytes_held=0), b""),
        p.Kind.CALIBRATE: (p.Calibrate(ggml_types=[8, 12, 0], refresh=True), bytes(300)),
        p.Kind.CALIBRATE_REPLY: (p.CalibrateReply(gbps=[21.5, 15.25, 0.0], cached=True, threads=16), b""),
        p.Kind.ERROR_REPLY: (p.ErrorReply(code=p.ErrorCode.UNKNOWN_SEGMENT, message="no segment 9"), b""),
    }
    return samples[kind]


def _raw(kind: int, meta: bytes, payload: bytes = b"", *, magic: bytes = p.MAGIC, major: int = p.PROTOCOL_MAJOR,
         flags: int = 0, meta_len: int | None = None, payload_len: int | None = None) -> bytes:
    """A frame built by hand, so headers can lie."""
    meta_len = len(meta) if meta_len is None else meta_len
    payload_len = len(payload) if payload_len is None else payload_len
    return p.HEADER.pack(magic, major, 0, kind, flags, 1, meta_len, payload_len) + meta + payload


async def _read_all(data: bytes, limits: p.Limits, allowed=None, n: int = 1) -> list[p.Frame]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return [await asyncio.wait_for(p.read_frame(reader, limits, allowed), TIMEOUT_S) for _ in range(n)]


def read(data: bytes, limits: p.Limits = p.DEFAULT_LIMITS, allowed=None, n: int = 1) -> list[p.Frame]:
    return asyncio.run(_read_all(data, limits, allowed, n))


# --- round trips ---
def test_header_is_32_bytes() -> None:
    assert p.HEADER_SIZE == 32
    assert p.encode_frame(p.TelemetryRequest(), 5)[:4] == b"IKRP"


@pytest.mark.parametrize("kind", list(p.Kind), ids=lambda k: k.name)
def test_round_trip_every_kind(kind: p.Kind) -> None:
    message, payload = _sample(kind)
    (frame,) = read(p.encode_frame(message, 0xDEADBEEF12, payload))
    assert frame.message == message
    assert frame.header.kind == kind == p.kind_of(message)
    assert frame.header.request_id == 0xDEADBEEF12
    assert bytes(frame.payload) == payload
    assert frame.payload.readonly


def test_frames_follow_each_other_and_parts_equal_the_joined_frame() -> None:
    frames = [_sample(k) for k in p.Kind]
    data = b"".join(b"".join(bytes(x) for x in p.encode_frame_parts(m, i, pl)) for i, (m, pl) in enumerate(frames))
    got = read(data, n=len(frames))
    assert [f.message for f in got] == [m for m, _ in frames]
    assert [f.header.request_id for f in got] == list(range(len(frames)))


def test_run_segment_sections_round_trip() -> None:
    hidden, ids = _x(4, 16), np.arange(8, dtype=np.int64).reshape(4, 2)
    specs, parts = p.pack_arrays([("hidden", hidden), ("ids", ids)])
    msg = p.RunSegment(segment_id=0, pos_start=0, n_tokens=4, sections=specs)
    (frame,) = read(p.encode_frame(msg, 1, parts))
    got = p.unpack_arrays(frame.message.sections, frame.payload)
    np.testing.assert_array_equal(got[0], hidden)
    np.testing.assert_array_equal(got[1], ids)
    assert not got[0].flags.writeable  # a view of the received bytes, not a copy


def test_a_calibrate_may_carry_a_payload_and_its_reply_may_not() -> None:
    [frame] = read(p.encode_frame(p.Calibrate(ggml_types=[]), 3, bytes(1000)))
    assert frame.message == p.Calibrate(ggml_types=[]) and frame.payload.nbytes == 1000
    with pytest.raises(p.ProtocolError) as info:
        read(_raw(p.Kind.CALIBRATE_REPLY, _enc(p.CalibrateReply(gbps=[], cached=False, threads=1)), bytes(8)))
    assert info.value.code == p.ErrorCode.BAD_HEADER and info.value.fatal


def test_encode_refuses_a_payload_on_a_kind_without_one() -> None:
    with pytest.raises(ValueError, match="carries no payload"):
        p.encode_frame(p.Hello(), 1, b"x")


def test_blocking_socket_variants() -> None:
    a, b = socket.socketpair()
    with a, b:
        p.set_nodelay(a)
        msg, payload = _sample(p.Kind.RUN_SEGMENT)
        p.send_frame(a, msg, 3, payload)
        frame = p.recv_frame(b)
        assert frame.message == msg and bytes(frame.payload) == payload
        a.close()
        with pytest.raises(asyncio.IncompleteReadError):
            p.recv_frame(b)


def test_write_frame_over_loopback_tcp() -> None:
    async def go() -> p.Frame:
        got: asyncio.Future[p.Frame] = asyncio.get_running_loop().create_future()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.set_result(await p.read_frame(reader))
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            p.set_nodelay(writer)
            assert writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            msg, payload = _sample(p.Kind.UPLOAD_TENSOR)
            await p.write_frame(writer, msg, 9, payload)
            frame = await asyncio.wait_for(got, TIMEOUT_S)
            writer.close()
            return frame

    frame = asyncio.run(go())
    assert frame.message == _sample(p.Kind.UPLOAD_TENSOR)[0]


def test_error_reply_from_protocol_error() -> None:
    err = p.ProtocolError(p.ErrorCode.TOO_LARGE, "payload of 9 bytes", fatal=True)
    (frame,) = read(p.encode_frame(p.error_reply(err), 4))
    assert frame.message == p.ErrorReply(code=104, message="payload of 9 bytes", fatal=True)


# --- header and limits: refused before the body is read ---
def _refusal(data: bytes, limits: p.Limits = p.DEFAULT_LIMITS, allowed=None) -> tuple[p.ProtocolError, bytes]:
    """The error, and what the reader still held afterwards (the unread body)."""
    async def go() -> tuple[p.ProtocolError, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        with pytest.raises(p.ProtocolError) as info:
            await asyncio.wait_for(p.read_frame(reader, limits, allowed), TIMEOUT_S)
        return info.value, await reader.read()
    return asyncio.run(go())


META = msgspec.msgpack.encode(p.TelemetryRequest())


@pytest.mark.parametrize(("data", "code"), [
    (_raw(p.Kind.TELEMETRY_REQUEST, META, magic=b"GGUF"), p.ErrorCode.BAD_MAGIC),
    (_raw(p.Kind.TELEMETRY_REQUEST, META, flags=1), p.ErrorCode.BAD_HEADER),
    (_raw(p.Kind.TELEMETRY_REQUEST, META, b"xyz"), p.ErrorCode.BAD_HEADER),
])
def test_bad_header_is_fatal_and_leaves_the_body_unread(data: bytes, code: p.ErrorCode) -> None:
    err, rest = _refusal(data)
    assert err.code == code and err.fatal
    assert rest == data[p.HEADER_SIZE:]


def test_other_major_version_is_refused_with_both_versions() -> None:
    err, _ = _refusal(_raw(p.Kind.HELLO, msgspec.msgpack.encode(p.Hello()), major=p.PROTOCOL_MAJOR + 1))
    assert err.code == p.ErrorCode.VERSION_MISMATCH and err.fatal
    assert f"peer speaks protocol {p.PROTOCOL_MAJOR + 1}.0" in err.message
    assert f"this side speaks {p.PROTOCOL_MAJOR}.{p.PROTOCOL_MINOR}" in err.message


SMALL = p.Limits(max_meta_bytes=64, max_payload_bytes=1024)


def test_metadata_over_the_limit_is_refused_unread() -> None:
    meta = msgspec.msgpack.encode(p.ErrorReply(code=500, message="x" * 100))
    err, rest = _refusal(_raw(p.Kind.ERROR_REPLY, meta), SMALL)
    assert err.code == p.ErrorCode.TOO_LARGE and err.fatal and rest == meta


def test_payload_over_the_limit_is_refused_unread() -> None:
    meta = msgspec.msgpack.encode(p.UploadTensor(digest=DIGEST, offset=0))
    data = _raw(p.Kind.UPLOAD_TENSOR, meta, bytes(1025))
    err, rest = _refusal(data, SMALL)
    assert err.code == p.ErrorCode.TOO_LARGE and err.fatal and rest == data[p.HEADER_SIZE:]


@pytest.mark.parametrize(("meta_len", "payload_len"), [(2**32 - 1, 0), (16, 2**64 - 1), (16, 2**62)])
def test_huge_declared_sizes_allocate_nothing_and_do_not_wait(meta_len: int, payload_len: int) -> None:
    data = _raw(p.Kind.UPLOAD_TENSOR, b"", meta_len=meta_len, payload_len=payload_len)  # no body follows
    tracemalloc.start()
    try:
        err, _ = _refusal(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.code == p.ErrorCode.TOO_LARGE and err.fatal
    assert peak < 1 << 20


def test_only_hello_and_auth_before_authentication() -> None:
    msg, payload = _sample(p.Kind.RUN_SEGMENT)
    data = p.encode_frame(msg, 1, payload)
    err, rest = _refusal(data, p.PREAUTH_LIMITS, p.PREAUTH_KINDS)
    assert err.code == p.ErrorCode.AUTH_REQUIRED and err.fatal and rest == data[p.HEADER_SIZE:]
    for kind in (p.Kind.HELLO, p.Kind.AUTH):
        (frame,) = read(p.encode_frame(_sample(kind)[0], 1), p.PREAUTH_LIMITS, p.PREAUTH_KINDS)
        assert frame.header.kind == kind


# --- strict decoding: errors after the body keep the stream in sync ---
def _enc(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


@pytest.mark.parametrize(("kind", "meta", "payload", "code"), [
    (p.Kind.HELLO, _enc({"kind": 1, "major": "1"}), b"", p.ErrorCode.BAD_METADATA),
    (p.Kind.HELLO, b"\xc1garbage", b"", p.ErrorCode.BAD_METADATA),
    (p.Kind.HELLO, b"", b"", p.ErrorCode.BAD_METADATA),
    (p.Kind.HELLO, _enc({"major": 1}), b"", p.ErrorCode.BAD_METADATA),  # no tag
    (p.Kind.AUTH, _enc({"kind": 2, "mac": "not-bytes"}), b"", p.ErrorCode.BAD_METADATA),
    (p.Kind.OFFER_TENSOR, _enc(p.Hello()), b"", p.ErrorCode.KIND_MISMATCH),
    (p.Kind.OFFER_TENSOR, _enc({"kind": 4, "digest": "XY" * 32, "nbytes": 1, "ggml_type": 0, "shape": [1]}), b"",
     p.ErrorCode.BAD_METADATA),
    (p.Kind.OFFER_TENSOR, _enc({"kind": 4, "digest": DIGEST, "nbytes": -1, "ggml_type": 0, "shape": [1]}), b"",
     p.ErrorCode.BAD_METADATA),
    (p.Kind.OFFER_TENSOR, _enc({"kind": 4, "digest": DIGEST, "nbytes": 1, "ggml_type": 0, "shape": [1] * 9}), b"",
     p.ErrorCode.BAD_METADATA),
    (p.Kind.OFFER_TENSOR, _enc(p.OfferTensor(digest=DIGEST, nbytes=1 << 40, ggml_type=0, shape=[2**40])), b"",
     p.ErrorCode.TOO_LARGE),
    (p.Kind.OFFER_TENSOR, _enc(p.OfferTensor(digest=DIGEST, nbytes=1 << 40, ggml_type=0, shape=[2**62, 2**62])),
     b"", p.ErrorCode.BAD_ARRAY),
    (p.Kind.OFFER_TENSOR, _enc(p.OfferTensor(digest=DIGEST, nbytes=1, ggml_type=0, shape=[2**40, 2**40])), b"",
     p.ErrorCode.BAD_ARRAY),
    (p.Kind.KV_OP, _enc({"kind": 8, "op": "rewind"}), b"", p.ErrorCode.BAD_METADATA),
    (p.Kind.DEFINE_SEGMENT, _enc({"kind": 6, "segment_id": 1, "ops": [{"op": "x", "args": {"a": {"b": 1}}}]}), b"",
     p.ErrorCode.BAD_METADATA),
    (p.Kind.RUN_SEGMENT, _enc({"kind": 7, "segment_id": 1, "pos_start": 0, "n_tokens": 1,
                               "sections": [{"dtype": "c64", "shape": [1]}]}), bytes(8), p.ErrorCode.BAD_METADATA),
    (p.Kind.RUN_SEGMENT, _enc(p.RunSegment(segment_id=1, pos_start=0, n_tokens=1,
                                           sections=[p.ArraySpec(dtype="f32", shape=[2**62, 2**62])])), bytes(8),
     p.ErrorCode.BAD_ARRAY),
    (p.Kind.RUN_SEGMENT, _enc(p.RunSegment(segment_id=1, pos_start=0, n_tokens=1,
                                           sections=[p.ArraySpec(dtype="f32", shape=[3])])), bytes(8),
     p.ErrorCode.BAD_ARRAY),
    (p.Kind.UPLOAD_TENSOR, _enc(p.UploadTensor(digest=DIGEST, offset=(64 << 30) - 1)), bytes(2),
     p.ErrorCode.TOO_LARGE),
    (0x55, _enc({"kind": 0x55}), b"", p.ErrorCode.UNKNOWN_KIND),
    (p.Kind.CALIBRATE, _enc(p.Calibrate(ggml_types=[8] * (p.MAX_CALIBRATE_TYPES + 1))), bytes(4),
     p.ErrorCode.BAD_METADATA),
    (p.Kind.CALIBRATE, _enc({"kind": 0x0B, "ggml_types": [-1]}), b"", p.ErrorCode.BAD_METADATA),
    (p.Kind.CALIBRATE_REPLY, _enc({"kind": 0x8B, "gbps": [1.0] * 65, "cached": False, "threads": 1}), b"",
     p.ErrorCode.BAD_METADATA),
], ids=lambda v: v.name if isinstance(v, p.ErrorCode) else "")
def test_strict_decoding_errors_are_not_fatal(kind: int, meta: bytes, payload: bytes, code: p.ErrorCode) -> None:
    after = p.encode_frame(p.TelemetryRequest(), 2)

    async def go() -> tuple[p.ProtocolError, p.Frame]:
        reader = asyncio.StreamReader()
        reader.feed_data(_raw(kind, meta, payload) + after)
        reader.feed_eof()
        with pytest.raises(p.ProtocolError) as info:
            await asyncio.wait_for(p.read_frame(reader), TIMEOUT_S)
        return info.value, await asyncio.wait_for(p.read_frame(reader), TIMEOUT_S)

    err, nxt = asyncio.run(go())
    assert err.code == code and not err.fatal, err
    assert nxt.message == p.TelemetryRequest() and nxt.header.request_id == 2


def test_peer_closing_mid_frame_is_an_incomplete_read() -> None:
    msg, payload = _sample(p.Kind.RUN_SEGMENT)
    data = p.encode_frame(msg, 1, payload)
    for cut in (0, 5, p.HEADER_SIZE, len(data) - 1):
        with pytest.raises(asyncio.IncompleteReadError):
            read(data[:cut])


# --- arrays ---
@pytest.mark.parametrize("array", [
    np.empty((0,), np.float32), np.empty((0, 7), np.float16), np.array(2.5, np.float32),
    np.arange(10, dtype=">i4"), np.arange(12, dtype=np.int64).reshape(3, 4).T, np.arange(5, dtype=np.uint8),
], ids=["empty", "empty-2d", "0-d", "big-endian", "non-contiguous", "u8"])
def test_pack_unpack_edge_cases(array: np.ndarray) -> None:
    spec, data = p.pack_array(array, "a")
    assert spec.shape == list(array.shape)
    out = p.unpack_array(spec, bytes(data))
    np.testing.assert_array_equal(out, array)
    assert out.dtype.byteorder in "<|="


@pytest.mark.parametrize("dtype", [np.longdouble, np.bool_, np.complex64, np.int16, np.uint32])
def test_dtype_not_allowed(dtype: type) -> None:
    with pytest.raises(p.ProtocolError, match="not allowed") as info:
        p.pack_array(np.zeros(3, dtype))
    assert info.value.code == p.ErrorCode.BAD_ARRAY
    with pytest.raises(p.ProtocolError):
        p.unpack_array(p.ArraySpec(dtype="c64", shape=[3]), bytes(24))  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**63 - 1, 2**63 - 1, 2], [1] * 9, [2**31 + 1]])
def test_overflowing_or_too_many_dims_are_refused(shape: list[int]) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.unpack_array(p.ArraySpec(dtype="u8", shape=shape), b"")
    assert info.value.code == p.ErrorCode.BAD_ARRAY


def test_size_mismatch_and_lower_dim_limit() -> None:
    spec, data = p.pack_array(_x(2, 3))
    for wrong in (bytes(data)[:-1], bytes(data) + b"\0", b""):
        with pytest.raises(p.ProtocolError, match="needs 24 bytes"):
            p.unpack_array(spec, wrong)
    with pytest.raises(p.ProtocolError, match="dims exceed"):
        p.unpack_array(p.ArraySpec(dtype="f32", shape=[1, 1, 1, 1, 1]), bytes(4), p.Limits(max_dims=4))
    specs, parts = p.pack_arrays([("a", _x(3)), ("b", _x(2))])
    with pytest.raises(p.ProtocolError, match="sections need"):
        p.unpack_arrays(specs, b"".join(bytes(x) for x in parts) + bytes(8))


def test_sections_are_aligned() -> None:
    specs, parts = p.pack_arrays([("ids", np.arange(3, dtype=np.uint8)), ("x", np.arange(2, dtype=np.int64))])
    assert p.sections_layout(specs) == [(0, 3), (8, 24)]
    assert sum(len(bytes(x)) for x in parts) == 24


# --- HMAC ---
def test_sign_and_verify() -> None:
    nonce = p.make_challenge()
    assert len(nonce) == p.NONCE_BYTES and nonce != p.make_challenge()
    mac = p.sign("secret", nonce)
    assert len(mac) == p.MAC_BYTES
    assert p.verify("secret", nonce, mac) and p.verify(b"secret", nonce, mac)
    assert not p.verify("wrong", nonce, mac)
    assert not p.verify("secret", p.make_challenge(), mac)
    assert not p.verify("secret", nonce, mac[:-1])
    assert not p.verify("secret", nonce, mac, "server")  # a client proof is not a server proof
    assert not p.verify("secret", b"", p.sign("secret", b""))  # an empty challenge proves nothing


# --- fuzz: read_frame returns a Frame or raises ProtocolError / IncompleteReadError, promptly ---
FUZZ_LIMITS = p.Limits(max_meta_bytes=4096, max_payload_bytes=8192, max_elements=4096, max_tensor_bytes=1 << 20)
VALID = [p.encode_frame(m, i, pl) for i, (m, pl) in enumerate(_sample(k) for k in p.Kind)]


async def _drain(data: bytes, limits: p.Limits) -> list[p.Frame]:
    """Read frames until EOF or a fatal error, as a worker loop would."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    while True:
        try:
            frame = await p.read_frame(reader, limits)
        except asyncio.IncompleteReadError:
            return frames
        except p.ProtocolError as e:
            if e.fatal:
                return frames
            continue
        assert frame.header.kind == p.kind_of(frame.message)
        assert frame.payload.nbytes == frame.header.payload_len <= limits.max_payload_bytes
        frames.append(frame)


def _check_fuzz(data: bytes, limits: p.Limits = FUZZ_LIMITS) -> None:
    asyncio.run(asyncio.wait_for(_drain(data, limits), TIMEOUT_S))


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.sampled_from(VALID), min_size=1, max_size=4),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       st.integers(0, 10**6), st.binary(max_size=16))
def test_fuzz_mutated_frames(frames: list[bytes], flips: list[tuple[int, int]], cut: int, junk: bytes) -> None:
    data = bytearray(b"".join(frames))
    for pos, value in flips:
        data[pos % len(data)] = value
    data = data[: cut % (len(data) + 1)] + junk
    _check_fuzz(bytes(data))


@FUZZ
@given(st.one_of(st.just(p.MAGIC), st.binary(min_size=4, max_size=4)), st.sampled_from([1, 1, 1, 0, 2, 0xFFFF]),
       st.one_of(st.sampled_from(list(p.Kind)), st.integers(0, 0xFFFF)), st.sampled_from([0, 0, 0, 1, 0x8000]),
       st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
       st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1)),
       st.binary(max_size=256))
def test_fuzz_random_headers(magic: bytes, major: int, kind: int, flags: int, meta_len: int, payload_len: int,
                             body: bytes) -> None:
    _check_fuzz(struct.pack("<4sHHHHQIQ", magic, major, 0, kind, flags, 7, meta_len, payload_len) + body)


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8) | st.sampled_from(["f32", "i64", "hit", "clear", DIGEST]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["kind", "shape", "sections", "dtype", "ops", "args", "op", "digest", "nbytes", "mac"])
        | st.text(max_size=4), inner, max_size=6),
    max_leaves=20,
)


@FUZZ
@given(st.sampled_from(list(p.Kind)), MSGPACK_VALUES, st.binary(max_size=64), st.booleans())
def test_fuzz_random_metadata(kind: p.Kind, value: object, payload: bytes, tagged: bool) -> None:
    if tagged and isinstance(value, dict):
        value = {**value, "kind": int(kind)}
    if kind not in p.PAYLOAD_KINDS:
        payload = b""
    _check_fuzz(_raw(kind, msgspec.msgpack.encode(value), payload))


# ---- polling and loopback ---------------------------------------------------------------------------------------


def test_poll_readable_returns_when_data_arrives() -> None:
    import threading
    import time

    a, b = socket.socketpair()
    with a, b:
        t0 = time.monotonic()
        p.poll_readable(a, 0.05)  # nothing comes: it gives up at the deadline, not before
        assert time.monotonic() - t0 >= 0.05
        sender = threading.Timer(0.1, lambda: b.sendall(b"x"))
        sender.start()
        t0 = time.monotonic()
        p.poll_readable(a, 30.0)  # data mid-spin ends it long before the deadline
        assert time.monotonic() - t0 < 20 and a.recv(1) == b"x"
        sender.join()
        t0 = time.monotonic()
        p.poll_readable(a, 0.0)  # 0: no spinning at all
        p.poll_readable(a, -1.0)
        assert time.monotonic() - t0 < 1


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
    ("localhost", True), ("198.51.100.7", False), ("::ffff:198.51.100.7", False), ("fe80::1%eth0", False),
    ("0.0.0.0", False), ("example.invalid", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert p.is_loopback(host) is loopback


def test_peer_is_loopback_on_a_real_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as ls, socket.create_connection(ls.getsockname()) as c:
        assert p.peer_is_loopback(c)
    lone = socket.socket()  # not connected: no peer, no loopback
    with lone:
        assert not p.peer_is_loopback(lone)
