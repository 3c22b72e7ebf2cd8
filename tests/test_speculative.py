"""Speculative decoding: prompt-lookup drafts checked by ``verify`` give the output plain decoding gives."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve import SamplingParams, checkpoint, model
from jserve.engine import ACTIVE, LOGPROB, TOKEN, JaxEngine, verify_widths
from jserve.speculative import GENERATE, MIN_RATE, Acceptance, PromptLookup, SpecPolicy, StepKind

from .compile_watch import CompileWatch

# ---- the drafter and the policy, on the host ---------------------------------------------------


def test_prompt_lookup_proposes_what_followed_the_latest_earlier_occurrence():
    d = PromptLookup([5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3], max_ngram=3, min_ngram=2)
    d.append(5)
    d.append(6)
    # "5 6" occurred at 0 and 6: the latest is followed by 7 2 3 5 6.
    assert d.propose(3) == [7, 2, 3]
    d.append(7)  # "5 6 7": the longest suffix found, latest at 6..8
    assert d.propose(10) == [2, 3, 5, 6, 7]
    assert d.propose(0) == []


def test_prompt_lookup_prefers_the_longest_ngram_and_finds_nothing_new():
    # "2 3" last occurred before 9, but "1 2 3" (longer) before 4.
    d = PromptLookup([1, 2, 3, 4, 7, 2, 3, 9, 1, 2, 3])
    assert d.propose(2) == [4, 7]
    assert PromptLookup([1, 2, 3, 4]).propose(4) == []  # no earlier occurrence of "3 4"
    assert PromptLookup([1, 1]).propose(4) == []  # a single 2-gram: nothing before it
    with pytest.raises(ValueError):
        PromptLookup([], max_ngram=1, min_ngram=2)


def test_acceptance_rate_and_expected_yield():
    acc = Acceptance(rate=1.0)
    assert acc.expected(3) == pytest.approx(3.0)
    for _ in range(20):
        acc.update(4, 0)  # every draft rejected at its first token
    assert acc.rate < MIN_RATE and acc.expected(4) < 0.2
    acc.update(0, 0)  # nothing drafted: no evidence
    before = acc.rate
    acc.update(4, 4)
    assert acc.rate > before
    half = Acceptance(rate=0.5)
    assert half.expected(2) == pytest.approx(0.5 + 0.25)


def test_policy_compares_tokens_per_second_of_every_kind_and_measures_each():
    now = [0.0]
    p = SpecPolicy(refresh_s=10.0, clock=lambda: now[0])
    full = {1: 0.0, 5: 3.0}  # width -> expected drafted tokens kept
    assert p.choose(4, 4, full) is None  # generate not timed yet
    p.observe(GENERATE, 0.5)  # a first call's one-off cost: replaced by the second
    p.observe(GENERATE, 0.1)
    assert p.choose(4, 4, full) == 1  # the untimed widths in turn, the narrowest first
    p.observe(StepKind(4, 1), 0.12)
    p.observe(StepKind(4, 1), 0.12)
    assert p.choose(4, 4, full) == 5
    p.observe(StepKind(4, 5), 0.2)
    p.observe(StepKind(4, 5), 0.2)
    assert p.times == {GENERATE: 0.1, StepKind(4, 1): 0.12, StepKind(4, 5): 0.2}
    assert [str(k) for k in p.times] == ["generate", "verify:4x1", "verify:4x5"]
    # 4 slots: 40 tokens/s plain, 33 at width 1; width 5 needs 4 + extra > 8 tokens per 0.2 s.
    assert p.choose(4, 4, {1: 0.0, 5: 3.9}) is None
    assert p.choose(4, 4, {1: 0.0, 5: 4.5}) == 5
    assert p.choose(4, 4, {1: 0.0}) is None  # nothing drafted: only the narrow call was offered
    # One stream, where the narrow call is cheaper than the full-batch step: verify with nothing drafted.
    for w in (1, 5):
        p.observe(StepKind(1, w), 0.03 if w == 1 else 0.05)
        p.observe(StepKind(1, w), 0.03 if w == 1 else 0.05)
    assert p.choose(1, 1, {1: 0.0}) == 1
    assert p.choose(1, 1, {1: 0.0, 5: 0.5}) == 1  # 1.5 tokens per 0.05 s is less than 1 per 0.03 s
    assert p.choose(1, 1, {1: 0.0, 5: 1.0}) == 5
    # Whether a synchronous (drafting) turn is worth it at all: not when even full drafts can't pay.
    assert p.could_pay(4, 4, {1: 0.0, 5: 3.9}) is False and p.could_pay(4, 4, {1: 0.0, 5: 4.5}) is True
    assert p.could_pay(8, 8, {1: 0.0}) is True  # verify:8x1 never timed
    # A time older than ``refresh_s`` is measured again, the oldest first.
    now[0] = 11.0
    assert p.could_pay(4, 4, {1: 0.0, 5: 0.0}) is True
    assert p.choose(4, 4, {1: 0.0, 5: 0.0}) == 1  # generate is the best; verify:4x1 is the oldest of the rest
    p.observe(StepKind(4, 1), 0.12)
    assert p.choose(4, 4, {1: 0.0, 5: 0.0}) == 5
    p.observe(StepKind(4, 5), 0.2)
    assert p.choose(4, 4, {1: 0.0, 5: 0.0}) is None and p.could_pay(4, 4, {1: 0.0, 5: 0.0}) is False
    now[0] = 22.0
    p.observe(StepKind(1, 1), 0.03)
    assert p.choose(1, 1, {1: 0.0}) is None  # generate's time is 22 s old: timed once more
    p.observe(GENERATE, 0.1)
    assert p.choose(1, 1, {1: 0.0}) == 1


def test_a_stale_time_measured_again_replaces_the_old_one():
    """A verify width timed slow under a passing load (the background compilation right after
    SERVING) is chosen again as soon as one fresh measurement, taken once the old one is stale, says
    it pays; while fresh, times are averaged."""
    now = [0.0]
    p = SpecPolicy(refresh_s=10.0, clock=lambda: now[0])
    for kind, t in ((GENERATE, 0.010), (StepKind(1, 1), 0.010), (StepKind(1, 5), 0.060)):
        p.observe(kind, t)
        p.observe(kind, t)
    drafts = {1: 0.0, 5: 2.0}  # 3 tokens per verify:1x5 call
    assert p.choose(1, 1, drafts) in (None, 1)  # 50 tokens/s at width 5 against 100
    now[0] = 11.0
    assert p.choose(1, 1, drafts) == 1  # stale: each timed again, the oldest first
    p.observe(StepKind(1, 1), 0.010)
    assert p.choose(1, 1, drafts) == 5
    p.observe(StepKind(1, 5), 0.015)
    assert p.times[StepKind(1, 5)] == 0.015
    assert p.choose(1, 1, drafts) is None  # generate, stale too, is timed again
    p.observe(GENERATE, 0.010)
    assert p.choose(1, 1, drafts) == 5  # 200 tokens/s against 100
    p.observe(StepKind(1, 5), 0.025)  # fresh times are averaged
    assert p.times[StepKind(1, 5)] == pytest.approx(0.8 * 0.015 + 0.2 * 0.025)


def test_verify_widths():
    assert verify_widths(0) == ()
    assert verify_widths(1) == (1, 2)
    assert verify_widths(4) == (1, 5)
    assert verify_widths(8) == (1, 5, 9)
    assert verify_widths(12) == (1, 5, 9, 13)
    assert verify_widths(16) == (1, 5, 9, 17)


# ---- the engine's verify step against plain decode steps ---------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    """Not warmed up: each call shape compiles when first used (the LLM tests below check warm-up)."""
    cfg, params, _ = checkpoint.load(tiny_ckpt, jnp.float32)
    eng = JaxEngine(cfg, params, slots=4, max_len=96, max_prompt_len=40, top_logprobs=2, speculate=4)
    assert eng.verify_rows == (1, 2, 4)
    return eng


PROMPT = [1, 450, 1134, 288, 34, 450, 1134, 288, 34, 450, 1134, 11, 77, 900, 3, 450, 1134]


def _assert_same_logprobs(eng, got, want) -> None:
    """Bitwise equal where every op is row-invariant (float weights on the CPU kernels: verify is
    then the same computation as plain decoding), else equal up to rounding."""
    if eng.row_invariant:
        assert np.asarray(got, np.float32).tobytes() == np.asarray(want, np.float32).tobytes()
    else:
        np.testing.assert_allclose(got, want, atol=1e-4)


def _plain(eng, params, n, seed=7, slot=2):
    state = eng.init_state()
    state, first = eng.prefill(state, slot, PROMPT, params, seed)
    toks, lps = [int(first[TOKEN])], [float(first[LOGPROB])]
    neighbour = SamplingParams(temperature=0.0)
    state, _ = eng.prefill(state, 0, PROMPT[:5], neighbour, 0)  # another live slot alongside
    while len(toks) < n:
        state, packed = eng.generate(state)
        row = np.asarray(packed)[slot]
        toks.append(int(row[TOKEN]))
        lps.append(float(row[LOGPROB]))
    return toks, lps


def _speculative(eng, params, n, drafts_for, seed=7, slot=2):
    """Decode with ``verify``; ``drafts_for(i, toks)`` gives the draft after ``i`` tokens."""
    state = eng.init_state()
    state, first = eng.prefill(state, slot, PROMPT, params, seed)
    toks, lps = [int(first[TOKEN])], [float(first[LOGPROB])]
    state, _ = eng.prefill(state, 0, PROMPT[:5], SamplingParams(temperature=0.0), 0)
    kept = []
    while len(toks) < n:
        draft = drafts_for(len(toks), toks)[:eng.speculate]
        state, packed = eng.verify(state, [(0, []), (slot, draft)])
        rows = np.asarray(packed)[1]
        active = rows[:, ACTIVE] > 0.5
        k = int(active.sum())
        assert active[:k].all() and not active[k:].any()  # the kept tokens come first
        kept.append((len(draft), k - 1))
        toks += [int(t) for t in rows[:k, TOKEN]]
        lps += [float(x) for x in rows[:k, LOGPROB]]
    return toks[:n], lps[:n], kept


SAMPLINGS = {
    "greedy": SamplingParams(temperature=0.0, logprobs=0),
    "top_p": SamplingParams(temperature=0.9, top_p=0.9, logprobs=0),
    "top_k_min_p": SamplingParams(temperature=1.2, top_k=20, min_p=0.05, logprobs=0),
    "penalties": SamplingParams(temperature=0.8, repetition_penalty=1.3, presence_penalty=0.5,
                                frequency_penalty=0.4, logprobs=0),
    "greedy_penalties": SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.7, logprobs=0),
}


@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_verify_keeps_exactly_the_tokens_plain_decoding_draws(engine, name):
    """Drafts that are the true continuation (mostly kept), with one token changed (cut there), and
    none: the output equals plain decoding token for token (seeded sampling too: each position uses
    the key of the step it stands for), with the same log-probabilities."""
    params = SAMPLINGS[name]
    n = 30
    ref, ref_lps = _plain(engine, params, n)

    def drafts(i, toks):
        d = list(ref[i:i + 4])
        if i % 3 == 1 and len(d) > 1:
            d[1] = (d[1] + 1) % engine.vocab_size  # wrong from its second token on
        if i % 5 == 4:
            d = []
        return d

    got, lps, kept = _speculative(engine, params, n, drafts)
    assert got == ref
    _assert_same_logprobs(engine, lps, ref_lps)
    assert any(a == d > 0 for d, a in kept)  # a whole draft was kept (k + 1 tokens in one step)
    assert any(a < d for d, a in kept)  # and one was cut


def test_a_wrong_draft_costs_nothing_but_the_step(engine):
    params = SAMPLINGS["greedy"]
    ref, _ = _plain(engine, params, 12)
    got, _, kept = _speculative(engine, params, 12, lambda i, toks: [(ref[i] + 1) % engine.vocab_size] * 4
                                if i < len(ref) else [])
    assert got == ref
    assert all(a == 0 for _, a in kept)  # one token per step, like plain decoding


def test_sampled_draft_is_kept_with_the_models_probability(engine):
    """The acceptance rule's output distribution is the model's: with a fixed draft at one position,
    over many keys the kept-or-replaced token's frequencies match softmax(logits / T) computed by
    the plain forward pass (independent of the engine's sampler)."""
    logits = np.asarray(model.logits_all(engine.params, engine.cfg, jnp.asarray([PROMPT])))[0, -1].astype(np.float64)

    def probs(temperature: float) -> np.ndarray:
        p = np.exp((logits - logits.max()) / temperature)
        return p / p.sum()

    lo, hi = 1e-3, 1e3  # the temperature at which the most likely token has probability 1/2
    for _ in range(60):
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if probs(mid).max() > 0.5 else (lo, mid)
    temperature = float(lo)
    params = SamplingParams(temperature=temperature)
    p = probs(temperature)
    draft_tok = int(np.argmax(p))
    assert 0.2 < p[draft_tok] < 0.95, p[draft_tok]  # the draft is kept sometimes and rejected sometimes

    # The prompt minus its last token in every slot; each trial checks [last token, draft] with a new key.
    state = engine.init_state()
    for s in range(engine.slots):
        state, _ = engine.prefill(state, s, PROMPT[:-1], params, s)
    base_len = np.asarray(state.lengths).copy()
    counts = np.zeros(engine.vocab_size)
    trials = 400
    keys = np.asarray(jax.random.randint(jax.random.key(3), (trials, engine.slots, 2), 0, 2**31 - 1), np.uint32)
    for t in range(trials):
        state = state.replace(lengths=jnp.asarray(base_len),
                              last_tokens=jnp.full((engine.slots,), PROMPT[-1], jnp.int32),
                              steps=jnp.ones((engine.slots,), jnp.int32),
                              sampling=state.sampling.replace(key=jnp.asarray(keys[t])))
        state, packed = engine.verify(state, [(s, [draft_tok]) for s in range(engine.slots)])
        for tok in np.asarray(packed)[:, 0, TOKEN].astype(int):
            counts[tok] += 1
    n = trials * engine.slots
    freq = counts / n
    # Within 4.5 standard errors for every token, and the draft itself.
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 4.5 * se + 2.0 / n), np.max(np.abs(freq - p) / (se + 1e-9))
    assert abs(freq[draft_tok] - p[draft_tok]) <= 4.5 * se[draft_tok]


