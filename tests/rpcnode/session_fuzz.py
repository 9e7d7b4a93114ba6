"""Mutations of a recorded real session, sent to a live worker: every request of a model load and a forward pass,
with one metadata field at a time replaced by a hostile value (wrong type, huge, negative, NaN, odd text...)."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from engine import load_model
from rpcnode import protocol as P
from rpcnode.client import Client

# The values a field is replaced with: each type msgpack carries, at and past the bounds the schema names.
HOSTILE: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 7, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1,
    2**63 - 1, 2**64 - 1, -(2**63), 0.0, -0.0, 0.5, -1.5, 1e300, math.nan, math.inf, -math.inf, "", " ", "\n",
    "x" * 300, "é☃\U0001f600", "a\nforged: line", "ab" * 32 + "\n", "AB" * 32, "ab" * 31, "../../etc/passwd",
    "f32", "q8_0", "clear", "attn", b"", b"\x00" * 8, [], [0], [-1], [2**40, 2**40], [[]], [None], ["x"], {}, {"": 1},
    {"a": [1, 2]},
)


@dataclass(frozen=True)
class Request:
    """One request of the recorded session: its message as plain data (with the "kind" tag) and its payload."""

    doc: dict[str, Any]
    payload: bytes

    @property
    def kind(self) -> int:
        return int(self.doc["kind"])


def record_session(model_path: Path, endpoint: str, prompt: list[int], **options: Any) -> list[Request]:
    """Load the model on the worker (all layers, or as `options` place it) and run a forward pass, recording
    every request the client sends."""
    sent: list[Request] = []
    real = Client._send

    def spy(self: Client, message: P.Message, payload: P.Payload = b"") -> int:
        data = payload if isinstance(payload, bytes | bytearray | memoryview) else b"".join(
            bytes(p) for p in payload)
        sent.append(Request(msgspec.to_builtins(message), bytes(data)))
        return real(self, message, payload)

    Client._send = spy  # type: ignore[method-assign]  # records, then sends for real
    try:
        model = load_model(model_path, rpc=endpoint, ctx_size=64, **(options or {"n_gpu_layers": 99}))
        model.logits(prompt)
    finally:
        Client._send = real  # type: ignore[method-assign]
    return [r for r in sent if r.kind not in (P.Kind.HELLO, P.Kind.AUTH)]


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key/index path in a document (not the kind tag), containers as well as leaves; at the top also a
    key no message has."""
    if prefix == ():
        yield ("unknown_field",)
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        if prefix == () and k == "kind":
            continue
        yield (*prefix, k)
        yield from paths(v, (*prefix, k))


def mutate(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A deep copy of doc with the item at path replaced (or, for the value ..., deleted)."""
    out = msgspec.msgpack.decode(msgspec.msgpack.encode(doc))
    node = out
    for k in path[:-1]:
        node = node[k]
    if value is ... and isinstance(node, dict):
        node.pop(path[-1], None)
    elif value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


# What a section's values are replaced with: indices past every table, negative ones, and non-finite floats.
HOSTILE_INTS = (-1, -(2**31), 2**31 - 1, 1 << 20, 255, 256)
HOSTILE_FLOATS = (math.nan, math.inf, -math.inf, 3e38, 0.0)


def section_mutations(r: Request) -> Iterator[bytes]:
    """The request's payload with one section's values all replaced by each hostile value of its dtype."""
    specs = [msgspec.convert(s, P.ArraySpec) for s in r.doc.get("sections", [])]
    if not specs:
        return
    layout = P.sections_layout(specs)
    for spec, (a, b) in zip(specs, layout, strict=True):
        dtype = P._DTYPES[spec.dtype]
        for v in HOSTILE_FLOATS if dtype.kind == "f" else HOSTILE_INTS:
            arr = np.full((b - a) // dtype.itemsize, v).astype(dtype)
            yield r.payload[:a] + arr.tobytes() + r.payload[b:]


def reshaped_sections(r: Request) -> Iterator[tuple[dict[str, Any], bytes]]:
    """The request with one section re-encoded as another dtype or reshaped (same values, a consistent payload),
    or left out: metadata the schema accepts, arrays the ops did not expect."""
    arrays = P.unpack_arrays([msgspec.convert(s, P.ArraySpec) for s in r.doc.get("sections", [])], r.payload)
    named = [(s["name"], a) for s, a in zip(r.doc.get("sections", []), arrays, strict=True)]
    for i, (name, arr) in enumerate(named):
        variants = [arr.astype(dt) for dt in ("<f2", "<f4", "<i4", "<i8", "<u1") if dt != arr.dtype.str]
        variants += [arr.reshape(-1), arr.reshape(1, *arr.shape)]
        if arr.ndim >= 1:
            variants += [arr[:0], arr[:1], np.concatenate([arr, arr])]
        if arr.ndim >= 2:
            variants += [np.ascontiguousarray(arr.T), arr.reshape(arr.shape[0], 1, -1)]
        for v in [*variants, None]:
            kept = [*named[:i], *([] if v is None else [(name, v)]), *named[i + 1:]]
            specs, parts = P.pack_arrays(kept)
            doc = dict(r.doc, sections=msgspec.to_builtins(specs))
            yield doc, b"".join(bytes(p) for p in parts)


def frame(doc: dict[str, Any], payload: bytes, request_id: int) -> bytes:
    meta = msgspec.msgpack.encode(doc)
    return P.HEADER.pack(P.MAGIC, 1, 0, int(doc["kind"]) & 0xFFFF, 0, request_id, len(meta), len(payload)) + meta + \
        payload


class Session:
    """A plain connection to a worker that sends raw frames and reads one reply per frame."""

    def __init__(self, endpoint: str, timeout: float = 30.0) -> None:
        host, _, port = endpoint.rpartition(":")
        self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        self.sock.sendall(P.encode_frame(P.Hello(), 1))
        assert isinstance(P.recv_frame(self.sock).message, P.HelloReply)
        self._rid = 2

    def ask(self, doc: dict[str, Any], payload: bytes = b"") -> P.Message:
        self._rid += 1
        self.sock.sendall(frame(doc, payload, self._rid))
        return P.recv_frame(self.sock).message

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def restore(s: Session, session: list[Request]) -> None:
    """Offer and define again what the recorded load did (the tensors are cached: no uploads), so requests after a
    mutated Free or DefineSegment still reach a defined segment."""
    for r in session:
        if r.kind in (P.Kind.OFFER_TENSOR, P.Kind.DEFINE_SEGMENT):
            reply = s.ask(r.doc, r.payload)
            assert not isinstance(reply, P.ErrorReply), reply
