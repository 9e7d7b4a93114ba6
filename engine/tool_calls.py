"""Tool calls in a model's reply, in the formats their chat templates teach: DeepSeek-V3/R1 and V3.1, Llama 3.x.

DeepSeek-V3/R1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```
<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`; V3.1 drops the type and the fence:
`<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>`.
Llama 3.x: the whole reply is `{"name": NAME, "parameters": ARGS}` (several joined by `;`), or follows
`<|python_tag|>` (there a bare text is code for the built-in `python` tool, as llama.cpp reads it)."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass

from engine.stop_strings import partial_suffix

DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_SEP, DS_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
PYTHON_TAG = "<|python_tag|>"
MARKERS = (DS_CALLS_BEGIN, DS_CALL_BEGIN, PYTHON_TAG)

_DS_CALL = re.compile(re.escape(DS_CALL_BEGIN) + r"(.*?)" + re.escape(DS_SEP) + r"(.*?)" + re.escape(DS_CALL_END),
                      re.DOTALL)
_FENCED = re.compile(r"\s*([^\n]+?)\s*\n```(?:json)?\s*\n?(.*?)\n?```\s*$", re.DOTALL)
_BUILTIN = re.compile(r"\s*([A-Za-z_]\w*)\.call\((.*)\)\s*$", re.DOTALL)
_KWARG = re.compile(r"\s*([A-Za-z_]\w*)\s*=\s*(\"(?:[^\"\\]|\\.)*\"|[^,]+)\s*(?:,|$)")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI's `function.arguments`
    id: str

    def as_dict(self, index: int | None = None) -> dict[str, object]:
        d: dict[str, object] = {"id": self.id, "type": "function",
                                "function": {"name": self.name, "arguments": self.arguments}}
        return d if index is None else {"index": index, **d}


@dataclass(frozen=True)
class ParsedReply:
    content: str
    tool_calls: tuple[ToolCall, ...] = ()


def _call(name: str, args: object) -> ToolCall:
    return ToolCall(name, json.dumps(args, ensure_ascii=False), f"call_{secrets.token_hex(12)}")


def _json_object(text: str) -> dict[str, object] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def parse_tool_calls(text: str, tool_names: Collection[str] = ()) -> ParsedReply:
    """The reply's text and its tool calls; a reply with no well-formed call is all content.

    `tool_names` (the request's tools) guards the Llama form, whose calls are plain JSON: an object naming no
    offered tool stays content."""
    for parse in (_deepseek, _python_tag, _llama_json):
        parsed = parse(text, tool_names)
        if parsed is not None:
            return parsed
    return ParsedReply(text)


def _deepseek(text: str, tool_names: Collection[str]) -> ParsedReply | None:
    starts = [i for i in (text.find(DS_CALLS_BEGIN), text.find(DS_CALL_BEGIN)) if i >= 0]
    if not starts:
        return None
    head = text[: min(starts)]
    calls = []
    for m in _DS_CALL.finditer(text, min(starts)):
        name, args = m[1].strip(), m[2]
        fenced = _FENCED.match(args)
        if fenced and name in ("function", ""):  # V3/R1: the type before the separator, the name after it
            name, args = fenced[1], fenced[2]
        value = _json_object(args.strip())
        if value is None or not name:
            return None
        calls.append(_call(name, value))
    if not calls:
        return None
    tail = text[text.rfind(DS_CALL_END) + len(DS_CALL_END) :].replace(DS_CALLS_END, "")
    return ParsedReply((head + tail).strip(), tuple(calls))


def _python_tag(text: str, tool_names: Collection[str]) -> ParsedReply | None:
    at = text.find(PYTHON_TAG)
    if at < 0:
        return None
    head, body = text[:at].strip(), text[at + len(PYTHON_TAG) :].strip()
    calls = _json_calls(body, ())
    if calls:
        return ParsedReply(head, calls)
    builtin = _BUILTIN.match(body)
    if builtin:  # brave_search.call(query="...")
        args = {k: _literal(v) for k, v in _KWARG.findall(builtin[2])}
        return ParsedReply(head, (_call(builtin[1], args),))
    return ParsedReply(head, (_call("python", {"code": body}),))


def _literal(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


def _llama_json(text: str, tool_names: Collection[str]) -> ParsedReply | None:
    calls = _json_calls(text.strip(), tool_names)
    return ParsedReply("", calls) if calls else None


def _json_calls(text: str, tool_names: Collection[str]) -> tuple[ToolCall, ...]:
    """`{"name": …, "parameters"|"arguments": {…}}` objects joined by `;` or whitespace, filling the whole text."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(text):
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return ()
        args = value.get("parameters", value.get("arguments")) if isinstance(value, dict) else None
        name = value.get("name") if isinstance(value, dict) else None
        if not isinstance(name, str) or not isinstance(args, dict) or (tool_names and name not in tool_names):
            return ()
        calls.append(_call(name, args))
        while at < len(text) and text[at] in " \t\r\n;":
            at += 1
    return tuple(calls)


def releasable(text: str) -> int:
    """How much of a reply still being generated can be streamed as content: all of it up to where a tool call
    starts or may be starting (a marker or its beginning at the end; a reply that opens with `{`, for Llama)."""
    stripped = text.lstrip()
    if not stripped or stripped.startswith("{"):
        return 0
    found = [i for i in (text.find(m) for m in MARKERS) if i >= 0]
    if found:
        return min(found)
    return len(text) - partial_suffix(text, MARKERS)


class ToolCallStream:
    """A reply streamed while tool calls in it are held back until they can be parsed whole: `feed` returns the
    content that can go out now, `end` the content still held and the calls."""

    def __init__(self, tool_names: Collection[str]) -> None:
        self.tool_names, self.text, self.sent = tool_names, "", 0

    def feed(self, piece: str) -> str:
        self.text += piece
        n = releasable(self.text)
        if n <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : n], n
        return out

    def end(self) -> tuple[str, tuple[ToolCall, ...]]:
        parsed = parse_tool_calls(self.text, self.tool_names)
        if not parsed.tool_calls:
            return self.text[self.sent :], ()
        # the content parsed out of the whole reply, less what was streamed already
        held = self.text[: self.sent]
        return (parsed.content[self.sent :] if parsed.content.startswith(held) else ""), parsed.tool_calls
