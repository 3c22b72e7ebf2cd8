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
