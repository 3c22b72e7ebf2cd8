"""The orchestrator exactly, over ``MockEngine`` (tests/mock_engine.py): no model, no JAX calls.

The mock's next token is the last one plus one (mod its vocabulary), so every expected token
sequence below is written out by hand; ``continuation`` recomputes it from the rule as a check on
the hand. The mock also refuses chunks out of place and prompts that do not end up in their slot
exactly, so a wrong placement or reuse fails the request instead of passing unseen.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import threading
import time

import pytest

from jserve.engine_api import Engine
from jserve.orchestrator import Orchestrator, Stream
from jserve.output import StreamOutput
from jserve.sampling import SamplingParams
from jserve.speculative import SpecPolicy
from jserve.streams import Event, FinishReason

from .mock_engine import LOGPROB_VALUE, LetterTokenizer, MockEngine, continuation
from .waits import wait_until

V = 64


@dataclasses.dataclass
class _Result:
    token_ids: list[int]
    text: str
    finish_reason: str | None
    error: str | None
    cached_tokens: int


def collect(pieces: list[StreamOutput]) -> _Result:
    pieces = list(pieces)
    last = pieces[-1]
    return _Result([t for p in pieces for t in p.token_ids], "".join(p.text for p in pieces), last.finish_reason,
                   last.error, last.cached_tokens)


def _params(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=kw.pop("ignore_eos", True), **kw)


class _Run:
    """An orchestrator over a gated ``MockEngine``: requests submitted inside ``with`` are all
    waiting when the loop starts (at the end of the block), so admission is exact."""

    def __init__(self, tokenizer=None, policy: SpecPolicy | None = None, **kw):
        orch_kw = {k: kw.pop(k) for k in ("prefix_cache", "prefill_budget", "max_undelivered",
                                          "eos_token_ids", "pipeline") if k in kw}
        self.gate = threading.Event()
        self.engine = MockEngine(gate=self.gate, **kw)
        self.events: list[tuple[Event, str, float]] = []
        self.orch = Orchestrator(self.engine, tokenizer, max_waiting=16,
                                 on_event=lambda e, req, v: self.events.append((e, req.request_id, v)), **orch_kw)
        if policy is not None:
            self.orch.policy = policy

    def submit(self, prompt, params, **kw) -> Stream:
        return self.orch.submit(prompt, params, Stream(), **kw)

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc) -> None:
        self.gate.set()
        self.orch.shutdown(drain=False, timeout=10)

    def go(self) -> None:
        self.gate.set()

    def count(self, event: Event) -> float:
        return sum(v for e, _, v in self.events if e == event)


class _AlwaysVerify(SpecPolicy):
    """Every step checks drafts (the real policy decides by measured speed)."""

    def could_pay(self, live: int, rows_bucket: int, options: dict[int, float]) -> bool:
        return True

    def choose(self, live: int, rows_bucket: int, options: dict[int, float]) -> int:
        return max(options)


def test_the_rule_by_hand():
    assert continuation([3, 9], 4, V) == [10, 11, 12, 13]
    assert continuation([62], 3, V) == [63, 0, 1]


def test_one_request_gets_the_rule_s_tokens_and_frees_its_slot():
    with _Run() as r:
        s = r.submit([3, 9], _params(5, logprobs=0))
        r.go()
        pieces = list(s)
        out = collect(pieces)
        assert out.token_ids == [10, 11, 12, 13, 14] == continuation([3, 9], 5, V)
        assert out.finish_reason == "length" and sum(p.finish_reason is not None for p in pieces) == 1
        assert [p.logprobs for p in pieces[:5]] == [[LOGPROB_VALUE]] * 5
        assert r.engine.log("begin") == [(0, [3, 9])]
        assert r.engine.log("extend") == [([(0, 0, [3, 9], True)],)]
        # The first token came from extend; step 5 was dispatched before step 4's token (the 5th,
        # the last) was handled: its token is dropped, and the slot released after it.
        assert r.engine.log("generate") == [([0],)] * 5
        wait_until(lambda: r.orch.slots_in_use == 0, "the slot is free")
        assert r.engine.log("release") == [(0, 5)]
        events = [e for e, _, _ in r.events]
        assert events == [Event.PREFIX_LOOKUP, Event.FIRST_TOKEN] + [Event.TOKEN] * 4 + [Event.FINISHED_LENGTH]
        assert events[-1] == "finished:length"  # what observers that read strings see


def test_admission_fills_free_slots_oldest_first_and_queues_the_rest():
    with _Run(slots=2, prefix_cache=False) as r:
        prompts = [[1], [20], [40], [50]]
        streams = [r.submit(p, _params(m)) for p, m in zip(prompts, (2, 6, 3, 2))]
        r.go()
        outs = [collect(list(s)) for s in streams]
        assert [o.token_ids for o in outs] == [[2, 3], [21, 22, 23, 24, 25, 26], [41, 42, 43], [51, 52]]
        # Two slots: the first two start at once; the third takes the first slot freed (the first
        # request's, after 2 tokens), the fourth the next one freed (the third's, before the second's).
        assert r.engine.log("begin") == [(0, [1]), (1, [20]), (0, [40]), (0, [50])]
        wait_until(lambda: r.orch.slots_in_use == 0, "every slot is free")
        assert sorted(s for s, _ in r.engine.log("release")) == [0, 0, 0, 1]


def test_prompts_run_in_chunks_oldest_first_in_calls_of_the_ready_rows():
    with _Run(slots=2, chunk=4, rows=2) as r:
        a = r.submit(list(range(1, 11)), _params(2))  # 10 tokens: 3 chunks
        b = r.submit([30, 31, 32], _params(2))  # 1 chunk
        r.go()
        assert collect(list(a)).token_ids == [11, 12]
        assert collect(list(b)).token_ids == [33, 34]
        ext = [rows for (rows,) in r.engine.log("extend")]
        assert ext[0] == [(0, 0, [1, 2, 3, 4], False), (0, 4, [5, 6, 7, 8], False)]
        assert ext[1] == [(0, 8, [9, 10], True), (1, 0, [30, 31, 32], True)]


def test_prefill_budget_bounds_each_call_while_an_older_stream_decodes():
    with _Run(slots=2, chunk=4, rows=4, prefill_budget=4, prefix_cache=False) as r:
        first = r.submit([1], _params(12))
        later: list[Stream] = []
        # At the 3rd decode step the first stream is live: a long prompt arriving now may not hold
        # it up by more than ``prefill_budget`` (4) tokens a call.
        r.engine.before_step[3] = lambda: later.append(r.submit(list(range(20, 32)), _params(1)))
        r.go()
        assert collect(list(first)).token_ids == continuation([1], 12, V)
        wait_until(lambda: later, "the long prompt was submitted")
        assert collect(list(later[0])).token_ids == [32]
        ext = [rows for (rows,) in r.engine.log("extend")]
        assert [len(rows) for rows in ext] == [1, 1, 1, 1]  # the first prompt's call, then 12 tokens 4 a call
        assert [row[1] for rows in ext[1:] for row in rows] == [0, 4, 8]
    with _Run(slots=2, chunk=4, rows=4, prefill_budget=4) as r:  # alone, the same prompt takes one call
        s = r.submit(list(range(20, 32)), _params(1))
        r.go()
        assert collect(list(s)).token_ids == [32]
        assert [len(rows) for (rows,) in r.engine.log("extend")] == [3]


def test_a_prompt_reuses_the_prefix_its_free_slot_holds():
    with _Run(slots=2, chunk=4, rows=4) as r:
        prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
        s = r.submit(prompt, _params(3))
        r.go()
        assert collect(list(s)).token_ids == [15, 16, 17]
        wait_until(lambda: r.orch.slots_in_use == 0, "the slot is free")
        # Slot 0 holds the prompt and the first two output tokens (the last one was never fed).
        # All of that cached: the last prompt token is run anyway, for its logits.
        whole = collect(list(r.submit(prompt + [15, 16], _params(1))))
        assert whole.token_ids == [17] and whole.cached_tokens == 11
        assert r.engine.log("extend")[-1] == ([(0, 11, [16], True)],)
        wait_until(lambda: r.orch.slots_in_use == 0, "the slot is free")
        again = r.submit(prompt[:8] + [40, 41], _params(2))
        out = collect(list(again))
        assert out.token_ids == [42, 43] and out.cached_tokens == 8
        # The free slot sharing the longest prefix (not slot 1, empty and less recently used).
        assert [slot for slot, _ in r.engine.log("begin")] == [0, 0, 0]
        assert r.engine.log("extend")[-1] == ([(0, 8, [40, 41], True)],)
        assert r.engine.log("copy") == []
        assert r.count(Event.PREFIX_LOOKUP) == 0 + 11 + 8


def test_a_prompt_copies_a_longer_prefix_from_a_live_slot():
    with _Run(slots=2, chunk=4, rows=4) as r:
        shared = [1, 2, 3, 4, 5, 6, 7, 8]
        live = r.submit(shared + [9], _params(20))
        copies: list[Stream] = []
        r.engine.before_step[2] = lambda: copies.append(r.submit(shared + [30, 31], _params(2)))
        r.go()
        assert collect(list(live)).token_ids == continuation([9], 20, V)
        wait_until(lambda: copies, "the second prompt was submitted")
        out = collect(list(copies[0]))
        assert out.token_ids == [32, 33] and out.cached_tokens == 8
        assert r.engine.log("copy") == [(0, 1, 8)]
        assert r.engine.log("extend")[-1] == ([(1, 8, [30, 31], True)],)


def test_eos_and_stop_token_ids_end_with_stop_and_keep_the_stopping_token():
    with _Run(slots=2, eos_token_ids=(7,)) as r:
        eos = r.submit([3], _params(10, ignore_eos=False))
        ignored = r.submit([5], _params(4))  # ignore_eos: 7 is just a token
        r.go()
        out = collect(list(eos))
        assert out.token_ids == [4, 5, 6, 7] and out.finish_reason == "stop"
        assert collect(list(ignored)).token_ids == [6, 7, 8, 9]
        stopped = collect(list(r.submit([20], _params(10, stop_token_ids=(23,)))))
        assert stopped.token_ids == [21, 22, 23] and stopped.finish_reason == FinishReason.STOP


def test_a_stop_string_cuts_the_text_where_it_starts():
    with _Run(tokenizer=LetterTokenizer()) as r:
        s = r.submit([0], _params(10, stop=("def",)))  # tokens 1, 2, 3, ...: text "bcdefg..."
        r.go()
        pieces = list(s)
        out = collect(pieces)
        assert out.text == "bc" and out.finish_reason == "stop"
        assert out.token_ids == [1, 2, 3, 4, 5]  # 5 ("f") completes "def"
        assert "".join(p.text for p in pieces) == "bc"


def test_cancel_at_a_known_step_delivers_the_tokens_before_it_and_frees_the_slot():
    with _Run() as r:
        s = r.submit([10], _params(50))
        r.engine.before_step[4] = s.cancel  # during step 4: the tokens of steps 1..3 are handled
        r.go()
        out = collect(list(s))
        assert out.token_ids == [11, 12, 13, 14] and out.finish_reason == "cancelled"
        wait_until(lambda: r.orch.slots_in_use == 0, "the slot is free")
        # Released before the step after: step 4 was on the device, its token dropped.
        assert r.engine.log("release") == [(0, 4)] and r.engine.steps == 4


def test_deadlines_end_a_request_waiting_or_running():
    with _Run() as r:
        expired = r.submit([10], _params(5), deadline=time.monotonic() - 1)
        running = r.submit([20], _params(50))
        r.engine.before_step[3] = lambda: setattr(running.request, "deadline", time.monotonic())
        r.go()
        out = collect(list(expired))
        assert out.token_ids == [] and out.finish_reason == "deadline"
        out = collect(list(running))
        assert out.token_ids == [21, 22, 23] and out.finish_reason == "deadline"
        assert [p for _, p in r.engine.log("begin")] == [[20]]  # the expired one never reached the engine


def test_a_reader_that_falls_behind_ends_as_slow_reader():
    with _Run(max_undelivered=3) as r:
        s = r.submit([1], _params(50))
        r.go()
        wait_until(lambda: r.engine.log("release"), "the slot is released")
        pieces = list(s)
        # The fourth undelivered piece passes the bound: the request ends before the next step.
        assert [p.token_ids for p in pieces[:-1]] == [[2], [3], [4], [5]]
        assert pieces[-1].finish_reason == "slow_reader" and pieces[-1].token_ids == []


def test_shutdown_without_drain_cuts_running_and_waiting_requests():
    with _Run(slots=1) as r:
        running = r.submit([1], _params(50))
        waiting = r.submit([2], _params(50))
        r.engine.before_step[2] = lambda: threading.Thread(target=r.orch.shutdown, kwargs={"drain": False}).start()
        r.go()
        assert collect(list(running)).finish_reason == "shutdown"
        assert collect(list(waiting)).finish_reason == "shutdown"


def test_a_sink_that_raises_ends_only_its_own_request():
    class Broken(Stream):
        def put(self, out):
            if out.token_ids == [13]:
                raise RuntimeError("broken consumer")
            super().put(out)

    with _Run(slots=2) as r:
        broken = r.orch.submit([10], _params(20), Broken())
        other = r.submit([30], _params(6))
        r.go()
        out = collect(list(broken))
        assert out.token_ids == [11, 12] and out.finish_reason == "cancelled"  # [13] was lost, the rest cut
        assert collect(list(other)).token_ids == [31, 32, 33, 34, 35, 36]


def test_after_an_engine_fault_each_request_ends_once_even_with_a_raising_sink_and_serving_goes_on():
    class Broken(Stream):  # fails on the final message, in the recovery path
        def put(self, out):
            if out.finish_reason is not None:
                raise RuntimeError("broken consumer")
            super().put(out)

    with _Run(slots=2) as r:
        r.engine.fail["generate"] = 3
        broken = r.orch.submit([10], _params(20), Broken())
        other = r.submit([30], _params(20))
        r.go()
        out = collect(list(other))
        assert out.finish_reason == "error" and "injected generate fault" in out.error
        assert out.token_ids == [31, 32]  # the first token and step 1's: step 3 failed before step 2's was handled
        assert broken.request is not None
        again = collect(list(r.submit([40], _params(3))))
        assert again.token_ids == [41, 42, 43] and again.finish_reason == "length"
        assert r.orch.dead is None and r.orch.slots_in_use == 0
        assert len(r.engine.log("init_state")) == 2  # started clean after the fault


@pytest.mark.parametrize("fail, nth", [("generate", 3), ("extend", 2), ("begin", 2), ("copy", 1), ("release", 1)])
def test_an_engine_fault_anywhere_ends_each_request_once_and_serving_goes_on(fail, nth):
    with _Run(slots=3, chunk=4, rows=4) as r:
        r.engine.fail[fail] = nth
        prompts = [[1, 2, 3, 4, 5, 6 + i] for i in range(4)]  # the later ones wait for the first's prefix, copy it
        streams = [r.submit(p, _params(4)) for p in prompts]
        r.go()
        errors = 0
        for p, s in zip(prompts, streams):
            pieces = list(s)
            assert sum(x.finish_reason is not None for x in pieces) == 1 and s._q.empty()
            out = collect(pieces)
            if out.finish_reason == "error":
                assert f"injected {fail} fault" in out.error
                errors += 1
            else:  # the others are untouched
                assert out.finish_reason == "length" and out.token_ids == continuation(p, 4, V)
        assert errors >= 1 and len(r.engine.log(fail)) >= nth  # the fault happened, and was reported
        assert collect(list(r.submit([40], _params(3)))).token_ids == [41, 42, 43]
        wait_until(lambda: r.orch.slots_in_use == 0, "every slot is free")
        assert r.orch.dead is None


@pytest.mark.parametrize("max_tokens", [4, 12, 20])
def test_speculation_gives_the_tokens_of_plain_decoding(max_tokens):
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    expected = continuation(prompt, max_tokens, V)
    with _Run(slots=2, speculate=4, policy=_AlwaysVerify()) as r:
        s = r.submit(prompt, _params(max_tokens))
        r.go()
        out = collect(list(s))
        assert out.token_ids == expected and out.finish_reason == "length"
        verifies = r.engine.log("verify")
        assert r.engine.log("generate") == []  # every step checked drafts
        # After the first token (3), "1, 2, 3" was seen before, followed by 4, 5, 6, 7: drafted
        # (as much as max_tokens leaves room for) and all kept, with the model's own next token.
        room = min(4, max_tokens - 2)
        assert verifies[0] == ([(0, [4, 5, 6, 7][:room])], 5)
        drafted, accepted = r.count(Event.SPEC_DRAFTED), r.count(Event.SPEC_ACCEPTED)
        assert drafted >= room and accepted >= room
        if max_tokens == 20:  # after 8 the prompt says 1, the rule says 9: a draft is rejected
            assert accepted < drafted
        wait_until(lambda: r.orch.slots_in_use == 0, "the slot is free")


def test_a_stop_inside_a_checked_block_drops_the_tokens_after_it():
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    with _Run(slots=2, speculate=4, policy=_AlwaysVerify()) as r:
        s = r.submit(prompt, _params(20, stop_token_ids=(5,)))
        r.go()
        out = collect(list(s))
        assert out.token_ids == [3, 4, 5] and out.finish_reason == "stop"  # the block kept 4..8


def test_a_request_that_opts_out_of_speculation_keeps_every_step_plain():
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    with _Run(slots=2, speculate=4, policy=_AlwaysVerify()) as r:
        spec = r.submit(prompt, _params(10))
        plain = r.submit([40, 41], _params(10, speculate=False))
        r.go()
        assert collect(list(spec)).token_ids == continuation(prompt, 10, V)
        assert collect(list(plain)).token_ids == continuation([41], 10, V)
        # Both went live in one extend call and end together: no step verified.
        assert r.engine.log("verify") == []
        assert r.engine.log("generate") == [([0, 1],)] * 10


def _contract() -> tuple[set[str], set[str]]:
    """The ``Engine`` protocol's data attributes and its calls (methods and properties)."""
    data = {n for n in Engine.__annotations__ if not n.startswith("_")}
    calls = {n for n, v in vars(Engine).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    return data, calls


class _AllowAll:
    """A structured-output matcher (the calls ``jserve.structured`` makes) that allows every token
    and records, at each mask, how many tokens it had consumed."""

    def __init__(self):
        self.consumed, self.at_mask = 0, []

    def unsafe_compute_mask_ptr(self, ptr: int, nbytes: int) -> None:
        self.at_mask.append(self.consumed)
        ctypes.memset(ptr, 0xFF, nbytes)

    def consume_token(self, token: int) -> None:
        self.consumed += 1

    def is_error(self) -> bool:
        return False

    def is_stopped(self) -> bool:
        return False


def test_a_constrained_row_gets_its_mask_after_its_last_token_while_the_others_stay_overlapped():
    """The step after n is dispatched once the constrained request's token of step n is handled
    (its mask depends on it), but before the plain request's is: the plain row's host work still
    overlaps the device. Both get the rule's tokens."""
    with _Run(slots=2) as r:
        matcher = _AllowAll()
        seen: list[tuple[int, int]] = []  # at each decode step's dispatch: tokens handled (plain, constrained)
        generate = r.engine.generate

        def counted(state, mask=None, slots=None):
            handled = collections.Counter(rid for e, rid, _ in r.events if e in (Event.FIRST_TOKEN, Event.TOKEN))
            seen.append((handled["plain"], handled["constrained"]))
            return generate(state, mask, slots)

        r.engine.generate = counted
        plain = r.submit([3, 9], _params(6), request_id="plain")
        constrained = r.orch.submit([5, 7], _params(6), Stream(), request_id="constrained", matcher=matcher)
        r.go()
        outs = [collect(list(plain)), collect(list(constrained))]
    assert [o.token_ids for o in outs] == [continuation([3, 9], 6, V), continuation([5, 7], 6, V)]
    # Both first tokens come from one extend call; decode step k (1-based) is dispatched with the
    # constrained request's k tokens handled, the plain one's k - 1.
    assert seen[:5] == [(k - 1, k) for k in range(1, 6)]
    assert matcher.at_mask[1:6] == [1, 2, 3, 4, 5]  # (the first: the extend call's, before any token)


def test_the_mock_and_the_jax_engine_offer_every_call_of_the_contract():
    from jserve.engine import JaxEngine

    data, calls = _contract()
    assert {"extend", "generate", "verify", "verify_width", "ready_widths", "release", "mask_words"} <= data | calls
    mock = MockEngine(speculate=4)
    assert all(hasattr(mock, n) for n in data | calls)
    assert all(callable(getattr(JaxEngine, n, None)) or isinstance(getattr(JaxEngine, n, None), property)
               for n in calls), sorted(n for n in calls if not hasattr(JaxEngine, n))
