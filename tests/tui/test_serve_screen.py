"""The Serve screen and its model layer (tui/server/watch.py, metrics.parse) against a real `ikctl serve`."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from textual.app import App
from textual.widgets import Static

from engine.batching import SchedulerStats
from engine.synth import DEFAULT_SPEC, write_model
from tests.tui.serve_process import ServeProc, start_serve
from tests.tui.test_app import run_async
from tui.screens.serve import ServeScreen
from tui.server.metrics import ServeSample, parse, rates, render
from tui.server.watch import WatchError, describe, read_sample


def test_metrics_text_reads_back_into_the_screen_record() -> None:
    stats = SchedulerStats(4, 3, 2, 10, 1, 2, 5, 300, 120, 1.5, 6.0, None)
    sample = parse(render(stats, [], 20))
    assert sample == ServeSample(slots=4, active=3, queued=2, requests=13, generated_tokens=120, prompt_tokens=300,
                                 ready=True)
    later = ServeSample(4, 1, 0, 17, 180, 400, True)
    r = rates(sample, later, 2.0)
    assert (r.requests_per_s, r.tokens_per_s) == (2.0, 30.0)
    lines = describe("http://h:1", later, r)
    assert lines[1] == "slots █░░░ 1 of 4 busy · 0 queued"
    assert "2.00 requests/s · 30.0 tokens/s generated" in lines[2]
    assert not parse(render(SchedulerStats(1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, "RPC[x:1]: gone"), [], 0)).ready


def test_no_server_is_one_line_saying_what_to_do() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(WatchError, match=f"no server at http://127.0.0.1:{port} .*ikctl serve --metrics"):
        read_sample(f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProc]:
    tmp = tmp_path_factory.mktemp("serve-screen")
    s = start_serve(tmp, "-m", str(write_model(tmp / "tiny.gguf", DEFAULT_SPEC)), "-c", "256", "-np", "2",
                    "--metrics")
    yield s
    s.stop()


class Host(App[None]):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def on_mount(self) -> None:
        self.push_screen(ServeScreen(self.url, interval_s=0.2))


@run_async
async def test_the_screen_shows_slots_and_requests_live(server: ServeProc) -> None:
    app = Host(server.url)
    async with app.run_test(size=(80, 24)) as pilot:
        body = app.screen.query_one("#serve-body", Static)
        for _ in range(100):
            await pilot.pause(0.05)
            if "of 2 busy" in str(body.render()):
                break
        assert f"{server.url} · ready" in str(body.render())
        assert "slots ░░ 0 of 2 busy · 0 queued" in str(body.render())
        await asyncio.to_thread(server.client().completions.create, model="tiny.gguf", prompt="Hi", max_tokens=3)
        for _ in range(100):
            await pilot.pause(0.05)
            if "since start: 1 requests" in str(body.render()):
                break
        assert "since start: 1 requests" in str(body.render()) and "3 generated" in str(body.render())

