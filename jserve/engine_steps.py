"""The engine's compiled computations: the decode state and the pure step functions ``JaxEngine``
jits (engine.py), each taking the state and returning the next one.

``_begin`` starts a request in a slot, ``_copy`` copies KV pages, ``_extend`` runs prompt chunks
(sampling a first token where a prompt ends), ``_decode_rows`` is the decode step (``_generate``
without drafts, ``_verify`` with them), ``_resume`` and ``_release`` make a slot live again or free
it; ``_pack`` lays a step's tokens and logprobs out in one array (``engine_api.RESULT_COLS``) and
``apply_bitmask`` applies structured output's allowed tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jserve import model
from jserve.config import ModelConfig
from jserve.kv_cache import PagedKVCache, copy_pages
from jserve.model import Params
from jserve.sampling import SlotSampling, apply_penalties, sample, top_k


@struct.dataclass
class DecodeState:
    """Everything that lives on device between decode steps. ``[S]`` unless noted."""

    cache: PagedKVCache  # pages [P, K, B, H] per layer
    table: jax.Array  # [S, M] int32: the page of each slot's block i (``kv_pages.PagePool``; P: none)
    lengths: jax.Array  # tokens already in the cache = position of ``last_tokens``
    last_tokens: jax.Array  # the token to feed next
    steps: jax.Array  # tokens generated so far (indexes the PRNG key)
    active: jax.Array  # bool
    sampling: SlotSampling
    seen: jax.Array  # [S, V] bool: token in prompt or output (repetition penalty)
    counts: jax.Array  # [S, V] int32: occurrences in output (presence/frequency penalties)


def _pack(tokens: jax.Array, raw_logits: jax.Array, active: jax.Array, logprobs: jax.Array,
          top_n: int) -> jax.Array:
    """One float32 array ``[B, 3 + 2 top_n]``: token, logprob, active, top ids, top logprobs.

    ``logprobs [B]`` is what each row asked for (``SlotSampling.logprobs``): in a step where no
    active row asked, no log-softmax is computed, and no top-k where none asked for alternatives
    (those columns are then zero)."""
    b = tokens.shape[0]
    wants = active & (logprobs >= 0)

    def with_logprobs(_):
        logp = _log_softmax(raw_logits)
        chosen = jnp.where(wants, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0], 0.0)
        if not top_n:
            return chosen, jnp.zeros((b, 0), jnp.float32)

        def tops(_):
            vals, ids = top_k(logp, top_n)
            # Zeros in the rows that did not ask, whoever else did: a row's result is its own.
            alt = jnp.concatenate([ids.astype(jnp.float32), vals], axis=-1)
            return jnp.where((wants & (logprobs > 0))[:, None], alt, 0.0)

        alt = jax.lax.cond(jnp.any(wants & (logprobs > 0)), tops,
                           lambda _: jnp.zeros((b, 2 * top_n), jnp.float32), None)
        return chosen, alt

    chosen, alt = jax.lax.cond(jnp.any(wants), with_logprobs,
                               lambda _: (jnp.zeros((b,), jnp.float32), jnp.zeros((b, 2 * top_n), jnp.float32)),
                               None)
    cols = [tokens.astype(jnp.float32)[:, None], chosen[:, None], active.astype(jnp.float32)[:, None], alt]
    return jnp.concatenate(cols, axis=-1)


def _log_softmax(logits: jax.Array) -> jax.Array:
    """``jax.nn.log_softmax`` over ``[B, V]`` with the sum in a fixed order (``model.pairwise_sum``):
    XLA:CPU's own sum gave a one-row call other bits than a row of a larger one."""
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    return shifted - jnp.log(model.pairwise_sum(jnp.exp(shifted)))[:, None]


