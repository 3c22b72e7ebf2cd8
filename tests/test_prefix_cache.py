"""Prefix caching and chunked prefill through the orchestrator: what is reused, and that reuse
changes nothing a client sees (tokens, and logprobs bit for bit where the reused keys/values
were computed by the same prompt path)."""

from __future__ import annotations

import numpy as np
import pytest

from jserve import SamplingParams
from jserve.llm import collect
from jserve.orchestrator import Orchestrator, Stream


def _orch(llm, **kw) -> Orchestrator:
    return Orchestrator(llm.engine, llm.tokenizer, max_waiting=64, **kw)


def _run(orch, prompt, params):
    return collect(list(orch.submit(prompt, params, Stream())))


def _fp(r):
    return r.token_ids, np.asarray(r.logprobs, np.float32).tobytes(), r.finish_reason


@pytest.fixture
def pair(tiny_llm):
    """An orchestrator with the prefix cache and one without, over the same engine."""
    on, off = _orch(tiny_llm), _orch(tiny_llm, prefix_cache=False)
    yield on, off
    on.shutdown(drain=False, timeout=10)
    off.shutdown(drain=False, timeout=10)


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=12, ignore_eos=True, logprobs=0)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_shared_prompt_prefix_is_reused_and_changes_nothing(pair, params):
    on, off = pair
    rng = np.random.default_rng(1)
    system = rng.integers(17, 40000, 45).tolist()  # crosses a chunk boundary (32) and ends inside the next
    first = _run(on, system + [101, 102, 103], params)
    assert first.cached_tokens == 0
    for tail in ([201, 202], [301] * 9, rng.integers(17, 40000, 17).tolist()):
        warm = _run(on, system + tail, params)
        cold = _run(off, system + tail, params)
        assert warm.cached_tokens == len(system) and cold.cached_tokens == 0
        assert _fp(warm) == _fp(cold)


def test_the_same_prompt_again_reuses_all_but_its_last_token(pair):
    on, off = pair
    prompt = list(range(300, 340))
    a = _run(on, prompt, GREEDY)
    b = _run(on, prompt, GREEDY)
    assert (a.cached_tokens, b.cached_tokens) == (0, len(prompt) - 1)  # the last is run again for its logits
    assert _fp(a) == _fp(b) == _fp(_run(off, prompt, GREEDY))


def test_second_chat_turn_reuses_the_first_turn_and_its_answer(pair):
    """The answer's keys/values were written by decode steps, not by the prompt path, so they may
    differ from a cold prefill in the last bits: greedy tokens are compared (see README)."""
    on, off = pair
    turn1 = list(range(500, 530))
    r1 = _run(on, turn1, GREEDY)
    turn2 = turn1 + r1.token_ids + [7, 8, 9]
    warm, cold = _run(on, turn2, GREEDY), _run(off, turn2, GREEDY)
    # All of turn 1's prompt and answer but its last token (sampled, never fed to a step) are reused.
    assert warm.cached_tokens == len(turn1) + len(r1.token_ids) - 1
    assert warm.token_ids == cold.token_ids


def test_a_live_request_prefix_is_copied_into_another_slot(tiny_llm):
    orch = _orch(tiny_llm)
    try:
        shared = list(range(1000, 1050))
        long_params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
        live = orch.submit(shared + [1], long_params, Stream())
        next(iter(live))  # it is decoding now: its prompt is in its slot
        r = _run(orch, shared + [2, 3], GREEDY)
        assert r.cached_tokens == len(shared)
        assert collect(list(live)).completion_tokens == 60
    finally:
        orch.shutdown(drain=False, timeout=10)
    off = _orch(tiny_llm, prefix_cache=False)
    try:
        assert _fp(_run(off, shared + [2, 3], GREEDY)) == _fp(r)
    finally:
        off.shutdown(drain=False, timeout=10)


def test_least_recently_used_idle_slot_is_evicted_first(tiny_llm):
    orch = _orch(tiny_llm)
    try:
        slots = tiny_llm.engine.slots
        prompts = [[2000 + 100 * i + j for j in range(20)] for i in range(slots + 1)]
        for p in prompts[:slots]:  # one after another: slot i keeps prompt i, prompt 0 the oldest
            _run(orch, p, GREEDY)
        _run(orch, prompts[slots], GREEDY)  # evicts prompt 0's slot only
        assert _run(orch, prompts[slots - 1], GREEDY).cached_tokens == 19
        assert _run(orch, prompts[1], GREEDY).cached_tokens == 19
        assert _run(orch, prompts[0], GREEDY).cached_tokens == 0
    finally:
        orch.shutdown(drain=False, timeout=10)


def test_long_prompts_are_chunked_between_decode_steps_without_changing_any_stream(tiny_llm):
    """Prompts of many chunks arrive while streams decode: the streams keep getting a token every
    step (at most ``prefill_budget`` prompt tokens run per step), and every output equals its run alone."""
    orch = _orch(tiny_llm, prefill_budget=32)
    rng = np.random.default_rng(5)
    limit = tiny_llm.engine.max_prompt_len
    try:
        streams = [orch.submit(rng.integers(17, 40000, 5).tolist(), SamplingParams(
            temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=0), Stream()) for _ in range(2)]
        heads = [next(iter(s)) for s in streams]
        long_prompts = [rng.integers(17, 40000, limit - i).tolist() for i in range(2)]
        steps0 = orch.steps
        longs = [orch.submit(p, GREEDY, Stream()) for p in long_prompts]
        long_results = [collect(list(s)) for s in longs]
        # Each long prompt needs two chunks of 32 at one chunk per step: run between decode steps.
        assert orch.steps - steps0 >= 4
        results = [collect([h] + list(s)) for h, s in zip(heads, streams)]
        assert all(r.completion_tokens == 40 for r in results)
    finally:
        orch.shutdown(drain=False, timeout=10)
    off = _orch(tiny_llm, prefix_cache=False)
    try:
        for p, r in zip(long_prompts, long_results):
            assert _fp(_run(off, p, GREEDY)) == _fp(r)
    finally:
        off.shutdown(drain=False, timeout=10)


def test_requests_arriving_together_compute_a_shared_prefix_once(pair):
    on, off = pair
    rng = np.random.default_rng(9)
    system = rng.integers(17, 40000, 40).tolist()
    prompts = [system + rng.integers(17, 40000, 5).tolist() for _ in range(3)]
    streams = [on.submit(p, GREEDY, Stream()) for p in prompts]  # the later ones wait for the first's prefix
    results = [collect(list(s)) for s in streams]
    assert [r.cached_tokens for r in results] == [0, len(system), len(system)]
    for p, r in zip(prompts, results):
        assert _fp(r) == _fp(_run(off, p, GREEDY))
