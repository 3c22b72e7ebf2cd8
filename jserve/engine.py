"""The engine: jit-compiled prefill, insert and generate over fixed batch slots.

``prefill`` runs one prompt (padded to a power-of-two bucket) and samples its first token;
``insert`` writes that prompt's keys/values into one slot of the preallocated cache;
``generate`` advances every slot by one token. ``insert``, ``generate`` and ``release`` take
the decode state donated, so the cache is updated in place and the caller must use the
state they return. Shapes never change after ``warmup``, so serving compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jserve import model
from jserve.config import ModelConfig
from jserve.kv_cache import KVCache, cache_bytes, write_prefix
from jserve.model import Params
from jserve.sampling import SamplingParams, SlotSampling, apply_penalties, sample
from jserve.sharding import Plan, prefix_sharding, state_sharding

log = logging.getLogger(__name__)

MIN_BUCKET = 16

# Columns of the packed per-step result ``[S, RESULT_COLS + 2 * top_logprobs]`` (float32).
TOKEN, LOGPROB, ACTIVE = 0, 1, 2
RESULT_COLS = 3


@struct.dataclass
class DecodeState:
    """Everything that lives on device between decode steps. ``[S]`` unless noted."""

    cache: KVCache
    lengths: jax.Array  # tokens already in the cache = position of ``last_tokens``
    last_tokens: jax.Array  # the token to feed next
    steps: jax.Array  # tokens generated so far (indexes the PRNG key)
    active: jax.Array  # bool
    sampling: SlotSampling
    seen: jax.Array  # [S, V] bool: token in prompt or output (repetition penalty)
    counts: jax.Array  # [S, V] int32: occurrences in output (presence/frequency penalties)


@struct.dataclass
class Prefix:
    """A prefilled prompt waiting to be inserted. ``k``, ``v``: ``[P, K, H]`` per layer."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    tokens: jax.Array  # [P] padded prompt
    length: jax.Array  # scalar int32
    sampling: SlotSampling  # one row
    result: jax.Array  # [RESULT_COLS + 2 * top_logprobs] first token, its logprob, ...


class Engine(Protocol):
    """What the orchestrator needs from an engine."""

    slots: int
    max_len: int
    max_prompt_len: int
    vocab_size: int
    top_logprobs: int

    def init_state(self) -> DecodeState: ...
    def prefill(self, tokens: list[int], params: SamplingParams, seed: int) -> Prefix: ...
    def insert(self, prefix: Prefix, state: DecodeState, slot: int) -> DecodeState: ...
    def generate(self, state: DecodeState) -> tuple[DecodeState, jax.Array]: ...
    def release(self, state: DecodeState, slot: int) -> DecodeState: ...


def buckets_for(max_prompt_len: int) -> tuple[int, ...]:
    """Powers of two from 16 up to (and including) ``max_prompt_len``, which closes the list."""
    out, b = [], MIN_BUCKET
    while b < max_prompt_len:
        out.append(b)
        b *= 2
    out.append(max_prompt_len)
    return tuple(out)


def _pack(tokens: jax.Array, raw_logits: jax.Array, active: jax.Array, logprobs: jax.Array,
          top_n: int) -> jax.Array:
    """One float32 array ``[B, 3 + 2 top_n]``: token, logprob, active, top ids, top logprobs.

    ``logprobs [B]`` is what each row asked for (``SlotSampling.logprobs``): in a step where no
    active row asked, no log-softmax is computed, and no top-k where none asked for alternatives
    (those columns are then zero)."""
    b = tokens.shape[0]
    wants = active & (logprobs >= 0)

    def with_logprobs(_):
        logp = jax.nn.log_softmax(raw_logits, axis=-1)
        chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
        if not top_n:
            return chosen, jnp.zeros((b, 0), jnp.float32)

        def tops(_):
            vals, ids = jax.lax.top_k(logp, top_n)
            return jnp.concatenate([ids.astype(jnp.float32), vals], axis=-1)

        alt = jax.lax.cond(jnp.any(wants & (logprobs > 0)), tops,
                           lambda _: jnp.zeros((b, 2 * top_n), jnp.float32), None)
        return chosen, alt

    chosen, alt = jax.lax.cond(jnp.any(wants), with_logprobs,
                               lambda _: (jnp.zeros((b,), jnp.float32), jnp.zeros((b, 2 * top_n), jnp.float32)),
                               None)
    cols = [tokens.astype(jnp.float32)[:, None], chosen[:, None], active.astype(jnp.float32)[:, None], alt]
    return jnp.concatenate(cols, axis=-1)


