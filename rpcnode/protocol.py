"""The ikctl wire format: frame header, limits, raw array payloads and HMAC auth around the typed messages of
rpcnode.messages."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import math
import secrets
import select
import socket
import struct
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import msgspec
import numpy as np

from rpcnode.endpoint import Endpoint
from rpcnode.errors import IkctlError
from rpcnode.messages import *  # noqa: F403  (the messages are this module's interface too: P.Hello)
from rpcnode.messages import (
    MAX_DIMS,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    ArraySpec,
    ErrorCode,
    ErrorReply,
    Kind,
    Message,
    OfferTensor,
    RunReply,
    RunSegment,
    UploadTensor,
)

MAGIC = b"IKRP"

# magic, major, minor, kind, flags, request id, metadata length, payload length; little-endian, no padding.
# The first 8 bytes (magic + version) never change across majors, so any version can read a peer's version.
HEADER = struct.Struct("<4sHHHHQIQ")
HEADER_SIZE = HEADER.size  # 32

SECTION_ALIGN = 8  # payload sections start at multiples of this, so i64/f32 views are aligned
NONCE_BYTES = 32
MAC_BYTES = 32


class ProtocolError(IkctlError):
    """Anything malformed on the wire; `fatal` means the stream is out of sync and must be closed."""

    def __init__(self, code: ErrorCode, message: str, *, fatal: bool = False) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.fatal = fatal


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds checked against the header and the metadata before anything is allocated or trusted."""

    max_meta_bytes: int = 1 << 20
    max_payload_bytes: int = 256 << 20
    max_dims: int = MAX_DIMS
    max_elements: int = 1 << 31
    max_tensor_bytes: int = 64 << 30  # offered tensors arrive in chunks, so this bounds the cache entry, not a read


DEFAULT_LIMITS = Limits()
# Before auth only HELLO and AUTH are read, and they are tiny.
PREAUTH_LIMITS = Limits(max_meta_bytes=4096, max_payload_bytes=0)
PREAUTH_KINDS = frozenset({Kind.HELLO, Kind.AUTH})
# The only kinds whose frames may carry a payload; any other kind declaring one is refused before reading it.
# A Calibrate's payload is bytes the worker reads and discards (a client times its upload with them).
PAYLOAD_KINDS = frozenset({Kind.UPLOAD_TENSOR, Kind.RUN_SEGMENT, Kind.RUN_REPLY, Kind.CALIBRATE})

_KINDS = frozenset(int(k) for k in Kind)
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Message)


def rpc_device(endpoint: str) -> str:
    """The device name of the worker at host:port, as llama.cpp's -ot and --device-mem write it."""
    return Endpoint(endpoint).device


def kind_of(message: Message) -> Kind:
    """The header kind for a message (its struct tag)."""
    return Kind(type(message).__struct_config__.tag)


def error_reply(err: ProtocolError) -> ErrorReply:
    """The reply a worker sends for a ProtocolError it caught."""
    return ErrorReply(code=int(err.code), message=err.message[:4096], fatal=err.fatal)


# --- frames ---
class Header(NamedTuple):
    major: int
    minor: int
    kind: int
    flags: int
    request_id: int
    meta_len: int
    payload_len: int


class Frame(NamedTuple):
    header: Header
    message: Message
    payload: memoryview  # read-only; np.frombuffer views of it share its memory


Buffer = bytes | bytearray | memoryview
Payload = Buffer | Sequence[Buffer]


def _parts(payload: Payload) -> list[Buffer]:
    return [payload] if isinstance(payload, bytes | bytearray | memoryview) else list(payload)


def _nbytes(b: Buffer) -> int:
    return b.nbytes if isinstance(b, memoryview) else len(b)


def encode_frame_parts(message: Message, request_id: int, payload: Payload = b"") -> list[Buffer]:
    """Header + metadata as one bytes object, then the payload buffers uncopied (for writelines/sendall)."""
    meta = _ENCODER.encode(message)
    parts = [p for p in _parts(payload) if _nbytes(p)]
    payload_len = sum(_nbytes(p) for p in parts)
    if payload_len and kind_of(message) not in PAYLOAD_KINDS:
        raise ValueError(f"{type(message).__name__} carries no payload ({payload_len} bytes given)")
    head = HEADER.pack(MAGIC, PROTOCOL_MAJOR, PROTOCOL_MINOR, kind_of(message), 0, request_id, len(meta), payload_len)
    return [head + meta, *parts]


