"""Generate screen: a prompt box, a streaming transcript with the chat template applied, t/s and stop."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, Static
from textual.worker import Worker, get_current_worker

from engine.errors import IkctlError
from engine.generate import GenerationStats
from tui.formatting import printable
from tui.messages import GenerationDone, TokenGenerated, WorkFailed
from tui.model_thread import on_model_thread
from tui.settings import parse_float, parse_int
from tui.shared_model import SharedModel
from tui.widgets.mode_tabs import ModeTabs

REFRESH_S = 1 / 20  # tokens can arrive faster than the terminal redraws; render the transcript at most 20x/s


def chat_prompt(model: Any, history: list[dict[str, str]]) -> str:
    """The prompt text: the chat template over the history when the model has one, else the last message."""
    if model.has_chat_template:
        return model.apply_chat_template(history)
    return history[-1]["content"]


class GenerateScreen(Screen[None]):
    """Owns the conversation; the model is the app's shared one. One generation at a time."""

    CSS_PATH = "generate.tcss"
    AUTO_FOCUS = "#prompt"  # typing goes straight into the main field
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "stop", "Stop"), Binding("ctrl+l", "clear", "Clear")]

    def __init__(self, shared: SharedModel) -> None:
        super().__init__()
        self.shared = shared
        self.history: list[dict[str, str]] = []
        self.reply = ""  # the reply being streamed
        self.dirty = False
        self.running = False
        self.run = 0  # bumped per generation and on stop, so a stopped thread's late messages are dropped

    def compose(self) -> ComposeResult:
        yield ModeTabs("generate")
        with VerticalScroll(id="transcript-scroll"):
            yield Static(Text("Type a prompt below and press Enter.", style="dim"), id="transcript")
        yield Static("", id="gen-stats")
        with Horizontal(id="gen-settings"):
            yield Label("-n")
            yield Input("64", id="n-predict", compact=True)
            yield Label("--temp")
            yield Input("0.8", id="temp", compact=True)
            yield Label("-s")
            yield Input("-1", id="seed", compact=True)
        yield Input(placeholder="prompt — Enter sends, Esc stops", id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(REFRESH_S, self.flush)

    @on(Input.Submitted, "#prompt")
    def prompt_submitted(self, event: Input.Submitted) -> None:
        self.action_send()

    def action_send(self) -> None:
        prompt = self.query_one("#prompt", Input).value.strip()
        if self.running or not prompt:
            if self.running:
                self.notify("a generation is running; Esc stops it", severity="warning")
            return
        try:
            n = parse_int("-n", self.query_one("#n-predict", Input).value, minimum=1)
            temp = parse_float("--temp", self.query_one("#temp", Input).value, minimum=0.0)
            seed = parse_int("-s", self.query_one("#seed", Input).value)
        except IkctlError as e:
            self.notify(str(e), severity="error")
            return
        self.query_one("#prompt", Input).value = ""
        self.history.append({"role": "user", "content": prompt})
        self.reply, self.running, self.dirty = "", True, True
        self.run += 1
        self.query_one("#gen-stats", Static).update("generating…")
        self.generate(list(self.history), {"n_predict": n, "temp": temp, "seed": seed}, self.run)

    @work(name="generate", exclusive=True, group="generate")
    async def generate(self, history: list[dict[str, str]], sampling: dict[str, Any], run: int) -> None:
        await on_model_thread(self.stream, get_current_worker(), history, sampling, run)

    def stream(self, worker: Worker[None], history: list[dict[str, str]], sampling: dict[str, Any], run: int) -> None:
        """On the model thread: the shared model (loaded on first use), then post tokens as messages until done or
        cancelled."""
        try:
            model = self.shared.get()
            gen = model.generate(chat_prompt(model, history), **sampling)
            text, stopped = "", False
            for token in gen:
                if worker.is_cancelled:
                    stopped = True
                    break
                text += token.text
                self.post_message(TokenGenerated(token.text, run))
            self.post_message(GenerationDone(gen.stats, text, stopped, run))
        except (IkctlError, OSError) as e:
            self.post_message(WorkFailed(str(e)))
            self.post_message(GenerationDone(GenerationStats(), "", True, run))

    @on(TokenGenerated)
    def token_generated(self, event: TokenGenerated) -> None:
        if event.run != self.run:
            return
        self.reply += event.text
        self.dirty = True

    @on(GenerationDone)
    def generation_done(self, event: GenerationDone) -> None:
        if event.run != self.run:
            return
        s = event.stats
        self.finish(event.text, s.summary() + (f" ({s.stop_reason})" if s.stop_reason else ""))

    def finish(self, text: str, status: str) -> None:
        """End the turn: keep what was generated in the conversation and show the status line."""
        self.running = False
        if text:
            self.history.append({"role": "assistant", "content": text})
        self.reply, self.dirty = "", True
        self.query_one("#gen-stats", Static).update(status)
        self.flush()

    def flush(self) -> None:
        if not self.dirty:
            return
        self.dirty = False
        self.query_one("#transcript", Static).update(render_transcript(self.history, self.reply, self.running))
        self.query_one("#transcript-scroll", VerticalScroll).scroll_end(animate=False)

    def action_stop(self) -> None:
        """Cancel the generation; keep the text so far. The thread ends at its next token; its messages are dropped."""
        if self.running:
            self.workers.cancel_group(self, "generate")
            self.run += 1
            self.finish(self.reply, f"stopped after {len(self.reply)} characters")

    def action_clear(self) -> None:
        if not self.running:
            self.history, self.reply, self.dirty = [], "", True
            self.query_one("#gen-stats", Static).update("")


def render_transcript(history: list[dict[str, str]], reply: str, running: bool) -> Text:
    out = Text()
    for m in history:
        who = "you" if m["role"] == "user" else "model"
        out.append(f"{who}: ", style="bold cyan" if who == "you" else "bold green")
        out.append(printable(m["content"]) + "\n\n")
    if running:
        out.append("model: ", style="bold green")
        out.append(printable(reply))
        out.append("▌", style="blink")
    return out
