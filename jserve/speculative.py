"""Speculative decoding on the host: prompt-lookup drafts and when checking them pays.

``PromptLookup`` drafts a request's next tokens with no second model: it finds the most recent
earlier occurrence of the sequence's last few tokens (prompt and output so far) and proposes what
followed it there. Input-grounded work (repeating, quoting, editing, continuing a list) repeats
long runs of its input, and there the drafts are mostly right.

``SpecPolicy`` decides, each decode step, between a plain step over all slots
(``Engine.generate``) and a step that also checks drafts over the live slots
(``Engine.verify``): it keeps measured step times of both and each request's acceptance rate,
and verifies only when the tokens expected per second are higher that way. A request whose
drafts are rarely accepted stops drafting (and tries again now and then).
"""

from __future__ import annotations

import dataclasses
import time


class PromptLookup:
    """N-gram drafter over one request's tokens. ``append`` each new token, ``propose`` a draft.

    Indexes every n-gram (``min_ngram..max_ngram`` tokens) by where it last ended, so a
    proposal is a few dictionary lookups, whatever the sequence's length."""

    def __init__(self, tokens: list[int], max_ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes {min_ngram}..{max_ngram} must satisfy 1 <= min <= max")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.seq: list[int] = []
        self._ends: dict[tuple[int, ...], int] = {}  # n-gram -> position right after its latest occurrence
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        # The n-grams ending at the current end become lookups for later: what follows them is ``token``.
        seq, end = self.seq, len(self.seq)
        for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
            self._ends[tuple(seq[end - n:])] = end
        seq.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest suffix n-gram's latest earlier occurrence."""
        seq = self.seq
        for n in range(min(self.max_ngram, len(seq)), self.min_ngram - 1, -1):
            end = self._ends.get(tuple(seq[-n:]))
            if end is not None:
                return seq[end:end + k]
        return []


@dataclasses.dataclass
class Acceptance:
    """A request's running estimate of how often a drafted token is accepted, given the ones
    before it were (an exponential average over its verify steps)."""

    rate: float = 0.6  # prior: prompt-lookup drafts that are found are right more often than not
    idle: int = 0  # steps since it last drafted (a request that stopped drafting retries now and then)

    def update(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        tried = accepted + (1 if accepted < drafted else 0)  # positions whose agreement was checked
        self.rate = 0.7 * self.rate + 0.3 * (accepted / tried)

    def expected(self, n: int) -> float:
        """Expected extra tokens from a draft of ``n``: sum of rate^i, i = 1..n."""
        r, total, p = self.rate, 0.0, 1.0
        for _ in range(n):
            p *= r
            total += p
        return total


# A request drafts only while its acceptance rate is at least this; below it, it retries every
# ``RETRY_STEPS`` steps (the text it writes may turn input-grounded later).
MIN_RATE = 0.15
RETRY_STEPS = 16


class SpecPolicy:
    """Chooses, for a step, a plain ``generate`` or a ``verify`` call of some width (positions
    per row: the last token and up to ``width - 1`` drafted tokens), from measured step times (an
    exponential average per call kind: ``generate``, and ``verify:<rows>x<width>``) and the drafts'
    expected yield at each width.

    A kind is tried until it has been timed twice (its first call may carry one-off costs, so
    the second replaces it); after that, a kind not chosen is timed again once its last time is
    ``refresh_s`` seconds old (times change with context length and load, and a measurement
    taken under a passing load must not decide for ever). ``clock``: seconds, monotonic (tests
    pass their own).

    ``options`` maps each width a step could take to the tokens its drafts are expected to add
    (cut to ``width - 1``); width 1, no drafts at all, is a decode step over the live slots only,
    which for a few live slots is cheaper than the plain step over all of them."""

    def __init__(self, refresh_s: float = 15.0, clock=time.monotonic):
        self.refresh_s = refresh_s
        self.clock = clock
        self.times: dict[str, float] = {}
        self._measured: dict[str, float] = {}
        self._count: dict[str, int] = {}

    @staticmethod
    def kind(rows_bucket: int, width: int | None) -> str:
        return "generate" if width is None else f"verify:{rows_bucket}x{width}"

    def observe(self, kind: str, seconds: float) -> None:
        n = self._count.get(kind, 0)
        self._count[kind] = n + 1
        self.times[kind] = seconds if n < 2 else 0.8 * self.times[kind] + 0.2 * seconds
        self._measured[kind] = self.clock()

    def _timed(self, kind: str) -> bool:
        return self._count.get(kind, 0) >= 2

    def _stale(self, kind: str) -> bool:
        return self.clock() - self._measured[kind] > self.refresh_s

    def _rates(self, live: int, rows_bucket: int, options: dict[int, float]) -> dict[int | None, float]:
        rates: dict[int | None, float] = {None: live / self.times["generate"]}
        for w, extra in options.items():
            rates[w] = (live + extra) / self.times[self.kind(rows_bucket, w)]
        return rates

    def could_pay(self, live: int, rows_bucket: int, options: dict[int, float]) -> bool:
        """Whether some verify could be chosen with ``options`` (an upper estimate: every drafting
        request finds a full draft), or is due to be timed. When not, the caller need not wait for
        the last step's tokens to draft."""
        if not self._timed("generate"):
            return True
        for w in options:
            kind = self.kind(rows_bucket, w)
            if not self._timed(kind) or self._stale(kind):
                return True
        rates = self._rates(live, rows_bucket, options)
        return max(rates, key=lambda o: (rates[o], o is None)) is not None

    def choose(self, live: int, rows_bucket: int, options: dict[int, float]) -> int | None:
        """The width to verify at, or None for a plain step: ``live`` slots, the verify call's row
        bucket, ``options`` (width -> expected drafted tokens accepted over all live requests).
        Compares tokens per second of every kind."""
        if not self._timed("generate"):
            return None
        untimed = [w for w in sorted(options) if not self._timed(self.kind(rows_bucket, w))]
        if untimed:
            return untimed[0]
        rates = self._rates(live, rows_bucket, options)
        best = max(rates, key=lambda o: (rates[o], o is None))
        stale = [o for o in rates if o != best and self._stale(self.kind(rows_bucket, o))]
        if stale:  # timed once more, the oldest first
            return min(stale, key=lambda o: self._measured[self.kind(rows_bucket, o)])
        return best
