"""Byte counts as people write them: parsed from flags and files (`24GiB`), formatted for tables (`812.4 MiB`)."""

from __future__ import annotations

import re

from engine.errors import IkctlError

_SIZE = re.compile(r"(?P<value>\d+(?:\.\d*)?)\s*(?P<unit>[A-Za-z]*)")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mi": 1 << 20,
          "mib": 1 << 20, "mb": 10**6, "g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40,
          "ti": 1 << 40, "tib": 1 << 40, "tb": 10**12}


class SizeError(IkctlError):
    """Text that is not a size."""


def parse_size(text: str) -> int:
    """`512MiB`, `8G`, `1.5GiB`, `1000000`: K/M/G/T and KiB... are powers of 1024, KB/MB... of 1000."""
    m = _SIZE.fullmatch(text.strip())
    unit = _UNITS.get(m["unit"].lower()) if m else None
    if m is None or unit is None:
        raise SizeError(f"'{text}' is not a size (e.g. 512MiB, 24GiB, 1000000)")
    return int(float(m["value"]) * unit)


def format_bytes(n_bytes: int) -> str:
    """Binary units, one decimal: `812.4 MiB`."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{n_bytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