def encode_frame(message: Message, request_id: int, payload: Payload = b"") -> bytes:
    """One frame as a single bytes object (copies the payload; use encode_frame_parts for big ones)."""
    return b"".join(encode_frame_parts(message, request_id, payload))


def parse_header(data: Buffer, limits: Limits = DEFAULT_LIMITS, allowed: Container[int] | None = None) -> Header:
    """Validate the 32 header bytes; every refusal here is fatal because the body is left unread."""
    magic, *rest = HEADER.unpack(data)
    h = Header(*rest)
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_MAGIC, f"bad magic {magic!r}, expected {MAGIC!r}", fatal=True)
    if h.major != PROTOCOL_MAJOR:
        raise ProtocolError(ErrorCode.VERSION_MISMATCH, f"peer speaks protocol {h.major}.{h.minor}, "
                            f"this side speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}", fatal=True)
    if h.flags:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"reserved flags set: {h.flags:#06x}", fatal=True)
    if allowed is not None and h.kind not in allowed:
        raise ProtocolError(ErrorCode.AUTH_REQUIRED, f"kind {h.kind:#04x} not allowed before authentication",
                            fatal=True)
    if h.meta_len > limits.max_meta_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"metadata of {h.meta_len} bytes exceeds the limit of "
                            f"{limits.max_meta_bytes}", fatal=True)
    if h.payload_len > limits.max_payload_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"payload of {h.payload_len} bytes exceeds the limit of "
                            f"{limits.max_payload_bytes}", fatal=True)
    if h.payload_len and h.kind not in PAYLOAD_KINDS:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"kind {h.kind:#04x} carries no payload, header declares "
                            f"{h.payload_len} bytes", fatal=True)
    return h


