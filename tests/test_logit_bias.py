"""logit_bias: added to the logits on the device, per slot, batch-invariant, without recompiling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve.sampling import (
    MAX_LOGIT_BIAS,
    InvalidRequestError,
    SamplingParams,
    SlotSampling,
    apply_logit_bias,
    sample,
    sample_with_uniform,
    validate_logit_bias,
)
from jserve.speculative import SpecPolicy

from .compile_watch import CompileWatch


def _rows(params: list[SamplingParams], seeds: list[int]) -> SlotSampling:
    rows = [SlotSampling.from_params(p, s) for p, s in zip(params, seeds)]
    return jax.tree.map(lambda *xs: jnp.asarray(np.concatenate(xs)), *rows)


def test_bias_is_added_exactly_and_only_to_its_own_row():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 500)).astype(np.float32) * 3
    bias = ((7, 2.5), (499, -1.25), (0, 100.0))
    sp = _rows([SamplingParams(), SamplingParams(logit_bias=bias), SamplingParams()], [0, 0, 0])
    got = np.asarray(jax.jit(apply_logit_bias)(jnp.asarray(logits), sp))
    want = logits.copy()
    for t, b in bias:
        want[1, t] = np.float32(want[1, t] + np.float32(b))
    np.testing.assert_array_equal(got, want)  # the neighbours' rows are bitwise their own logits


def test_no_bias_anywhere_passes_the_logits_through():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64)), jnp.float32)
    got = jax.jit(apply_logit_bias)(logits, _rows([SamplingParams()] * 2, [0, 0]))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(logits))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_plus_100_forces_and_minus_100_bans(temperature):
    rng = np.random.default_rng(2)
    n, v = 64, 300
    logits = jnp.asarray(rng.normal(size=(n, v)) * 2, jnp.float32)
    best = np.asarray(jnp.argmax(logits, axis=-1))
    forced = SamplingParams(temperature=temperature, logit_bias=((123, 100.0),))
    drawn = sample(logits, _rows([forced] * n, list(range(n))), jnp.arange(n))
    assert set(np.asarray(drawn).tolist()) == {123}
    # Ban each row's most likely token: greedy then takes the runner-up, sampling never draws it.
    banned = [SamplingParams(temperature=temperature, logit_bias=((int(b), -100.0),)) for b in best]
    drawn = np.asarray(sample(logits, _rows(banned, list(range(n))), jnp.arange(n)))
    assert not np.any(drawn == best)
    if temperature == 0.0:
        second = np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, 1]
        np.testing.assert_array_equal(drawn, second)


def test_draws_follow_softmax_of_logits_plus_bias():
    """Driven by a grid of uniform numbers, draws land on each token in proportion to numpy's
    softmax of logits + bias (to within one grid step)."""
    rng = np.random.default_rng(3)
    v = 40
    logits = rng.normal(size=v).astype(np.float32)
    bias = ((3, 1.5), (10, -2.0), (22, 0.75), (39, -100.0))
    p = SamplingParams(temperature=1.0, logit_bias=bias)
    biased = logits.astype(np.float64)
    for t, b in bias:
        biased[t] += b
    q = np.exp(biased - biased.max())
    q /= q.sum()
    m = 20000
    u = jnp.asarray((np.arange(m) + 0.5) / m, jnp.float32)
    sp = _rows([p] * m, [0] * m)
    tiled = jnp.tile(jnp.asarray(logits)[None], (m, 1))
    drawn = np.asarray(jax.jit(lambda lg, s, uu: sample_with_uniform(apply_logit_bias(lg, s), s, uu))(tiled, sp, u))
    freq = np.bincount(drawn, minlength=v) / m
    np.testing.assert_allclose(freq, q, atol=2.5 / m + 1e-4)
    assert freq[39] == 0


@pytest.mark.parametrize("pairs, msg", [
    ({str(i): 1.0 for i in range(MAX_LOGIT_BIAS + 1)}, f"at most {MAX_LOGIT_BIAS} entries, got {MAX_LOGIT_BIAS + 1}"),
    ({"1000": 1.0}, "logit_bias token id 1000 is outside the vocabulary [0, 1000)"),
    ({"-1": 1.0}, "logit_bias token id -1 is outside the vocabulary [0, 1000)"),
    ({"abc": 1.0}, "logit_bias keys must be token ids (integers), got 'abc'"),
    ({"5": 100.5}, "logit_bias values must be in [-100, 100], got 100.5 for token id 5"),
    ({"5": float("nan")}, "logit_bias values must be finite numbers, got nan for token id 5"),
    ({"5": "high"}, "logit_bias values must be finite numbers, got 'high' for token id 5"),
    (((5, 1.0), (5, 2.0)), "logit_bias gives token id 5 twice"),
])
def test_invalid_logit_bias_is_refused_precisely(pairs, msg):
    with pytest.raises(InvalidRequestError) as e:
        validate_logit_bias(pairs, vocab_size=1000)
    assert msg in str(e.value)
    if not isinstance(pairs, dict):
        with pytest.raises(InvalidRequestError, match="twice"):
            SamplingParams(logit_bias=pairs).validate(vocab_size=1000, max_logprobs=0)


def test_valid_logit_bias_becomes_int_float_pairs():
    assert validate_logit_bias({"5": 100, 7: -0.5}, 1000) == ((5, 100.0), (7, -0.5))
    assert validate_logit_bias({}, 1000) == ()


def test_engine_forces_bans_and_leaves_neighbours_bitwise_alone(tiny_llm):
    """On the engine: a +100 bias makes every token the forced one, a -100 bias keeps the token
    the unbiased run chose first out of the whole output; an unbiased needle's tokens and logprobs
    are bitwise the same alone and beside biased neighbours; nothing compiles on the way."""
    rng = np.random.default_rng(4)
    vocab = tiny_llm.config.vocab_size
    prompt = rng.integers(17, vocab, 12).tolist()
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    seeded = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=99, ignore_eos=True, logprobs=3)
    tiny_llm.engine.wait_ready()
    alone = tiny_llm.generate([prompt, prompt], [plain, seeded])
    first = alone[0].token_ids[0]
    forced = SamplingParams(max_tokens=12, temperature=0.9, seed=5, ignore_eos=True, logit_bias=((4242, 100.0),))
    banned = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logit_bias=((first, -100.0), (17, 3.0)))
    mixed_params = [forced, plain, banned, seeded]
    # The same traffic without the biases first: whatever it compiles, the biases add nothing to.
    tiny_llm.generate([prompt] * 4, [dataclasses.replace(p, logit_bias=()) for p in mixed_params])
    with CompileWatch() as watch:
        mixed = tiny_llm.generate([prompt] * 4, mixed_params)
    watch.assert_nothing_traced()
    assert mixed[0].token_ids == [4242] * 12
    assert first not in mixed[2].token_ids
    for a, b in ((alone[0], mixed[1]), (alone[1], mixed[3])):
        assert a.token_ids == b.token_ids
        assert np.asarray(a.logprobs, np.float32).tobytes() == np.asarray(b.logprobs, np.float32).tobytes()


class _AlwaysVerify(SpecPolicy):
    """Every step checks drafts (the real policy picks by measured speed, which a test can't fix)."""

    def could_pay(self, live: int, rows_bucket: int, options: dict[int, float]) -> bool:
        return True

    def choose(self, live: int, rows_bucket: int, options: dict[int, float]) -> int:
        return max(options)


def test_speculative_verify_applies_the_bias_as_decoding_does(tiny_ckpt):
    """Verify draws each position through the same biased sampler: with drafts checked on every
    step, a biased request's tokens and logprobs equal plain decoding's."""
    import collections

    from jserve import LLM

    events = collections.Counter()
    llm = LLM(tiny_ckpt, slots=4, max_len=128, max_prompt_len=64, top_logprobs=2, speculate=4,
              on_event=lambda kind, req, value: events.update({kind: value}))
    try:
        llm.engine.wait_ready()
        llm.orchestrator.policy = _AlwaysVerify()
        prompts = [[1, 450, 1134, 288, 34, 450, 1134, 288, 34, 450, 1134, 288], [1, 5, 6, 5, 6, 5, 6, 5]]
        params = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=0,
                                 logit_bias=((34, -100.0), (1134, 2.0))),
                  SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True, logprobs=0,
                                 logit_bias=((6, 5.0), (777, 100.0)))]
        spec = llm.generate(prompts, [dataclasses.replace(p, speculate=True) for p in params])
        drafted = events["spec_drafted"]
        plain = llm.generate(prompts, [dataclasses.replace(p, speculate=False) for p in params])
        bitwise = getattr(llm.engine, "row_invariant", False)  # verify is then plain decoding's computation
    finally:
        llm.close(drain=False)
    assert drafted > 0, "no draft was ever checked: the verify path went untested"
    assert 34 not in spec[0].token_ids and spec[1].token_ids == [777] * 30
    for a, b in zip(spec, plain):
        assert a.token_ids == b.token_ids
        if bitwise:
            assert np.asarray(a.logprobs, np.float32).tobytes() == np.asarray(b.logprobs, np.float32).tobytes()
        else:
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
