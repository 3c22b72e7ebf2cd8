"""Attention over a KV cache as pure functions: the per-layer spec (score scale, soft cap, sliding
window), dense attention for whole sequences, and the blockwise forms the engine uses — a decode
step reading fixed-size cache blocks up to the longest live sequence (``_attend_blocks``) and
prompt chunks written straight into their slots (``_attend_chunks``), both with sums in a fixed
order so a row's bits do not depend on the rest of the batch. ``jserve.model`` builds the layer
around these.

With a page pool (``table`` given) on CPU, both call sites in ``jserve.model`` run
``attend_paged_cpu`` instead where the row-invariant CPU kernels are built (``jserve.cpu_kernels``)
and the pool holds float32 or bfloat16 bits: one FFI call per layer in place of the blockwise
loop's ~15 XLA ops per page, each query's bits fixed by its position and its keys alone (so decode
and extend agree bitwise). ``JSERVE_CPU_ATTENTION=0`` (read when a step is traced) keeps the XLA
loops below, which stay the oracle the kernel is tested against and the path for the slot layout,
other pool dtypes and machines without the kernels.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jserve.config import ModelConfig
from jserve.kv_cache import QUANT, dequantize, read_pages

# Cache positions per decode-attention block (``_attend_blocks``): measured on XLA:CPU at
# 16 slots x ~1,000 live positions, 64 and 128 were fastest, 256 1.4x and 512 2.4x slower.
ATTN_BLOCK = 128


class AttnSpec(NamedTuple):
    """What differs between layers' attention: the score scale, soft cap and sliding window."""

    scale: float
    softcap: float | None
    window: int | None


def attn_spec(cfg: ModelConfig, layer: int) -> AttnSpec:
    scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(cfg.head_dim)
    return AttnSpec(scale, cfg.attn_softcap, cfg.window(layer))


def _cap(s: jax.Array, cap: float | None) -> jax.Array:
    return s if cap is None else cap * jnp.tanh(s / cap)


def _in_window(kpos: jax.Array, qpos: jax.Array, window: int | None) -> jax.Array:
    """Key position ``kpos`` is visible from query position ``qpos``: at or before it, and inside
    the window (the query and the ``window - 1`` positions before it)."""
    ok = kpos <= qpos
    return ok if window is None else ok & (kpos > qpos - window)


