"""Sampling parameters and the on-device, per-slot sampler.

Every slot carries its own parameters and PRNG key, and each row of the batch is sampled
independently (``vmap``), so a request's tokens do not depend on what else is in the batch.
The key of a request's ``i``-th token is ``fold_in(key(seed), i)``: the same seed and prompt
give the same output whenever, wherever the request runs.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


class InvalidRequestError(ValueError):
    """A request that can never be served as given; the message says exactly why."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops.

    ``temperature`` 0 means greedy. ``top_k`` 0 and ``top_p`` 1 and ``min_p`` 0 disable those
    filters. ``repetition_penalty`` (1 = off) divides positive / multiplies negative logits of
    tokens seen in the prompt or output; ``presence_penalty`` and ``frequency_penalty``
    (0 = off) subtract from the logits of tokens already generated, once / per occurrence.
    ``stop`` strings end the text just before the stop string. ``logprobs`` is how many top
    alternatives to report per token (0: only the chosen token's logprob).
    """

    max_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0

    def validate(self, vocab_size: int, max_logprobs: int) -> None:
        def bad(msg: str) -> None:
            raise InvalidRequestError(msg)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            bad(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p <= 1.0):
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not math.isfinite(v) or not -2.0 <= v <= 2.0:
                bad(f"{name} must be in [-2, 2], got {v}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            bad(f"seed must be in [0, 2**64), got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop strings must be non-empty strings")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                bad(f"stop token id {t} is outside the vocabulary [0, {vocab_size})")
        if not 0 <= self.logprobs <= max_logprobs:
            bad(f"logprobs must be in [0, {max_logprobs}] on this server, got {self.logprobs}")


def seed_to_key(seed: int) -> np.ndarray:
    """A raw threefry key ``[2] uint32`` from a 64-bit seed."""
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], dtype=np.uint32)


@struct.dataclass
class SlotSampling:
    """Per-slot sampling parameters, each ``[S]`` (``key``: ``[S, 2]`` raw threefry keys)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    key: jax.Array

    @classmethod
    def empty(cls, slots: int) -> SlotSampling:
        # Distinct buffers for every field: the state is donated, and one buffer may not be
        # donated twice.
        def f(x: float) -> jax.Array:
            return jnp.full((slots,), x, jnp.float32)

        return cls(temperature=f(0.0), top_k=jnp.zeros((slots,), jnp.int32), top_p=f(1.0), min_p=f(0.0),
                   repetition_penalty=f(1.0), presence_penalty=f(0.0), frequency_penalty=f(0.0),
                   key=jnp.zeros((slots, 2), jnp.uint32))

    @classmethod
    def from_params(cls, p: SamplingParams, seed: int) -> SlotSampling:
        """One row (shapes ``[1]``), built on the host."""
        def f(x: float) -> np.ndarray:
            return np.array([x], np.float32)

        return cls(temperature=f(p.temperature), top_k=np.array([p.top_k], np.int32), top_p=f(p.top_p),
                   min_p=f(p.min_p), repetition_penalty=f(p.repetition_penalty),
                   presence_penalty=f(p.presence_penalty), frequency_penalty=f(p.frequency_penalty),
                   key=seed_to_key(seed)[None])

    def set_row(self, slot: jax.Array, row: SlotSampling) -> SlotSampling:
        return jax.tree.map(lambda a, r: a.at[slot].set(r[0]), self, row)


def apply_penalties(logits: jax.Array, sp: SlotSampling, seen: jax.Array, counts: jax.Array) -> jax.Array:
    """``logits [B, V]``; ``seen [B, V]`` bool (prompt or output); ``counts [B, V]`` output counts."""
    rep = sp.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalized, logits)
    c = counts.astype(jnp.float32)
    return logits - sp.frequency_penalty[:, None] * c - sp.presence_penalty[:, None] * (c > 0)


def greedy(logits: jax.Array) -> jax.Array:
    """Argmax ``[B, V] → [B]`` without a sort (first index among ties)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(logits == top, iota, logits.shape[-1]), axis=-1)


def _sample_row(logits: jax.Array, t: jax.Array, k: jax.Array, p: jax.Array, min_p: jax.Array,
                key: jax.Array) -> jax.Array:
    """One row: temperature, top-k, top-p, min-p, then a categorical draw. ``logits [V]``."""
    v = logits.shape[0]
    scaled = logits / jnp.maximum(t, 1e-6)
    order = jnp.argsort(-scaled)  # stable: equal logits keep index order
    s = scaled[order]
    probs = jax.nn.softmax(s)
    rank = jnp.arange(v)
    keep = (rank < jnp.where(k > 0, k, v)) & (jnp.cumsum(probs) - probs < p) & (probs >= min_p * probs[0])
    choice = jax.random.categorical(key, jnp.where(keep, s, -jnp.inf))
    return jnp.where(t > 0, order[choice], order[0])


def sample(logits: jax.Array, sp: SlotSampling, step: jax.Array) -> jax.Array:
    """Next tokens ``[B]`` for already-penalized ``logits [B, V]``; ``step [B]`` indexes the keys.

    When no row samples (all temperatures 0) this is an argmax and nothing is sorted.
    """
    def stochastic(lg: jax.Array) -> jax.Array:
        keys = jax.vmap(jax.random.fold_in)(sp.key, step)
        sampled = jax.vmap(_sample_row)(lg, sp.temperature, sp.top_k, sp.top_p, sp.min_p, keys)
        return jnp.where(sp.temperature > 0, sampled, greedy(lg))

    return jax.lax.cond(jnp.any(sp.temperature > 0), stochastic, greedy, logits)
