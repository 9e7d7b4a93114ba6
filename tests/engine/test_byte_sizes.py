"""Sizes as people write them, and as the planner's tables print them."""

from __future__ import annotations

import pytest

from engine.byte_sizes import SizeError, format_bytes, parse_size


@pytest.mark.parametrize(("text", "n_bytes"), [
    ("512MiB", 512 << 20), ("8G", 8 << 30), ("1.5GiB", 3 << 29), ("1000000", 10**6), ("2 GB", 2 * 10**9),
    ("64k", 65536),
])
def test_parse_size(text: str, n_bytes: int) -> None:
    assert parse_size(text) == n_bytes


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "-1G", ""])
def test_what_is_not_a_size(text: str) -> None:
    with pytest.raises(SizeError, match="is not a size"):
        parse_size(text)


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (0, 1023, 1024, 851_863_142, 3 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "812.4 MiB", "3.0 GiB"]
