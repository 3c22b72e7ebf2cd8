"""Every op of a decode step is row-invariant: a row computed alone and among 1..16 random other
rows (one position per row, and five: a verify call's width) gives the same bits. This is what lets
a step compute only its live slots (``JaxEngine.generate``'s row buckets) and makes ``verify`` equal
plain decoding bitwise. Needs the CPU kernels for the matmuls (float weights as ``f32`` blocks)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve import model
from jserve.config import tiny_config
from jserve.engine import _pack
from jserve.kv_cache import KVCache
from jserve.sampling import SamplingParams, SlotSampling, apply_penalties, sample

ROW_COUNTS = (2, 3, 5, 8, 13, 17)  # the needle plus 1..16 others
MAX_LEN = 384


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(vocab_size=700)
    params = model.for_cpu_kernels(model.init_params(cfg, jax.random.key(0)))
    if not model.row_invariant(params):
        pytest.skip("the CPU kernels are not built here: float matmuls take XLA's path")
    return cfg, params


@functools.partial(jax.jit, static_argnames=("cfg",))
def _extend_logits(params, cache, tokens, slots, starts, counts, *, cfg):
    furthest = jnp.max(jnp.where(counts > 0, starts + counts - 1, 0))
    n_blocks = furthest // model.attention_block(cache.max_len) + 1
    x, _ = model.extend(params, cfg, tokens, slots, starts, counts, cache, n_blocks)
    return model.unembed(params, cfg, x)  # [R, C, V]


@pytest.mark.parametrize("width", [1, 5])
def test_a_rows_logits_do_not_depend_on_the_other_rows_of_an_extend_call(tiny, width):
    """Matmuls (kernels), norms, RoPE, attention over the cache (other rows read more blocks, of
    other slots) and the unembedding: the needle row's logits, bit for bit."""
    cfg, params = tiny
    rng = np.random.default_rng(width)
    s_ = 18
    shape = (s_, cfg.n_kv_heads, MAX_LEN, cfg.head_dim)
    cache = KVCache(k=tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(cfg.n_layers)),
                    v=tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(cfg.n_layers)))
    needle = rng.integers(0, cfg.vocab_size, (width,)).astype(np.int32)
    start = 150

    def call(r: int, at: int) -> np.ndarray:
        tokens = rng.integers(0, cfg.vocab_size, (r, width)).astype(np.int32)
        slots = rng.permutation(np.arange(1, s_))[:r].astype(np.int32)
        starts = rng.integers(0, MAX_LEN - width, r).astype(np.int32)
        counts = rng.integers(0, width + 1, r).astype(np.int32)  # some padding rows (count 0)
        tokens[at], slots[at], starts[at], counts[at] = needle, 0, start, width
        out = _extend_logits(params, cache, tokens, slots, starts, counts, cfg=cfg)
        return np.asarray(out[at])

    alone = call(1, 0)
    for r in ROW_COUNTS:
        at = int(rng.integers(r))
        assert call(r, at).tobytes() == alone.tobytes(), (r, at)


def _rows(params: list[SamplingParams], seeds: list[int]) -> SlotSampling:
    parts = [SlotSampling.from_params(p, s) for p, s in zip(params, seeds)]
    return jax.tree.map(lambda *a: jnp.asarray(np.concatenate(a)), *parts)


@jax.jit
def _sample_and_pack(logits, sp, seen, counts, steps):
    penalized = apply_penalties(logits, sp, seen, counts)
    tokens = sample(penalized, sp, steps)
    active = jnp.ones(tokens.shape, bool)
    return penalized, tokens, _pack(tokens, logits, active, sp.logprobs, 3)


NEEDLES = {
    "greedy": SamplingParams(temperature=0.0, logprobs=3),
    "top_p": SamplingParams(temperature=0.9, top_p=0.9, logprobs=1),
    "top_k_min_p": SamplingParams(temperature=1.2, top_k=40, min_p=0.02, logprobs=0),
    "full_vocab": SamplingParams(temperature=1.0),
    "penalties": SamplingParams(temperature=0.8, repetition_penalty=1.3, presence_penalty=0.5,
                                frequency_penalty=0.4, logprobs=2),
}


@pytest.mark.parametrize("name", list(NEEDLES))
def test_penalties_sampling_and_packing_of_a_row_do_not_depend_on_the_other_rows(name):
    """``apply_penalties``, ``sample`` (every filter and both draw paths) and ``_pack``'s log-softmax
    and top-k: the needle row's penalized logits, token and packed result, bit for bit, whatever
    its neighbours ask for (penalties, alternatives, other filters)."""
    rng = np.random.default_rng(len(name))
    v = 3000
    needle = (rng.normal(size=v) * 3).astype(np.float32), rng.random(v) < 0.1, rng.integers(0, 3, v).astype(np.int32)
    others = [SamplingParams(temperature=float(rng.choice([0.0, 0.7, 1.5])), top_p=float(rng.choice([1.0, 0.8])),
                             top_k=int(rng.choice([0, 5])), repetition_penalty=float(rng.choice([1.0, 1.2])),
                             logprobs=[None, 0, 3][rng.integers(3)]) for _ in range(17)]

    def call(r: int, at: int):
        logits = (rng.normal(size=(r, v)) * 3).astype(np.float32)
        seen, counts = rng.random((r, v)) < 0.1, rng.integers(0, 3, (r, v)).astype(np.int32)
        logits[at], seen[at], counts[at] = needle
        params = others[:r]
        params[at] = NEEDLES[name]
        seeds = [int(s) for s in rng.integers(1 << 30, size=r)]
        seeds[at] = 99
        steps = rng.integers(0, 50, r).astype(np.int32)
        steps[at] = 7
        out = _sample_and_pack(logits, _rows(params, seeds), seen, counts, steps)
        return [np.asarray(x)[at].tobytes() for x in out]

    alone = call(1, 0)
    for r in ROW_COUNTS:
        at = int(rng.integers(r))
        assert call(r, at) == alone, (r, at)