def test_verify_rejects_more_drafts_than_configured(engine):
    state = engine.init_state()
    with pytest.raises(ValueError, match="exceed"):
        engine.verify(state, [(0, [1] * (engine.speculate + 1))])
    with pytest.raises(ValueError, match="rows"):
        engine.verify(state, [])
    with pytest.raises(ValueError, match="width"):
        engine.verify(state, [(0, [1, 2])], width=1)  # too narrow for its draft
    with pytest.raises(ValueError, match="width"):
        engine.verify(state, [(0, [])], width=3)  # not a compiled width


def test_verify_at_any_width_that_holds_the_drafts_gives_the_same_tokens(engine):
    """A row's result does not depend on the call's width: the same draft checked in a width-5 call
    as in the narrowest one (and no draft: a one-position call, i.e. a decode step of the live slots)."""
    assert engine.verify_widths == (1, 5)
    assert engine.widths_for(2) == (1, 5) and engine.widths_for(4) == (5,)  # 4 rows: every slot
    assert engine.verify_width(0, 4) == 5
    params = SamplingParams(temperature=0.0, logprobs=0)
    out = {}
    for width in (None, 5):
        state = engine.init_state()
        state, first = engine.prefill(state, 1, PROMPT, params, 0)
        toks = [int(first[TOKEN])]
        lps = []
        for draft in ([], [450, 1134], [], [7]):
            state, packed = engine.verify(state, [(1, draft)], width)
            rows = np.asarray(packed)[0]
            assert rows.shape[0] == (width or engine.verify_width(len(draft)))
            k = int((rows[:, ACTIVE] > 0.5).sum())
            toks += [int(t) for t in rows[:k, TOKEN]]
            lps += [float(x) for x in rows[:k, LOGPROB]]
        out[width] = toks, lps
    assert out[None][0] == out[5][0]
    _assert_same_logprobs(engine, out[None][1], out[5][1])
    plain, plain_lps = _plain(engine, params, len(out[5][0]), slot=1)
    assert plain[:len(out[5][0])] == out[5][0]
    _assert_same_logprobs(engine, plain_lps[1:len(out[5][0])], out[5][1])


