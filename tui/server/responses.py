"""The response bodies and stream chunks of OpenAI's chat and text completions, with llama-server's `timings`."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.batching import Finished
from engine.tool_calls import ToolCall


@dataclass(frozen=True)
class Reply:
    """What every body and chunk of one response shares."""

    kind: str  # "chat.completion" | "text_completion"
    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{secrets.token_hex(12)}")
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"

    def _wrap(self, obj: str, choice: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "ikctl", "choices": [choice], **extra}

    def body(self, text: str, calls: Sequence[ToolCall], done: Finished) -> dict[str, Any]:
        reason = "tool_calls" if calls else done.reason
        extra = {"usage": usage(done), "timings": done.timings.as_dict()}
        if not self.chat:
            return self._wrap("text_completion", {"index": 0, "text": text, "logprobs": None,
                                                  "finish_reason": reason}, extra)
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            message["tool_calls"] = [c.as_dict() for c in calls]
        return self._wrap("chat.completion", {"index": 0, "message": message, "logprobs": None,
                                              "finish_reason": reason}, extra)

    def chunk(self, delta: dict[str, Any] | str, finish: str | None = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """A stream chunk: for chat, `delta` is the message delta; for text completions, the new text."""
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._wrap("chat.completion.chunk", choice, extra or {})
        return self._wrap("text_completion", {"index": 0, "text": delta, "logprobs": None,
                                              "finish_reason": finish}, extra or {})

    def usage_chunk(self, done: Finished) -> dict[str, Any]:
        """stream_options.include_usage: a last chunk with no choices and the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [],
                "usage": usage(done)}


def usage(done: Finished) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
