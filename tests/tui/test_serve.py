"""`ikctl serve` end to end: a real server process on loopback, driven by the official `openai` client."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.synth import DEFAULT_SPEC, write_model
from tests.tui.serve_process import REPO, ServeProc, serve_env, start_serve

CTX = 512
QUESTIONS = ["Hello", "What is the river like in spring?", "Tell me about the town.", "Who reads tokens?"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
LLAMA_TEMPLATE = Path(__file__).parents[1] / "engine" / "data" / "chat_templates" / "llama-3.2.jinja"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("serve-model") / "tiny.gguf", DEFAULT_SPEC)


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProc]:
    s = start_serve(tmp_path_factory.mktemp("serve"), "-m", str(model_path), "-c", str(CTX), "-np", "3",
                    "--max-queue", "2", "--alias", "tiny", "--metrics")
    yield s
    s.stop()


def chat(client: openai.OpenAI, question: str, **kwargs: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                          **kwargs)  # type: ignore[call-overload]


def streamed(client: openai.OpenAI, question: str, **kwargs: object) -> tuple[str, list[object]]:
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                                 stream=True, **kwargs))  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def metrics(server: ServeProc) -> dict[str, float]:
    r = server.get("/metrics")
    assert r.status_code == 200, r.text
    return {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples if not s.labels}


def test_models_and_health(server: ServeProc) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert server.get("/health").json() == {"status": "ok"}


def test_chat_stream_gives_the_non_stream_text_and_ends_with_done(server: ServeProc) -> None:
    client = server.client()
    whole = chat(client, QUESTIONS[1], max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 5
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    timings = (whole.model_extra or {})["timings"]
    assert timings["predicted_n"] == 12 and timings["prompt_n"] == whole.usage.prompt_tokens
    text, chunks = streamed(client, QUESTIONS[1], max_tokens=12, temperature=0,
                            stream_options={"include_usage": True})
    assert text == whole.choices[0].message.content and text
    assert chunks[0].choices[0].delta.role == "assistant"  # type: ignore[attr-defined]
    assert chunks[-2].choices[0].finish_reason == "length"  # type: ignore[attr-defined]
    assert chunks[-1].usage == whole.usage  # type: ignore[attr-defined]
    raw = server.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_completions(server: ServeProc) -> None:
    client = server.client()
    a = client.completions.create(model="tiny", prompt="The river runs", max_tokens=8, temperature=0)
    assert a.choices[0].finish_reason == "length" and a.usage and a.usage.completion_tokens == 8
    parts = list(client.completions.create(model="tiny", prompt="The river runs", max_tokens=8, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == a.choices[0].text


def test_seed_reproducibility(server: ServeProc) -> None:
    client = server.client()
    kw = {"max_tokens": 12, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    texts = [chat(client, QUESTIONS[2], seed=s, extra_body=kw).choices[0].message.content for s in (5, 5, 6)]
    assert texts[0] == texts[1] != texts[2]


def test_stop_string_across_token_boundaries(server: ServeProc) -> None:
    client = server.client()
    _, chunks = streamed(client, QUESTIONS[3], max_tokens=24, temperature=0)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]  # type: ignore[attr-defined]
    full = "".join(pieces)
    i = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 2 and pieces[i + 1])
    stop = pieces[i][-2:] + pieces[i + 1][:1]  # begins in one token, ends in the next
    expected = full[: full.index(stop)]
    stopped = chat(client, QUESTIONS[3], max_tokens=24, temperature=0, stop=[stop, "never appears"])
    assert stopped.choices[0].message.content == expected
    assert stopped.choices[0].finish_reason == "stop"
    text, chunks = streamed(client, QUESTIONS[3], max_tokens=24, temperature=0, stop=stop)
    assert text == expected and chunks[-1].choices[0].finish_reason == "stop"  # type: ignore[attr-defined]


def test_concurrent_requests_return_what_each_returns_alone(server: ServeProc) -> None:
    client = server.client()
    alone = [chat(client, q, max_tokens=10, temperature=0).choices[0].message.content for q in QUESTIONS]
    together: dict[int, str | None] = {}

    def one(i: int) -> None:
        together[i] = chat(client, QUESTIONS[i], max_tokens=10, temperature=0).choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(QUESTIONS))]  # 3 slots + 1 queued
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [together.get(i) for i in range(len(QUESTIONS))] == alone
    assert len(set(alone)) > 1


@contextlib.contextmanager
def open_stream(server: ServeProc, max_tokens: int = 400) -> Iterator[httpx.Response]:
    """A streamed chat request whose headers have arrived (so it holds a slot or a queue place) until closed."""
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Go on"}], "max_tokens": max_tokens, "stream": True,
                  "temperature": 0}) as r:
        assert r.status_code == 200
        yield r


def wait_for(predicate: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_queue_full_is_429_and_the_slots_come_back(server: ServeProc) -> None:
    with contextlib.ExitStack() as stack:
        for _ in range(5):  # 3 slots + 2 queue places
            stack.enter_context(open_stream(server))
        with pytest.raises(openai.RateLimitError) as e:
            chat(server.client(), "one too many", max_tokens=2)
        assert e.value.status_code == 429 and "slots are busy" in e.value.message
        assert wait_for(lambda: (metrics(server)["ikctl_slots_active"], metrics(server)["ikctl_requests_queued"])
                        == (3, 2), 10)
    # the clients went away: their slots and queue places are free again
    assert wait_for(lambda: (metrics(server)["ikctl_slots_active"], metrics(server)["ikctl_requests_queued"])
                    == (0, 0), 5)
    assert chat(server.client(), "after", max_tokens=2).choices[0].finish_reason == "length"


def test_client_disconnect_frees_its_slot(server: ServeProc) -> None:
    before = metrics(server)["ikctl_requests_cancelled_total"]
    with open_stream(server, max_tokens=CTX) as r:
        lines = r.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(6), strict=False) if line.startswith("data:")) >= 3
        assert metrics(server)["ikctl_slots_active"] == 1
    # hundreds of tokens were still to come: the slot is free long before they could have been generated
    assert wait_for(lambda: metrics(server)["ikctl_slots_active"] == 0, 5)
    assert metrics(server)["ikctl_requests_cancelled_total"] == before + 1


def test_metrics_parse_as_prometheus_text(server: ServeProc) -> None:
    chat(server.client(), "count me", max_tokens=3)
    families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics").text)}
    for name in ("ikctl_requests_ok", "ikctl_prompt_tokens", "ikctl_generated_tokens", "ikctl_http_requests"):
        assert families[name].type == "counter" and families[name].samples[0].value > 0
    for name in ("ikctl_slots", "ikctl_slots_active", "ikctl_requests_queued", "ikctl_generated_tokens_per_second",
                 "ikctl_prompt_tokens_per_second"):
        assert families[name].type == "gauge"
    assert families["ikctl_slots"].samples[0].value == 3
    assert families["ikctl_generated_tokens_per_second"].samples[0].value > 0
    assert "ikctl_worker_round_trips" not in families  # no workers here


def error_of(r: httpx.Response) -> dict[str, object]:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_bad_input_gets_4xx_with_an_openai_error_body(server: ServeProc) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert nf.value.code == "model_not_found" and "'tiny'" in nf.value.message
    with pytest.raises(openai.BadRequestError) as long:
        chat(client, "word " * CTX, max_tokens=2)
    assert long.value.code == "context_length_exceeded" and f"context holds {CTX}" in long.value.message
    cases = [({"temperature": "hot"}, "temperature"), ({"n": 2}, "n"), ({"max_tokens": "ten"}, "max_tokens"),
             ({"response_format": {"type": "json_object"}}, "response_format"), ({"stop": 3}, "stop"),
             ({"messages": "hi"}, "messages"), ({"messages": [{"role": "robot", "content": "hi"}]},
                                                  "messages[0].role")]
    for fields, param in cases:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
        r = server.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, (fields, r.text)
        assert error_of(r)["param"] == param
    r = server.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in str(error_of(r)["message"])
    assert server.get("/v1/nothing").status_code == 404


@pytest.fixture(scope="module")
def keyed_server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProc, str]]:
    """A server with an API key, over the same model with Meta's Llama 3.2 chat template (it renders `tools`)."""
    tmp = tmp_path_factory.mktemp("keyed")
    path = write_model(tmp / "llama-template.gguf",
                       dataclasses.replace(DEFAULT_SPEC, chat_template=LLAMA_TEMPLATE.read_text()))
    key_file = tmp / "key"
    key = "k" * 24
    key_file.write_text(key)
    key_file.chmod(0o600)
    s = start_serve(tmp, "-m", str(path), "-c", "2048", "--api-key-file", str(key_file))
    yield s, key
    s.stop()
    del model_path