def test_engine_without_speculation_has_no_verify(tiny_ckpt):
    cfg, params, _ = checkpoint.load(tiny_ckpt)
    eng = JaxEngine(cfg, params, slots=2, max_len=64)
    with pytest.raises(ValueError, match="speculate=0"):
        eng.verify(eng.init_state(), [(0, [])])


# ---- through the orchestrator ------------------------------------------------------------------


class AlwaysVerify(SpecPolicy):
    """Every step checks drafts (the real policy picks by measured speed, which a test can't fix)."""

    def could_pay(self, live: int, rows_bucket: int, options: dict[int, float]) -> bool:
        return True

    def choose(self, live: int, rows_bucket: int, options: dict[int, float]) -> int:
        return max(options)


@pytest.fixture(scope="module")
def spec_llm(tiny_ckpt):
    from jserve import LLM

    events = collections.Counter()

    def on_event(kind, req, value):
        if kind.startswith("spec_"):
            events[kind] += value

    llm = LLM(tiny_ckpt, slots=4, max_len=128, max_prompt_len=64, top_logprobs=2, speculate=4, on_event=on_event)
    llm.engine.wait_ready()  # verify's shapes are compiled in the background
    llm.orchestrator.policy = AlwaysVerify()
    llm.events = events
    yield llm
    llm.close(drain=False)


