"""The on-device sampler: filters, penalties and greedy, checked on hand-made logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve.sampling import InvalidRequestError, SamplingParams, SlotSampling, apply_penalties, greedy
from jserve.sampling import sample as _sample

sample = jax.jit(_sample)


def _draws(logits_row, params: SamplingParams, seed: int, n: int) -> set[int]:
    """``n`` draws of one request at steps 0..n-1, as one batch of identical rows."""
    sp = _rows([params] * n, [seed] * n)
    return set(sample(jnp.tile(logits_row[None], (n, 1)), sp, jnp.arange(n)).tolist())


def _rows(params: list[SamplingParams], seeds: list[int]) -> SlotSampling:
    rows = [SlotSampling.from_params(p, s) for p, s in zip(params, seeds)]
    return jax.tree.map(lambda *xs: jnp.asarray(np.concatenate(xs)), *rows)


def test_greedy_takes_first_maximum():
    logits = jnp.array([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 5.0]])
    assert greedy(logits).tolist() == [1, 0]


def test_top_k_one_and_tiny_top_p_and_full_min_p_are_greedy():
    rng = np.random.default_rng(0)
    logits = jnp.array(rng.normal(size=(3, 50)) * 3, jnp.float32)
    sp = _rows([SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6),
                SamplingParams(temperature=1.5, min_p=1.0)], [1, 2, 3])
    for step in range(5):
        assert sample(logits, sp, jnp.full((3,), step)).tolist() == greedy(logits).tolist()


def test_top_k_restricts_to_the_k_best():
    drawn = _draws(jnp.arange(10.0), SamplingParams(temperature=100.0, top_k=3), 7, 200)
    assert drawn == {7, 8, 9}


def test_top_p_keeps_the_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    drawn = _draws(jnp.log(jnp.array(probs, jnp.float32)), SamplingParams(temperature=1.0, top_p=0.75), 1, 300)
    assert drawn == {0, 1}  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75: the nucleus is the first two


def test_same_seed_same_draw_different_seed_differs():
    logits = jnp.zeros((2, 1000))
    sp = _rows([SamplingParams(temperature=1.0), SamplingParams(temperature=1.0)], [42, 42])
    a = sample(logits, sp, jnp.array([3, 3]))
    assert a[0] == a[1]
    sp2 = _rows([SamplingParams(temperature=1.0)] * 2, [42, 43])
    draws = [sample(logits, sp2, jnp.array([s, s])).tolist() for s in range(5)]
    assert any(x != y for x, y in draws)


def test_penalties():
    logits = jnp.array([[2.0, -2.0, 1.0, 1.0]])
    sp = _rows([SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)], [0])
    seen = jnp.array([[True, True, False, True]])
    counts = jnp.array([[0, 0, 0, 2]])
    out = np.asarray(apply_penalties(logits, sp, seen, counts))[0]
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, 0.5 - 0.5 - 0.5])


@pytest.mark.parametrize("kwargs, msg", [
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"min_p": 2.0}, "min_p must be in [0, 1]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"stop_token_ids": (10**6,)}, "outside the vocabulary"),
    ({"logprobs": 9}, "logprobs must be in [0, 5]"),
])
def test_invalid_params_are_refused_precisely(kwargs, msg):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs).validate(vocab_size=1000, max_logprobs=5)
    assert msg in str(e.value)
