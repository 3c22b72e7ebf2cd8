"""The on-device sampler: filters, penalties and greedy, checked on hand-made logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve.sampling import (
    InvalidRequestError,
    SamplingParams,
    SlotSampling,
    apply_penalties,
    greedy,
    sample_with_uniform,
)
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


def test_top_p_zero_keeps_only_the_most_likely_token_at_any_temperature():
    """OpenAI takes ``top_p: 0``: the nucleus is the most likely token alone (its tie broken as
    greedy's, the first index), whatever the temperature and the uniform number drawn; numpy's
    argmax is the reference. The rows beside it take the full-vocabulary path in the same step."""
    SamplingParams(temperature=1.0, top_p=0.0).validate(vocab_size=1000, max_logprobs=0)  # accepted
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 1000)).astype(np.float32)  # flat: temperature alone rarely picks the top
    logits[3, [10, 700]] = logits[3].max() + 1.0  # a tie at the top
    params = [SamplingParams(temperature=t, top_p=0.0) for t in (1.0, 1.0, 2.0, 1.0)] + [
        SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.999)]
    sp = _rows(params, [1, 2, 3, 4, 5, 6])
    want = np.argmax(logits[:4], axis=-1).tolist()
    assert want[3] == 10
    for step in range(20):
        assert sample(jnp.asarray(logits), sp, jnp.full((6,), step)).tolist()[:4] == want
    for u in (0.0, 0.5, 1.0 - 2.0**-24):  # the edges of the inverse-CDF draw
        drawn = jax.jit(sample_with_uniform)(jnp.asarray(logits), sp, jnp.full((6,), u, jnp.float32))
        assert drawn.tolist()[:4] == want


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
    ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0 (0 = greedy), got inf"),
    ({"top_p": -0.1}, "top_p must be in [0, 1] (0 = the most likely token only), got -0.1"),
    ({"top_p": 1.5}, "top_p must be in [0, 1] (0 = the most likely token only), got 1.5"),
    ({"top_p": float("nan")}, "top_p must be in [0, 1] (0 = the most likely token only), got nan"),
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"min_p": 2.0}, "min_p must be in [0, 1]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"stop_token_ids": (10**6,)}, "outside the vocabulary"),
    ({"logprobs": 9}, "logprobs must be in [0, 5]"),
    ({"stop": ("x",) * 17}, "at most 16 stop strings are accepted, got 17"),
    ({"stop": ("x" * 1001,)}, "stop strings may have at most 1000 characters, got one of 1001"),
    ({"stop_token_ids": tuple(range(65))}, "at most 64 stop_token_ids are accepted, got 65"),
])
def test_invalid_params_are_refused_precisely(kwargs, msg):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs).validate(vocab_size=1000, max_logprobs=5)
    assert msg in str(e.value)


def _reference_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """What a sampled row should draw from, by the sort-based definition (float64, host)."""
    s = logits.astype(np.float64) / p.temperature
    probs = np.exp(s - s.max())
    probs /= probs.sum()
    order = np.argsort(-s, kind="stable")
    ps = probs[order]
    rank = np.arange(len(s))
    keep = (rank < (p.top_k or len(s))) & (np.cumsum(ps) - ps < p.top_p) & (ps >= p.min_p * ps[0])
    keep[0] = True
    q = np.zeros_like(probs)
    q[order[keep]] = ps[keep]
    return q / q.sum()


# Rows of a 1,000-token vocabulary: some filters keep a few tokens (drawn from the top-k
# candidates), others a wide set or the whole vocabulary (the full-vocabulary path).
DRAW_CASES = [
    ("peaked", SamplingParams(temperature=0.8, top_p=0.95, top_k=50)),
    ("peaked", SamplingParams(temperature=0.7, top_p=0.9)),
    ("peaked", SamplingParams(temperature=1.0, min_p=0.05)),
    ("flat", SamplingParams(temperature=1.0)),
    ("flat", SamplingParams(temperature=1.3, top_p=0.9)),
    ("flat", SamplingParams(temperature=1.0, top_k=600)),
    ("flat", SamplingParams(temperature=1.0, top_k=700, top_p=0.8, min_p=0.2)),
    ("peaked", SamplingParams(temperature=2.0, top_k=300)),
]


@pytest.mark.parametrize("shape, params", DRAW_CASES)
def test_draws_follow_the_filtered_distribution_exactly(shape, params):
    """Driven by a grid of uniform numbers, inverse-CDF draws land on each token in proportion to
    its probability under the reference definition, to within one grid step."""
    from jserve.sampling import CANDIDATES

    rng = np.random.default_rng(11)
    v = 1000
    assert v > CANDIDATES
    logits = rng.normal(size=v) * (4.0 if shape == "peaked" else 0.5)
    q = _reference_probs(logits, params)
    m = 20000
    u = (np.arange(m) + 0.5) / m
    rows = _rows([params] * m, [0] * m)
    drawn = np.asarray(jax.jit(sample_with_uniform)(jnp.tile(jnp.asarray(logits, jnp.float32)[None], (m, 1)), rows,
                                                    jnp.asarray(u, jnp.float32)))
    freq = np.bincount(drawn, minlength=v) / m
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(q))
    np.testing.assert_allclose(freq, q, atol=2.5 / m + 1e-4)


def test_a_rows_draw_does_not_depend_on_the_other_rows():
    """Each row's token is the same alone as beside rows that take other paths (greedy, the
    candidates, the full vocabulary), for the same uniform number."""
    from jserve.sampling import sample_with_uniform

    rng = np.random.default_rng(12)
    logits = jnp.asarray(rng.normal(size=(len(DRAW_CASES) + 1, 1000)) * 2, jnp.float32)
    params = [p for _, p in DRAW_CASES] + [SamplingParams(temperature=0.0)]
    u = jnp.asarray(rng.uniform(size=len(params)), jnp.float32)
    draw = jax.jit(sample_with_uniform)
    together = np.asarray(draw(logits, _rows(params, [0] * len(params)), u))
    for i, p in enumerate(params):
        alone = np.asarray(draw(logits[i:i + 1], _rows([p], [0]), u[i:i + 1]))[0]
        assert together[i] == alone, f"row {i} ({p}) changed with its neighbours"


def test_penalties_skip_is_bitwise_neutral():
    """Rows without penalties come out of ``apply_penalties`` unchanged, whether or not another row
    has one (the whole pass is skipped when none has)."""
    logits = jnp.asarray(np.random.default_rng(13).normal(size=(2, 64)), jnp.float32)
    seen = jnp.ones((2, 64), bool)
    counts = jnp.ones((2, 64), jnp.int32)
    plain = _rows([SamplingParams(), SamplingParams()], [0, 0])
    mixed = _rows([SamplingParams(), SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5)], [0, 0])
    a = np.asarray(jax.jit(apply_penalties)(logits, plain, seen, counts))
    b = np.asarray(jax.jit(apply_penalties)(logits, mixed, seen, counts))
    np.testing.assert_array_equal(a, np.asarray(logits))
    np.testing.assert_array_equal(b[0], a[0])
    assert not np.array_equal(b[1], a[1])


def test_penalties_match_a_host_reference_on_random_rows():
    rng = np.random.default_rng(14)
    b, v = 6, 300
    logits = rng.normal(size=(b, v)).astype(np.float32) * 3
    seen = rng.random((b, v)) < 0.3
    counts = np.where(rng.random((b, v)) < 0.2, rng.integers(1, 5, (b, v)), 0).astype(np.int32)
    params = [SamplingParams(repetition_penalty=float(r), presence_penalty=float(pp), frequency_penalty=float(f))
              for r, pp, f in zip(rng.uniform(0.5, 2, b), rng.uniform(-2, 2, b), rng.uniform(-2, 2, b))]
    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), _rows(params, [0] * b), jnp.asarray(seen),
                                              jnp.asarray(counts)))
    for i, p in enumerate(params):
        x = logits[i].astype(np.float64)
        x = np.where(seen[i], np.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
        x = x - p.frequency_penalty * counts[i] - p.presence_penalty * (counts[i] > 0)
        np.testing.assert_allclose(got[i], x, rtol=1e-6, atol=1e-5)
