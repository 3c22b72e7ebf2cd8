"""Sampling parameters and the on-device, per-slot sampler.

Every slot carries its own parameters and PRNG key, and each row of the batch is sampled
independently (``vmap``), so a request's tokens do not depend on what else is in the batch.
The key of a request's ``i``-th token is ``fold_in(key(seed), i)``: the same seed and prompt
give the same output whenever, wherever the request runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jserve.constraint import Constraint
from jserve.errors import (  # InvalidRequestError: re-exported
    ARRAY_TOO_LONG,
    INVALID_TYPE,
    INVALID_VALUE,
    OBJECT_TOO_LARGE,
    STRING_TOO_LONG,
    InvalidRequestError,
    range_code,
)

# Bounds on what a client controls (besides the prompt, bounded by the engine's max_prompt_len).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1000
MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID_CHARS = 256
MAX_CHAT_MESSAGES = 1024
# logit_bias: at most this many (token id, bias) pairs per request, each bias in [-100, 100]
# (OpenAI's bounds). Every slot carries a row of this many pairs, so the shape never changes.
MAX_LOGIT_BIAS = 300
LOGIT_BIAS_LIMIT = 100.0
# The token id of an unused pair: past any vocabulary, so the scatter drops it (adds nothing).
BIAS_PAD_ID = 2**31 - 1



@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops.

    ``temperature`` 0 means greedy. ``top_k`` 0 and ``top_p`` 1 and ``min_p`` 0 disable those
    filters; ``top_p`` 0 (OpenAI's API takes it) keeps the most likely token alone, as greedy
    does, whatever the temperature. ``repetition_penalty`` (1 = off) divides positive / multiplies negative logits of
    tokens seen in the prompt or output; ``presence_penalty`` and ``frequency_penalty``
    (0 = off) subtract from the logits of tokens already generated, once / per occurrence.
    ``stop`` strings end the text just before the stop string. ``logprobs``: None (the default)
    computes no log-probabilities at all; 0 reports the chosen token's; n > 0 also the n most
    likely alternatives per token. ``logit_bias``: (token id, bias) pairs added to the logits
    before sampling, after the penalties and the structured-output mask (OpenAI's semantics:
    -100 / 100 in effect ban / force a token; a masked token stays masked whatever its bias).
    Reported log-probabilities are the model's own, before penalties and bias, as elsewhere.
    """

    max_tokens: int | None = None  # None: the rest of the context (resolved by ``jserve.request``)
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
    logprobs: int | None = None
    constraint: Constraint | None = None  # structured output (``jserve.constraint``); host side only
    speculate: bool | None = None  # speculative decoding for this request; None: the server's default
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Detokenize the output without its special tokens (True, the default) or with them: a tool
    # call's marker may be a special token (``jserve.tools``' ``ToolPlan.keep_special_tokens``).
    skip_special_tokens: bool = True

    def validate(self, vocab_size: int, max_logprobs: int) -> None:
        def outside(msg: str, integer: bool, below: bool) -> None:  # a number past one of its bounds
            raise InvalidRequestError(msg, range_code(integer, below))

        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            outside(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", True, True)
        if not math.isfinite(self.temperature):
            raise InvalidRequestError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}",
                                      INVALID_VALUE)
        if self.temperature < 0:
            outside(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}", False, True)
        if self.top_k < 0:
            outside(f"top_k must be >= 0 (0 = off), got {self.top_k}", True, True)
        if not (0.0 <= self.top_p <= 1.0):  # 0, as OpenAI takes it: the most likely token only
            outside(f"top_p must be in [0, 1] (0 = the most likely token only), got {self.top_p}", False,
                    not self.top_p >= 0.0)
        if not (0.0 <= self.min_p <= 1.0):
            outside(f"min_p must be in [0, 1], got {self.min_p}", False, not self.min_p >= 0.0)
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            outside(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}", False,
                    not self.repetition_penalty > 0)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not math.isfinite(v) or not -2.0 <= v <= 2.0:
                outside(f"{name} must be in [-2, 2], got {v}", False, not v >= -2.0)
        if self.seed is not None and not 0 <= self.seed < 2**64:
            outside(f"seed must be in [0, 2**64), got {self.seed}", True, self.seed < 0)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings", param="stop")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings are accepted, got {len(self.stop)}",
                                      ARRAY_TOO_LONG, "stop")
        lengths = [len(s) for s in self.stop]
        longest = max(lengths, default=0)
        if longest > MAX_STOP_CHARS:
            raise InvalidRequestError(f"stop strings may have at most {MAX_STOP_CHARS} characters, got one of "
                                      f"{longest}", STRING_TOO_LONG, f"stop[{lengths.index(longest)}]")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are accepted, got "
                                      f"{len(self.stop_token_ids)}", ARRAY_TOO_LONG, "stop_token_ids")
        for i, t in enumerate(self.stop_token_ids):
            if not 0 <= t < vocab_size:
                raise InvalidRequestError(f"stop token id {t} is outside the vocabulary [0, {vocab_size})",
                                          INVALID_VALUE, f"stop_token_ids[{i}]")
        if self.logprobs is not None and not 0 <= self.logprobs <= max_logprobs:
            outside(f"logprobs must be in [0, {max_logprobs}] on this server, got {self.logprobs}", True,
                    self.logprobs < 0)
        validate_logit_bias(self.logit_bias, vocab_size)


