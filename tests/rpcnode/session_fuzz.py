"""Mutations of a recorded real session, sent to a live worker: every request of a model load and a forward pass,
with metadata fields replaced by hostile values (wrong type, huge, negative, NaN, odd text...), numbers nudged past
their bounds, the msgpack bytes and the frame header broken, section values and shapes changed, uploads out of
order. `Mutator` draws such frames at random; tests/rpcnode/fuzz_campaign.py sends them, pipelined, over many
connections (the CI test and benchmarks/fuzz_worker.py both use it)."""

from __future__ import annotations

import copy
import itertools
import math
import random
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
from rpcnode.digest import digest_of

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


def record_sessions(model_path: Path, endpoint: str, prompt: list[int]) -> dict[str, list[Request]]:
    """Real sessions against one worker: all layers there, only the experts, only the embedding (so the recorded
    RunSegments carry a hidden state, routing, or token ids). Each load defines segments of its own ids."""
    placements = {"all": {"n_gpu_layers": 99}, "exps": {"override_tensor": [f"exps=RPC[{endpoint}]"]},
                  "embd": {"override_tensor": [f"token_embd=RPC[{endpoint}]"]}}
    return {name: record_session(model_path, endpoint, prompt, **opts) for name, opts in placements.items()}


# ---- random mutations, for campaigns of many frames ------------------------------------------------------------

# msgpack type bytes: every family (nil, bools, ints, floats, str/bin/ext of each width, arrays, maps, the unused
# 0xc1), for replacing a byte of an encoded message.
MSGPACK_MARKERS = bytes([0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF,
                         0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD8, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0x80, 0x8F,
                         0x90, 0x9F, 0xA0, 0xBF, 0x00, 0x7F, 0xE0, 0xFF])
# Containers and strings that declare far more than follows.
HUGE_HEADERS = (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                b"\xc9\x7f\xff\xff\xff\x01", b"\xdc\xff\xff", b"\xde\xff\xff")
HEADER_BITS = (16, 16, 16, 16, 64, 32, 64)  # major, minor, kind, flags, request id, metadata length, payload length


def int_neighbours(v: int, bits: int = 64) -> list[int]:
    """Values next to v and at the edges of a field of `bits` bits: off by one, doubled, negated, huge."""
    top = (1 << bits) - 1
    return [v - 1, v + 1, 0, 1, -1, -v, 2 * v, v // 2, v * 1000, v + (1 << 31), (1 << 31) - 1, 1 << 32, top, top - 1,
            1 << (bits - 1), -(1 << (bits - 1)), v ^ 1, v << 20]


def float_neighbours(v: float) -> list[float]:
    return [v * (1 + 1e-7), -v, 0.0, -0.0, math.nan, math.inf, -math.inf, v * 1e30, 1e-45, 3.4e38, v + 1.0]


def leaves(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, value) of every scalar in a document but the kind tag."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else None
    if items is None:
        yield prefix, doc
        return
    for k, v in items:
        if not (prefix == () and k == "kind"):
            yield from leaves(v, (*prefix, k))


