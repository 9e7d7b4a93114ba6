"""Stop strings over streamed text: text that could still become a stop string is held back, never sent early."""

from __future__ import annotations

from collections.abc import Sequence


def partial_suffix(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper beginning of one of `patterns` (0: none)."""
    best = 0
    for p in patterns:
        for n in range(min(len(p) - 1, len(text)), best, -1):
            if text.endswith(p[:n]):
                best = n
                break
    return best


class StopMatcher:
    """Feed it each token's new text; it says what may be sent and whether a stop string was met.

    The stop string itself and everything after it are never sent (OpenAI's and llama-server's behaviour)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""  # received, not yet released
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text that can be released now; after a stop string, the text before it and then nothing."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        keep = partial_suffix(self.pending, self.stops)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        """At the end of generation: what was held back (it never became a stop string)."""
        out, self.pending = self.pending, ""
        return out
