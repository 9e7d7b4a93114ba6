"""Snapshots of each TUI screen at 80x24 and 120x40 (update with `pytest --snapshot-update`, then look)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from engine.placement import PlacementRules
from tui.app import make_app
from tui.screens.placement import PlacementScreen

RPC = "127.0.0.1:50052"
SIZES = [(80, 24), (120, 40)]


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """IKCTL_CACHE in a temporary dir: the embedded model is made once, and its name is the same everywhere."""
    path = tmp_path_factory.mktemp("ikctl-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IKCTL_CACHE", str(path))
        yield path


async def workers_done(pilot: Pilot[Any]) -> None:
    """Wait for the workers, their messages, and the tab underline's animation (else it is caught mid-slide)."""
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    if isinstance(pilot.app.screen, PlacementScreen):
        for _ in range(100):  # the header's message, then the plan it triggers, may take a few turns
            if pilot.app.screen.placement is not None:
                break
            await pilot.pause(0.05)
    await pilot.pause()
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_placement_screen(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    rules = PlacementRules.from_flags([f"exps=RPC[{RPC}]"], rpc=RPC)
    app = make_app(rules=rules, capacities={f"RPC[{RPC}]": 8 << 20})
    assert snap_compare(app, terminal_size=size, run_before=workers_done)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_placement_screen_bad_regex(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    async def break_the_rule(pilot: Pilot[Any]) -> None:
        await workers_done(pilot)
        pilot.app.screen.query_one("#ot").load_text("exps(=CPU")
        await workers_done(pilot)

    assert snap_compare(make_app(), terminal_size=size, run_before=break_the_rule)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_generate_screen(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    assert snap_compare(make_app(start_mode="generate"), terminal_size=size, run_before=workers_done)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bench_screen(snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    assert snap_compare(make_app(start_mode="bench"), terminal_size=size, run_before=workers_done)