def test_api_key(keyed_server: tuple[ServeProc, str]) -> None:
    server, key = keyed_server
    assert server.get("/health").status_code == 200  # no key needed
    for wrong in (None, "wrong-key"):
        headers = {"Authorization": f"Bearer {wrong}"} if wrong else {}
        r = server.get("/v1/models", headers=headers)
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong-key").models.list()
    assert server.client(key).models.list().data[0].id == "llama-template.gguf"


def test_tools_reach_the_chat_template(keyed_server: tuple[ServeProc, str]) -> None:
    server, key = keyed_server
    auth = {"Authorization": f"Bearer {key}"}
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    prompt = server.post("/apply-template", json={"messages": messages, "tools": [WEATHER]}, headers=auth).json()
    assert '"name": "get_weather"' in prompt["prompt"] and "Environment: ipython" in prompt["prompt"]
    client = server.client(key)
    plain = client.chat.completions.create(model="llama-template.gguf", messages=messages, max_tokens=1)
    tooled = client.chat.completions.create(model="llama-template.gguf", messages=messages, max_tokens=1,
                                            tools=[WEATHER])  # type: ignore[list-item]
    assert plain.usage and tooled.usage
    assert tooled.usage.prompt_tokens > plain.usage.prompt_tokens + len(json.dumps(WEATHER)) // 4


def test_a_public_address_needs_a_key(model_path: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tui.cli", "serve", "-m", str(model_path), "--host", "0.0.0.0",
                           "--port", "0"], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=serve_env(tmp_path))
    assert proc.returncode == 1
    assert "--host 0.0.0.0 is reachable from other machines: give --api-key-file" in proc.stderr
