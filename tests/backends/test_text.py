"""Incremental UTF-8 and stop-string handling."""

from __future__ import annotations

import pytest

from backends.text import StopMatcher, Utf8Stream


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, hit = matcher.push(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize(("stops", "pieces", "expected"), [
    (["END"], ["hel", "lo E", "N", "D more"], ("hello ", True)),
    (["END"], ["hello EN", "d"], ("hello ENd", False)),
    (["\n\n"], ["a\n", "\nb"], ("a", True)),
    (["ab", "b"], ["xa", "b"], ("x", True)),
    (["abc"], ["ab"], ("ab", False)),
    ([], ["a", "b"], ("ab", False)),
    (["stop"], ["xxstopyy"], ("xx", True)),
])
def test_stop_matching_across_pieces(stops: list[str], pieces: list[str],
                                     expected: tuple[str, bool]) -> None:
    assert run(stops, pieces) == expected


def test_held_text_never_exceeds_the_longest_stop() -> None:
    matcher = StopMatcher(["zzzz"])
    assert [matcher.push("z") for _ in range(4)] == [("", False)] * 3 + [("", True)]
    matcher = StopMatcher(["abc"])
    emitted = [matcher.push("a")[0] for _ in range(1000)]
    assert emitted == [""] + ["a"] * 999 and matcher.flush() == "a"


def test_utf8_tail_is_held_until_complete() -> None:
    stream = Utf8Stream()
    data = "é€😀".encode()
    out = [stream.push(data[i:i + 1]) for i in range(len(data))]
    assert "".join(out) == "é€😀"
    assert out[0] == ""  # first byte of é alone is held back
    assert stream.push(b"\xff") == "\ufffd" and stream.flush() == ""