REPETITIVE = [
    [1, 450, 1134, 288, 34, 450, 1134, 288, 34, 450, 1134, 288],
    [1, 77, 78, 79, 80, 81, 77, 78, 79, 80],
    [1, 5, 6, 5, 6, 5, 6, 5],
]


def _compare(llm, params_list):
    """Each (prompt, params) in one batch speculating, then in one batch not: outputs must be equal."""
    import dataclasses

    prompts = [p for p in REPETITIVE for _ in params_list]
    params = [p for _ in REPETITIVE for p in params_list]
    spec = llm.generate(prompts, [dataclasses.replace(p, speculate=True) for p in params])
    plain = llm.generate(prompts, [dataclasses.replace(p, speculate=False) for p in params])
    for p, a, b in zip(params, spec, plain):
        assert a.token_ids == b.token_ids, p
        assert a.text == b.text and a.finish_reason == b.finish_reason
        if p.logprobs is not None:
            _assert_same_logprobs(llm.engine, a.logprobs, b.logprobs)
    return spec


def test_speculating_batch_equals_plain_decoding(spec_llm):
    before = dict(spec_llm.events)
    with CompileWatch() as watch:
        results = _compare(spec_llm, [
            SamplingParams(temperature=0.0, max_tokens=40, logprobs=2),
            SamplingParams(temperature=0.8, top_p=0.95, seed=11, max_tokens=40, logprobs=0),
            SamplingParams(temperature=0.0, max_tokens=40, repetition_penalty=1.2, presence_penalty=0.3),
            SamplingParams(temperature=1.0, top_k=8, seed=5, max_tokens=33, frequency_penalty=0.5),
        ])
    assert all(r.completion_tokens >= 1 for r in results)
    drafted = spec_llm.events["spec_drafted"] - before.get("spec_drafted", 0)
    accepted = spec_llm.events["spec_accepted"] - before.get("spec_accepted", 0)
    assert drafted > 0 and 0 < accepted <= drafted  # drafts were checked and some kept
    watch.assert_nothing_traced()  # nothing compiled while serving: verify was compiled at warm-up


