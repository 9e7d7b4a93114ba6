"""The OpenAI request bodies the server takes, checked field by field into frozen records (or an ApiError)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.errors import IkctlError
from engine.sampling import SamplerParams

ROLES = ("system", "user", "assistant", "tool", "ipython", "developer")


class ApiError(IkctlError):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


@dataclass(frozen=True)
class Sampling:
    params: SamplerParams
    max_tokens: int  # -1: until end of generation or a full context
    stop: tuple[str, ...]
    ignore_eos: bool = False  # llama-server's field: generate past end-of-generation tokens


@dataclass(frozen=True)
class ChatParams:
    model: str | None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    stream: bool
    include_usage: bool
    sampling: Sampling


@dataclass(frozen=True)
class CompletionParams:
    model: str | None
    prompt: str | list[int]
    stream: bool
    include_usage: bool
    sampling: Sampling


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise bad(key, f"must be a number, got {type(v).__name__}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(key, f"{v} is out of range ({'(' if lo_open else '['}{lo:g}, {hi:g}])")
    return float(v)


def _integer(body: dict[str, Any], key: str, default: int | None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(key, f"must be an integer, got {type(v).__name__}")
    return v


def _flag(body: dict[str, Any], key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(key, f"must be true or false, got {type(v).__name__}")
    return v


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(v)
    raise bad("stop", "must be a string or a list of strings")


def sampling(body: dict[str, Any]) -> Sampling:
    """The sampling fields, with llama-server's defaults (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05)."""
    if _integer(body, "n", 1) != 1:
        raise bad("n", "only n=1 is supported (one choice per request); send several requests instead")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise bad("logprobs", "log probabilities are not supported; leave logprobs out")
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind != "text":
            raise bad("response_format", f"{kind or fmt!r} is not supported (no constrained decoding); only "
                      "{\"type\": \"text\"} is; ask for JSON in the prompt instead")
    max_tokens = _integer(body, "max_completion_tokens", None)
    max_tokens = _integer(body, "max_tokens", max_tokens)
    max_tokens = _integer(body, "n_predict", max_tokens)  # llama-server's name
    if max_tokens is not None and max_tokens < -1:
        raise bad("max_tokens", f"{max_tokens} is not a token count; give 0 or more (or leave it out)")
    seed = _integer(body, "seed", -1)
    top_k = _integer(body, "top_k", 40)
    params = SamplerParams(temp=_number(body, "temperature", 0.8, 0.0, 100.0),
                           top_k=top_k if top_k is not None else 40,
                           top_p=_number(body, "top_p", 0.95, 0.0, 1.0, lo_open=True),
                           min_p=_number(body, "min_p", 0.05, 0.0, 1.0),
                           seed=seed if seed is not None and seed >= 0 else -1)
    return Sampling(params, -1 if max_tokens is None else max_tokens, _stop(body), _flag(body, "ignore_eos"))


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _flag(body, "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options", "must be an object such as {\"include_usage\": true}")
    return stream, _flag(opts, "include_usage")


def _model(body: dict[str, Any]) -> str | None:
    v = body.get("model")
    if v is not None and not isinstance(v, str):
        raise bad("model", f"must be a string, got {type(v).__name__}")
    return v


def _text(content: Any, where: str) -> str | None:
    """A message's content: a string, null, or a list of text parts (images and audio are refused)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(where, f"a content part of type {kind!r} is not supported; send text parts only")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(where, f"must be a string or a list of text parts, got {type(content).__name__}")


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"must be an object, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise bad(f"{where}.role", f"{m.get('role')!r} is not one of {', '.join(ROLES)}")
        content = _text(m.get("content"), f"{where}.content")
        if content is None and not m.get("tool_calls"):
            raise bad(f"{where}.content", "is missing")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({**m, "role": role, "content": content})
    return out


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise bad("tool_choice", f"{choice!r} is not supported (no constrained decoding); use \"auto\" or \"none\"")
    if tools is None or choice == "none":
        return None
    if not isinstance(tools, list):
        raise bad("tools", f"must be a list, got {type(tools).__name__}")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise bad(f"tools[{i}]", "must be {\"type\": \"function\", \"function\": {\"name\": ..., ...}}")
    return tools or None


def _body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def parse_chat(body: Any) -> ChatParams:
    body = _body(body)
    stream, usage = _stream(body)
    return ChatParams(_model(body), _messages(body), _tools(body), stream, usage, sampling(body))


def parse_completion(body: Any) -> CompletionParams:
    body = _body(body)
    stream, usage = _stream(body)
    for key in ("suffix", "echo", "best_of"):
        if body.get(key) not in (None, False, 1, ""):
            raise bad(key, "is not supported; leave it out")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [int(t) for t in prompt]
    elif not isinstance(prompt, str) or not prompt:
        raise bad("prompt", "must be a non-empty string (or a list of token ids); one prompt per request")
    return CompletionParams(_model(body), prompt, stream, usage, sampling(body))
