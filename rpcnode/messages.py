"""The typed messages of the ikctl wire protocol (msgspec structs, checked while decoding), their kinds and error codes.

rpcnode.protocol frames them; it re-exports every name here, so callers write `P.Hello`, `P.Kind`.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "MAX_CALIBRATE_TYPES",
    "MAX_DIMS",
    "MAX_RUN_SEQUENCES",
    "PROTOCOL_MAJOR",
    "PROTOCOL_MINOR",
    "U16",
    "U32",
    "U64",
    "ArgValue",
    "ArraySpec",
    "Auth",
    "AuthReply",
    "Calibrate",
    "CalibrateReply",
    "DType",
    "DefineReply",
    "DefineSegment",
    "DeviceInfo",
    "DeviceInfoRequest",
    "Digest",
    "ErrorCode",
    "ErrorReply",
    "Free",
    "FreeReply",
    "Hello",
    "HelloReply",
    "KVOp",
    "KVReply",
    "Kind",
    "Message",
    "Name",
    "Nonce",
    "OfferReply",
    "OfferTensor",
    "OpRecord",
    "RunReply",
    "RunSegment",
    "Scalar",
    "SeqSpan",
    "Shape",
    "Telemetry",
    "TelemetryRequest",
    "Text",
    "UploadReply",
    "UploadTensor",
]

PROTOCOL_MAJOR = 1
# 1.1: RunSegment.seqs (several sequences in one run); 1.2: expert id -1 (split experts); 1.3: Calibrate (measured
# decode speed per weight type, and a payload to time the link with) for automatic placement
PROTOCOL_MINOR = 3
MAX_DIMS = 8  # hard cap in the schema; Limits.max_dims may only be lower
MAX_RUN_SEQUENCES = 64  # hard cap in the schema on RunSegment.seqs; a worker may take fewer
MAX_CALIBRATE_TYPES = 64  # hard cap in the schema on Calibrate.ggml_types (GGML has about 40 types)


class Kind(IntEnum):
    """Message kinds; a reply is its request's kind | 0x80."""

    HELLO = 0x01
    AUTH = 0x02
    DEVICE_INFO_REQUEST = 0x03
    OFFER_TENSOR = 0x04
    UPLOAD_TENSOR = 0x05
    DEFINE_SEGMENT = 0x06
    RUN_SEGMENT = 0x07
    KV_OP = 0x08
    TELEMETRY_REQUEST = 0x09
    FREE = 0x0A
    CALIBRATE = 0x0B  # since 1.3
    HELLO_REPLY = 0x81
    AUTH_REPLY = 0x82
    DEVICE_INFO = 0x83
    OFFER_REPLY = 0x84
    UPLOAD_REPLY = 0x85
    DEFINE_REPLY = 0x86
    RUN_REPLY = 0x87
    KV_REPLY = 0x88
    TELEMETRY = 0x89
    FREE_REPLY = 0x8A
    CALIBRATE_REPLY = 0x8B
    ERROR_REPLY = 0xFF


class ErrorCode(IntEnum):
    """Error codes: 1xx framing, 2xx auth, 3xx request semantics, 5xx worker faults."""

    BAD_MAGIC = 100
    VERSION_MISMATCH = 101
    BAD_HEADER = 102
    UNKNOWN_KIND = 103
    TOO_LARGE = 104
    BAD_METADATA = 105
    BAD_ARRAY = 106
    KIND_MISMATCH = 107
    AUTH_REQUIRED = 200
    AUTH_FAILED = 201
    UNKNOWN_SEGMENT = 300
    UNKNOWN_TENSOR = 301
    DIGEST_MISMATCH = 302
    BAD_UPLOAD = 303
    BAD_PROGRAM = 304
    OUT_OF_MEMORY = 305
    UNKNOWN_SEQUENCE = 306
    INTERNAL = 500
    BUSY = 503  # the worker has --max-connections peers already; try again when one leaves
    TIMED_OUT = 504  # the peer was idle, or stalled mid-frame or mid-upload, past the worker's limit; it closes
    DISK_FULL = 507  # the disk under the worker's tensor cache (or its quota) is full, even after evicting
    DISK_FAILED = 508  # the disk under the worker's tensor cache failed otherwise (I/O error, read-only, too large)


