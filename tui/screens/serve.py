"""Serve screen (F6): a running `ikctl serve` watched through its /metrics: address, slots, queue, requests/s and
tokens/s, every second."""

from __future__ import annotations

import time

from textual import on, work
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer, Input, Static

from tui.server.metrics import rates
from tui.server.watch import Reading, WatchError, describe, read_sample

INTERVAL_S = 1.0


class ServeScreen(Screen[None]):
    """Polls in a thread worker; renders only the latest reading against the one before it."""

    CSS_PATH = "serve.tcss"

    def __init__(self, url: str, interval_s: float = INTERVAL_S) -> None:
        super().__init__()
        self.url, self.interval_s = url, interval_s
        self.last: Reading | None = None

    def compose(self) -> ComposeResult:
        yield Static("Serve F6 · the server at this address (`ikctl serve --metrics`); F1-F5 the other screens",
                     id="serve-title")
        yield Input(self.url, placeholder="http://127.0.0.1:8080", id="serve-url")
        yield Static("reading…", id="serve-body")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(self.interval_s, self.poll)
        self.poll()

    @on(Input.Submitted, "#serve-url")
    def url_changed(self, event: Input.Submitted) -> None:
        self.url, self.last = event.value.strip(), None
        self.poll()

    @work(thread=True, exclusive=True, group="serve-poll", name="serve-poll")
    def poll(self) -> None:
        url = self.url
        try:
            reading: Reading | str = Reading(read_sample(url), time.monotonic())
        except WatchError as e:
            reading = str(e)
        self.app.call_from_thread(self.show, url, reading)

    def show(self, url: str, reading: Reading | str) -> None:
        if url != self.url or not self.is_mounted:
            return  # an answer for the address before the last edit
        body = self.query_one("#serve-body", Static)
        if isinstance(reading, str):
            self.last = None
            body.update(reading)
            return
        prev, self.last = self.last, reading
        r = rates(prev.sample, reading.sample, reading.at - prev.at) if prev is not None else None
        body.update("\n".join(describe(url, reading.sample, r)))