def validate_logit_bias(pairs: object, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """``pairs`` (a mapping of token id → bias, ids as ints or decimal strings as JSON sends them,
    or a sequence of (id, bias) pairs) checked and returned as ``SamplingParams.logit_bias``.

    Refused with a precise ``InvalidRequestError``, each with OpenAI's error code and the field
    (or its entry, ``logit_bias.5``) it names: more than ``MAX_LOGIT_BIAS`` entries
    (``object_above_max_properties``), a key that is not a token id, an id outside [0,
    vocab_size), the same id twice, a bias that is not a finite number (``invalid_value``), a bias
    outside [-100, 100] (``range_code``)."""
    def bad(msg: str, code: str, param: str = "logit_bias") -> None:
        raise InvalidRequestError(msg, code, param)

    items = list(pairs.items()) if hasattr(pairs, "items") else list(pairs)  # type: ignore[union-attr]
    if len(items) > MAX_LOGIT_BIAS:
        bad(f"logit_bias may have at most {MAX_LOGIT_BIAS} entries, got {len(items)}", OBJECT_TOO_LARGE)
    out: list[tuple[int, float]] = []
    seen: set[int] = set()
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            bad(f"logit_bias entries must be (token id, bias) pairs, got {item!r}", INVALID_TYPE)
        key, value = item
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, numbers.Integral):
            bad(f"logit_bias keys must be token ids (integers), got {key!r}", INVALID_VALUE)
        at = f"logit_bias.{key}"  # the item, as a body's field inside an object is named (``stream_options.x``)
        if not 0 <= key < vocab_size:
            raise InvalidRequestError(f"logit_bias token id {key} is outside the vocabulary [0, {vocab_size})",
                                      INVALID_VALUE, at)
        if key in seen:
            raise InvalidRequestError(f"logit_bias gives token id {key} twice", INVALID_VALUE, at)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            bad(f"logit_bias values must be finite numbers, got {value!r} for token id {key}", INVALID_TYPE, at)
        if not math.isfinite(value):  # JSON's 1e400 is infinity (and Python's parser takes NaN)
            bad(f"logit_bias values must be finite numbers, got {value!r} for token id {key}", INVALID_VALUE, at)
        if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise InvalidRequestError(f"logit_bias values must be in [-100, 100], got {value} for token id {key}",
                                      range_code(False, value < -LOGIT_BIAS_LIMIT), at)
        seen.add(int(key))
        out.append((int(key), float(value)))
    return tuple(out)


def seed_to_key(seed: int) -> np.ndarray:
    """A raw threefry key ``[2] uint32`` from a 64-bit seed."""
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], dtype=np.uint32)


