"""Slot and prefix placement: which slot a new prompt takes, which cached prefix it reuses, and
which prompt chunks the next ``extend`` call runs.

A slot keeps the keys/values of what it last held (prompt and output) until it is needed again;
the host keeps the token ids they belong to (``[T]`` int64 arrays, ``Slots``). A new prompt takes
the free slot whose tokens share the longest prefix with it (else the least recently used one),
or copies a longer prefix from any other slot, live or idle, and computes only the rest. Pure
functions over those arrays, and ``Slots``, the host's record of the slots (the orchestrator's
loop thread owns it).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from jserve.engine_api import ChunkRow

_EMPTY = np.zeros((0,), np.int64)


class Placement(NamedTuple):
    """Where a new prompt goes: its ``slot``, the slot to copy a cached prefix from (``source``,
    None when it reuses its own slot's or nothing), and the prompt tokens ``reused``."""

    slot: int
    source: int | None
    reused: int


def shared_prefix(a: np.ndarray, b: np.ndarray, limit: int) -> int:
    """Length of the common prefix of two token arrays, at most ``limit``."""
    n = min(limit, len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def place(prompt: Sequence[int], free: Mapping[int, np.ndarray], last_used: Mapping[int, float],
          busy: Mapping[int, np.ndarray]) -> Placement:
    """The placement of ``prompt`` given the ``free`` slots' cached tokens (slot -> tokens, at least
    one), when each free slot was last released (``last_used``), and the tokens cached by the
    ``busy`` slots (prefilling or live).

    At most ``len(prompt) - 1`` tokens are reused: the last one is always run, for its logits."""
    ids = np.asarray(prompt, np.int64)
    limit = len(ids) - 1
    shared = {s: shared_prefix(tokens, ids, limit) for s, tokens in free.items()}
    # The free slot with the longest shared prefix; among equals the least recently used.
    slot = max(shared, key=lambda s: (shared[s], -last_used[s]))
    best, reused = max((*shared.items(), *((s, shared_prefix(t, ids, limit)) for s, t in busy.items())),
                       key=lambda kv: kv[1])
    if reused > shared[slot]:
        return Placement(slot, best, reused)
    return Placement(slot, None, shared[slot])


def worth_waiting(prompt: Sequence[int], pending: Sequence[np.ndarray], cached: Iterable[np.ndarray],
                  least: int) -> bool:
    """Whether ``prompt`` should wait for a prefix still being computed: the prompts being
    prefilled (``pending``) share at least ``least`` tokens more with it than anything ``cached``
    holds already (and at least ``least`` in all). ``cached`` is read only when that is in doubt."""
    if not pending:
        return False
    ids = np.asarray(prompt, np.int64)
    limit = len(ids) - 1
    coming = max(shared_prefix(p, ids, limit) for p in pending)
    if coming < least:
        return False
    held = max((shared_prefix(t, ids, limit) for t in cached), default=0)
    return coming - held >= least


def prompt_chunks(prompts: Sequence[tuple[int, Sequence[int], int]], rows_max: int, chunk: int) -> list[ChunkRow]:
    """The rows of the next ``extend`` call: ``prompts`` (slot, prompt, tokens already in the slot),
    oldest first, each cut in chunks of ``chunk`` tokens, at most ``rows_max`` rows in all (an older
    prompt's chunks all go before a younger one's)."""
    rows: list[ChunkRow] = []
    for slot, prompt, done in prompts:
        while len(rows) < rows_max and done < len(prompt):
            tokens = list(prompt[done:done + chunk])
            rows.append(ChunkRow(slot=slot, start=done, tokens=tokens, final=done + len(tokens) == len(prompt)))
            done += len(tokens)
        if len(rows) >= rows_max:
            break
    return rows


class Slots:
    """The host's record of ``n`` slots: which are free (in the order they were freed) and, for each
    free slot, the tokens its cache holds and when it was released."""

    def __init__(self, n: int):
        self.n = n
        self.used = [0.0] * n  # when each slot was last released (least recently used first)
        self.clear()

    def clear(self) -> None:
        """Every slot free and empty (the device's cache was rebuilt)."""
        self.free: collections.deque[int] = collections.deque(range(self.n))
        self.tokens: list[np.ndarray] = [_EMPTY] * self.n

    @property
    def in_use(self) -> int:
        return self.n - len(self.free)

    def take(self, prompt: Sequence[int], busy: Mapping[int, np.ndarray], prefix_cache: bool = True) -> Placement:
        """Take a free slot for ``prompt`` (``place``; without ``prefix_cache`` the first free slot,
        reusing nothing). ``busy``: the tokens cached by the slots in use."""
        if prefix_cache:
            placed = place(prompt, {s: self.tokens[s] for s in self.free}, self.used, busy)
        else:
            placed = Placement(self.free[0], None, 0)
        self.free.remove(placed.slot)
        return placed

    def untake(self, slot: int) -> None:
        """Give back a slot taken for a request that could not start (first in line again)."""
        self.free.appendleft(slot)

    def overwrite(self, slot: int) -> None:
        """``slot``'s cache is being overwritten by a new request: what it held is gone."""
        self.tokens[slot] = _EMPTY

    def release(self, slot: int, tokens: np.ndarray, now: float) -> None:
        """Free ``slot``, whose cache holds ``tokens`` (kept for the next prompt sharing them)."""
        self.tokens[slot] = tokens
        self.used[slot] = now
        self.free.append(slot)

    def cached(self, busy: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """The tokens every slot's cache holds: the free slots', then ``busy`` (those in use)."""
        return itertools.chain([self.tokens[s] for s in self.free], busy)
