"""Model-quality measurements shared by ``scripts/eval_quality.py`` and the tests."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jserve import model
from jserve.config import ModelConfig
from jserve.model import Params


@functools.partial(jax.jit, static_argnames=("cfg",))
def _window_nll(params: Params, tokens: jax.Array, valid: jax.Array, *, cfg: ModelConfig) -> jax.Array:
    """Summed negative log-likelihood of ``tokens[1:]`` given their prefixes, where ``valid``."""
    logits = model.logits_all(params, cfg, tokens[None])[0, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[1:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(valid[1:], nll, 0.0))


def perplexity(params: Params, cfg: ModelConfig, ids: list[int], window: int = 512) -> float:
    """Perplexity over consecutive, non-overlapping windows (each window starts afresh)."""
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        tokens = np.zeros(window, np.int32)
        tokens[: len(chunk)] = chunk
        valid = np.arange(window) < len(chunk)
        total += float(_window_nll(params, tokens, valid, cfg=cfg))
        count += len(chunk) - 1
    return math.exp(total / count)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _chunk_logits(params: Params, tokens: jax.Array, start: jax.Array, count: jax.Array, cache,
                  n_blocks: jax.Array, *, cfg: ModelConfig):
    """Float32 logits ``[C, V]`` of one chunk run into slot 0 of ``cache`` (``model.extend``)."""
    x, cache = model.extend(params, cfg, tokens[None], jnp.zeros((1,), jnp.int32), start[None], count[None], cache,
                            n_blocks)
    return model.unembed(params, cfg, x[0]), cache


def perplexity_cached(params: Params, cfg: ModelConfig, ids: list[int], kv_dtype: jnp.dtype,
                      window: int = 512, chunk: int = 64) -> float:
    """``perplexity``'s windows, each run through a one-slot KV cache of ``kv_dtype`` in chunks of
    ``chunk`` positions (``model.extend``, as serving runs prompts): every key and value a token
    attends to, its own included, is read back from the cache, so this measures the cache's
    element type. With a float32 cache it equals ``perplexity`` up to the order of float sums."""
    from jserve.kv_cache import KVCache

    total, count = 0.0, 0
    cache_len = model.padded_cache_len(window)
    for start in range(0, len(ids), window):
        piece = ids[start:start + window]
        if len(piece) < 2:
            break
        cache = KVCache.zeros(cfg, 1, cache_len, kv_dtype)
        logits = []
        for at in range(0, len(piece), chunk):
            tokens = np.zeros(chunk, np.int32)
            part = piece[at:at + chunk]
            tokens[: len(part)] = part
            n_blocks = -(-(at + chunk) // model.attention_block(cache_len))
            out, cache = _chunk_logits(params, tokens, jnp.int32(at), jnp.int32(len(part)), cache,
                                       jnp.int32(min(n_blocks, cache_len // model.attention_block(cache_len))),
                                       cfg=cfg)
            logits.append(np.asarray(out[: len(part)]))
        logp = jax.nn.log_softmax(jnp.asarray(np.concatenate(logits)[:-1]), axis=-1)
        nll = -np.take_along_axis(np.asarray(logp), np.asarray(piece[1:])[:, None], axis=-1)[:, 0]
        total += float(nll.sum())
        count += len(piece) - 1
    return math.exp(total / count)