@struct.dataclass
class SlotSampling:
    """Per-slot sampling parameters, each ``[S]`` (``key``: ``[S, 2]`` raw threefry keys).

    ``logprobs`` is -1 for a slot that wants no log-probabilities, else ``SamplingParams.logprobs``.
    ``bias_ids`` / ``bias_values`` ``[S, MAX_LOGIT_BIAS]``: the slot's logit_bias pairs, the unused
    ones with id ``BIAS_PAD_ID`` (dropped by the scatter) and value 0."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    key: jax.Array
    logprobs: jax.Array
    bias_ids: jax.Array
    bias_values: jax.Array

    @classmethod
    def empty(cls, slots: int) -> SlotSampling:
        # Distinct buffers for every field: the state is donated, and one buffer may not be
        # donated twice.
        def f(x: float) -> jax.Array:
            return jnp.full((slots,), x, jnp.float32)

        return cls(temperature=f(0.0), top_k=jnp.zeros((slots,), jnp.int32), top_p=f(1.0), min_p=f(0.0),
                   repetition_penalty=f(1.0), presence_penalty=f(0.0), frequency_penalty=f(0.0),
                   key=jnp.zeros((slots, 2), jnp.uint32), logprobs=jnp.full((slots,), -1, jnp.int32),
                   bias_ids=jnp.full((slots, MAX_LOGIT_BIAS), BIAS_PAD_ID, jnp.int32),
                   bias_values=jnp.zeros((slots, MAX_LOGIT_BIAS), jnp.float32))

    @classmethod
    def from_params(cls, p: SamplingParams, seed: int) -> SlotSampling:
        """One row (shapes ``[1]``), built on the host."""
        def f(x: float) -> np.ndarray:
            return np.array([x], np.float32)

        ids = np.full((1, MAX_LOGIT_BIAS), BIAS_PAD_ID, np.int32)
        values = np.zeros((1, MAX_LOGIT_BIAS), np.float32)
        for i, (t, b) in enumerate(p.logit_bias):
            ids[0, i], values[0, i] = t, b
        return cls(temperature=f(p.temperature), top_k=np.array([p.top_k], np.int32), top_p=f(p.top_p),
                   min_p=f(p.min_p), repetition_penalty=f(p.repetition_penalty),
                   presence_penalty=f(p.presence_penalty), frequency_penalty=f(p.frequency_penalty),
                   key=seed_to_key(seed)[None],
                   logprobs=np.array([-1 if p.logprobs is None else p.logprobs], np.int32),
                   bias_ids=ids, bias_values=values)

    def set_row(self, slot: jax.Array, row: SlotSampling) -> SlotSampling:
        return jax.tree.map(lambda a, r: a.at[slot].set(r[0]), self, row)


def apply_penalties(logits: jax.Array, sp: SlotSampling, seen: jax.Array, counts: jax.Array) -> jax.Array:
    """``logits [B, V]``; ``seen [B, V]`` bool (prompt or output); ``counts [B, V]`` output counts.

    When no row has a penalty the logits pass through untouched (the formulas below leave such
    rows bitwise unchanged too, so skipping them changes no result, only the cost).
    """
    def penalize(lg: jax.Array) -> jax.Array:
        rep = sp.repetition_penalty[:, None]
        penalized = jnp.where(lg > 0, lg / rep, lg * rep)
        lg = jnp.where(seen, penalized, lg)
        c = counts.astype(jnp.float32)
        return lg - sp.frequency_penalty[:, None] * c - sp.presence_penalty[:, None] * (c > 0)

    any_penalty = jnp.any((sp.repetition_penalty != 1.0) | (sp.presence_penalty != 0.0)
                          | (sp.frequency_penalty != 0.0))
    return jax.lax.cond(any_penalty, penalize, lambda lg: lg, logits)


def apply_logit_bias(logits: jax.Array, sp: SlotSampling) -> jax.Array:
    """``logits [B, V]`` plus each row's logit_bias (``sp.bias_ids / bias_values [B, P]``).

    A row adds only its own pairs (padding ids fall outside the vocabulary and are dropped), so an
    unbiased row's logits are bitwise unchanged whatever its neighbours carry; a step where no row
    has a bias skips the scatter."""
    def add(lg: jax.Array) -> jax.Array:
        rows = jnp.broadcast_to(jnp.arange(lg.shape[0])[:, None], sp.bias_ids.shape)
        return lg.at[rows, sp.bias_ids].add(sp.bias_values, mode="drop")

    return jax.lax.cond(jnp.any(sp.bias_ids != BIAS_PAD_ID), add, lambda lg: lg, logits)


def greedy(logits: jax.Array) -> jax.Array:
    """Argmax ``[B, V] → [B]`` without a sort (first index among ties)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(logits == top, iota, logits.shape[-1]), axis=-1)


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k(x, k)`` of a float32 ``x [B, V]``, its values and indices, through the CPU
    kernel where the kernels run (``cpu_kernels.top_k``: the same bits, 3-4x faster than XLA:CPU's
    sort of each row for a 49k vocabulary); ``JSERVE_CPU_TOPK=0`` keeps XLA's."""
    import os

    from jserve.blocks import kernels_loaded

    if (x.ndim == 2 and x.dtype == jnp.float32 and os.environ.get("JSERVE_CPU_TOPK", "1").strip() != "0"
            and kernels_loaded()):
        from jserve import cpu_kernels

        return cpu_kernels.top_k(x, k)
    return jax.lax.top_k(x, k)