def _first_block(first_pos: jax.Array, window: int | None, block: int) -> jax.Array:
    """The first cache block any query from ``first_pos`` on can see: 0, or with a sliding window
    the block holding ``first_pos - window + 1`` (earlier blocks are wholly outside every window)."""
    if window is None:
        return jnp.zeros((), jnp.int32)
    return (jnp.maximum(first_pos - window + 1, 0) // block).astype(jnp.int32)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, spec: AttnSpec) -> jax.Array:
    """``q [B, T, K, G, H]``, ``k/v [B, S, K, H]``, ``mask [B, T, S]`` → ``[B, T, K, G, H]``."""
    s = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * spec.scale
    s = jnp.where(mask[:, None, None], _cap(s, spec.softcap), -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", p, v)


def _attend_step(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, spec: AttnSpec) -> jax.Array:
    """One query per slot against the whole cache, masked: ``q [S, K, G, H]``, ``k/v [S, K, T, H]``,
    ``mask [S, T]`` → ``[S, K, G, H]``. Its cost follows ``T``; serving uses ``_attend_blocks``,
    and this dense form stays as the reference the tests hold the blocked one to."""
    qf = q.astype(jnp.float32)[:, :, :, None, :]  # [S, K, G, 1, H]
    s = jnp.sum(qf * widen(k[:, :, None]), axis=-1) * spec.scale  # [S, K, G, T]
    s = jnp.where(mask[:, None, None], _cap(s, spec.softcap), -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.sum(p[..., None] * widen(v[:, :, None]), axis=3)  # [S, K, G, H]
    return out.astype(q.dtype)


def widen(x: jax.Array) -> jax.Array:
    """Keys or values read from the cache as float32, exactly: a bfloat16 cache's ``uint16`` bits
    (``kv_cache.storage``) are the top half of their float32, shifted into place; an int8 cache's
    ``[..., H + 4]`` rows are values times their scale (``kv_cache.dequantize``) → ``[..., H]``."""
    if x.dtype == QUANT:
        return dequantize(x)
    if x.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.uint32) << 16, jnp.float32)
    return x.astype(jnp.float32)


def attention_block(cache_len: int) -> int:
    """Positions per attention block for a cache of ``cache_len`` (which it divides)."""
    return min(ATTN_BLOCK, cache_len)


def padded_cache_len(max_len: int) -> int:
    """``max_len`` rounded up to whole attention blocks: the length the cache is allocated with."""
    b = attention_block(max_len)
    return -(-max_len // b) * b


def _attend_blocks(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                   n_blocks: jax.Array, spec: AttnSpec, table: jax.Array | None = None,
                   heads_first: bool = False) -> jax.Array:
    """One query per slot against the first ``n_blocks`` blocks of the cache, with an online softmax.

    ``q [S, K, G, H]``, ``k/v [S, K, T, H]``, ``positions [S]`` (slot s attends to ``0..positions[s]``,
    or to its window; inactive slots have position ``T``), ``n_blocks`` a traced scalar →
    ``[S, K, G, H]``. The work follows the longest live sequence, not ``T``; with a sliding window
    it starts at the first block inside the earliest live slot's window. Blocks have a fixed size
    and are folded in one after another, and a block wholly outside a slot's view adds exact zeros
    (its scores are -inf, the running max and sum are multiplied by exactly 1): a slot's result is
    bitwise the same however many blocks its neighbours need. With ``table [S, M]`` the cache is a
    page pool ``k/v [P, K, B, H]`` (``heads_first``: ``[K, P, B, H]``) and slot s's block i is page
    ``table[s, i]`` (``kv_cache``).
    """
    s_, kh, g, h = q.shape
    b = k.shape[2] if table is not None else attention_block(k.shape[2])
    qf = q.astype(jnp.float32) * spec.scale
    offsets = jnp.arange(b)

    def fold(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]):
        m, denom, acc = carry
        start = i * b
        if table is None:
            kb = widen(jax.lax.dynamic_slice_in_dim(k, start, b, axis=2))  # [S, K, B, H]
            vb = widen(jax.lax.dynamic_slice_in_dim(v, start, b, axis=2))
        else:
            pages = table[:, jnp.minimum(i, table.shape[1] - 1)]
            kb, vb = widen(read_pages(k, pages, heads_first)), widen(read_pages(v, pages, heads_first))
        s = _cap(jnp.sum(qf[:, :, :, None, :] * kb[:, :, None], axis=-1), spec.softcap)  # [S, K, G, B]
        valid = _in_window((start + offsets)[None, :], positions[:, None], spec.window)  # [S, B]
        s = jnp.where(valid[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a slot with nothing valid yet
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        denom = denom * alpha + jnp.sum(p, axis=-1)
        acc = acc * alpha[..., None] + jnp.einsum("skgb,skbh->skgh", p, vb)
        return m_new, denom, acc

    init = (jnp.full((s_, kh, g), -jnp.inf, jnp.float32), jnp.zeros((s_, kh, g), jnp.float32),
            jnp.zeros((s_, kh, g, h), jnp.float32))
    first = _first_block(jnp.min(positions), spec.window, b)
    _, denom, acc = jax.lax.fori_loop(first, n_blocks, fold, init)
    return (acc / jnp.where(denom > 0, denom, 1.0)[..., None]).astype(q.dtype)


def paged_kernel(k: jax.Array) -> bool:
    """Whether attention over a page pool like ``k`` runs the CPU kernel here (see the module
    docstring): kernels loaded (CPU backend), a float32 or bfloat16-bits pool, not switched off."""
    if os.environ.get("JSERVE_CPU_ATTENTION", "1").strip() == "0":
        return False
    if k.dtype not in (jnp.float32, jnp.uint16):  # int8 pages etc.: the XLA path
        return False
    from jserve.blocks import kernels_loaded

    return kernels_loaded()


def attend_paged_cpu(q: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array, positions: jax.Array,
                     spec: AttnSpec, table: jax.Array, layer: jax.Array | None = None) -> jax.Array:
    """``_attend_chunks`` over a page pool through ``cpu_kernels.paged_attention`` (``paged_kernel``
    must hold): ``q [R, C, K, G, H]``, ``positions [R, C]`` → ``[R, C, K, G, H]`` in q's dtype. A
    query reads only its own pages, so neither ``n_blocks`` nor ``first_pos`` is needed. ``layer``:
    the pools are stacked ``[L, P, K, B, H]`` and that layer is read in place."""
    from jserve import cpu_kernels

    out = cpu_kernels.paged_attention(q, positions, k, v, table, slots, scale=spec.scale, softcap=spec.softcap,
                                      window=spec.window, layer=layer)
    return out.astype(q.dtype)


def pairwise_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis as a fixed tree of elementwise adds (padded with zeros to a power of
    two). ``jnp.sum``'s order of additions is XLA's choice and changed with the number of rows on
    XLA:CPU (one ulp at 16 rows of 32 queries); this one is the same for any shape."""
    n = x.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - n)])
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def _attend_chunks(q: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array, positions: jax.Array,
                   n_blocks: jax.Array, first_pos: jax.Array, spec: AttnSpec,
                   table: jax.Array | None = None, heads_first: bool = False) -> jax.Array:
    """Rows of queries against their slots' caches, block by block with an online softmax.

    ``q [R, C, K, G, H]`` (row r: ``C`` consecutive positions of slot ``slots[r]``), ``k/v [S, K, T, H]``,
    ``positions [R, C]`` (a query attends to its slot's positions ``0..position``, or to its window),
    ``n_blocks`` a traced scalar covering every row, ``first_pos`` the least position of a real
    query (with a window, blocks wholly before its window are not read) → ``[R, C, K, G, H]``. As in
    ``_attend_blocks``, a block outside a query's view adds exact zeros, so a query's result does not
    depend on which blocks the call reads. With ``table [S, M]`` the cache is a page pool
    ``k/v [P, K, B, H]`` (``heads_first``: ``[K, P, B, H]``): row r's block i is page
    ``table[slots[r], i]`` (``_attend_blocks``).
    """
    r, c, kh, g, h = q.shape
    b = k.shape[2] if table is not None else attention_block(k.shape[2])
    qf = (q.astype(jnp.float32) * spec.scale).transpose(0, 2, 3, 1, 4).reshape(r, kh, g * c, h)
    qpos = jnp.broadcast_to(positions[:, None, :], (r, g, c)).reshape(r, g * c)  # [R, GC]
    offsets = jnp.arange(b)

    def fold(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]):
        m, denom, acc = carry
        start = i * b
        if table is None:
            kb = widen(jnp.take(jax.lax.dynamic_slice_in_dim(k, start, b, axis=2), slots, axis=0))
            vb = widen(jnp.take(jax.lax.dynamic_slice_in_dim(v, start, b, axis=2), slots, axis=0))
        else:  # [R, K, B, H]: each row's page of block i
            pages = table[slots, jnp.minimum(i, table.shape[1] - 1)]
            kb, vb = widen(read_pages(k, pages, heads_first)), widen(read_pages(v, pages, heads_first))
        # Products and fixed-order sums, not dots: XLA:CPU's dot changed a query's bits with the
        # number of rows and queries per row; these are the same for any shape.
        s = _cap(pairwise_sum(qf[:, :, :, None, :] * kb[:, :, None]), spec.softcap)  # [R, K, GC, B]
        valid = _in_window((start + offsets)[None, None, :], qpos[:, :, None], spec.window)  # [R, GC, B]
        s = jnp.where(valid[:, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        denom = denom * alpha + pairwise_sum(p)
        pv = pairwise_sum(p[:, :, :, None, :] * vb.transpose(0, 1, 3, 2)[:, :, None])  # [R, K, GC, H]
        acc = acc * alpha[..., None] + pv
        return m_new, denom, acc

    init = (jnp.full((r, kh, g * c), -jnp.inf, jnp.float32), jnp.zeros((r, kh, g * c), jnp.float32),
            jnp.zeros((r, kh, g * c, h), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(_first_block(first_pos, spec.window, b), n_blocks, fold, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]  # [R, K, GC, H]
    return out.reshape(r, kh, g, c, h).transpose(0, 3, 1, 2, 4).astype(q.dtype)
