"""Every message the TUI's widgets and workers post upwards, as dataclasses in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message

from engine.bench import SweepRow
from engine.generate import GenerationStats
from tui.plan_flags import ModelHeader, PlanFlags


@dataclass
class SwitchTo(Message):
    """A tab was clicked: show that mode."""

    mode: str


@dataclass
class FlagsEdited(Message):
    """The placement form changed; the screen re-plans."""

    flags: PlanFlags


@dataclass
class HeaderLoaded(Message):
    """The GGUF header was read (worker result)."""

    header: ModelHeader


@dataclass
class WorkFailed(Message):
    """A worker's call failed with a user-fixable error; shown as a notification."""

    message: str


@dataclass
class TokenGenerated(Message):
    """New text from the generation worker."""

    text: str
    run: int  # which run posted it: a stopped run's late messages are dropped


@dataclass
class GenerationDone(Message):
    """The generation worker finished (or was stopped); stats are final."""

    stats: GenerationStats
    text: str
    stopped: bool
    run: int  # which run posted it: a stopped run's late messages are dropped


@dataclass
class BenchStarted(Message):
    """The bench worker loaded the model and knows its settings and step count."""

    settings: dict[str, Any]
    n_steps: int
    run: int  # which run posted it: a stopped run's late messages are dropped


@dataclass
class BenchRowReady(Message):
    """One sweep step finished."""

    row: SweepRow
    run: int  # which run posted it: a stopped run's late messages are dropped


@dataclass
class BenchDone(Message):
    """The sweep ended (complete or stopped)."""

    stopped: bool
    run: int  # which run posted it: a stopped run's late messages are dropped
