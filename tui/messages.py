"""Every message the TUI's widgets and workers post upwards, as dataclasses in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message

from engine.bench import SweepRow, WorkerTraffic
from engine.generate import GenerationStats
from tui.plan_flags import ModelHeader, PlanFlags
from tui.shared_model import LoadSummary


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
class HeaderFailed(Message):
    """The GGUF header could not be read (worker result): the one-line reason."""

    message: str


@dataclass
class WorkFailed(Message):
    """A worker's call failed with a user-fixable error; shown as a notification."""

    message: str


@dataclass
class WorkerNotice(Message):
    """A worker was lost during the model's work and the run went on without it (engine.distributed.Failover), or
    a lost one was taken back."""

    line: str
    lost: bool


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
    workers: list[WorkerTraffic] = field(default_factory=list)  # each worker's round trips and bytes in the sweep


@dataclass
class LoadProgressed(Message):
    """One worker's load advanced (engine.distributed.LoadProgress); a newer one for the same device replaces it in
    the queue, since tensors can settle faster than the screen redraws."""

    progress: Any
    run: int

    def can_replace(self, message: Message) -> bool:
        return (isinstance(message, LoadProgressed) and message.run == self.run
                and message.progress.device == self.progress.device)


@dataclass
class AutoChosen(Message):
    """--auto weighed its candidates on the model thread (engine.auto_placement.AutoChoice)."""

    choice: Any


@dataclass
class PlanApplied(Message):
    """The model thread loaded the model with these flags (summary set), or failed (error set)."""

    flags: PlanFlags
    summary: LoadSummary | None
    error: str | None
    run: int


@dataclass
class WorkersChanged(Message):
    """Workers were launched (added, with their tokens and capacities) or stopped (removed) on the Hosts screen."""

    added: list[str]  # host:port
    removed: list[str]
    tokens: dict[str, str]
    capacities: dict[str, int]  # RPC[host:port] -> bytes


@dataclass
class HostsProbed(Message):
    """The probe worker's results (tui.probe.ProbeResults)."""

    results: Any


@dataclass
class HostLaunched(Message):
    """One host's launch finished: its new workers (tui.host_board.WorkerEntry), or the one-line error."""

    host: str
    entries: list[Any]
    error: str | None = None


@dataclass
class HostStopped(Message):
    """One host's workers were stopped: (WorkerEntry, status or error) each."""

    host: str
    results: list[tuple[Any, str]]


@dataclass
class LogTail(Message):
    """The last lines of one worker's log."""

    endpoint: str
    lines: list[str]
