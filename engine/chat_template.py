"""Chat prompts: the GGUF's Jinja chat template rendered as Hugging Face does, or llama.cpp's fallbacks."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import IkctlError
from engine.gguf_file import GGUFFile
from engine.tokenizer import Tokenizer

Messages = list[dict[str, Any]]

# what a template can do wrong at render time besides jinja's own errors (e.g. "a" + None)
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
                  ZeroDivisionError, RecursionError)


def apply_chat_template(f: GGUFFile, tok: Tokenizer, messages: Messages, add_generation_prompt: bool,
                        tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text for `messages` ({"role", "content"} dicts), to be encoded with special=True and
    add_bos=tok.add_bos. `tools` (OpenAI function specs) reach the template as Hugging Face passes them.

    A leading BOS that the template writes itself is dropped when the tokenizer adds one, as llama.cpp's
    common_chat_templates_apply does, so the prompt never starts with two.
    """
    _check_messages(messages)
    source = f.get("tokenizer.chat_template", None)
    if not source:
        return _FALLBACKS[_fallback_name(f, tok)](messages, add_generation_prompt)
    bos = tok.token_text(tok.bos_id) if tok.bos_id is not None else ""
    eos = tok.token_text(tok.eos_id) if tok.eos_id is not None else ""
    text = render_template(str(source), messages, add_generation_prompt, bos, eos, tools)
    if tok.add_bos and bos and text.startswith(bos):
        text = text[len(bos) :]
    return text


def _check_messages(messages: Messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise IkctlError("a chat needs a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise IkctlError(f"chat message {i} must be a dict with a string 'role' (and 'content')")


def render_template(source: str, messages: Messages, add_generation_prompt: bool, bos: str, eos: str,
                    tools: list[dict[str, Any]] | None = None) -> str:
    """A Jinja chat template's text, rendered in transformers' environment."""
    try:
        return _compile(source).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
            tools=tools or None,
            documents=None,
        )
    except _RENDER_ERRORS as e:
        raise IkctlError(f"the model's chat template failed: {_one_line(e)}") from None


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    """The environment transformers uses for chat templates (trim/lstrip blocks, tojson, raise_exception)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise IkctlError(f"the model's chat template does not parse: {_one_line(e)}") from None


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML and sorts keys; templates are written against this one
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}  # noqa: RUF012 - jinja reads this class attribute

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Callable[[], str]) -> str:
        return caller()


def _one_line(e: BaseException) -> str:
    where = f" (line {e.lineno})" if isinstance(e, jinja2.TemplateSyntaxError) and e.lineno else ""
    text = " ".join(str(e).split()) or type(e).__name__
    return text + where


# ---- fallbacks when the file has no template (llama.cpp src/llama-chat.cpp) --------------------------------
def _fallback_name(f: GGUFFile, tok: Tokenizer) -> str:
    if tok.token_id("<｜User｜>") is not None and tok.token_id("<｜Assistant｜>") is not None:
        return "deepseek3"
    pre = f.get("tokenizer.ggml.pre", "")
    if pre == "deepseek-v3":
        return "deepseek3"
    if pre == "deepseek-llm" or f.architecture == "deepseek2":
        return "deepseek2"
    return "chatml"


def _content(m: dict[str, Any]) -> str:
    return str(m.get("content") or "")


def _chatml(messages: Messages, add_generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{_content(m)}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _deepseek2(messages: Messages, add_generation_prompt: bool) -> str:
    turns = {"system": "{}\n\n", "user": "User: {}\n\n", "assistant": "Assistant: {}<｜end▁of▁sentence｜>"}
    text = "".join(turns[m["role"]].format(_content(m)) for m in messages if m["role"] in turns)
    return text + ("Assistant:" if add_generation_prompt else "")


def _deepseek3(messages: Messages, add_generation_prompt: bool) -> str:
    turns = {
        "system": "{}\n\n",
        "user": "<｜User｜>{}",
        "assistant": "<｜Assistant｜>{}<｜end▁of▁sentence｜>",
    }
    text = "".join(turns[m["role"]].format(_content(m)) for m in messages if m["role"] in turns)
    return text + ("<｜Assistant｜>" if add_generation_prompt else "")


_FALLBACKS: dict[str, Callable[[Messages, bool], str]] = {
    "chatml": _chatml,
    "deepseek2": _deepseek2,
    "deepseek3": _deepseek3,
}