def apply_bitmask(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """``logits [B, V]`` with tokens whose bit is clear in ``mask [B, ceil(V/32)]`` (int32, bit i of
    word w = token 32 w + i) set to -inf. A step where every bit is set costs one comparison."""
    def masked(lg: jax.Array) -> jax.Array:
        bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
        allowed = bits.reshape(mask.shape[0], -1)[:, :lg.shape[1]] != 0
        return jnp.where(allowed, lg, -jnp.inf)

    return jax.lax.cond(jnp.any(mask != -1), masked, lambda lg: lg, logits)


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def _cache_len(state: DecodeState) -> int:
    """Positions a slot can address: its page-table row's pages."""
    return state.table.shape[1] * state.cache.page_size


def _begin(state: DecodeState, slot: jax.Array, prompt: jax.Array, n: jax.Array,
           sampling: SlotSampling) -> DecodeState:
    """Start a request in ``slot``: its sampling row and penalty tables (``prompt [T]`` padded,
    ``n`` long). The slot stays inactive (decode steps skip it) until its last chunk is run."""
    v = state.seen.shape[1]
    seen_row = jnp.zeros((v,), bool).at[jnp.where(jnp.arange(prompt.shape[0]) < n, prompt, v)].set(True, mode="drop")
    return state.replace(
        lengths=state.lengths.at[slot].set(_cache_len(state)),
        steps=state.steps.at[slot].set(0),
        active=state.active.at[slot].set(False),
        sampling=state.sampling.set_row(slot, sampling),
        seen=state.seen.at[slot].set(seen_row),
        counts=state.counts.at[slot].set(jnp.zeros((v,), jnp.int32)),
    )


def _copy(state: DecodeState, src: jax.Array, dst: jax.Array, n: jax.Array) -> DecodeState:
    """Page ``src[i]`` onto page ``dst[i]`` for ``i < n`` (``[M]`` each; a ``dst`` of P is skipped)."""
    return state.replace(cache=copy_pages(state.cache, src, dst, n))


def _extend(params: Params, state: DecodeState, tokens: jax.Array, slots: jax.Array, starts: jax.Array,
            counts: jax.Array, finals: jax.Array, masks: jax.Array, *, cfg: ModelConfig, top_n: int,
            out_rows: int | None) -> tuple[DecodeState, jax.Array]:
    """Run rows of prompt chunks into their slots; sample the first token of rows that end a prompt.

    With ``out_rows`` the first tokens' logits always come from that many rows (padded), so a
    request's first token is computed by the same shapes whichever row bucket its last chunk ran
    in; None where every op is row-invariant (the call's own rows). ``masks [out_rows or R, W]``."""
    r = tokens.shape[0]
    out_rows = out_rows or r
    furthest = jnp.max(jnp.where(counts > 0, starts + counts - 1, 0))
    n_blocks = furthest // state.cache.page_size + 1
    x, cache = model.extend(params, cfg, tokens, slots, starts, counts, state.cache, n_blocks, state.table)
    last = x[jnp.arange(r), jnp.maximum(counts - 1, 0)]  # [R, D]
    pad = out_rows - r
    last = jnp.pad(last, ((0, pad), (0, 0)))
    rows_slot = jnp.pad(slots, (0, pad))
    final = jnp.pad(finals & (counts > 0), (0, pad))
    logits = model.unembed(params, cfg, last)  # [out_rows, V]
    sp = jax.tree.map(lambda a: a[rows_slot], state.sampling)
    penalized = apply_penalties(logits, sp, state.seen[rows_slot], state.counts[rows_slot])
    penalized = apply_bitmask(penalized, masks)
    first = jnp.where(final, sample(penalized, sp, jnp.zeros((out_rows,), jnp.int32)), 0)
    idx = jnp.where(final, rows_slot, state.lengths.shape[0])  # rows that end no prompt write nothing
    ends = jnp.pad(starts + counts, (0, pad))
    new_state = state.replace(
        cache=cache,
        lengths=state.lengths.at[idx].set(ends, mode="drop"),
        last_tokens=state.last_tokens.at[idx].set(first, mode="drop"),
        steps=state.steps.at[idx].set(1, mode="drop"),
        active=state.active.at[idx].set(True, mode="drop"),
        seen=state.seen.at[idx, first].set(True, mode="drop"),
        counts=state.counts.at[idx, first].set(1, mode="drop"),
    )
    return new_state, _pack(first, logits, final, sp.logprobs, top_n)


def _decode_rows(params: Params, state: DecodeState, slots: jax.Array, drafts: jax.Array, n_draft: jax.Array,
                 live: jax.Array, masks: jax.Array | None, *, cfg: ModelConfig,
                 top_n: int) -> tuple[DecodeState, jax.Array]:
    """A decode step over rows of slots, each with its drafted tokens: ``generate`` (no drafts,
    width 1) and ``verify`` are this one computation, so they give the same bits.

    Row r runs slot ``slots[r]``'s last token and its ``n_draft[r]`` drafted tokens ``drafts[r]``
    (``[R, k]``) at positions ``length..length + n_draft`` (``extend``: causal within the row, keys
    and values written for all). At each position j the model's own token ``x_j`` is drawn exactly
    as a decode step would draw it there (penalties counting the drafts before it, the key of that
    step). The row keeps ``x_0..x_a`` where ``a`` is the number of leading drafts equal to the
    model's token: as long as the drafts agree, ``x_j`` is the token decoding would have produced
    with the same prefix, and ``x_a`` is the model's own token after the agreed prefix. So the
    output is the one plain decoding gives, for greedy and seeded sampling alike (for sampling
    this is speculative sampling's acceptance rule with a single-token draft: a draft is kept with
    probability p(draft), and a rejected one is replaced by a draw from p without it). Keys/values
    past the kept tokens are left behind and overwritten later. Rows with ``live`` false, or whose
    slot is inactive, are padding (they write nothing). Every op computes a row from that row's
    inputs only, by the same instructions whatever ``R`` (row-invariant kernels on CPU), so a
    slot's bits do not depend on which or how many rows share the call. ``masks [R, W]``: allowed
    tokens per row (``apply_bitmask``; width 1 only), None for all. Returns the state and
    ``[R, k + 1, RESULT_COLS + 2 top_n]``, ``ACTIVE`` set on the kept positions.
    """
    r, k = drafts.shape
    c = k + 1
    s_, v = state.seen.shape
    t = _cache_len(state)
    live = live & state.active[slots]
    starts = state.lengths[slots]
    counts = jnp.where(live, 1 + n_draft, 0)
    tokens = jnp.concatenate([state.last_tokens[slots][:, None], drafts], axis=1)  # [R, C]
    furthest = jnp.max(jnp.where(live, starts + counts - 1, 0))
    n_blocks = jnp.minimum(furthest, t - 1) // state.cache.page_size + 1
    x, cache = model.extend(params, cfg, tokens, slots, starts, counts, state.cache, n_blocks, state.table)
    logits = model.unembed(params, cfg, x).reshape(r * c, v)  # position j of row r at r * C + j
    sp = jax.tree.map(lambda a: jnp.repeat(a[slots], c, axis=0), state.sampling)
    j = jnp.arange(c)

    def penalize(lg: jax.Array) -> jax.Array:
        # Position j counts the drafts before it as output: [R, C, V] one-hot counts, cumulated.
        valid = j[None, :k] < n_draft[:, None]  # [R, k]
        hot = jax.nn.one_hot(jnp.where(valid, drafts, v), v, dtype=jnp.int32)  # [R, k, V]
        before = jnp.concatenate([jnp.zeros((r, 1, v), jnp.int32), jnp.cumsum(hot, axis=1)], axis=1)
        cnt = (state.counts[slots][:, None] + before).reshape(r * c, v)
        seen = (state.seen[slots][:, None] | (before > 0)).reshape(r * c, v)
        return apply_penalties(lg, sp, seen, cnt)

    any_penalty = jnp.any((sp.repetition_penalty != 1.0) | (sp.presence_penalty != 0.0)
                          | (sp.frequency_penalty != 0.0))
    penalized = jax.lax.cond(any_penalty, penalize, lambda lg: lg, logits)
    if masks is not None:
        penalized = apply_bitmask(penalized, masks)
    steps = (state.steps[slots][:, None] + j[None]).reshape(r * c)
    drawn = sample(penalized, sp, steps).reshape(r, c)  # x_j
    agree = (drawn[:, :k] == drafts) & (j[None, :k] < n_draft[:, None])
    accepted = jnp.sum(jnp.cumprod(agree, axis=1), axis=1)  # a: leading drafts the model agrees with
    keep = live[:, None] & (j[None, :] <= accepted[:, None])  # [R, C]
    out = jnp.where(keep, drawn, 0)
    emitted = jnp.where(live, accepted + 1, 0)
    idx = jnp.where(live, slots, s_)  # padding rows write nothing
    last = jnp.take_along_axis(drawn, accepted[:, None], axis=1)[:, 0]
    hot_idx = jnp.where(keep, jnp.broadcast_to(slots[:, None], (r, c)), s_)
    new_state = state.replace(
        cache=cache,
        lengths=state.lengths.at[idx].add(emitted, mode="drop"),
        last_tokens=state.last_tokens.at[idx].set(last, mode="drop"),
        steps=state.steps.at[idx].add(emitted, mode="drop"),
        seen=state.seen.at[hot_idx, out].set(True, mode="drop"),
        counts=state.counts.at[hot_idx, out].add(1, mode="drop"),
    )
    packed = _pack(out.reshape(r * c), logits, keep.reshape(r * c), sp.logprobs, top_n)
    return new_state, packed.reshape(r, c, -1)


def _generate(params: Params, state: DecodeState, slots: jax.Array, live: jax.Array, masks: jax.Array, *,
              cfg: ModelConfig, top_n: int) -> tuple[DecodeState, jax.Array]:
    """One token for each live slot of ``slots [R]``: ``_decode_rows`` without drafts. Returns the
    state and ``[R, RESULT_COLS + 2 top_n]`` (row r: slot ``slots[r]``'s token)."""
    none = jnp.zeros((slots.shape[0], 0), jnp.int32)
    state, packed = _decode_rows(params, state, slots, none, jnp.zeros_like(slots), live, masks, cfg=cfg, top_n=top_n)
    return state, packed[:, 0]


def _verify(params: Params, state: DecodeState, slots: jax.Array, drafts: jax.Array, n_draft: jax.Array,
            live: jax.Array, *, cfg: ModelConfig, top_n: int) -> tuple[DecodeState, jax.Array]:
    """A decode step that also checks drafted tokens (speculative decoding): ``_decode_rows``."""
    return _decode_rows(params, state, slots, drafts, n_draft, live, None, cfg=cfg, top_n=top_n)


def _resume(state: DecodeState, slot: jax.Array, last: jax.Array, length: jax.Array, steps: jax.Array,
            counts: jax.Array) -> DecodeState:
    """Make ``slot`` live again as it was when preempted, its tokens run in again by ``extend``
    (non-final rows; ``_begin`` marked every one of them seen): ``last`` to feed at position
    ``length``, ``steps`` tokens generated (the PRNG's step), ``counts [V]`` their occurrences."""
    return state.replace(
        lengths=state.lengths.at[slot].set(length),
        last_tokens=state.last_tokens.at[slot].set(last),
        steps=state.steps.at[slot].set(steps),
        active=state.active.at[slot].set(True),
        counts=state.counts.at[slot].set(counts),
    )


def _release(state: DecodeState, slot: jax.Array) -> DecodeState:
    return state.replace(
        active=state.active.at[slot].set(False),
        sampling=state.sampling.replace(temperature=state.sampling.temperature.at[slot].set(0.0)),
    )

def _take_rows(packed: jax.Array, rows: jax.Array) -> jax.Array:
    """``packed [S, cols]`` at ``rows [S]``."""
    return packed[rows]