# Top candidates per sampled row (``top_k``, no sort of the vocabulary). A row whose filters
# keep only tokens among them is drawn from them; other rows take the full-vocabulary path.
CANDIDATES = 256
# Vocabulary entries per block of the two-level inverse-CDF draw over the full vocabulary.
DRAW_BLOCK = 256
BISECT_STEPS = 31  # 2**31 > the bit pattern of 1.0: the bisection ends on the exact threshold


def _draw(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Index drawn from each row of unnormalized ``weights [B, N]`` (>= 0, some > 0) by inverse CDF
    with ``u [B]`` in [0, 1): the first index whose running sum exceeds ``u`` · total."""
    cdf = jnp.cumsum(weights, axis=-1)
    idx = jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=-1)
    last = weights.shape[-1] - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)  # last index with weight
    return jnp.minimum(idx, last)


def _draw_blocked(weights: jax.Array, u: jax.Array) -> jax.Array:
    """``_draw`` over a wide row in two levels: pick a block by its mass, then an entry in it,
    so nothing runs a cumulative sum over the whole vocabulary."""
    b, n = weights.shape
    blk = DRAW_BLOCK
    nb = -(-n // blk)
    w = jnp.pad(weights, ((0, 0), (0, nb * blk - n))).reshape(b, nb, blk)
    mass = jnp.sum(w, axis=-1)  # [B, nb]
    chosen = _draw(mass, u)
    cum = jnp.cumsum(mass, axis=-1)
    before = jnp.take_along_axis(cum, chosen[:, None], axis=-1)[:, 0] - mass[jnp.arange(b), chosen]
    inner = jnp.take_along_axis(w, chosen[:, None, None], axis=1)[:, 0]  # [B, blk]
    target = u * cum[:, -1] - before
    frac = jnp.clip(target / jnp.maximum(mass[jnp.arange(b), chosen], 1e-30), 0.0, 1.0 - 1e-7)
    return chosen * blk + _draw(inner, frac)


def _bisect_thresholds(e: jax.Array, k: jax.Array, mass: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of ``e [B, V]`` (>= 0, max 1): the largest ``thr`` with at least ``k`` entries >= thr,
    and the largest with the entries >= thr summing to at least ``mass``. Exact: both bisect the bit
    patterns of non-negative float32 values (ordered as integers), ``BISECT_STEPS`` halvings."""
    def fold(_, bounds):
        (klo, khi), (plo, phi) = bounds  # int32 bit patterns; lo satisfies its condition, hi does not
        kmid, pmid = (klo + khi) // 2, (plo + phi) // 2
        kthr = jax.lax.bitcast_convert_type(kmid, jnp.float32)[:, None]
        pthr = jax.lax.bitcast_convert_type(pmid, jnp.float32)[:, None]
        kok = jnp.sum(e >= kthr, axis=-1) >= k
        pok = jnp.sum(jnp.where(e >= pthr, e, 0.0), axis=-1) >= mass
        return ((jnp.where(kok, kmid, klo), jnp.where(kok, khi, kmid)),
                (jnp.where(pok, pmid, plo), jnp.where(pok, phi, pmid)))

    lo = jnp.zeros(e.shape[:1], jnp.int32)  # thr 0 keeps everything
    hi = jnp.full(e.shape[:1], jax.lax.bitcast_convert_type(jnp.float32(1.0), jnp.int32) + 1)
    (klo, _), (plo, _) = jax.lax.fori_loop(0, BISECT_STEPS, fold, ((lo, hi), (lo, hi)))
    as_float = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.float32)
    return as_float(klo), as_float(plo)


