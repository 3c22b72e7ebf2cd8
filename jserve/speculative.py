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

``Drafting`` is one request's speculation state; ``could_verify`` and ``plan_verify`` schedule a
step's speculation over the live requests (which rows draft what, at which width).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import NamedTuple

from jserve.engine_api import DraftRow, Engine


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


class StepKind(NamedTuple):
    """A decode step's kind, the key of its measured time: ``verify`` at ``rows_bucket`` rows of
    ``width`` positions, or (``width`` None) the plain ``generate`` step (``GENERATE``)."""

    rows_bucket: int
    width: int | None

    def __str__(self) -> str:
        return "generate" if self.width is None else f"verify:{self.rows_bucket}x{self.width}"


GENERATE = StepKind(0, None)


class SpecPolicy:
    """Chooses, for a step, a plain ``generate`` or a ``verify`` call of some width (positions
    per row: the last token and up to ``width - 1`` drafted tokens), from measured step times (an
    exponential average per ``StepKind``: ``generate``, and ``verify`` per rows bucket and width)
    and the drafts' expected yield at each width.

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
        self.times: dict[StepKind, float] = {}
        self._measured: dict[StepKind, float] = {}
        self._count: dict[StepKind, int] = {}

    @staticmethod
    def kind(rows_bucket: int, width: int | None) -> StepKind:
        return GENERATE if width is None else StepKind(rows_bucket, width)

    def observe(self, kind: StepKind, seconds: float) -> None:
        n = self._count.get(kind, 0)
        self._count[kind] = n + 1
        # A kind timed again because its time went stale takes the new time whole: the old one was
        # taken under other conditions (often the background compilation's load, right after SERVING),
        # and averaged in at 0.2 a stale time would keep a verify width unchosen for minutes.
        fresh = n < 2 or self._stale(kind)
        self.times[kind] = seconds if fresh else 0.8 * self.times[kind] + 0.2 * seconds
        self._measured[kind] = self.clock()

    def _timed(self, kind: StepKind) -> bool:
        return self._count.get(kind, 0) >= 2

    def _stale(self, kind: StepKind) -> bool:
        return self.clock() - self._measured[kind] > self.refresh_s

    def _rates(self, live: int, rows_bucket: int, options: dict[int, float]) -> dict[int | None, float]:
        rates: dict[int | None, float] = {None: live / self.times[GENERATE]}
        for w, extra in options.items():
            rates[w] = (live + extra) / self.times[self.kind(rows_bucket, w)]
        return rates

    def could_pay(self, live: int, rows_bucket: int, options: dict[int, float]) -> bool:
        """Whether some verify could be chosen with ``options`` (an upper estimate: every drafting
        request finds a full draft), or is due to be timed. When not, the caller need not wait for
        the last step's tokens to draft."""
        if not self._timed(GENERATE):
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
        if not self._timed(GENERATE):
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


@dataclasses.dataclass
class Drafting:
    """One request's speculation: its drafter, its acceptance, and what it has in flight."""

    drafter: PromptLookup
    acceptance: Acceptance = dataclasses.field(default_factory=Acceptance)
    drafted: int = 0  # tokens drafted for the verify step in flight
    hint: bool = False  # whether its latest handled token left a draft to propose

    def may_draft(self) -> bool:
        acc = self.acceptance
        return acc.rate >= MIN_RATE or acc.idle >= RETRY_STEPS

    def append(self, token: int) -> None:
        """Take a new token of the request's output."""
        self.drafter.append(token)
        self.hint = bool(self.drafter.propose(1))

    def checked(self, kept: int) -> int:
        """Take a verify step's verdict (``kept`` tokens: accepted drafts and one more); returns
        the tokens it had drafted for it (0: none)."""
        drafted, self.drafted = self.drafted, 0
        if drafted:
            self.acceptance.update(drafted, kept - 1)
        return drafted

    def stepped(self) -> None:
        """A decode step was dispatched: count steps since it last drafted (``RETRY_STEPS``)."""
        self.acceptance.idle = 0 if self.drafted else self.acceptance.idle + 1


class VerifyPlan(NamedTuple):
    """A verify step: every live slot with its draft, at ``width`` positions per row."""

    rows: list[DraftRow]
    width: int


def could_verify(engine: Engine, policy: SpecPolicy, runs: Sequence[Drafting | None], spec_tokens: int) -> bool:
    """Whether a verify step could pay this turn over the live requests' ``runs`` (None: one that
    does not speculate): every live run speculates, and ``policy`` says so if each run that had a
    draft after its last handled token finds a full one. Only then is the turn synchronous (drafts
    follow the last token, which may still be on the device). A live request that does not
    speculate (opted out, or constrained) keeps every step plain: its output is bitwise what it
    would be alone."""
    if not runs or any(d is None for d in runs):
        return False
    hints = [d.acceptance for d in runs if d.hint and d.may_draft()]
    bucket = engine.verify_bucket(len(runs))
    widths = engine.ready_widths(bucket)  # shapes still compiling in the background are not offered
    options = {w: sum(acc.expected(min(spec_tokens, w - 1)) for acc in hints) for w in widths}
    return bool(widths) and policy.could_pay(len(runs), bucket, options)


def plan_verify(engine: Engine, policy: SpecPolicy, runs: Sequence[tuple[int, Drafting, int]]) -> VerifyPlan | None:
    """Every live slot with its draft and the verify call's width, if verifying them is expected
    to pay; else None. ``runs``: (slot, its ``Drafting``, room: the most tokens it may draft).
    Marks what each run drafted (``Drafting.drafted``) when a plan is returned."""
    rows, accs = [], []
    for slot, d, room in runs:
        draft = d.drafter.propose(room) if room > 0 and d.may_draft() else []
        rows.append(DraftRow(slot, draft))
        accs.append(d.acceptance)
    bucket = engine.verify_bucket(len(rows))
    need = engine.verify_width(max(len(r.draft) for r in rows), bucket)
    widths = [w for w in engine.ready_widths(bucket) if w <= need]
    if not widths:
        return None
    if any(r.draft and acc.idle >= RETRY_STEPS for acc, r in zip(accs, rows)):
        widths = [widths[-1]]  # a draft unchecked for long is checked whole: its acceptance is re-measured
    options = {w: sum(acc.expected(min(len(r.draft), w - 1)) for acc, r in zip(accs, rows)) for w in widths}
    width = policy.choose(len(rows), bucket, options)
    if width is None:
        return None
    rows = [DraftRow(r.slot, r.draft[:width - 1]) for r in rows]
    for (_, d, _), r in zip(runs, rows):
        d.drafted = len(r.draft)
    return VerifyPlan(rows, width)