def containers(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], list[Any]]]:
    """(path, list) of every list in a document."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    if isinstance(doc, list):
        yield prefix, doc
    for k, v in items:
        yield from containers(v, (*prefix, k))


def copy_doc(doc: dict[str, Any]) -> dict[str, Any]:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(doc))


def raw_frame(kind: int, meta: bytes, payload: bytes, request_id: int) -> bytes:
    """A frame whose header is consistent with the bytes that follow it, whatever they hold."""
    return P.HEADER.pack(P.MAGIC, 1, 0, kind & 0xFFFF, 0, request_id, len(meta), len(payload)) + meta + payload


@dataclass(frozen=True)
class Fuzzed:
    """One frame to send. `framed`: its header matches its body, so it gets exactly one reply (or a fatal one);
    otherwise the stream may be out of sync after it and it is the last frame sent on its connection."""

    data: bytes
    strategy: str
    framed: bool = True


class Mutator:
    """Draws mutated requests of recorded sessions: `bundle()` is one to a few frames meant to be sent in order
    (an offer and its chunks, say). Everything derived from the recording is computed once, so a draw is cheap."""

    def __init__(self, sessions: dict[str, list[Request]], seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.requests = [r for s in sessions.values() for r in s]
        self.restores = [[r for r in s if r.kind in (P.Kind.OFFER_TENSOR, P.Kind.DEFINE_SEGMENT)]
                         for s in sessions.values()]
        self.runs = [r for r in self.requests if r.kind == P.Kind.RUN_SEGMENT]
        self.uploads = [r for r in self.requests if r.kind == P.Kind.UPLOAD_TENSOR]
        self.segment_ids = sorted({r.doc["segment_id"] for r in self.runs})
        self.seq_ids = sorted({r.doc.get("seq_id", 0) for r in self.runs})
        # values seen under each key (digests, op names, cache types...): swapping them keeps a message well typed
        self.vocab: dict[Any, list[Any]] = {}
        for r in self.requests:
            for path, v in leaves(r.doc):
                key = next((k for k in reversed(path) if isinstance(k, str)), None)
                if isinstance(v, str) and v not in self.vocab.setdefault(key, []):
                    self.vocab[key].append(v)
        self.vocab.setdefault("cache_type", []).extend(["f32", "q8_0", "q4_0", "bf16"])
        self.vocab.setdefault("op", []).extend(["config", "attn", "ffn", "moe_router", "moe_experts", "output"])
        self.paths = {id(r): list(paths(r.doc)) for r in self.requests}
        self.leaves = {id(r): list(leaves(r.doc)) for r in self.requests}
        self.sections: dict[int, list[tuple[dict[str, Any], bytes]]] = {}
        for r in self.runs:
            self.sections[id(r)] = [(r.doc, p) for p in section_mutations(r)] + list(reshaped_sections(r)) + \
                list(tiled_batches(r))
        weights = {"field": 24, "number": 24, "swap": 10, "structure": 6, "msgpack": 12, "section": 10, "payload": 4,
                   "upload": 4, "control": 3, "valid": 6, "restore": 1, "header": 1, "cut": 1}
        self._choices = [name for name, w in weights.items() for _ in range(w)]
        self.bulk_share = 0.001  # bundles of up to 255 MiB (see bulk): rare, or the client spends its time on them
        self._rid = 1 << 20

    def fork(self, seed: int) -> Mutator:
        """A mutator sharing this one's precomputed mutations, with a random stream of its own (one per thread)."""
        other = copy.copy(self)
        other.rng = random.Random(seed)
        other._rid = (seed % 4096) << 40
        return other

    def _id(self) -> int:
        self._rid += 1
        return self._rid

    def _frame(self, doc: dict[str, Any], payload: bytes, strategy: str) -> Fuzzed:
        return Fuzzed(frame(doc, payload, self._id()), strategy)

    def bundle(self) -> list[Fuzzed]:
        if self.rng.random() < self.bulk_share:
            return self.bulk()
        return getattr(self, self.rng.choice(self._choices))()

    def _request(self) -> Request:
        return self.rng.choice(self.requests)

    # ---- metadata fields -------------------------------------------------------------------------------------------
    def field(self) -> list[Fuzzed]:
        """One to three fields (or whole containers) replaced by hostile values or deleted; a key added."""
        r = self._request()
        doc = r.doc
        for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
            doc = mutate(doc, self.rng.choice(list(paths(doc)) if doc is not r.doc else self.paths[id(r)]),
                         self.rng.choice((*HOSTILE, ...)))
        return [self._frame(doc, r.payload, "field")]

    def number(self) -> list[Fuzzed]:
        """Every config value and count: one number of the message moved to a neighbour or an edge."""
        r = self._request()
        nums = [(p, v) for p, v in self.leaves[id(r)] if isinstance(v, int | float) and not isinstance(v, bool)]
        if not nums:
            return self.field()
        doc = r.doc
        for _ in range(self.rng.choice((1, 1, 2))):
            path, v = self.rng.choice(nums)
            new = self.rng.choice(int_neighbours(v) if isinstance(v, int) else float_neighbours(v))
            doc = mutate(doc, path, new)
        return [self._frame(doc, r.payload, "number")]

    def swap(self) -> list[Fuzzed]:
        """A string (a digest, an op name, a tensor name) replaced by another seen under the same key, or edited:
        one hex digit changed, upper case, cut short."""
        r = self._request()
        strs = [(p, v) for p, v in self.leaves[id(r)] if isinstance(v, str)]
        if not strs:
            return self.field()
        path, v = self.rng.choice(strs)
        key = next((k for k in reversed(path) if isinstance(k, str)), None)
        i = self.rng.randrange(max(len(v), 1))
        edits = [v[:i] + self.rng.choice("0123456789abcdefg") + v[i + 1:], v.upper(), v[:i], v + v[:1], v[::-1]]
        new = self.rng.choice(self.vocab.get(key, [v]) + edits)
        return [self._frame(mutate(r.doc, path, new), r.payload, "swap")]

    def structure(self) -> list[Fuzzed]:
        """A list of the message (ops, sections, shapes, tensor refs) with an item dropped, repeated, moved or
        taken from another message."""
        r = self._request()
        lists = list(containers(r.doc))
        if not lists:
            return self.field()
        path, items = self.rng.choice(lists)
        items = msgspec.msgpack.decode(msgspec.msgpack.encode(items))
        op = self.rng.randrange(5)
        if op == 0 and items:
            items.pop(self.rng.randrange(len(items)))
        elif op == 1 and items:
            items.insert(self.rng.randrange(len(items) + 1), self.rng.choice(items))
        elif op == 2:
            self.rng.shuffle(items)
        elif op == 3 and items:
            items = items * self.rng.choice((2, 16, 300))
        else:
            other = self.rng.choice(list(containers(self._request().doc)) or [((), [])])[1]
            items = items + other[: self.rng.randrange(len(other) + 1)]
        doc = mutate(r.doc, path, items) if path else r.doc
        return [self._frame(doc, r.payload, "structure")]

    # ---- msgpack bytes and the frame header -----------------------------------------------------------------------
    def msgpack(self) -> list[Fuzzed]:
        """The encoded metadata broken: a byte replaced by a type marker or noise, bytes inserted or cut, a
        container or string declaring 4 G items, deep nesting, trailing bytes, a key repeated, a map as an array."""
        r = self._request()
        meta = bytearray(msgspec.msgpack.encode(r.doc))
        rng = self.rng
        i = rng.randrange(len(meta))
        op = rng.randrange(9)
        if op == 0:
            meta[i] = rng.choice(MSGPACK_MARKERS)
        elif op == 1:
            meta[i] = rng.randrange(256)
        elif op == 2:
            meta[i:i] = rng.randbytes(rng.randrange(1, 9))
        elif op == 3:
            del meta[i:i + rng.randrange(1, 9)]
        elif op == 4:
            meta = meta[:i]
        elif op == 5:
            meta[i:i] = rng.choice(HUGE_HEADERS)
        elif op == 6:  # nesting far deeper than any message, within the metadata limit
            depth = rng.choice((100, 1000, 10_000, 100_000, 500_000))
            meta[i:i] = b"\x91" * depth + b"\xc0"
        elif op == 7:
            meta += rng.choice((b"\xc0", b"\x00" * 8, bytes(meta)))
        else:  # a key twice (the map's count raised by one, a copy of its first pair after it), or a map as an array
            if meta[0] & 0xF0 == 0x80 and meta[0] < 0x8F:
                first = msgspec.msgpack.encode("kind") + msgspec.msgpack.encode(r.doc["kind"])
                meta = bytearray([meta[0] + 1]) + first + meta[1:]
            else:
                meta[0] = 0x90 | (meta[0] & 0x0F)
        return [Fuzzed(raw_frame(r.kind, bytes(meta), r.payload, self._id()), "msgpack")]

    def header(self) -> list[Fuzzed]:
        """One header field replaced by a neighbour or an edge value (its magic by other bytes); the stream may
        be out of sync after it."""
        r = self._request()
        data = frame(r.doc, r.payload, self._id())
        fields = list(P.HEADER.unpack_from(data))
        i = self.rng.randrange(len(fields))
        if i == 0:
            fields[0] = self.rng.choice((b"IKRQ", b"\0\0\0\0", b"GET ", b"ikrp", self.rng.randbytes(4)))
        else:
            bits = HEADER_BITS[i - 1]
            fields[i] = self.rng.choice([*int_neighbours(fields[i], bits), self.rng.getrandbits(bits)]) % (1 << bits)
        return [Fuzzed(P.HEADER.pack(*fields) + data[P.HEADER_SIZE:], "header", framed=False)]

    def cut(self) -> list[Fuzzed]:
        """A frame cut short anywhere: the worker waits for the rest, then times the connection out."""
        r = self._request()
        data = frame(r.doc, r.payload, self._id())
        return [Fuzzed(data[:self.rng.randrange(1, len(data))], "cut", framed=False)]

    # ---- payloads ---------------------------------------------------------------------------------------------------
    def section(self) -> list[Fuzzed]:
        """A RunSegment whose sections hold hostile values, other dtypes or shapes, or a batch of many tokens."""
        r = self.rng.choice(self.runs)
        doc, payload = self.rng.choice(self.sections[id(r)])
        if self.rng.random() < 0.3:
            doc = mutate(doc, self.rng.choice(list(paths(doc))), self.rng.choice((*HOSTILE, ...)))
        return [self._frame(doc, payload, "section")]

    def payload(self) -> list[Fuzzed]:
        """A request's payload with random bytes overwritten (NaN patterns, huge ids), with its length kept."""
        r = self.rng.choice(self.runs + self.uploads[:8])
        data = bytearray(r.payload)
        for _ in range(self.rng.randrange(1, 9)):
            i = self.rng.randrange(len(data))
            data[i:i + 4] = self.rng.choice((b"\xff\xff\xff\x7f", b"\x00\x00\xc0\x7f", b"\xff\xff\xff\xff",
                                             self.rng.randbytes(4)))[: len(data) - i]
        return [self._frame(r.doc, bytes(data), "payload")]

    def upload(self) -> list[Fuzzed]:
        """An offer of a tensor the worker lacks, then its chunks, in order or not: offsets past, behind or
        repeated, the final flag early or missing, the bytes wrong for the digest, chunks of another digest; now
        and then a correct upload of fresh bytes (it is stored, held, and counts against -m)."""
        rng = self.rng
        body = rng.choice(self.uploads).payload if rng.random() < 0.8 else rng.randbytes(rng.randrange(1, 300_000))
        good = rng.random() < 0.3
        digest = digest_of(body) if good else rng.randbytes(32).hex()
        offer = {"kind": int(P.Kind.OFFER_TENSOR), "digest": digest, "nbytes": len(body), "ggml_type": 0,
                 "shape": [len(body)], "name": "fuzz"}
        if not good and rng.random() < 0.3:
            offer = mutate(offer, rng.choice(list(paths(offer))), rng.choice((*int_neighbours(len(body)), *HOSTILE)))
        out = [self._frame(offer, b"", "upload")]
        n = rng.choice((1, 2, 3, 5))
        cuts = sorted({0, len(body), *(rng.randrange(len(body) + 1) for _ in range(n - 1))})
        chunks = [(a, body[a:b]) for a, b in itertools.pairwise(cuts)]
        if not good:
            if rng.random() < 0.5:
                rng.shuffle(chunks)
            if rng.random() < 0.3 and chunks:
                chunks.insert(rng.randrange(len(chunks)), rng.choice(chunks))
        for i, (offset, data) in enumerate(chunks):
            final = i == len(chunks) - 1 if good or rng.random() < 0.7 else rng.random() < 0.5
            doc = {"kind": int(P.Kind.UPLOAD_TENSOR), "digest": digest, "offset": offset, "final": final}
            if not good and rng.random() < 0.2:
                doc = mutate(doc, rng.choice(list(paths(doc))), rng.choice((*int_neighbours(offset), *HOSTILE)))
            out.append(self._frame(doc, data, "upload"))
        return out

    def bulk(self) -> list[Fuzzed]:
        """Big bodies, to be received into memory charged to -m (or refused before a byte is kept): an upload of
        a fresh tensor of 4 to 255 MiB in one chunk, or a RunSegment whose hidden state has that many bytes."""
        rng = self.rng
        nbytes = rng.choice((4, 16, 48, 100, 255)) << 20
        if rng.random() < 0.5:
            digest = rng.randbytes(32).hex()
            offer = {"kind": int(P.Kind.OFFER_TENSOR), "digest": digest, "nbytes": nbytes, "ggml_type": 0,
                     "shape": [nbytes // 4], "name": "bulk"}
            chunk = {"kind": int(P.Kind.UPLOAD_TENSOR), "digest": digest, "offset": 0, "final": True}
            return [self._frame(offer, b"", "bulk"), self._frame(chunk, bytes(nbytes), "bulk")]
        r = rng.choice(self.runs)
        spec = msgspec.convert(r.doc["sections"][0], P.ArraySpec)
        width = math.prod(spec.shape[1:]) * P._DTYPES[spec.dtype].itemsize
        rows = nbytes // max(width, 1)
        specs = [dict(r.doc["sections"][0], shape=[rows, *spec.shape[1:]])]
        return [self._frame(dict(r.doc, n_tokens=rows, sections=specs), bytes(rows * width), "bulk")]

    # ---- requests the recording has none of, and the recording itself ----------------------------------------------
    def control(self) -> list[Fuzzed]:
        """KV cache operations, Free of one segment (rarely of everything), telemetry, device info and link timings
        (an empty Calibrate, with bytes the worker reads and drops)."""
        rng = self.rng
        seg = rng.choice([*self.segment_ids, None, 0, 2**32 - 1])
        choices = [
            {"kind": int(P.Kind.KV_OP), "op": rng.choice(("clear", "truncate")), "seq_id": rng.choice(self.seq_ids),
             "n": rng.choice((0, 1, 3, 5, 64, 2**63)), "segment_id": seg},
            {"kind": int(P.Kind.TELEMETRY_REQUEST)},
            {"kind": int(P.Kind.DEVICE_INFO_REQUEST)},
        ]
        if rng.random() < 0.1:
            choices.append({"kind": int(P.Kind.FREE), "segment_id": seg if rng.random() < 0.9 else None})
        if rng.random() < 0.2:
            link = {"kind": int(P.Kind.CALIBRATE), "ggml_types": []}
            return [self._frame(link, bytes(rng.choice((0, 1, 4096, 1 << 18))), "control")]
        return [self._frame(rng.choice(choices), b"", "control")]

    def valid(self) -> list[Fuzzed]:
        """A recorded request as it was (a forward pass, most often), so that later mutations meet a worker in use."""
        r = self.rng.choice(self.runs) if self.rng.random() < 0.7 else self._request()
        return [self._frame(r.doc, r.payload, "valid")]

    def restore(self) -> list[Fuzzed]:
        """A recorded load's offers and segment definitions again (after a Free, its segments are back)."""
        return [self._frame(r.doc, r.payload, "restore") for r in self.rng.choice(self.restores)]


def tiled_batches(r: Request) -> Iterator[tuple[dict[str, Any], bytes]]:
    """The RunSegment with every per-token section repeated to more tokens (2 to 64x), n_tokens to match, and with
    n_tokens alone changed: prefill batches larger than the recording's."""
    specs = [msgspec.convert(s, P.ArraySpec) for s in r.doc.get("sections", [])]
    arrays = P.unpack_arrays(specs, r.payload)
    n = r.doc["n_tokens"]
    for k in (2, 13, 64):
        named = [(s.name, np.concatenate([a] * k) if a.ndim and a.shape[0] == n else a)
                 for s, a in zip(specs, arrays, strict=True)]
        new, parts = P.pack_arrays(named)
        yield dict(r.doc, n_tokens=n * k, sections=msgspec.to_builtins(new)), b"".join(bytes(p) for p in parts)
        yield dict(r.doc, n_tokens=n * k), r.payload

