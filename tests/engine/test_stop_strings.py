"""Stop strings over streamed text: nothing of a stop string is ever sent, whatever the token boundaries."""

from __future__ import annotations

import itertools

from engine.stop_strings import StopMatcher, partial_suffix


def stream(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    m = StopMatcher(stops)
    out = [m.feed(p) for p in pieces]
    if not m.stopped:
        out.append(m.flush())
    return out, m.stopped


def test_every_split_of_the_text_sends_exactly_the_text_before_the_stop() -> None:
    text = "The answer is 42.\nUser: next"
    stops = ["\nUser:", "never here"]
    for a, b in itertools.combinations(range(1, len(text)), 2):
        out, stopped = stream([text[:a], text[a:b], text[b:]], stops)
        assert stopped
        assert "".join(out) == "The answer is 42."
        assert all("\nU" not in piece for piece in out)


def test_a_held_prefix_that_does_not_become_a_stop_is_released() -> None:
    m = StopMatcher(["</end>"])
    assert m.feed("abc</e") == "abc"  # "</e" could still become "</end>"
    assert m.feed("x") == "</ex"
    assert m.feed("</en") == ""
    assert m.flush() == "</en"  # generation ended: it never became a stop string
    assert not m.stopped


def test_the_earliest_of_several_stops_wins_and_nothing_follows() -> None:
    out, stopped = stream(["one two ", "three four"], ["four", "two"])
    assert stopped and "".join(out) == "one "
    m = StopMatcher(["x"])
    assert m.feed("ax") == "a" and m.feed("more") == "" and m.flush() == ""


def test_no_stops_passes_everything_through() -> None:
    out, stopped = stream(["a", "b", ""], [])
    assert "".join(out) == "ab" and not stopped


def test_partial_suffix() -> None:
    assert partial_suffix("hello <|py", ["<|python_tag|>"]) == 4
    assert partial_suffix("hello", ["<|python_tag|>"]) == 0
    assert partial_suffix("ab", ["abc", "bcd"]) == 2