def decode_body(header: Header, meta: Buffer, payload: Buffer, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Strictly decode the metadata and check it against the payload; errors here leave the stream in sync."""
    if _nbytes(payload) != header.payload_len:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"header declares {header.payload_len} payload bytes, "
                            f"{_nbytes(payload)} given", fatal=True)
    return Frame(header, decode_meta(header, meta, limits), memoryview(payload).toreadonly())


def decode_meta(header: Header, meta: Buffer, limits: Limits = DEFAULT_LIMITS) -> Message:
    """The metadata, checked against the header's declared payload length: a receiver can refuse a frame (and
    skip its payload unread and unallocated) before a byte of the payload is stored."""
    if header.kind not in _KINDS:
        raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"unknown message kind {header.kind:#04x}")
    try:
        message = _DECODER.decode(meta)
    except (msgspec.DecodeError, ValueError) as e:  # ValidationError is a DecodeError; bad UTF-8 is a ValueError
        raise ProtocolError(ErrorCode.BAD_METADATA, f"{Kind(header.kind).name}: {e}") from None
    except RecursionError:  # containers nested past the interpreter's depth (a few bytes each: b"\x91" * 10**5)
        raise ProtocolError(ErrorCode.BAD_METADATA, f"{Kind(header.kind).name}: nested too deeply") from None
    if kind_of(message) != header.kind:
        raise ProtocolError(ErrorCode.KIND_MISMATCH, f"header says {Kind(header.kind).name}, "
                            f"metadata says {kind_of(message).name}")
    check_message(message, header.payload_len, limits)
    return message


def check_message(message: Message, payload_len: int, limits: Limits = DEFAULT_LIMITS) -> None:
    """Bounds the schema cannot express: shapes and sizes against limits, sections against the payload."""
    if isinstance(message, RunSegment | RunReply):
        end = sections_layout(message.sections, limits)[-1][1] if message.sections else 0
        if end != payload_len:
            raise ProtocolError(ErrorCode.BAD_ARRAY, f"sections need {end} payload bytes, frame has {payload_len}")
    if isinstance(message, RunSegment) and message.seqs:
        _check_seqs(message)
    elif isinstance(message, OfferTensor):
        _check_shape(message.shape, limits, (1 << 63) - 1)  # a whole expert stack passes 2**31 elements; int64 holds it
        if message.nbytes > limits.max_tensor_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"tensor of {message.nbytes} bytes exceeds the limit of "
                                f"{limits.max_tensor_bytes}")
    elif isinstance(message, UploadTensor) and message.offset + payload_len > limits.max_tensor_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"upload reaches byte {message.offset + payload_len}, limit is "
                            f"{limits.max_tensor_bytes}")


def _check_seqs(m: RunSegment) -> None:
    """A batched run's sequences: distinct, their token counts summing to the run's."""
    total = sum(s.n_tokens for s in m.seqs)
    if total != m.n_tokens:
        raise ProtocolError(ErrorCode.BAD_METADATA, f"the sequences' token counts sum to {total}, n_tokens is "
                            f"{m.n_tokens}")
    ids = [s.seq_id for s in m.seqs]
    if len(set(ids)) != len(ids):
        twice = next(v for k, v in enumerate(ids) if v in ids[:k])
        raise ProtocolError(ErrorCode.BAD_METADATA, f"sequence {twice} appears twice in one run")


async def read_frame(reader: asyncio.StreamReader, limits: Limits = DEFAULT_LIMITS,
                     allowed: Container[int] | None = None) -> Frame:
    """Read one frame; raises ProtocolError, or IncompleteReadError when the peer closes mid-frame (or before it)."""
    header = parse_header(await reader.readexactly(HEADER_SIZE), limits, allowed)
    meta = await reader.readexactly(header.meta_len)
    payload = await reader.readexactly(header.payload_len)
    return decode_body(header, meta, payload, limits)


async def write_frame(writer: asyncio.StreamWriter, message: Message, request_id: int, payload: Payload = b"") -> None:
    """Send one frame without copying the payload, then wait for the transport to drain."""
    writer.writelines(encode_frame_parts(message, request_id, payload))
    await writer.drain()


def recv_exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)  # n was checked against the limits before this is called
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise asyncio.IncompleteReadError(bytes(buf[:got]), n)
        got += k
    return buf


def recv_frame(sock: socket.socket, limits: Limits = DEFAULT_LIMITS, allowed: Container[int] | None = None) -> Frame:
    """Blocking twin of read_frame, for sync clients; EOF raises IncompleteReadError (an EOFError) as well."""
    header = parse_header(recv_exactly(sock, HEADER_SIZE), limits, allowed)
    meta = recv_exactly(sock, header.meta_len)
    payload = recv_exactly(sock, header.payload_len)
    return decode_body(header, meta, payload, limits)


def send_frame(sock: socket.socket, message: Message, request_id: int, payload: Payload = b"") -> int:
    """Blocking twin of write_frame; the bytes sent."""
    parts = encode_frame_parts(message, request_id, payload)
    n = sum(_nbytes(p) for p in parts)
    if n <= 1 << 16:  # a small frame in one write: one TCP segment instead of four, half the latency
        parts = [b"".join(parts)]
    for part in parts:
        sock.sendall(part)
    return n


def poll_readable(sock: socket.socket, seconds: float) -> None:
    """Spin up to `seconds` until the socket has data (then a blocking read finds it at once).

    An idle core wakes slowly: on the VMs and power-saving CPUs workers run on, the interrupt that ends a blocking
    wait costs 0.1-0.3 ms, which a decode step pays on both sides of each of its round trips. llama.cpp's
    threads poll for work for the same reason (its --poll)."""
    if seconds <= 0:
        return
    deadline = time.perf_counter() + seconds
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while not poller.poll(0) and time.perf_counter() < deadline:
        pass


def is_loopback(host: str) -> bool:
    """An address (or `localhost`) of this machine's loopback: 127.0.0.0/8, ::1, ::ffff:127.x.x.x."""
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as a dual-stack listener sees IPv4 peers
    return (mapped or addr).is_loopback


def peer_is_loopback(sock: socket.socket) -> bool:
    """The peer is this machine: it shares our cores, so spinning while it works would steal its time."""
    try:
        return is_loopback(sock.getpeername()[0])
    except OSError:
        return False


def set_nodelay(conn: socket.socket | asyncio.StreamWriter) -> None:
    """TCP_NODELAY on a socket or a stream's socket: a segment round trip must not wait for Nagle."""
    sock = conn.get_extra_info("socket") if isinstance(conn, asyncio.StreamWriter) else conn
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --- arrays in the payload ---
_DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "i32": np.dtype("<i4"), "i64": np.dtype("<i8"),
    "u8": np.dtype("<u1"), "f64": np.dtype("<f8"),  # f64 since 1.2: a split layer's partial sums
}
_NAMES = {(dt.kind, dt.itemsize): name for name, dt in _DTYPES.items()}  # any byte order packs as little-endian


def _check_shape(shape: Sequence[int], limits: Limits, max_elements: int | None = None) -> int:
    max_elements = limits.max_elements if max_elements is None else max_elements
    if len(shape) > limits.max_dims:
        raise ProtocolError(ErrorCode.BAD_ARRAY, f"{len(shape)} dims exceed the limit of {limits.max_dims}")
    count = math.prod(shape)  # Python ints: no overflow, however large the declared dims
    if count > max_elements:
        raise ProtocolError(ErrorCode.BAD_ARRAY, f"shape {list(shape)} has {count} elements, limit is {max_elements}")
    return count