def test_a_request_that_opts_out_keeps_every_step_plain_and_its_bits(spec_llm):
    """Batch invariance is bitwise for a request that does not speculate: while it is live no step
    verifies (a verify call's matmul shapes differ from the decode step's), so beside speculating
    neighbours it gets exactly the logprobs it gets alone."""
    out = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=0, speculate=False)
    [alone] = spec_llm.generate([REPETITIVE[0]], out)
    before = spec_llm.events["spec_drafted"]
    neighbours = SamplingParams(temperature=0.0, max_tokens=20, speculate=True)
    results = spec_llm.generate([REPETITIVE[0]] + REPETITIVE, [out] + [neighbours] * 3)
    assert results[0].token_ids == alone.token_ids and results[0].logprobs == alone.logprobs
    assert spec_llm.events["spec_drafted"] == before


def test_stops_and_max_tokens_cut_inside_a_checked_block(spec_llm):
    plain = spec_llm.generate(REPETITIVE, SamplingParams(temperature=0.0, max_tokens=24, speculate=False))
    # A stop token that plain decoding meets mid-way, and a max_tokens that is not a multiple of k + 1.
    stop_id = plain[0].token_ids[9]
    cut = _compare(spec_llm, [SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=(stop_id,)),
                              SamplingParams(temperature=0.0, max_tokens=7)])
    assert cut[0].finish_reason == "stop" and len(cut[0].token_ids) <= 10  # (the stop was met, not skipped)
    text = plain[1].text
    assert len(text) > 6  # else the stop string below would not be tested
    [_, stopped, _] = _compare(spec_llm, [SamplingParams(temperature=0.0, max_tokens=24, stop=(text[3:6],))])
    assert stopped.finish_reason == "stop" and stopped.text == text[:text.index(text[3:6])]


def test_a_constrained_request_beside_speculating_ones(spec_llm):
    from jserve.structured import Constraint

    params = [SamplingParams(temperature=0.0, max_tokens=30)] * 3
    params.append(SamplingParams(temperature=0.7, seed=1, max_tokens=30,
                                 constraint=Constraint("choice", ("alpha", "beta"))))
    results = spec_llm.generate(REPETITIVE + [[1, 2, 3]], params)
    assert results[3].text in ("alpha", "beta")
    plain = spec_llm.generate(REPETITIVE, SamplingParams(temperature=0.0, max_tokens=30, speculate=False))
    assert [r.token_ids for r in results[:3]] == [r.token_ids for r in plain]
