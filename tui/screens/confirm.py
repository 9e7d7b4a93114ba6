"""A small modal question with a few answers, each a button and a key: quitting with workers still running over
SSH, trusting a host's key seen for the first time."""

from __future__ import annotations

from collections.abc import Sequence

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class Confirm(ModalScreen[str]):
    """Dismissed with the key of the answer chosen (a button, or its key); escape answers `cancel`."""

    DEFAULT_CSS = """
    Confirm { align: center middle; }
    Confirm #confirm-box { width: 76; max-width: 100%; height: auto; padding: 1 2; border: thick $warning;
                           background: $surface; }
    Confirm #confirm-text { height: auto; margin-bottom: 1; }
    Confirm #confirm-buttons { height: auto; }
    Confirm Button { margin-right: 2; }
    """

    def __init__(self, text: str, answers: Sequence[tuple[str, str]]) -> None:
        """`answers`: (key, label) each; the key is pressed or returned."""
        super().__init__()
        self.text = text
        self.answers = list(answers)

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(self.text, id="confirm-text")
            with Horizontal(id="confirm-buttons"):
                for key, label in self.answers:
                    yield Button(f"{label} ({key})", id=f"answer-{key}", compact=True)

    def on_key(self, event: object) -> None:
        key = getattr(event, "key", "")
        if key == "escape":
            self.dismiss("cancel")
        elif any(k == key for k, _ in self.answers):
            self.dismiss(key)

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss((event.button.id or "").removeprefix("answer-"))
