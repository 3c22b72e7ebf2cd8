"""The two attention steps over a KV cache that ``jserve.model``'s layers call: the decode step's
(``_attend_step_cache``: one query per slot) and ``extend``'s (``_attend_chunks_cache``: rows of
prompt chunks). Each writes the new keys and values into the cache first (reading the donated cache
before writing would make XLA copy it), then attends through the pool's kernel where it does the
layer: the row-invariant CPU kernel on a ``[P, K, B, H]`` pool of float32 or bfloat16 bits, a Pallas
kernel on a ``[K, P, B, H]`` pool (one-position rows), else XLA's blockwise loops (``attention``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jserve.attention import (
    AttnSpec,
    _attend_blocks,
    _attend_chunks,
    _attend_step,
    _in_window,
    attend_paged_cpu,
    paged_kernel,
)
from jserve.attention_kernels import layer_impl, pool_decode
from jserve.config import ModelConfig
from jserve.kv_cache import write_chunks, write_paged, write_paged_layer, write_step


def _attend_step_cache(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttnSpec, ck: jax.Array, cv: jax.Array,
                       aux: tuple, cfg: ModelConfig, kernel: str = "xla"):
    """``decode_step``'s attention: ``q [S, 1, N, H]``, ``k/v [S, 1, K, H]`` at ``aux = (positions [S],
    n_blocks)``. Written before attending: reading the donated cache first would make XLA copy it.
    ``kernel``: the page pool's decode attention (``_with_kernel``; a layer it cannot do is XLA's)."""
    positions, n_blocks, table = aux
    s_, t = q.shape[0], ck.shape[2]
    if table is not None:  # a page pool (``kv_cache.PagedKVCache``)
        slots, heads_first = jnp.arange(s_), kernel != "xla"
        ck = write_paged(ck, k[:, 0], table, slots, positions, heads_first)
        cv = write_paged(cv, v[:, 0], table, slots, positions, heads_first)
        if layer_impl(kernel, spec.window, cfg.head_dim, ck.shape[2]) != "xla":
            lengths = jnp.where(positions < table.shape[1] * ck.shape[2], positions + 1, 0)
            o = pool_decode(q[:, 0], ck, cv, table, lengths, scale=spec.scale, softcap=spec.softcap, kernel=kernel)
            return o.reshape(s_, 1, cfg.n_heads * cfg.head_dim), (ck, cv)
        q = q.reshape(s_, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim)
        if not heads_first and paged_kernel(ck):  # the row-invariant CPU kernel, bitwise what extend gives
            o = attend_paged_cpu(q[:, None], ck, cv, slots, positions[:, None], spec, table)
        else:
            o = _attend_blocks(q, ck, cv, positions, n_blocks, spec, table, heads_first)
        return o.reshape(s_, 1, cfg.n_heads * cfg.head_dim), (ck, cv)
    ck = write_step(ck, k[:, 0], positions)
    cv = write_step(cv, v[:, 0], positions)
    q = q.reshape(s_, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim)
    if n_blocks is None:
        mask = _in_window(jnp.arange(t)[None, :], positions[:, None], spec.window)  # [S, T]
        o = _attend_step(q, ck, cv, mask, spec)
    else:
        o = _attend_blocks(q, ck, cv, positions, n_blocks, spec)
    return o.reshape(s_, 1, cfg.n_heads * cfg.head_dim), (ck, cv)


def _attend_chunks_cache(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttnSpec, ck: jax.Array, cv: jax.Array,
                         aux: tuple, cfg: ModelConfig, kernel: str = "xla"):
    """``extend``'s attention: ``q [M, N, H]``, ``k/v [M, K, H]`` of rows ``aux = (slots [R], pos
    [R, C], write_pos [R, C], n_blocks, first_pos)``, written into the cache, then attended. Rows of
    one position (the engine's decode steps) go through the pool's ``kernel`` where it does the
    layer (``_with_kernel``); wider rows (prompt chunks, speculative checks) through XLA's."""
    slots, pos, write_pos, n_blocks, first_pos, table = aux
    r, c = pos.shape
    k, v = (a.reshape(r, c, cfg.n_kv_heads, cfg.head_dim) for a in (k, v))
    heads_first = kernel != "xla"
    if table is None:
        ck, cv = write_chunks(ck, k, slots, write_pos), write_chunks(cv, v, slots, write_pos)
    else:
        ck, cv = (write_paged(buf, new, table, slots[:, None], write_pos, heads_first)
                  for buf, new in ((ck, k), (cv, v)))
    if table is not None and c == 1 and layer_impl(kernel, spec.window, cfg.head_dim, ck.shape[2]) != "xla":
        lengths = jnp.where(write_pos[:, 0] < table.shape[1] * ck.shape[2], pos[:, 0] + 1, 0)  # padding: 0
        o = pool_decode(q, ck, cv, table[slots], lengths, scale=spec.scale, softcap=spec.softcap, kernel=kernel)
        return o.reshape(r, cfg.n_heads * cfg.head_dim), (ck, cv)
    q = q.reshape(r, c, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim)
    if table is not None and not heads_first and paged_kernel(ck):
        o = attend_paged_cpu(q, ck, cv, slots, pos, spec, table)
    else:
        o = _attend_chunks(q, ck, cv, slots, pos, n_blocks, first_pos, spec, table, heads_first)
    return o.reshape(r * c, cfg.n_heads * cfg.head_dim), (ck, cv)


def _attend_step_stacked(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttnSpec, ck: jax.Array, cv: jax.Array,
                         aux: tuple, cfg: ModelConfig):
    """``_attend_step_cache`` inside the loop over layers (``model.loops_layers``): ``ck``/``cv`` are the
    stacked pools ``[L, P, K, B, H]``, ``aux = (positions, n_blocks, table, layer)``; the layer's keys
    and values are written and read in place, through the row-invariant CPU kernel."""
    positions, _, table, layer = aux
    s_ = q.shape[0]
    slots = jnp.arange(s_)
    ck = write_paged_layer(ck, layer, k[:, 0], table, slots, positions)
    cv = write_paged_layer(cv, layer, v[:, 0], table, slots, positions)
    q = q.reshape(s_, 1, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim)
    o = attend_paged_cpu(q, ck, cv, slots, positions[:, None], spec, table, layer=layer)
    return o.reshape(s_, 1, cfg.n_heads * cfg.head_dim), (ck, cv)


def _attend_chunks_stacked(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttnSpec, ck: jax.Array, cv: jax.Array,
                           aux: tuple, cfg: ModelConfig):
    """``_attend_chunks_cache`` inside the loop over layers: stacked pools, ``aux = (slots, pos,
    write_pos, n_blocks, first_pos, table, layer)`` (``_attend_step_stacked``)."""
    slots, pos, write_pos, _, _, table, layer = aux
    r, c = pos.shape
    k, v = (a.reshape(r, c, cfg.n_kv_heads, cfg.head_dim) for a in (k, v))
    ck = write_paged_layer(ck, layer, k, table, slots[:, None], write_pos)
    cv = write_paged_layer(cv, layer, v, table, slots[:, None], write_pos)
    q = q.reshape(r, c, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim)
    o = attend_paged_cpu(q, ck, cv, slots, pos, spec, table, layer=layer)
    return o.reshape(r * c, cfg.n_heads * cfg.head_dim), (ck, cv)
