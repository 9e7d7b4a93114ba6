"""Numeric settings typed into the TUI's inputs, parsed with the CLI's flag names in the errors."""

from __future__ import annotations

from engine.errors import IkctlError


def parse_int(flag: str, text: str, minimum: int | None = None) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise IkctlError(f"{flag} '{text.strip()}' is not a whole number") from None
    if minimum is not None and value < minimum:
        raise IkctlError(f"{flag} {value} must be >= {minimum}")
    return value


def parse_float(flag: str, text: str, minimum: float | None = None) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise IkctlError(f"{flag} '{text.strip()}' is not a number") from None
    if minimum is not None and value < minimum:
        raise IkctlError(f"{flag} {value:g} must be >= {minimum:g}")
    return value
