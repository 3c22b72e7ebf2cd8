"""Slot and prefix placement (``jserve.placement``): pure functions, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from jserve.engine_api import ChunkRow
from jserve.placement import Placement, Slots, place, prompt_chunks, shared_prefix, worth_waiting


def _t(*tokens: int) -> np.ndarray:
    return np.asarray(tokens, np.int64)


def test_shared_prefix_stops_at_the_first_difference_and_at_the_limit():
    assert shared_prefix(_t(1, 2, 3, 4), _t(1, 2, 9, 4), 10) == 2
    assert shared_prefix(_t(1, 2, 3), _t(1, 2, 3, 4), 10) == 3  # the shorter one ends it
    assert shared_prefix(_t(1, 2, 3), _t(1, 2, 3), 2) == 2
    assert shared_prefix(_t(), _t(1), 5) == 0
    assert shared_prefix(_t(5), _t(6), 5) == 0


def test_place_takes_the_free_slot_sharing_the_longest_prefix():
    free = {0: _t(1, 2), 1: _t(1, 2, 3, 4), 2: _t()}
    assert place([1, 2, 3, 7], free, [0.0, 0.0, 0.0], {}) == Placement(1, None, 3)


def test_place_never_reuses_the_last_prompt_token():
    free = {0: _t(1, 2, 3, 4, 5)}
    assert place([1, 2, 3], free, [0.0], {}) == Placement(0, None, 2)


def test_place_prefers_the_least_recently_used_free_slot_among_equals():
    free = {0: _t(9), 1: _t(8), 2: _t(7)}
    used = [5.0, 1.0, 3.0]
    assert place([1, 2], free, used, {}) == Placement(1, None, 0)
    assert place([7, 2], free, used, {}) == Placement(2, None, 1)  # a shared token beats recency


def test_place_copies_a_longer_prefix_from_a_busy_slot():
    free = {1: _t(1, 2), 2: _t()}
    busy = {0: _t(1, 2, 3, 4, 5, 6)}
    assert place([1, 2, 3, 4, 9], free, [0.0, 0.0, 0.0], busy) == Placement(1, 0, 4)
    # A busy slot sharing no more than the chosen free slot is not copied from.
    assert place([1, 2, 8], free, [0.0, 0.0, 0.0], busy) == Placement(1, None, 2)


def test_prompt_chunks_run_the_oldest_prompt_first_within_the_rows():
    prompts = [(3, list(range(10)), 0), (1, [50, 51], 0)]
    assert prompt_chunks(prompts, 2, 4) == [ChunkRow(3, 0, [0, 1, 2, 3], False), ChunkRow(3, 4, [4, 5, 6, 7], False)]
    assert prompt_chunks([(3, list(range(10)), 8), (1, [50, 51], 0)], 4, 4) == [
        ChunkRow(3, 8, [8, 9], True), ChunkRow(1, 0, [50, 51], True)]
    # A prompt whose prefix was reused starts where the reuse ends.
    assert prompt_chunks([(0, [5, 6, 7, 8, 9], 3)], 4, 4) == [ChunkRow(0, 3, [8, 9], True)]


def test_worth_waiting_only_for_a_pending_prefix_longer_than_any_cached_one():
    prompt = list(range(20))
    pending = [_t(*range(12), 99)]
    assert worth_waiting(prompt, pending, [_t()], least=8) is True
    assert worth_waiting(prompt, pending, [_t(*range(5))], least=8) is False  # 12 - 5 < 8
    assert worth_waiting(prompt, [_t(*range(6))], [_t()], least=8) is False  # too short to wait for
    assert worth_waiting(prompt, [], [_t()], least=8) is False


def test_worth_waiting_does_not_read_the_cache_when_nothing_pending_is_worth_it():
    def cached():
        raise AssertionError("read")
        yield

    assert worth_waiting([1, 2, 3], [_t(9)], cached(), least=2) is False


def test_slots_take_release_and_clear():
    slots = Slots(3)
    assert slots.in_use == 0
    a = slots.take([1, 2, 3], {})
    assert a == Placement(0, None, 0) and slots.in_use == 1
    slots.overwrite(a.slot)
    slots.release(a.slot, _t(1, 2, 3, 4), now=10.0)
    b = slots.take([1, 2, 3, 4, 5], {})
    assert b == Placement(0, None, 4)  # the freed slot holds the prefix, though slots 1 and 2 were free first
    c = slots.take([7], {}, prefix_cache=False)
    assert c.slot == 1
    slots.untake(c.slot)
    assert list(slots.free) == [1, 2]
    assert [t.tolist() for t in slots.cached([_t(8)])] == [[], [], [8]]
    slots.clear()
    assert slots.in_use == 0 and all(t.size == 0 for t in slots.tokens)


def test_slots_take_fails_loudly_with_no_free_slot():
    slots = Slots(1)
    slots.take([1], {})
    with pytest.raises(ValueError):
        slots.take([1], {})
