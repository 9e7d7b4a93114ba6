"""The README's app section says what the app does: every screen's keys, and what happens to workers at quit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from textual.binding import Binding
from textual.screen import Screen

from tui.local_workers import DIR_PREFIX
from tui.screens.bench import BenchScreen
from tui.screens.generate import GenerateScreen
from tui.screens.hosts import HostsScreen
from tui.screens.live import LiveScreen
from tui.screens.placement import PlacementScreen

README = Path(__file__).resolve().parents[2] / "README.md"
SCREENS = {"Placement": PlacementScreen, "Generate": GenerateScreen, "Bench": BenchScreen, "Live": LiveScreen,
           "Hosts": HostsScreen}


def app_section() -> str:
    text = README.read_text()
    start = text.index("## The terminal app: `ikctl`")
    return text[start:text.index("\n## ", start + 1)]


def keys_cell(screen: str) -> str:
    """The `keys` column of the screen's row in the table of screens."""
    row = next(line for line in app_section().splitlines() if line.startswith(f"| {screen} ("))
    return row.rstrip(" |").rsplit("|", 1)[1]


@pytest.mark.parametrize("name", list(SCREENS))
def test_every_key_in_a_screens_footer_is_in_its_row(name: str) -> None:
    screen: type[Screen[None]] = SCREENS[name]
    cell = keys_cell(name).lower()
    for binding in screen.BINDINGS:
        assert isinstance(binding, Binding)
        if binding.show:
            key = {"escape": "esc"}.get(binding.key, binding.key)
            assert re.search(rf"(^|[ ,(]){re.escape(key)} ", cell), f"{name}: {binding.key} ({binding.description})"


def test_it_says_what_happens_to_the_workers_at_the_end() -> None:
    section = app_section()
    # the quit question's answers and the command it prints
    for text in ("ctrl+q", "`s` stops them", "`l` quits and leaves them running", "`c` or Esc",
                 "ikctl stop --cluster"):
        assert text in section, text
    # local workers: their share of the RAM, stopped on SIGHUP/SIGTERM, a killed app's leftovers swept
    for text in ("`-m` = the RAM available", "SIGHUP", "SIGTERM", f"{DIR_PREFIX}<pid>", "SIGKILL"):
        assert text in section, text
    # an unknown host's key: k shows it, t trusts it
    assert "`k`" in section and "`t` then appends the key" in section