def sample(logits: jax.Array, sp: SlotSampling, step: jax.Array) -> jax.Array:
    """Next tokens ``[B]`` for already-penalized ``logits [B, V]``; ``step [B]`` indexes the keys.

    Each row's logit_bias is added first (``apply_logit_bias``): here, not with the penalties,
    because every path (extend's first token, decode, verify) samples through this function.
    Greedy rows take the argmax. A sampled row applies temperature, then keeps the tokens that
    pass top-k (the ``top_k`` most likely), top-p (the most likely ones until their mass reaches
    ``top_p``) and min-p (probability >= ``min_p`` x the top one), all measured on the full
    softmax, and draws one of them by inverse CDF with a single uniform number per step. A row
    whose kept set lies within the ``CANDIDATES`` most likely tokens is drawn from those
    (``top_k``, no sort); any other row (plain temperature sampling, a wide nucleus) draws
    over the whole vocabulary in two levels. Nothing is sorted, and a row's token depends only on
    its own logits, parameters and key, never on which other rows shared the step. Tokens tied
    with the last kept one are all kept. The most likely token is always kept, so no filter leaves
    an empty set: ``top_p`` 0 keeps it alone (nothing divides by ``top_p``).
    """
    def stochastic(lg: jax.Array) -> jax.Array:
        keys = jax.vmap(jax.random.fold_in)(sp.key, step)
        return sample_with_uniform(lg, sp, jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys))

    return jax.lax.cond(jnp.any(sp.temperature > 0), stochastic, greedy, apply_logit_bias(logits, sp))


def sample_with_uniform(logits: jax.Array, sp: SlotSampling, u: jax.Array) -> jax.Array:
    """``sample`` given each row's uniform number ``u [B]`` in [0, 1) (tests drive it with a grid)."""
    b, v = logits.shape
    t, k, p, min_p = sp.temperature, sp.top_k, sp.top_p, sp.min_p
    sampled = t > 0
    filtered = (k > 0) | (p < 1.0) | (min_p > 0.0)
    scaled = logits / jnp.where(sampled, t, 1.0)[:, None]
    top = jnp.max(scaled, axis=-1)
    z = jnp.sum(jnp.exp(scaled - top[:, None]), axis=-1)
    c = min(CANDIDATES, v)

    def from_candidates(_):
        vals, ids = top_k(scaled, c)
        pc = jnp.exp(vals - top[:, None]) / z[:, None]  # [B, C], descending
        rank = jnp.arange(c)[None, :]
        keep = ((rank < jnp.where(k > 0, k, c)[:, None]) & (jnp.cumsum(pc, axis=-1) - pc < p[:, None])
                & (pc >= (min_p * pc[:, 0])[:, None])) | (rank == 0)
        fits = ((k > 0) & (k <= c)) | ~keep[:, -1]
        pick = _draw(jnp.where(keep, pc, 0.0), u)
        return jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0], fits

    tok_c, fits = jax.lax.cond(jnp.any(sampled & filtered), from_candidates,
                               lambda _: (jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool)), None)
    use_c = filtered & fits

    def from_vocab(_):
        e = jnp.exp(scaled - top[:, None])  # [B, V], the top token at 1
        wide_k = (k > c) & (k < v)
        bisect = sampled & ~use_c & (wide_k | (p < 1.0))
        zeros = jnp.zeros((b,), jnp.float32)
        thr_k, thr_p = jax.lax.cond(jnp.any(bisect), lambda _: _bisect_thresholds(e, k, p * z),
                                    lambda _: (zeros, zeros), None)
        thr = jnp.maximum(jnp.where(bisect & wide_k, thr_k, 0.0), jnp.where(bisect & (p < 1.0), thr_p, 0.0))
        thr = jnp.maximum(thr, min_p)
        return _draw_blocked(jnp.where(e >= thr[:, None], e, 0.0), u)

    tok_v = jax.lax.cond(jnp.any(sampled & ~use_c), from_vocab, lambda _: jnp.zeros((b,), jnp.int32), None)
    return jnp.where(sampled, jnp.where(use_c, tok_c, tok_v), greedy(logits))
