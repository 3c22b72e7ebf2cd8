"""Continuous batching: batch invariance, cancellation, deadlines, backpressure, stop strings, errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from jserve import SamplingParams
from jserve.llm import collect
from jserve.orchestrator import Orchestrator, QueueFullError, ShuttingDownError, Stream

from .waits import wait_steps, wait_until

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _alone(llm, prompt, params):
    [r] = llm.generate([prompt], params)
    return r


def _staggered(llm, prompts, params, gap_steps=1):
    """Submit each prompt ``gap_steps`` decode steps after the one before (so they join mid-flight,
    on any device), collect all results."""
    streams = []
    for p, sp in zip(prompts, params):
        streams.append(llm.submit(p, sp, block=True))
        wait_steps(llm.orchestrator, gap_steps)
    return [collect(list(s)) for s in streams]


class _CountingEngine:
    """An engine that counts decode steps (``generate`` calls), runs ``before[n]()`` on the loop's
    thread just before step n (so a cancel or a passing deadline lands at a known step), and logs
    each ``release`` as (slot, steps so far)."""

    def __init__(self, engine, before: dict | None = None):
        self._engine, self.before, self.steps, self.released = engine, dict(before or {}), 0, []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, *args, **kwargs):
        self.steps += 1
        action = self.before.pop(self.steps, None)
        if action is not None:
            action()
        return self._engine.generate(*args, **kwargs)

    def release(self, state, slot, *args, **kwargs):
        self.released.append((slot, self.steps))
        return self._engine.release(state, slot, *args, **kwargs)


def test_batch_invariance_24_staggered_requests_in_4_slots(tiny_llm):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(17, tiny_llm.config.vocab_size, int(n)).tolist() for n in rng.integers(1, 64, 24)]
    params = [SamplingParams(max_tokens=int(m), **GREEDY) for m in rng.integers(3, 40, 24)]
    alone = [_alone(tiny_llm, p, sp).token_ids for p, sp in zip(prompts, params)]
    together = _staggered(tiny_llm, prompts, params)
    for i, (a, t) in enumerate(zip(alone, together)):
        assert t.token_ids == a, f"request {i} differs when batched"
        assert t.finish_reason == "length" and len(a) == params[i].max_tokens
    assert tiny_llm.orchestrator.slots_in_use == 0


def test_batch_invariance_real_model(real_llm, reference):
    cases = reference["cases"][:6]
    params = [SamplingParams(max_tokens=m, **GREEDY) for m in (12, 20, 8, 16, 10, 14)]
    alone = [_alone(real_llm, c["prompt_ids"], sp).token_ids for c, sp in zip(cases, params)]
    together = _staggered(real_llm, [c["prompt_ids"] for c in cases], params, gap_steps=2)
    assert [t.token_ids for t in together] == alone


def test_same_seed_sampling_is_identical_alone_or_among_others(tiny_llm):
    prompt = [100, 200, 300, 400]
    sp = SamplingParams(temperature=0.8, seed=1234, max_tokens=30, ignore_eos=True)
    alone = _alone(tiny_llm, prompt, sp).token_ids
    others = [SamplingParams(temperature=t, seed=s, max_tokens=25, ignore_eos=True)
              for t, s in ((0.0, None), (1.0, 7), (0.8, None))]
    res = _staggered(tiny_llm, [[5, 6, 7], [9] * 20, prompt, [11, 12]], [others[0], others[1], sp, others[2]])
    assert res[2].token_ids == alone
    different_seed = _alone(tiny_llm, prompt, SamplingParams(temperature=0.8, seed=99, max_tokens=30,
                                                             ignore_eos=True)).token_ids
    assert different_seed != alone


def test_cancel_mid_stream_from_another_thread_ends_it_and_leaves_others_untouched(tiny_llm):
    orch = tiny_llm.orchestrator
    other_sp = SamplingParams(max_tokens=60, **GREEDY)
    expected_other = _alone(tiny_llm, [42, 43, 44], other_sp).token_ids
    victim = tiny_llm.submit([1, 2, 3], SamplingParams(max_tokens=120, **GREEDY))
    other = tiny_llm.submit([42, 43, 44], other_sp)
    it = iter(victim)
    got = [next(it) for _ in range(3)]
    assert all(p.finish_reason is None for p in got)
    victim.cancel()
    rest = list(it)
    assert rest[-1].finish_reason == "cancelled" and sum(p.finish_reason is not None for p in rest) == 1
    assert 3 <= rest[-1].completion_tokens < 120
    assert collect(list(other)).token_ids == expected_other
    wait_until(lambda: orch.slots_in_use == 0, "the slots are free")


@pytest.mark.parametrize("step", [1, 5])
def test_cancel_frees_the_slot_before_the_next_step_and_leaves_others_untouched(tiny_llm, step):
    """The cancel lands just before decode step ``step`` (on the loop's thread, so exactly there):
    the request has the prefill's token and those of steps 1 .. step - 1; step ``step``'s token is
    dropped and its slot is released before step ``step + 1``. Counted in steps, not seconds."""
    other_sp = SamplingParams(max_tokens=12, **GREEDY)
    expected_other = _alone(tiny_llm, [42, 43, 44], other_sp).token_ids
    streams = []
    engine = _CountingEngine(tiny_llm.engine, before={step: lambda: streams[0].cancel()})
    orch = Orchestrator(engine, tiny_llm.tokenizer, speculate=False)
    try:
        streams.append(orch.submit([1, 2, 3], SamplingParams(max_tokens=120, **GREEDY), Stream()))
        # Its first step means it took its slot (it may have been cancelled since: a step takes
        # less than a poll, so "holds a slot now" could be missed).
        wait_until(lambda: engine.steps >= 1 and not orch.num_waiting, "the victim took a slot")
        streams.append(orch.submit([42, 43, 44], other_sp, Stream()))
        victim = collect(list(streams[0]))
        assert victim.finish_reason == "cancelled" and victim.completion_tokens == step
        assert collect(list(streams[1])).token_ids == expected_other
        # The victim's slot is released first, before step + 1; the other's after its 12 tokens.
        assert [s for _, s in engine.released][0] == step and len(engine.released) == 2
        assert engine.released[1][1] > step and orch.slots_in_use == 0
    finally:
        orch.shutdown(drain=False, timeout=10)


def test_full_queue_is_refused_with_a_clear_error(tiny_llm):
    gated = _GatedEngine(tiny_llm.engine)  # no request can start, so none finishes and makes room
    orch = Orchestrator(gated, tiny_llm.tokenizer, max_waiting=2)
    streams = []
    try:
        with pytest.raises(QueueFullError, match=r"waiting queue is full \(2 requests\)"):
            for _ in range(tiny_llm.engine.slots + 3):
                streams.append(orch.submit([1, 2, 3], SamplingParams(max_tokens=100, **GREEDY), Stream()))
        assert 2 <= len(streams) <= tiny_llm.engine.slots + 2
        gated.gate.set()
        done = [collect(list(s)) for s in streams]  # admitted work still completes
        assert all(r.finish_reason == "length" and r.completion_tokens == 100 for r in done)
    finally:
        gated.gate.set()
        orch.shutdown(drain=False, timeout=10)


def test_a_deadline_already_passed_ends_the_request_before_its_first_token(tiny_llm):
    expired = collect(list(tiny_llm.submit([1, 2], SamplingParams(max_tokens=5), timeout=0.0)))
    assert expired.finish_reason == "deadline" and expired.completion_tokens == 0
    # A timeout is a deadline that far from submission; one not reached leaves the request alone.
    before = time.monotonic()
    stream = tiny_llm.submit([1, 2, 3], SamplingParams(max_tokens=7, **GREEDY), timeout=3600.0)
    after = time.monotonic()
    assert before + 3600.0 <= stream.request.deadline <= after + 3600.0
    r = collect(list(stream))
    assert r.finish_reason == "length" and r.completion_tokens == 7
    wait_until(lambda: tiny_llm.orchestrator.slots_in_use == 0, "the slots are free")


@pytest.mark.parametrize("step", [1, 6])
def test_a_deadline_passing_before_step_n_ends_the_request_with_n_tokens(tiny_llm, step):
    """The deadline passes just before decode step ``step`` (moved to that moment on the loop's
    thread): the request ends with reason deadline, having the prefill's token and those of steps
    1 .. step - 1, and no step runs for it after the next. Counted in steps, not seconds."""
    streams = []

    def expire():
        streams[0].request.deadline = time.monotonic()

    engine = _CountingEngine(tiny_llm.engine, before={step: expire})
    orch = Orchestrator(engine, tiny_llm.tokenizer, speculate=False)
    try:
        far = time.monotonic() + 3600.0
        streams.append(orch.submit([1, 2, 3], SamplingParams(max_tokens=120, **GREEDY), Stream(), deadline=far))
        r = collect(list(streams[0]))
        assert r.finish_reason == "deadline" and r.completion_tokens == step
        assert [s for _, s in engine.released] == [step]  # released before step + 1 was dispatched
        assert engine.steps == step and orch.slots_in_use == 0
    finally:
        orch.shutdown(drain=False, timeout=10)


def test_a_cancel_after_the_deadline_counts_as_deadline():
    from jserve.orchestrator import Request

    now = time.monotonic()
    late = Request([1], SamplingParams(), "r", sink=lambda out: None, deadline=now - 0.1, cancelled=True)
    early = Request([1], SamplingParams(), "r", sink=lambda out: None, deadline=now + 60, cancelled=True)
    assert late.ended(now) == "deadline"
    assert early.ended(now) == "cancelled"


def test_stop_string_spanning_tokens_ends_text_before_it_without_leaking(tiny_llm):
    prompt = "The weather today is"
    full = _alone(tiny_llm, prompt, SamplingParams(max_tokens=60, **GREEDY))
    tok = tiny_llm.tokenizer
    # Choose a stop string made of the text of tokens 20..23: it spans several tokens.
    start = len(tok.decode(full.token_ids[:20]))
    stop = tok.decode(full.token_ids[:23])[start:]
    assert len(stop) >= 3 and len(full.token_ids[20:23]) == 3
    cut = full.text.find(stop)
    pieces = list(tiny_llm.submit(prompt, SamplingParams(max_tokens=60, stop=(stop,), **GREEDY)))
    text = "".join(p.text for p in pieces)
    assert text == full.text[:cut]
    assert pieces[-1].finish_reason == "stop"
    assert stop not in text


def test_eos_finishes_with_stop_and_max_tokens_with_length(tiny_llm):
    eos = tiny_llm.tokenizer.eos_token_ids[0]
    r = _alone(tiny_llm, [1, 2, 3], SamplingParams(max_tokens=7, **GREEDY))
    assert r.finish_reason == "length" and len(r.token_ids) == 7
    # Make the request's own second token a stop token id: it ends there, with reason stop.
    r2 = _alone(tiny_llm, [1, 2, 3], SamplingParams(max_tokens=7, temperature=0.0,
                                                     stop_token_ids=(r.token_ids[1],)))
    assert r2.finish_reason == "stop" and r2.token_ids == r.token_ids[: r.token_ids.index(r.token_ids[1]) + 1]
    assert eos in tiny_llm.orchestrator.eos_token_ids


def test_error_in_one_request_ends_only_that_request(tiny_llm, monkeypatch):
    engine = tiny_llm.engine
    real_begin = engine.begin

    def flaky(state, slot, tokens, params, seed, **kw):
        if tokens[0] == 4242:
            raise RuntimeError("injected failure")
        return real_begin(state, slot, tokens, params, seed, **kw)

    monkeypatch.setattr(engine, "begin", flaky)
    sp = SamplingParams(max_tokens=10, **GREEDY)
    expected = _alone(tiny_llm, [7, 8, 9], sp).token_ids
    res = _staggered(tiny_llm, [[7, 8, 9], [4242, 1], [7, 8, 9]], [sp] * 3)
    assert res[1].finish_reason == "error" and "injected failure" in res[1].error
    assert res[0].token_ids == expected and res[2].token_ids == expected
    assert tiny_llm.orchestrator.slots_in_use == 0


def test_logprobs_and_top_alternatives_are_streamed(tiny_llm):
    pieces = list(tiny_llm.submit([3, 4, 5], SamplingParams(max_tokens=4, logprobs=2, **GREEDY)))
    toks = [p for p in pieces if p.token_ids]
    assert len(toks) == 4
    for p in toks:
        assert len(p.top_logprobs[0]) == 2
        assert p.top_logprobs[0][0][0] == p.token_ids[0]  # greedy: the chosen token is the best
        assert p.logprobs[0] <= 0


def test_async_stream_yields_pieces_and_cancels_when_abandoned(tiny_llm, monkeypatch):
    import asyncio

    orch = tiny_llm.orchestrator
    cancelled, cancel = [], orch.cancel
    # A free slot alone would also follow from the request simply finishing: the cancel itself is seen.
    monkeypatch.setattr(orch, "cancel", lambda req: (cancelled.append(req.request_id), cancel(req)))

    async def run():
        got = []
        async for piece in tiny_llm.stream([1, 2, 3], SamplingParams(max_tokens=100, **GREEDY)):
            got.append(piece)
            if len(got) == 5:
                break  # the generator's finally cancels the request
        return got

    got = asyncio.run(run())
    assert len(got) == 5 and len(cancelled) == 1
    wait_until(lambda: tiny_llm.orchestrator.slots_in_use == 0, "the abandoned stream's slot is free")


def test_concurrent_submitters_all_complete(tiny_llm):
    sp = SamplingParams(max_tokens=8, **GREEDY)
    expected = _alone(tiny_llm, [10, 11], sp).token_ids
    results = [None] * 12

    def worker(i):
        results[i] = collect(list(tiny_llm.submit([10, 11], sp, block=True))).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [expected] * 12


def test_a_prompt_too_big_to_fit_is_refused_before_tokenizing(tiny_llm, monkeypatch):
    from jserve.sampling import InvalidRequestError

    tok = tiny_llm.tokenizer
    limit = tiny_llm.engine.max_prompt_len * tok.max_token_bytes

    def must_not_run(*a, **k):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(tok, "encode", must_not_run)
    monkeypatch.setattr(tok, "encode_rendered", must_not_run)
    huge = "hello world " * 350_000  # 4.2 MB
    with pytest.raises(InvalidRequestError, match=rf"the prompt has 4200000 bytes; .* at most {limit} bytes"):
        tiny_llm.prepare(huge, SamplingParams())
    with pytest.raises(InvalidRequestError, match=r"the chat \(rendered with its template\) has \d+ bytes"):
        tiny_llm.prepare([{"role": "user", "content": huge}], SamplingParams())
    monkeypatch.undo()
    # Just under the byte bound the prompt is tokenized and refused (or not) by its token count.
    text = "x" * limit
    n = len(tok.encode(text))
    assert n > tiny_llm.engine.max_prompt_len  # (else the refusal below would not be tested)
    with pytest.raises(InvalidRequestError, match=rf"the prompt has {n} tokens"):
        tiny_llm.prepare(text, SamplingParams(max_tokens=1))


class _GatedEngine:
    """An engine whose requests' starts wait for a gate: the loop is held inside admission while the test acts."""

    def __init__(self, engine):
        self._engine, self.gate = engine, threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def begin(self, *args, **kwargs):
        self.gate.wait(30)
        return self._engine.begin(*args, **kwargs)


def test_cancelled_waiting_requests_leave_the_queue_at_once(tiny_llm):
    gated = _GatedEngine(tiny_llm.engine)
    orch = Orchestrator(gated, tiny_llm.tokenizer, max_waiting=3)
    try:
        sp = SamplingParams(max_tokens=5, **GREEDY)
        first = orch.submit([1, 2, 3], sp, Stream())
        wait_until(lambda: not orch.num_waiting, "the first request taken")  # the loop now waits in its start
        waiting = [orch.submit([4, 5], sp, Stream()) for _ in range(3)]
        with pytest.raises(QueueFullError):
            orch.submit([6], sp, Stream())
        for w in waiting:
            w.cancel()
        assert orch.num_waiting == 0  # while the loop is still held: the places are free now
        for w in waiting:
            [last] = list(w)
            assert last.finish_reason == "cancelled" and last.completion_tokens == 0
        again = orch.submit([7, 8], sp, Stream())
        gated.gate.set()
        assert collect(list(first)).finish_reason == "length"
        assert collect(list(again)).finish_reason == "length"
    finally:
        gated.gate.set()
        orch.shutdown(drain=False, timeout=10)


def test_shutdown_without_drain_cuts_running_and_waiting_requests_once_each(tiny_llm):
    orch = Orchestrator(tiny_llm.engine, tiny_llm.tokenizer, max_waiting=16)
    sp = SamplingParams(max_tokens=100, **GREEDY)
    streams = [orch.submit([1, 2, 3 + i], sp, Stream(), block=True) for i in range(tiny_llm.engine.slots + 3)]
    next(iter(streams[0]))  # running
    assert orch.shutdown(drain=False, timeout=30)
    for s in streams:
        pieces = list(s)  # each stream ends exactly once (iteration stops at the final piece)
        assert pieces[-1].finish_reason == "shutdown"
        assert sum(p.finish_reason is not None for p in pieces) == 1
        assert s._q.empty()
    with pytest.raises(ShuttingDownError, match="shutting down"):
        orch.submit([1], sp, Stream())


class _FaultyEngine:
    """An engine that raises once from ``fail`` (a method name) after ``after`` good calls."""

    def __init__(self, engine, fail: str, after: int = 0, times: int = 1):
        self._engine, self.fail, self.after, self.times, self.calls = engine, fail, after, times, 0

    def __getattr__(self, name):
        real = getattr(self._engine, name)
        if name != self.fail:
            return real

        def call(*args, **kwargs):
            self.calls += 1
            if self.calls > self.after and self.times > 0:
                self.times -= 1
                raise RuntimeError(f"injected {name} fault")
            return real(*args, **kwargs)

        return call


def _final_pieces(stream, timeout: float = 60.0):
    """Every piece of a stream, failing (not hanging) if its final message never comes."""
    pieces, deadline = [], time.monotonic() + timeout
    while not pieces or pieces[-1].finish_reason is None:
        pieces.append(stream._q.get(timeout=max(0.01, deadline - time.monotonic())))
    return pieces


# ``copy_pages``: a paged engine's prefix copy (a live request's partial page), ``copy`` a slot's.
@pytest.mark.parametrize("fail, after", [("generate", 3), ("extend", 1), ("begin", 2), ("copy_pages", 0),
                                         ("release", 0)])
def test_an_engine_fault_ends_each_request_once_and_serving_goes_on(tiny_llm, fail, after):
    engine = _FaultyEngine(tiny_llm.engine, fail, after)
    orch = Orchestrator(engine, tiny_llm.tokenizer, max_waiting=16)
    try:
        sp = SamplingParams(max_tokens=6, **GREEDY)
        first = orch.submit([1, 2, 3, 4, 5, 6], sp, Stream(), block=True)
        head = first._q.get(timeout=60)  # live (or already ended): the others find its prefix to copy
        streams = [orch.submit([1, 2, 3, 4, 5, 6 + i], sp, Stream(), block=True) for i in range(1, 6)]
        finals = [head if head.finish_reason else _final_pieces(first)[-1]]
        finals += [_final_pieces(s)[-1] for s in streams]
        assert engine.times == 0  # the fault happened
        assert any(f.finish_reason == "error" and "injected" in f.error for f in finals)
        assert all(f.finish_reason in ("error", "length") for f in finals)
        for s in streams:
            assert s._q.empty()  # nothing after the final message
        assert collect(_final_pieces(orch.submit([9, 9], sp, Stream()))).finish_reason == "length"
        assert orch.dead is None and orch.slots_in_use == 0
    finally:
        orch.shutdown(drain=False, timeout=10)


def test_an_engine_that_cannot_be_rebuilt_ends_everything_and_refuses_new_work(tiny_llm):
    from jserve.orchestrator import EngineDeadError

    engine = _FaultyEngine(_FaultyEngine(tiny_llm.engine, "generate", after=2), "init_state", after=1)
    fatal = []
    orch = Orchestrator(engine, tiny_llm.tokenizer, max_waiting=16, on_fatal=fatal.append)
    sp = SamplingParams(max_tokens=50, **GREEDY)
    streams = [orch.submit([1, 2, 3 + i], sp, Stream(), block=True) for i in range(tiny_llm.engine.slots + 4)]
    finals = [_final_pieces(s)[-1] for s in streams]
    assert all(f.finish_reason == "error" for f in finals)
    assert fatal and "could not be restarted" in fatal[0] and "injected init_state fault" in fatal[0]
    with pytest.raises(EngineDeadError):
        orch.submit([1], sp, Stream())
    orch._thread.join(10)
    assert not orch._thread.is_alive()


def test_a_reader_that_stops_reading_has_its_request_ended_and_slot_freed(tiny_llm):
    orch = Orchestrator(tiny_llm.engine, tiny_llm.tokenizer, max_undelivered=8)
    try:
        sp = SamplingParams(max_tokens=100, **GREEDY)
        unread = orch.submit([1, 2, 3], sp, Stream())
        reader = orch.submit([4, 5, 6], sp, Stream())
        pieces = list(reader)  # read as it comes (may still fall behind now and then)
        wait_until(lambda: orch.slots_in_use == 0, "both slots free")
        got = _final_pieces(unread)
        assert got[-1].finish_reason == "slow_reader"
        assert 9 <= len(got) - 1 < 100  # stopped soon after the backlog passed 8, long before 100 tokens
        assert pieces[-1].finish_reason in ("length", "slow_reader")
    finally:
        orch.shutdown(drain=False, timeout=10)


def test_cancel_while_text_is_held_back_never_leaks_or_repeats_text(tiny_llm):
    prompt = "The weather today is"
    full = _alone(tiny_llm, prompt, SamplingParams(max_tokens=60, **GREEDY))
    tok = tiny_llm.tokenizer
    start = len(tok.decode(full.token_ids[:20]))
    partial = tok.decode(full.token_ids[:23])[start:]  # the text of tokens 20..22
    assert len(partial) >= 2
    stop = partial + "\x00never"  # the text starts it, but never completes it
    stream = tiny_llm.submit(prompt, SamplingParams(max_tokens=60, stop=(stop,), **GREEDY))
    it = iter(stream)
    pieces = []
    while sum(len(p.token_ids) for p in pieces) < 23:
        pieces.append(next(it))
    assert "".join(p.text for p in pieces) == full.text[:start]  # tokens 20..22 could still start the stop
    stream.cancel()
    pieces += list(it)
    text = "".join(p.text for p in pieces)
    assert pieces[-1].finish_reason == "cancelled"
    assert full.text.startswith(text) and len(text) >= start  # nothing repeated, nothing invented
    assert stop not in text
