"""Pilot tests of the TUI's main flows on the embedded model: placement edits, generation, a tiny bench."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Input, Static, TextArea

from engine.bench import sweep_steps
from tui.app import IkctlApp, make_app
from tui.screens.bench import BenchScreen
from tui.screens.generate import GenerateScreen
from tui.screens.placement import PlacementScreen

RPC = "127.0.0.1:50052"
RPC_DEV = f"RPC[{RPC}]"
SIZE = (120, 40)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """IKCTL_CACHE in a temporary dir, so the embedded model is made once for this module."""
    path = tmp_path_factory.mktemp("ikctl-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IKCTL_CACHE", str(path))
        yield path


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body with asyncio.run (no async pytest plugin needed)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


def text_of(app: IkctlApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


def notifications(app: IkctlApp) -> list[str]:
    return [n.message for n in app._notifications]


async def settle(app: IkctlApp, pilot: object) -> None:
    """Wait for the screen's workers, then let their posted messages be handled."""
    await app.workers.wait_for_complete()
    await pilot.pause()  # type: ignore[attr-defined]


@run_async
async def test_placement_edit_moves_experts_and_bad_regex_keeps_the_plan(cache_dir: Path) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, PlacementScreen)
        assert screen.placement is not None and screen.error is None
        total = sum(screen.placement.bytes_per_device.values())
        assert screen.placement.bytes_per_device == {"CPU": total}

        await pilot.click("#rpc")
        await pilot.press(*RPC)
        assert screen.query_one("#rpc", Input).value == RPC
        screen.query_one("#ot", TextArea).insert(f"exps={RPC_DEV}")
        await pilot.pause()
        assert screen.error is None
        exps = sum(n for name, n in screen.header.tensors if "_exps." in name)  # type: ignore[union-attr]
        assert exps > 0
        assert screen.placement.bytes_per_device == {"CPU": total - exps, RPC_DEV: exps}
        assert RPC_DEV in text_of(app, "#bars") and "R1" in text_of(app, "#map")
        good = screen.placement

        screen.query_one("#ot", TextArea).load_text(f"exps(={RPC_DEV}")
        await pilot.pause()
        assert screen.error is not None and "not a valid regex" in screen.error
        assert screen.placement is good  # the last good plan stays on screen
        status = screen.query_one("#plan-status", Static)
        assert status.has_class("-error") and "not a valid regex" in text_of(app, "#plan-status")

        screen.query_one("#ot", TextArea).load_text(f"exps={RPC_DEV}")
        screen.query_one("#device-mem", Input).value = f"{RPC_DEV}=1MiB"
        await pilot.pause()
        assert screen.error is not None and "would hold" in screen.error and "has 1.0 MiB" in screen.error
        assert screen.placement is good

        await pilot.press("ctrl+r")  # back to the flags the app started with
        await pilot.pause()
        assert screen.error is None and screen.placement.bytes_per_device == {"CPU": total}


@run_async
async def test_placement_starts_from_the_given_rules(cache_dir: Path) -> None:
    from engine.placement import PlacementRules

    rules = PlacementRules.from_flags([f"exps={RPC_DEV}"], rpc=RPC)
    app = make_app(rules=rules, capacities={RPC_DEV: 1 << 20})
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, PlacementScreen)
        assert screen.query_one("#ot", TextArea).text == f"exps={RPC_DEV}"
        # it overflows from the start: the unchecked plan is shown with the device marked
        assert screen.error is not None and screen.good is None
        assert "over capacity" in text_of(app, "#bars")


@run_async
async def test_generate_streams_text_and_stats(cache_dir: Path) -> None:
    app = make_app(start_mode="generate")
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, GenerateScreen)
        screen.query_one("#n-predict", Input).value = "6"
        screen.query_one("#temp", Input).value = "0"
        await pilot.click("#prompt")
        await pilot.press(*"Hello", "enter")
        await settle(app, pilot)
        assert not screen.running
        assert [m["role"] for m in screen.history] == ["user", "assistant"]
        assert screen.history[0]["content"] == "Hello"
        reply = screen.history[1]["content"]
        assert reply
        stats = text_of(app, "#gen-stats")
        assert "prompt:" in stats and "t/s" in stats and "generation:" in stats
        assert "model: " in text_of(app, "#transcript")
        assert notifications(app) == []