def array_nbytes(spec: ArraySpec, limits: Limits = DEFAULT_LIMITS) -> int:
    """Bytes of one section, after checking its shape against the limits."""
    return _check_shape(spec.shape, limits) * _DTYPES[spec.dtype].itemsize


def sections_layout(specs: Sequence[ArraySpec], limits: Limits = DEFAULT_LIMITS) -> list[tuple[int, int]]:
    """(start, end) byte range of each section; each starts at the next multiple of SECTION_ALIGN."""
    out, pos = [], 0
    for spec in specs:
        start = -(-pos // SECTION_ALIGN) * SECTION_ALIGN
        pos = start + array_nbytes(spec, limits)
        if pos > limits.max_payload_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"sections need {pos} bytes, limit is {limits.max_payload_bytes}")
        out.append((start, pos))
    return out


def pack_array(array: np.ndarray, name: str = "") -> tuple[ArraySpec, memoryview]:
    """Spec and little-endian C-order bytes of an array (no copy when it already is)."""
    kind = _NAMES.get((array.dtype.kind, array.dtype.itemsize))
    if kind is None:
        raise ProtocolError(ErrorCode.BAD_ARRAY, f"dtype {array.dtype} not allowed; use one of {sorted(_DTYPES)}")
    data = np.asarray(array, dtype=_DTYPES[kind], order="C")  # ascontiguousarray would turn 0-d into 1-d
    return ArraySpec(name=name, dtype=kind, shape=list(data.shape)), memoryview(data.reshape(-1)).cast("B")


def unpack_array(spec: ArraySpec, payload: Buffer, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """View the payload as the array the spec describes (read-only when the payload is; no copy)."""
    if spec.dtype not in _DTYPES:
        raise ProtocolError(ErrorCode.BAD_ARRAY, f"dtype {spec.dtype!r} not allowed; use one of {sorted(_DTYPES)}")
    need = array_nbytes(spec, limits)
    have = _nbytes(payload)
    if need != have:
        raise ProtocolError(ErrorCode.BAD_ARRAY, f"{spec.name or 'array'} {spec.dtype}{list(spec.shape)} needs "
                            f"{need} bytes, payload has {have}")
    return np.frombuffer(payload, dtype=_DTYPES[spec.dtype]).reshape(spec.shape)


def pack_arrays(arrays: Sequence[tuple[str, np.ndarray]]) -> tuple[list[ArraySpec], list[Buffer]]:
    """Specs and payload buffers (with alignment padding) for several named sections."""
    specs, parts, pos = [], [], 0
    for name, array in arrays:
        spec, data = pack_array(array, name)
        pad = -pos % SECTION_ALIGN
        if pad:
            parts.append(bytes(pad))
        specs.append(spec)
        parts.append(data)
        pos += pad + data.nbytes
    return specs, parts


def unpack_arrays(specs: Sequence[ArraySpec], payload: Buffer, limits: Limits = DEFAULT_LIMITS) -> list[np.ndarray]:
    """Views of every section of a payload, in order; the payload must end exactly after the last one."""
    view = memoryview(payload).cast("B")
    layout = sections_layout(specs, limits)
    end = layout[-1][1] if layout else 0
    if end != view.nbytes:
        raise ProtocolError(ErrorCode.BAD_ARRAY, f"sections need {end} payload bytes, payload has {view.nbytes}")
    return [unpack_array(spec, view[a:b], limits) for spec, (a, b) in zip(specs, layout, strict=True)]


# --- authentication ---
_AUTH_CONTEXT = {"client": b"IKRP auth v1 client\0", "server": b"IKRP auth v1 server\0"}


def make_challenge() -> bytes:
    """A fresh random nonce for HelloReply (or Hello, for the client's challenge of the server)."""
    return secrets.token_bytes(NONCE_BYTES)


def sign(token: str | bytes, nonce: bytes, role: Literal["client", "server"] = "client") -> bytes:
    """HMAC-SHA256 of a role label + nonce under the shared token; the label stops a server's proof being replayed."""
    key = token.encode() if isinstance(token, str) else token
    return hmac.new(key, _AUTH_CONTEXT[role] + nonce, hashlib.sha256).digest()


def verify(token: str | bytes, nonce: bytes, mac: bytes, role: Literal["client", "server"] = "client") -> bool:
    """Constant-time check of a MAC made by sign()."""
    return len(nonce) > 0 and hmac.compare_digest(sign(token, nonce, role), mac)
