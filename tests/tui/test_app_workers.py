"""The app over two real loopback workers: the Placement screen's Auto place fills the form with --auto's choice;
on the Generate screen one worker SIGKILLed mid-generation, the reply is finished over the worker left and the app
says which worker was lost, once; restarted, the worker is taken back by the next generation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from textual.widgets import Input

from engine.synth import SynthSpec, write_model
from tests.rpcnode.conftest import WorkerProc, start_worker
from tui.app import IkctlApp
from tui.plan_flags import PlanFlags
from tui.screens.generate import GenerateScreen
from tui.screens.placement import PlacementScreen


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[list[WorkerProc]]:
    started = []
    for i in range(2):
        (tmp_path / f"w{i}").mkdir()
        started.append(start_worker(tmp_path / f"w{i}"))
    yield started
    for w in started:
        w.kill()


def test_generate_goes_on_when_a_worker_dies(two_workers: list[WorkerProc], tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.gguf", SynthSpec(layers=4, dense_layers=1, dtype="Q8_0", seed=7))
    a, b = two_workers
    flags = PlanFlags(n_gpu_layers="99", tensor_split="1,1", rpc=f"{a.endpoint},{b.endpoint}")
    app = IkctlApp(str(model), flags, {"ctx_size": 512}, start_mode="generate")

    async def body() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            screen = app.screen
            assert isinstance(screen, GenerateScreen)
            screen.query_one("#n-predict", Input).value = "300"
            screen.query_one("#temp", Input).value = "0"
            screen.query_one("#prompt", Input).value = "Tell me a long story"
            await pilot.press("enter")
            deadline = time.monotonic() + 120
            while not screen.reply and screen.running and time.monotonic() < deadline:
                await pilot.pause(0.05)
            assert screen.running, "the generation ended before the worker could be killed"
            b.kill()
            while screen.running and time.monotonic() < deadline:
                await pilot.pause(0.05)
            await app.workers.wait_for_complete()
            await pilot.pause()
            lost = [n.message for n in app._notifications if "was lost" in n.message]
            assert len(lost) == 1, [n.message for n in app._notifications]
            assert lost[0].startswith(f"{b.device} was lost") and "recovered in" in lost[0]
            assert [m["role"] for m in screen.history] == ["user", "assistant"]
            assert "generation:" in str(screen.query_one("#gen-stats").render())
            # the worker restarted at its endpoint (as the Hosts screen would): the next generation takes it back
            port = int(b.endpoint.rsplit(":", 1)[1])
            two_workers.append(start_worker(b.cache.parent, cache=b.cache, port=port))
            screen.query_one("#n-predict", Input).value = "4"
            screen.query_one("#prompt", Input).value = "And then?"
            await pilot.press("enter")
            while screen.running and time.monotonic() < deadline + 60:
                await pilot.pause(0.05)
            await app.workers.wait_for_complete()
            await pilot.pause()
            back = [n.message for n in app._notifications if "answered again" in n.message]
            assert back == [f"{b.device} answered again and was taken back (--rpc {a.endpoint},{b.endpoint} "
                            "-ngl 99 -ts 1,1)"], [n.message for n in app._notifications]
            assert [m["role"] for m in screen.history] == ["user", "assistant"] * 2

    asyncio.run(body())


def test_auto_place_fills_the_form_with_the_choice(two_workers: list[WorkerProc], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IKCTL_CACHE", str(tmp_path / "ikctl-cache"))
    model = write_model(tmp_path / "m.gguf", SynthSpec(layers=4, dense_layers=1, dtype="Q8_0", seed=7))
    a, b = two_workers
    rpc = f"{a.endpoint},{b.endpoint}"
    # this machine planned with a tenth of the model: the choice must use the workers
    flags = PlanFlags(rpc=rpc, device_mem=f"CPU={model.stat().st_size // 10}")
    app = IkctlApp(str(model), flags, {"ctx_size": 256}, start_mode="placement")

    async def body() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            screen = app.screen
            assert isinstance(screen, PlacementScreen)
            await pilot.pause(0.5)
            await pilot.press("ctrl+o")
            deadline = time.monotonic() + 120
            while screen.auto_running and time.monotonic() < deadline:
                await pilot.pause(0.1)
            await pilot.pause(0.3)
            chosen = [n.message for n in app._notifications if n.message.startswith("--auto chose ")]
            assert len(chosen) == 1, [n.message for n in app._notifications]
            assert screen.flags.rpc == rpc  # the workers listed stay listed
            assert screen.flags.ot_lines() or screen.flags.ngl() > 0
            assert screen.flags.device_mem == flags.device_mem
            assert screen.error is None and screen.placement is not None
            assert screen.placement.devices_used() - {"CPU"}

    asyncio.run(body())
