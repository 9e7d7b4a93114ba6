"""`ikctl serve` across two real loopback workers: batching through them, and a worker killed mid-request."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from engine import load_model
from engine.synth import DEFAULT_SPEC, write_model
from tests.rpcnode.conftest import WorkerProc, start_worker
from tests.tui.serve_process import ServeProc, start_serve

PROMPTS = [[5, 6, 7, 8], [40, 41, 42, 43, 44, 45, 46], [100, 200, 300]]


def start_cluster(tmp_path: Path, *extra: str) -> tuple[ServeProc, list[WorkerProc], Path]:
    model = write_model(tmp_path / "tiny.gguf", DEFAULT_SPEC)
    workers = []
    for i in range(2):
        (tmp_path / f"w{i}").mkdir()
        workers.append(start_worker(tmp_path / f"w{i}"))
    rpc = ",".join(w.endpoint for w in workers)
    server = start_serve(tmp_path, "-m", str(model), "-c", "512", "-np", "2", "--rpc", rpc, "-ngl", "99",
                         "-ts", "1,1", "--metrics", "--rpc-timeout", "5", "--rpc-probe-timeout", "5", *extra)
    return server, workers, model


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[ServeProc, list[WorkerProc], Path]]:
    yield from _running(start_cluster(tmp_path, "--no-failover"))


@pytest.fixture
def failover_cluster(tmp_path: Path) -> Iterator[tuple[ServeProc, list[WorkerProc], Path]]:
    yield from _running(start_cluster(tmp_path))


def _running(parts: tuple[ServeProc, list[WorkerProc], Path]) -> Iterator[tuple[ServeProc, list[WorkerProc], Path]]:
    yield parts
    server, workers, _ = parts
    server.stop()
    for w in workers:
        w.kill()


def complete(client: openai.OpenAI, prompt: list[int], **kwargs: object) -> str:
    r = client.completions.create(model="tiny.gguf", prompt=prompt, temperature=0, **kwargs)  # type: ignore[call-overload]
    return r.choices[0].text


def test_batched_through_workers_is_what_one_request_gives_locally(
        cluster: tuple[ServeProc, list[WorkerProc], Path]) -> None:
    server, workers, path = cluster
    local = load_model(path, ctx_size=512)
    expected = ["".join(t.text for t in local.generate(p, n_predict=8, temp=0.0)) for p in PROMPTS]
    client = server.client()
    got: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, complete(client, PROMPTS[i], max_tokens=8)))
               for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got.get(i) for i in range(len(PROMPTS))] == expected
    families = server.get("/metrics").text
    for w in workers:
        assert f'ikctl_worker_round_trips_total{{worker="{w.device}"}}' in families
        assert f'ikctl_worker_up{{worker="{w.device}"}} 1' in families


def test_a_worker_killed_mid_stream(cluster: tuple[ServeProc, list[WorkerProc], Path]) -> None:
    server, workers, _ = cluster
    client = server.client(timeout=30)
    stream = client.completions.create(model="tiny.gguf", prompt=PROMPTS[0], max_tokens=400, temperature=0,
                                       stream=True)
    parts = iter(stream)
    next(parts), next(parts)
    workers[1].kill()
    t0 = time.monotonic()
    with pytest.raises(openai.APIError) as e:
        for _ in parts:
            pass
    assert workers[1].device in str(e.value.message)
    assert time.monotonic() - t0 < 20
    health = server.get("/health")
    assert health.status_code == 503 and workers[1].device in health.json()["error"]["message"]
    with pytest.raises(openai.APIStatusError) as again:  # a new request: a clear error, no hang
        complete(client, PROMPTS[1], max_tokens=4)
    assert again.value.status_code == 503 and workers[1].device in again.value.message
    assert server.client().models.list().data[0].id == "tiny.gguf"  # the server still answers
    assert f'ikctl_worker_up{{worker="{workers[1].device}"}} 0' in server.get("/metrics").text
    assert "failed: " in server.log_text()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
def test_a_worker_lost_mid_stream_is_failed_over(failover_cluster: tuple[ServeProc, list[WorkerProc], Path],
                                                 sig: signal.Signals) -> None:
    """With failover (the default) the stream goes on over the worker left, with the text an uninterrupted request
    gives, whether the worker died (SIGKILL) or froze (SIGSTOP: lost after --rpc-timeout and the probe's 5 s
    each); the server logs the loss once, /health is 200 and the next request is served; restarted at its
    endpoint, the worker is taken back by a request."""
    server, workers, _ = failover_cluster
    client = server.client(timeout=60)
    want = complete(client, PROMPTS[0], max_tokens=60, extra_body={"ignore_eos": True})
    stream = client.completions.create(model="tiny.gguf", prompt=PROMPTS[0], max_tokens=60, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    parts = iter(stream)
    text = "".join(c.choices[0].text for c in (next(parts), next(parts)))
    os.kill(workers[1].proc.pid, sig)
    text += "".join(c.choices[0].text for c in parts)
    if sig == signal.SIGSTOP:  # it is lost: end it, so that its endpoint is free for the restart below
        workers[1].kill()
    assert text == want
    assert server.get("/health").status_code == 200
    assert complete(client, PROMPTS[0], max_tokens=60, extra_body={"ignore_eos": True}) == want
    lost = [ln for ln in server.log_text().splitlines() if "was lost" in ln]
    assert len(lost) == 1 and workers[1].device in lost[0] and "recovered in" in lost[0], server.log_text()
    # the worker back at its endpoint is taken back by a request (at most one try per 5 s)
    back = start_worker(workers[1].cache.parent, cache=workers[1].cache, port=int(workers[1].endpoint.split(":")[1]))
    workers.append(back)
    time.sleep(5)
    assert complete(client, PROMPTS[0], max_tokens=60, extra_body={"ignore_eos": True}) == want
    assert f"{workers[1].device} answered again and was taken back" in server.log_text(), server.log_text()
    assert f'ikctl_worker_round_trips_total{{worker="{workers[1].device}"}}' in server.get("/metrics").text
