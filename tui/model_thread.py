"""One long-lived thread for all of the TUI's model work (generate, bench), shared by every screen.

It serialises the screens' use of the model (a stopped run finishes its step before the next one starts), and
numba's OpenMP layer keeps one thread team per calling thread, so one thread means one team, not one per run."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
_executor: ThreadPoolExecutor | None = None


def model_executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ikctl-model")
    return _executor


async def on_model_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run fn on the model thread and await its result (queued behind any call still running there)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(model_executor(), lambda: fn(*args, **kwargs))