@run_async
async def test_generate_stop_keeps_the_text_so_far(cache_dir: Path) -> None:
    app = make_app(start_mode="generate")
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, GenerateScreen)
        screen.query_one("#n-predict", Input).value = "100000"  # until the context is full: far longer than this test
        # greedy: this model then repeats itself without an end-of-text token until the context is full (seconds),
        # where a sampled run can end by itself before the first tokens reach the screen
        screen.query_one("#temp", Input).value = "0"
        screen.query_one("#prompt", Input).value = "Tell me a long story"
        await pilot.press("enter")
        deadline = time.monotonic() + 120
        while not screen.reply and screen.running and time.monotonic() < deadline:  # the first tokens arrive
            await pilot.pause(0.05)
        assert screen.reply and screen.running, ("no text arrived before the generation ended: "
                                                 f"{text_of(app, '#gen-stats')!r} {notifications(app)}")
        await pilot.press("escape")
        assert not screen.running
        assert [m["role"] for m in screen.history] == ["user", "assistant"] and screen.history[1]["content"]
        assert "stopped after" in text_of(app, "#gen-stats")
        await settle(app, pilot)
        assert len(screen.history) == 2  # the thread's late GenerationDone was dropped


@run_async
async def test_bench_fills_the_table_and_saves_json(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    app = make_app(start_mode="bench", model_options={"threads": 1})
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, BenchScreen)
        for selector, value in (("#ctx", "64"), ("#ubatch", "16"), ("#n-gen", "2"), ("#json-path", str(out))):
            screen.query_one(selector, Input).value = value
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        steps = sweep_steps(64, 16, 2)
        table = screen.query_one("#bench-table", DataTable)
        assert table.row_count == len(steps)
        assert [int(table.get_row_at(i)[2]) for i in range(len(steps))] == steps
        assert [r.n_kv for r in screen.rows] == steps
        assert f"step {len(steps)}/{len(steps)}" in text_of(app, "#bench-status")

        await pilot.press("ctrl+s")
        await pilot.pause()
        doc = json.loads(out.read_text())
        for key in ("model", "quant", "threads", "placement", "host", "ikctl_version", "n_ctx", "n_ubatch", "mla"):
            assert key in doc
        assert doc["n_ctx"] == 64 and doc["n_ubatch"] == 16 and doc["n_gen"] == 2 and doc["threads"] == 1
        assert [r["n_kv"] for r in doc["rows"]] == steps
        assert any("saved 4 rows" in m for m in notifications(app))


@run_async
async def test_bench_stop_and_error_notification(cache_dir: Path) -> None:
    app = make_app(start_mode="bench", model_options={"threads": 1})
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, BenchScreen)
        screen.query_one("#ctx", Input).value = "8"  # smaller than one -ub 128 step
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        assert any("raise -c" in m for m in notifications(app))
        assert not screen.running and screen.rows == []

        for selector, value in (("#ctx", "4096"), ("#ubatch", "16"), ("#n-gen", "1")):
            screen.query_one(selector, Input).value = value
        await pilot.press("ctrl+r")
        await pilot.press("escape")
        await settle(app, pilot)
        assert not screen.running
        assert len(screen.rows) < len(sweep_steps(4096, 16, 1))
        assert "stopped" in text_of(app, "#bench-status")
        rows = len(screen.rows)
        await pilot.pause(0.2)  # the stopped thread's late rows, if any, are dropped
        assert len(screen.rows) == rows


@run_async
async def test_mode_keys_and_palette_commands(cache_dir: Path) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        for key, cls in (("f2", GenerateScreen), ("f3", BenchScreen), ("f1", PlacementScreen)):
            await pilot.press(key)
            await pilot.pause()
            assert isinstance(app.screen, cls)
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert {"Show placement", "Show generate", "Show bench", "Placement: reset flags"} <= set(titles)
        await pilot.press("f3")
        await pilot.pause()
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert {"Bench: run", "Bench: stop", "Bench: save JSON"} <= set(titles) and "Generate: stop" not in titles
