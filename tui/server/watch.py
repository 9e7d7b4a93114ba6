"""Watching a running `ikctl serve` from outside (the app's Serve screen): its /metrics read into a record, and
that record as the lines the screen shows. No Textual here."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass

from engine.errors import IkctlError
from tui.server.metrics import ServeRates, ServeSample, parse

DEFAULT_URL = "http://127.0.0.1:8080"
KEY_ENV = "IKCTL_API_KEY"


class WatchError(IkctlError):
    """The server could not be read; the message says why and what to do, in one line."""


@dataclass(frozen=True)
class Reading:
    sample: ServeSample
    at: float  # time.monotonic() of the reading


def read_sample(url: str, key: str | None = None, timeout: float = 2.0) -> ServeSample:
    key = key if key is not None else os.environ.get(KEY_ENV)
    request = urllib.request.Request(f"{url.rstrip('/')}/metrics",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return parse(r.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise WatchError(f"{url} wants its API key: start the app with {KEY_ENV}=KEY in the environment") from None
        if e.code == 501:
            raise WatchError(f"{url} runs without metrics: restart it with `ikctl serve --metrics`") from None
        if e.code == 503:
            raise WatchError(f"{url} is loading its model") from None
        raise WatchError(f"{url}/metrics answered {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise WatchError(f"no server at {url} ({reason}); start one with `ikctl serve --metrics`") from None


def describe(url: str, sample: ServeSample, rates: ServeRates | None) -> list[str]:
    """The Serve screen's lines: address and state, slots and queue, and the rates over the last interval."""
    state = "ready" if sample.ready else "a worker is down (GET /health says which)"
    speed = (f"{rates.requests_per_s:.2f} requests/s · {rates.tokens_per_s:.1f} tokens/s generated"
             if rates is not None else "rates after the next reading")
    bar = "█" * sample.active + "░" * max(0, sample.slots - sample.active)
    return [f"{url} · {state}",
            f"slots {bar} {sample.active} of {sample.slots} busy · {sample.queued} queued",
            speed,
            f"since start: {sample.requests} requests, {sample.prompt_tokens} prompt tokens, "
            f"{sample.generated_tokens} generated"]
