"""The one loaded model the TUI's screens share: loaded with the placement flags, replaced when a plan is applied.

Every method that loads or returns the model runs on the model thread (tui.model_thread), which serialises its
use: applying a plan waits for a running generation or sweep to finish its step."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from engine import load_model
from engine.distributed import DistributedNet
from engine.synth import default_model_path
from tui.formatting import format_bytes
from tui.plan_flags import PlanFlags


@dataclass(frozen=True)
class LoadSummary:
    """What one load did: the workers used, bytes found in their caches vs sent, seconds."""

    n_workers: int
    bytes_hit: int
    bytes_sent: int
    seconds: float

    def line(self) -> str:
        if not self.n_workers:
            return f"loaded in {self.seconds:.1f} s, everything on CPU"
        return (f"loaded in {self.seconds:.1f} s on {self.n_workers} worker{'s' * (self.n_workers != 1)}: "
                f"{format_bytes(self.bytes_hit)} from their caches, {format_bytes(self.bytes_sent)} sent")


def load_options(flags: PlanFlags, options: Mapping[str, Any], tokens: Mapping[str, str] | None = None
                 ) -> dict[str, Any]:
    """load_model keywords for these placement flags on top of `options` (threads, ctx_size...).

    The flags are parsed here first, so a typo is the same one-line PlacementError as in the form."""
    flags.spec()
    return {**options, **flags.options(tokens)}


def is_distributed(model: Any) -> bool:
    return isinstance(model.net, DistributedNet)


class SharedModel:
    """Holds the loaded model (None until first used) and the flags it was loaded with."""

    def __init__(self, model_path: str | None, options: Mapping[str, Any] | None = None,
                 flags: PlanFlags | None = None, tokens: Mapping[str, str] | None = None) -> None:
        self.model_path = model_path
        self.options = dict(options or {})
        self.flags = flags or PlanFlags()  # what get() loads with until a plan is applied
        self.tokens = dict(tokens or {})  # per worker endpoint (cluster file, launched workers)
        self.model: Any = None
        self.loaded_flags: PlanFlags | None = None
        self.loads = 0  # bumped per load, so a screen can tell that the model changed under it
        self.on_failover: Callable[[Any], None] | None = None  # told of each worker lost (engine.distributed.Failover)
        self.on_rejoin: Callable[[str], None] | None = None  # told when lost workers answer again and are taken back

    def get(self) -> Any:
        """The loaded model, loading it with the current flags first if there is none (model thread). Workers lost
        earlier that answer again (restarted, e.g. from the Hosts screen) are taken back first, as a request to
        `ikctl serve` takes them back."""
        if self.model is None:
            self.apply(self.flags)
        elif (back := self.model.rejoin()) is not None and self.on_rejoin is not None:
            self.on_rejoin(back.line())
        return self.model

    def apply(self, flags: PlanFlags, progress: Callable[[Any], None] | None = None) -> LoadSummary:
        """Load with `flags` (model thread). The old model is released only once the new one loaded, so a failed
        load loses nothing; tensors both plans put on a worker are found there, not sent again."""
        totals: dict[str, tuple[int, int]] = {}

        def track(p: Any) -> None:
            totals[p.device] = (p.bytes_hit, p.bytes_sent)
            if progress is not None:
                progress(p)

        start = time.monotonic()
        model = load_model(self.model_path or default_model_path(), progress=track,
                           **load_options(flags, self.options, self.tokens))
        self.release()
        model.on_failover(lambda event: self.on_failover(event) if self.on_failover is not None else None)
        self.model, self.loaded_flags, self.flags = model, flags, flags
        self.loads += 1
        return LoadSummary(len(totals), sum(h for h, _ in totals.values()), sum(s for _, s in totals.values()),
                           time.monotonic() - start)

    def release(self) -> None:
        """Drop the model; a distributed one frees its segments and KV caches on the workers (model thread)."""
        model, self.model = self.model, None
        if model is not None and is_distributed(model):
            model.net.close()

    def add_tokens(self, tokens: Mapping[str, str]) -> None:
        self.tokens.update(tokens)