# metadata field types (checked by msgspec while decoding)
U16 = Annotated[int, Meta(ge=0, le=0xFFFF)]
U32 = Annotated[int, Meta(ge=0, le=0xFFFF_FFFF)]
U64 = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]  # msgspec bounds stop at int64; no count gets near
# BLAKE3-256 of the tensor bytes, lowercase hex; \Z, not $, which lets a trailing newline through
Digest = Annotated[str, Meta(pattern=r"\A[0-9a-f]{64}\Z")]
Name = Annotated[str, Meta(max_length=256)]
Text = Annotated[str, Meta(max_length=4096)]
Nonce = Annotated[bytes, Meta(max_length=64)]
Shape = Annotated[list[U64], Meta(max_length=MAX_DIMS)]
DType = Literal["f32", "f16", "i32", "i64", "u8", "f64"]  # f64 since 1.2
Scalar = str | int | float | bool
ArgValue = Scalar | Annotated[list[Scalar], Meta(max_length=65536)]


class ArraySpec(msgspec.Struct, frozen=True, kw_only=True):
    """One little-endian C-order array in the payload; sections follow each other, each aligned to 8 bytes."""

    name: Name = ""
    dtype: DType
    shape: Shape


class OpRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One op of a segment program; tensors are named by digest inside `args`; meaning belongs to the worker."""

    op: Name
    args: dict[Name, ArgValue] = {}


class _Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Base of every message; the integer tag in field "kind" equals the header kind."""


class Hello(_Message, tag=int(Kind.HELLO), kw_only=True):
    major: U16 = PROTOCOL_MAJOR
    minor: U16 = PROTOCOL_MINOR
    client: Name = ""
    want_auth: bool = True
    nonce: Nonce = b""  # optional client challenge; the server proves the token in AuthReply.mac


class HelloReply(_Message, tag=int(Kind.HELLO_REPLY), kw_only=True):
    major: U16 = PROTOCOL_MAJOR
    minor: U16 = PROTOCOL_MINOR
    server: Name = ""
    auth_required: bool
    nonce: Nonce = b""


class Auth(_Message, tag=int(Kind.AUTH), kw_only=True):
    mac: Nonce  # sign(token, server nonce, "client")


class AuthReply(_Message, tag=int(Kind.AUTH_REPLY), kw_only=True):
    mac: Nonce = b""  # sign(token, client nonce, "server") when the Hello carried a nonce


class DeviceInfoRequest(_Message, tag=int(Kind.DEVICE_INFO_REQUEST), kw_only=True):
    pass


class DeviceInfo(_Message, tag=int(Kind.DEVICE_INFO), kw_only=True):
    device: Literal["cpu", "cuda"]
    index: U32 = 0
    name: Name
    mem_total_bytes: U64
    mem_free_bytes: U64
    threads: U32
    cache_entries: U64 = 0
    cache_bytes: U64 = 0


class OfferTensor(_Message, tag=int(Kind.OFFER_TENSOR), kw_only=True):
    digest: Digest
    nbytes: U64
    ggml_type: U32
    shape: Shape
    name: Name = ""
    # 1.2: the bytes are those at part_offset of the tensor whose digest is part_of (a range of a split expert
    # tensor), which a worker may find in a GGUF file of its own (--models)
    part_of: Digest | None = None
    part_offset: U64 = 0


class OfferReply(_Message, tag=int(Kind.OFFER_REPLY), kw_only=True):
    digest: Digest
    status: Literal["hit", "miss"]


class UploadTensor(_Message, tag=int(Kind.UPLOAD_TENSOR), kw_only=True):
    digest: Digest
    offset: U64  # must equal the bytes received so far for this digest
    final: bool = False  # the worker verifies the digest after this chunk


class UploadReply(_Message, tag=int(Kind.UPLOAD_REPLY), kw_only=True):
    digest: Digest
    received: U64
    verified: bool = False


class DefineSegment(_Message, tag=int(Kind.DEFINE_SEGMENT), kw_only=True):
    segment_id: U32
    ops: Annotated[list[OpRecord], Meta(max_length=65536)]


class DefineReply(_Message, tag=int(Kind.DEFINE_REPLY), kw_only=True):
    segment_id: U32
    n_ops: U32


