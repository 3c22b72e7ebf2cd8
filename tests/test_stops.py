"""Stop strings in streamed text: the earliest one found, and the suffix held back meanwhile."""

from __future__ import annotations

import random

from jserve.stops import StopMatcher


def _reference(text: str, stops: tuple[str, ...], start: int) -> tuple[int | None, int]:
    """By brute force: the earliest stop starting at or after ``start - len + 1`` and held-back length."""
    hits = [i for s in stops for i in [text.find(s, max(0, start - len(s) + 1))] if i >= 0]
    held = max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
               default=0)
    return (min(hits) if hits else None), held


def test_held_back_is_the_longest_stop_prefix_suffix():
    for text, stops, held in [("hello wor", ("world",), 3), ("hello", ("xyz", "lo!"), 2), ("abc", ("zzz",), 0),
                              ("aaab", ("aab" + "x",), 3), ("abab", ("ababc",), 4)]:
        m = StopMatcher(stops)
        assert m.feed(text) is None
        assert m.held_back == held, (text, stops)


def test_pieces_agree_with_brute_force_on_random_text():
    rng = random.Random(0)
    for _ in range(300):
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3)))
        m, text = StopMatcher(stops), ""
        while True:
            piece = "".join(rng.choice("abc") for _ in range(rng.randint(0, 3)))
            start = len(text)
            text += piece
            hit = m.feed(piece)
            want_hit, want_held = _reference(text, stops, start)
            assert hit == want_hit, (stops, text)
            if hit is not None or len(text) > 40:
                break
            assert m.held_back == want_held, (stops, text)


class _Counted(str):
    """A stop string that counts the characters read from it."""

    reads = 0

    def __getitem__(self, i):
        _Counted.reads += 1
        return str.__getitem__(self, i)


def test_long_stop_strings_cost_work_linear_in_the_text():
    """Four 4,000-character stop strings that the text keeps almost matching, fed 2,000 one-character
    pieces: a suffix search from scratch at every piece (the old way) reads ~4 x 4,000 characters per
    piece; this reads a few per piece and stop string, beyond building its tables once."""
    stops = tuple(_Counted("a" * 3999 + c) for c in "wxyz")
    m = StopMatcher(stops)
    built = _Counted.reads
    for _ in range(2000):
        assert m.feed("a") is None
    assert m.held_back == 2000
    assert _Counted.reads - built <= 4 * 2000 * 4
    assert built <= 4 * 8 * 4000  # linear in the stop strings too


def test_long_stop_strings_never_matching_cost_a_few_reads_per_character():
    """The old search's worst case (8.6 ms per token measured for these stops, text that never starts
    one): from scratch it tried every prefix length of every stop string at every token."""
    stops = tuple(_Counted("a" * 3999 + c) for c in "wxyz")
    m = StopMatcher(stops)
    built = _Counted.reads
    for _ in range(300):
        assert m.feed("hello world ") is None
    assert m.held_back == 0
    assert _Counted.reads - built <= 4 * 300 * 12 * 3
