"""The app's modes, listed once: the key, the tab and the command palette entry each one gets come from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str  # the app's mode name (switch_mode)
    title: str
    key: str  # the function key that switches to it
    help: str  # the command palette's line
    tab: bool = True  # shown in the tab row (80 columns hold five)

    @property
    def label(self) -> str:
        return f"{self.title} {self.key.upper()}"


MODES = (
    Mode("placement", "Placement", "f1", "The tensor map, memory bars and placement flags"),
    Mode("generate", "Generate", "f2", "Prompt and streaming transcript"),
    Mode("bench", "Bench", "f3", "Sweep benchmark table and plot"),
    Mode("live", "Live", "f4", "Each worker's memory, busy %, network and cache, updated every second"),
    Mode("hosts", "Hosts", "f5", "Hosts with probe results; launch and stop workers, read their logs"),
    Mode("serve", "Serve", "f6", "A running `ikctl serve`: slots, queue, requests/s, tokens/s", tab=False),
)
