"""Stop strings found in streamed text, in time linear in the text (Knuth–Morris–Pratt).

A request's text grows a piece per token. ``StopMatcher`` keeps, for each stop string, how much
of it the text currently ends with, and advances that over each new piece only: a token costs
what its own characters cost, however long the stop strings are, and the text that must be held
back (a suffix that may still grow into a stop string) falls out of the same state.
"""

from __future__ import annotations


def _failure(s: str) -> list[int]:
    """``f[i]``: length of the longest proper prefix of ``s[:i + 1]`` that is also its suffix."""
    f = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class StopMatcher:
    """Feed text piece by piece; learn where the first stop string starts and what to hold back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self._fail = [_failure(s) for s in stops]
        self._state = [0] * len(stops)  # characters of each stop string the text ends with
        self._fed = 0  # characters fed so far

    def feed(self, piece: str) -> int | None:
        """Advance over ``piece``. Returns where, in the whole text, the earliest stop string that
        completes within ``piece`` starts, or None."""
        found = None
        for j, (s, f) in enumerate(zip(self.stops, self._fail)):
            k = self._state[j]
            for i, ch in enumerate(piece):
                while k and ch != s[k]:
                    k = f[k - 1]
                if ch == s[k]:
                    k += 1
                if k == len(s):
                    start = self._fed + i + 1 - len(s)
                    found = start if found is None else min(found, start)
                    break
            self._state[j] = k
        self._fed += len(piece)
        return found

    @property
    def held_back(self) -> int:
        """Length of the longest suffix of the text so far that is a proper prefix of a stop string."""
        return max((k for k, s in zip(self._state, self.stops) if k < len(s)), default=0)
