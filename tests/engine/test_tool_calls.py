"""Tool calls parsed back from the text the models' own chat templates write for them.

The templates in data/chat_templates are the vendors' own: DeepSeek-R1's (the V3/R1 format: type, name, a fenced
JSON block; from llama.cpp's models/templates/deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja), DeepSeek-V3.1's
(name and bare JSON; models/templates/deepseek-ai-DeepSeek-V3.1.jinja) and Meta's Llama 3.2 Instruct template."""

from __future__ import annotations

import json
from pathlib import Path

from engine.chat_template import render_template
from engine.tool_calls import (
    DS_CALLS_BEGIN,
    MARKERS,
    PYTHON_TAG,
    ToolCall,
    ToolCallStream,
    parse_tool_calls,
    releasable,
)

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def template(name: str) -> str:
    return (TEMPLATES / name).read_text()


def openai_call(name: str, args: dict[str, object], i: int = 0) -> dict[str, object]:
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def assistant_turn(source: str, calls: list[dict[str, object]], marker: str, end: str) -> str:
    """What the model generates for these calls: the template's rendering of the assistant turn holding them."""
    messages = [{"role": "user", "content": "Weather in Paris and Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": calls}]
    text = render_template(source, messages, False, BOS, EOS)
    return text[text.index(marker) + len(marker) : text.rindex(end)]


def test_deepseek_r1_v3_format_with_two_calls() -> None:
    calls = [openai_call("get_weather", {"city": "Paris"}), openai_call("get_weather", {"city": "Oslo"}, 1)]
    out = assistant_turn(template("deepseek-r1.jinja"), calls, "<｜Assistant｜>", EOS)
    assert out.startswith(DS_CALLS_BEGIN + "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n")
    parsed = parse_tool_calls(out, ["get_weather"])
    assert parsed.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
    assert len({c.id for c in parsed.tool_calls}) == 2


def test_deepseek_v31_format_with_content_before_the_calls() -> None:
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Let me look.",
                 "tool_calls": [openai_call("get_weather", {"city": "Paris"})]}]
    text = render_template(template("deepseek-v3.1.jinja"), messages, False, BOS, EOS)
    out = text[text.index("</think>") + len("</think>") : text.rindex(EOS)]
    assert out.startswith("Let me look." + DS_CALLS_BEGIN + "<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{")
    parsed = parse_tool_calls(out, ["get_weather"])
    assert parsed.content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", {"city": "Paris"})]


def test_llama_32_json_format() -> None:
    # Llama's template writes the arguments with tojson, so it takes them as an object (Hugging Face's convention)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    out = assistant_turn(template("llama-3.2.jinja"), [call], "<|start_header_id|>assistant<|end_header_id|>\n\n",
                         "<|eot_id|>")
    assert out == '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    parsed = parse_tool_calls(out, ["get_weather"])
    assert parsed.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", {"city": "Paris"})]


def test_llama_python_tag_forms() -> None:
    parsed = parse_tool_calls('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", {"city": "Oslo"})]
    parsed = parse_tool_calls('<|python_tag|>brave_search.call(query="ikctl", count=3)')
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("brave_search", {"query": "ikctl", "count": 3})]
    parsed = parse_tool_calls("Running it.<|python_tag|>print(1 + 1)")
    assert parsed.content == "Running it."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("python", {"code": "print(1 + 1)"})]
    two = parse_tool_calls('{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"x": 1}}', ["a", "b"])
    assert [c.name for c in two.tool_calls] == ["a", "b"]


def test_replies_that_are_not_calls_stay_content() -> None:
    for text in ('{"name": "somebody", "parameters": {}}',  # names no offered tool
                 '{"answer": 42}', "Plain text.", DS_CALLS_BEGIN + "<｜tool▁call▁begin｜>f<｜tool▁sep｜>{broken",
                 '{"name": "get_weather", "parameters": {"city": "Paris"}} and more words'):
        parsed = parse_tool_calls(text, ["get_weather"])
        assert parsed.tool_calls == () and parsed.content == text


def test_tools_reach_the_template() -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with_tools = render_template(template("llama-3.2.jinja"), messages, True, "", "", tools=[WEATHER])
    without = render_template(template("llama-3.2.jinja"), messages, True, "", "")
    assert '"name": "get_weather"' in with_tools and "Environment: ipython" in with_tools
    assert "get_weather" not in without


def test_releasable_holds_back_what_may_be_a_call() -> None:
    assert releasable("Hello there") == len("Hello there")
    assert releasable("Hello <｜tool▁ca") == len("Hello ")  # may be the start of a marker
    assert releasable("Sure." + DS_CALLS_BEGIN + "<｜tool▁call▁begin｜>") == len("Sure.")
    assert releasable('  {"name": "get_weather"') == 0  # Llama's JSON call
    assert releasable("Code: <|python_tag|>print(1)") == len("Code: ")


def _streamed(text: str, size: int, names: list[str]) -> tuple[list[str], str, tuple[ToolCall, ...]]:
    """The reply fed `size` characters at a time (as tokens arrive): what went out as it came, the rest, calls."""
    stream = ToolCallStream(names)
    out = [stream.feed(text[i : i + size]) for i in range(0, len(text), size)]
    rest, calls = stream.end()
    return out, rest, calls


def test_a_streamed_reply_holds_tool_calls_back_whatever_the_token_boundaries() -> None:
    v31 = render_template(template("deepseek-v3.1.jinja"), [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [openai_call("get_weather", {"city": "Paris"})]},
    ], False, BOS, EOS)
    replies = [
        v31[v31.index("</think>") + len("</think>") : v31.rindex(EOS)],
        assistant_turn(template("deepseek-r1.jinja"), [openai_call("get_weather", {"city": "Oslo"})],
                       "<｜Assistant｜>", EOS),
        "Running it." + PYTHON_TAG + '{"name": "get_weather", "parameters": {"city": "Rome"}}',
        "No call here, just <｜tool words and {braces}.",
    ]
    for text in replies:
        whole = parse_tool_calls(text, ["get_weather"])
        for size in range(1, len(text) + 1):
            out, rest, calls = _streamed(text, size, ["get_weather"])
            assert "".join(out) + rest == whole.content, (text, size)
            assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole.tool_calls]
            assert not any(m in "".join(out) for m in MARKERS)  # no marker ever reaches the client as text