class SeqSpan(msgspec.Struct, frozen=True, kw_only=True):
    """One sequence's rows of a batched run: its id, the position of its first new token, its token count."""

    seq_id: U32
    pos_start: U64
    n_tokens: U32


class RunSegment(_Message, tag=int(Kind.RUN_SEGMENT), kw_only=True):
    segment_id: U32
    seq_id: U32 = 0
    pos_start: U64
    n_tokens: U32
    sections: Annotated[list[ArraySpec], Meta(max_length=16)]  # sections[0] is the hidden state (T × n_embd)
    # since 1.1: several sequences, their rows one after another (n_tokens is their sum); empty: the one sequence
    # seq_id at pos_start
    seqs: Annotated[list[SeqSpan], Meta(max_length=MAX_RUN_SEQUENCES)] = []


class RunReply(_Message, tag=int(Kind.RUN_REPLY), kw_only=True):
    segment_id: U32
    seq_id: U32 = 0
    compute_seconds: float = 0.0
    sections: Annotated[list[ArraySpec], Meta(max_length=16)]


class KVOp(_Message, tag=int(Kind.KV_OP), kw_only=True):
    op: Literal["clear", "truncate"]
    seq_id: U32 = 0
    n: U64 = 0  # truncate: keep positions [0, n)
    segment_id: U32 | None = None  # None: every segment on the worker


class KVReply(_Message, tag=int(Kind.KV_REPLY), kw_only=True):
    seq_id: U32
    n_tokens: U64  # cache length after the op


class TelemetryRequest(_Message, tag=int(Kind.TELEMETRY_REQUEST), kw_only=True):
    pass


class Telemetry(_Message, tag=int(Kind.TELEMETRY), kw_only=True):
    rss_bytes: U64
    busy_seconds: float
    uptime_seconds: float = 0.0
    bytes_in: U64
    bytes_out: U64
    cache_hits: U64
    cache_misses: U64
    tensors_held: U64
    bytes_held: U64
    mem_free_bytes: U64 = 0
    kv_bytes: U64 = 0  # KV caches, counted at the whole context per segment (as the memory limit counts them)
    vram_total_bytes: U64 = 0  # a GPU worker's device memory as the driver reports it (0 on a CPU worker)
    vram_free_bytes: U64 = 0


class Free(_Message, tag=int(Kind.FREE), kw_only=True):
    segment_id: U32 | None = None  # None: free everything (segments, tensors, KV caches)


class FreeReply(_Message, tag=int(Kind.FREE_REPLY), kw_only=True):
    bytes_freed: U64
    tensors_held: U64
    bytes_held: U64


class Calibrate(_Message, tag=int(Kind.CALIBRATE), kw_only=True):
    """Since 1.3: the worker's decode speed for these GGML weight types (empty: answered at once, for timing the
    link). The frame may carry a payload of any bytes, which the worker reads and discards (upload timing)."""

    ggml_types: Annotated[list[U32], Meta(max_length=MAX_CALIBRATE_TYPES)]
    refresh: bool = False  # measure again even where the worker's cache file has the figures


class CalibrateReply(_Message, tag=int(Kind.CALIBRATE_REPLY), kw_only=True):
    # GB/s of weight bytes read while decoding one token, one per requested type, in order; 0.0 where the worker
    # cannot run that type
    gbps: Annotated[list[float], Meta(max_length=MAX_CALIBRATE_TYPES)]
    cached: bool  # every figure came from the worker's cache file (nothing was measured)
    threads: U32  # the compute threads the figures were measured with
    machine: Name = ""  # a digest of the worker's machine identity: devices with equal ones share the cores
    cores: U32 = 0  # the machine's CPU count


class ErrorReply(_Message, tag=int(Kind.ERROR_REPLY), kw_only=True):
    code: U16
    message: Text
    fatal: bool = False  # the sender closes the connection after this frame


Message = (
    Hello | HelloReply | Auth | AuthReply | DeviceInfoRequest | DeviceInfo | OfferTensor | OfferReply
    | UploadTensor | UploadReply | DefineSegment | DefineReply | RunSegment | RunReply | KVOp | KVReply
    | TelemetryRequest | Telemetry | Free | FreeReply | Calibrate | CalibrateReply | ErrorReply
)