def _prefill(params: Params, tokens: jax.Array, length: jax.Array, sampling: SlotSampling, *,
             cfg: ModelConfig, top_n: int) -> Prefix:
    logits, ks, vs = model.prefill(params, cfg, tokens[None], length[None])
    v = cfg.vocab_size
    valid = jnp.arange(tokens.shape[0]) < length
    seen = jnp.zeros((1, v), bool).at[0, jnp.where(valid, tokens, v)].set(True, mode="drop")
    penalized = apply_penalties(logits, sampling, seen, jnp.zeros((1, v), jnp.int32))
    first = sample(penalized, sampling, jnp.zeros((1,), jnp.int32))
    result = _pack(first, logits, jnp.ones((1,), bool), sampling.logprobs, top_n)[0]
    return Prefix(k=tuple(k[0] for k in ks), v=tuple(x[0] for x in vs), tokens=tokens, length=length,
                  sampling=sampling, result=result)


def _insert(prefix: Prefix, state: DecodeState, slot: jax.Array) -> DecodeState:
    v = state.seen.shape[1]
    first = prefix.result[TOKEN].astype(jnp.int32)
    valid = jnp.arange(prefix.tokens.shape[0]) < prefix.length
    seen_row = jnp.zeros((v,), bool).at[jnp.where(valid, prefix.tokens, v)].set(True, mode="drop")
    seen_row = seen_row.at[first].set(True)
    counts_row = jnp.zeros((v,), jnp.int32).at[first].set(1)
    return DecodeState(
        cache=write_prefix(state.cache, prefix.k, prefix.v, slot),
        lengths=state.lengths.at[slot].set(prefix.length),
        last_tokens=state.last_tokens.at[slot].set(first),
        steps=state.steps.at[slot].set(1),
        active=state.active.at[slot].set(True),
        sampling=state.sampling.set_row(slot, prefix.sampling),
        seen=state.seen.at[slot].set(seen_row),
        counts=state.counts.at[slot].set(counts_row),
    )


def _generate(params: Params, state: DecodeState, *, cfg: ModelConfig, top_n: int) -> tuple[DecodeState, jax.Array]:
    t = state.cache.max_len
    positions = jnp.where(state.active, state.lengths, t)  # inactive slots write nothing
    # Attention reads the cache blocks up to the longest live sequence, not all T positions.
    longest = jnp.max(jnp.where(state.active, state.lengths, 0))
    n_blocks = longest // model.attention_block(t) + 1
    logits, cache = model.decode_step(params, cfg, state.last_tokens, positions, state.cache, n_blocks)
    penalized = apply_penalties(logits, state.sampling, state.seen, state.counts)
    tokens = sample(penalized, state.sampling, state.steps)
    tokens = jnp.where(state.active, tokens, 0)
    rows = jnp.arange(tokens.shape[0])
    inc = state.active.astype(jnp.int32)
    new_state = DecodeState(
        cache=cache,
        lengths=state.lengths + inc,
        last_tokens=tokens,
        steps=state.steps + inc,
        active=state.active,
        sampling=state.sampling,
        seen=state.seen.at[rows, tokens].set(state.seen[rows, tokens] | state.active),
        counts=state.counts.at[rows, tokens].add(inc),
    )
    return new_state, _pack(tokens, logits, state.active, state.sampling.logprobs, top_n)


def _release(state: DecodeState, slot: jax.Array) -> DecodeState:
    return state.replace(
        active=state.active.at[slot].set(False),
        sampling=state.sampling.replace(temperature=state.sampling.temperature.at[slot].set(0.0)),
    )


@dataclasses.dataclass
class JaxEngine:
    """The JAX implementation of ``Engine``: one model on the default device, or sharded over
    ``plan``'s mesh (params already sharded by ``checkpoint.load``; the state is sharded here)."""

    cfg: ModelConfig
    params: Params
    slots: int = 8
    max_len: int = 1024
    max_prompt_len: int | None = None
    cache_dtype: jnp.dtype = jnp.float32
    top_logprobs: int = 0
    plan: Plan | None = None

    def __post_init__(self) -> None:
        if self.max_prompt_len is None:
            self.max_prompt_len = self.max_len - 1
        if not 1 <= self.max_prompt_len < self.max_len:
            raise ValueError(f"max_prompt_len={self.max_prompt_len} must be in [1, max_len={self.max_len})")
        if self.max_len > self.cfg.max_position_embeddings:
            log.warning("max_len %d exceeds the model's trained context %d", self.max_len,
                        self.cfg.max_position_embeddings)
        self.vocab_size = self.cfg.vocab_size
        self.buckets = buckets_for(self.max_prompt_len)
        top_n = self.top_logprobs
        prefill = functools.partial(_prefill, cfg=self.cfg, top_n=top_n)
        generate = functools.partial(_generate, cfg=self.cfg, top_n=top_n)
        self._state_shape = jax.eval_shape(self._zeros)
        if self.plan is None:
            state_sh = prefix_sh = result_sh = None
        else:  # outputs pinned to the shardings the next call expects, so donation stays in place
            state_sh = state_sharding(self._state_shape, self.plan)
            row = SlotSampling.from_params(SamplingParams(), 0)
            prefix_sh = prefix_sharding(jax.eval_shape(prefill, self.params, np.zeros((MIN_BUCKET,), np.int32),
                                                       np.int32(1), row), self.plan)
            result_sh = self.plan.replicated()
            self._state_shape = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                             self._state_shape, state_sh)
        self._init = jax.jit(self._zeros, out_shardings=state_sh)
        self._prefill = jax.jit(prefill, out_shardings=prefix_sh)
        self._insert = jax.jit(_insert, donate_argnames=("state",), out_shardings=state_sh)
        self._generate = jax.jit(generate, donate_argnames=("state",), out_shardings=(state_sh, result_sh))
        self._release = jax.jit(_release, donate_argnames=("state",), out_shardings=state_sh)
        self._compiled: dict[tuple[str, int], jax.stages.Compiled] = {}  # filled by warmup
        log.info("engine: %d slots x %d positions, KV cache %.1f MiB, prefill buckets %s", self.slots,
                 self.max_len,
                 cache_bytes(self.cfg, self.slots, model.padded_cache_len(self.max_len), self.cache_dtype) / 2**20,
                 self.buckets)

    def init_state(self) -> DecodeState:
        return self._init()

    def _zeros(self) -> DecodeState:
        s, v = self.slots, self.cfg.vocab_size
        return DecodeState(
            cache=KVCache.zeros(self.cfg, s, model.padded_cache_len(self.max_len), self.cache_dtype),
            lengths=jnp.full((s,), self.max_len, jnp.int32),
            last_tokens=jnp.zeros((s,), jnp.int32),
            steps=jnp.zeros((s,), jnp.int32),
            active=jnp.zeros((s,), bool),
            sampling=SlotSampling.empty(s),
            seen=jnp.zeros((s, v), bool),
            counts=jnp.zeros((s, v), jnp.int32),
        )

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f"prompt of {n} tokens exceeds max_prompt_len={self.max_prompt_len}")

    def prefill(self, tokens: list[int], params: SamplingParams, seed: int) -> Prefix:
        n = len(tokens)
        b = self.bucket(n)
        padded = np.zeros((b,), np.int32)
        padded[:n] = tokens
        fn = self._compiled.get(("prefill", b), self._prefill)
        return fn(self.params, padded, np.int32(n), SlotSampling.from_params(params, seed))

    def insert(self, prefix: Prefix, state: DecodeState, slot: int) -> DecodeState:
        fn = self._compiled.get(("insert", prefix.tokens.shape[0]), self._insert)
        return fn(prefix, state=state, slot=np.int32(slot))

    def generate(self, state: DecodeState) -> tuple[DecodeState, jax.Array]:
        return self._compiled.get(("generate", 0), self._generate)(self.params, state=state)

    def release(self, state: DecodeState, slot: int) -> DecodeState:
        return self._compiled.get(("release", 0), self._release)(state=state, slot=np.int32(slot))

    def warmup(self) -> float:
        """Compile (ahead of time) every prefill bucket, insert, generate and release.

        Nothing is executed: the compiled executables are kept and called directly, so
        serving never traces or compiles, and with JAX's persistent cache a restart only
        traces and loads. Returns seconds taken.
        """
        t0 = time.perf_counter()
        state = self._state_shape
        row = SlotSampling.from_params(SamplingParams(), 0)
        slot = np.int32(0)
        for b in self.buckets:
            tb = time.perf_counter()
            lowered = self._prefill.lower(self.params, np.zeros((b,), np.int32), np.int32(1), row)
            self._compiled[("prefill", b)] = lowered.compile()
            self._compiled[("insert", b)] = self._insert.lower(lowered.out_info, state=state, slot=slot).compile()
            log.info("compiled prefill+insert bucket %d in %.1fs", b, time.perf_counter() - tb)
        tb = time.perf_counter()
        self._compiled[("generate", 0)] = self._generate.lower(self.params, state=state).compile()
        self._compiled[("release", 0)] = self._release.lower(state=state, slot=slot).compile()
        log.info("compiled generate in %.1fs", time.perf_counter() - tb)
        return time.perf_counter() - t0
