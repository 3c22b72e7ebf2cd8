"""The preallocated KV cache: fixed shapes, written in place through donated buffers.

Two layouts. ``KVCache``, one ``[S, K, T, H]`` array per slot axis (below), is the reference the
model's functions and tests use directly. ``PagedKVCache``, what the engine serves from, is a pool
of ``P`` pages ``[P, K, B, H]`` per layer (``B`` positions a page: the attention block) with a page
table ``[S, M]`` int32 saying where each slot's block ``i`` lives (``jserve.kv_pages`` decides it on
the host); a table entry of ``P`` or more (``kv_pages.NO_PAGE`` as ``PagePool.table_for_writes``
hands it over) is no page: writes there are dropped, and reads are clamped to a real page whose
positions the attention masks, so a block past a sequence's end adds exact zeros as before.

One ``[S, K, T, H]`` array for keys and one for values per layer (a tuple over layers):
the same memory as one ``[L, S, K, T, H]`` array, but each layer's update is a
``dynamic_update_slice`` / scatter on its own buffer, which XLA keeps in place. Slots and KV
heads lead, so a decode step's attention reads each (slot, head)'s ``[T, H]`` block as it lies:
on XLA:CPU this layout with multiply-reduce attention measured 3-4x faster than ``[S, T, K, H]``
with ``einsum`` (``model._attend_step``).

The elements are float32, float16, bfloat16 or int8 (``--kv-dtype``); a bfloat16 cache is stored
as its bits, ``uint16`` arrays: XLA:CPU widens a bfloat16 buffer around every slice and scatter of it
(a decode step at 900 positions measured 2-3x slower than float32), while integers are sliced
and updated in place; attention widens each block it reads (``attention.widen``: a shift).

An int8 cache holds each (position, KV head) vector of ``H`` keys or values as ``H + 4`` int8s:
the values quantized symmetrically, ``round(x / s)`` (to nearest, ties to even) with
``s = max|x| / 127`` (computed as ``max|x| · float32(1/127)``), then the float32 scale ``s`` as
its 4 bytes (``quantize``). The scale lives in the same row as its values, so every write, slice,
page copy and slot copy moves it with them and nothing else has to know; attention's ``widen``
multiplies the values back (``dequantize``). Quantizing looks at one vector only, elementwise and
in a fixed order, so a key's int8s do not depend on the batch, the chunk or the call that wrote it.

A page pool's layout follows the decode-attention kernel that reads it (``PagedKVCache.kernel``,
chosen by ``attention_kernels.engine_kernel``): ``"xla"`` (CPU, and any sharded engine) keeps
``[P, K, B, H]``; a Pallas kernel (GPU, TPU) reads ``[K, P, B, H]``, the layout JAX's paged-attention
kernels take as it lies, so no step copies the pool, and stores bfloat16 as bfloat16 (the kernels
take it; the ``uint16`` bits are an XLA:CPU measure). ``read_pages``, ``write_paged`` and
``copy_pages`` honour both (``heads_first``); B stays axis 2 either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jserve.config import ModelConfig

BITS = jnp.uint16  # how a bfloat16 cache is stored
QUANT = jnp.int8  # an int8 cache: values and their scale's bytes (``quantize``)
SCALE_BYTES = 4  # one float32 scale per (position, KV head) vector of an int8 cache
# max|x| times this is the scale: a product, because XLA turns a division by a constant into that
# product inside a compiled call and not outside one (one ulp apart), and each call must agree.
INV_127 = np.float32(1 / 127)


def storage(dtype: jnp.dtype, native: bool = False) -> jnp.dtype:
    """The arrays' type for a cache of ``dtype`` elements (``native``: bfloat16 as itself)."""
    return jnp.dtype(BITS) if jnp.dtype(dtype) == jnp.bfloat16 and not native else jnp.dtype(dtype)


def stored_width(dtype: jnp.dtype, head_dim: int) -> int:
    """The cache arrays' last axis for vectors of ``head_dim``: the scale's bytes follow an int8 cache's."""
    return head_dim + SCALE_BYTES if jnp.dtype(dtype) == QUANT else head_dim


def quantize(x: jax.Array) -> jax.Array:
    """``x [..., H]`` (keys or values) → int8 ``[..., H + 4]``: each vector's ``round(x / s)``, ties
    to even, with ``s = max|x| · float32(1/127)`` (a vector of zeros: ``s = 0``, values 0), then
    ``s``'s float32 bytes."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) * INV_127
    q = jnp.round(xf / jnp.where(scale > 0, scale, 1.0))
    q = jnp.clip(q, -127, 127).astype(QUANT)
    return jnp.concatenate([q, jax.lax.bitcast_convert_type(scale, QUANT).reshape(*scale.shape[:-1], SCALE_BYTES)],
                           axis=-1)


def dequantize(x: jax.Array) -> jax.Array:
    """``quantize``'s int8 ``[..., H + 4]`` → float32 ``[..., H]``: each value times its vector's scale."""
    scale = jax.lax.bitcast_convert_type(x[..., -SCALE_BYTES:], jnp.float32)  # [...]
    return x[..., :-SCALE_BYTES].astype(jnp.float32) * scale[..., None]


def element_type(buf: jax.Array) -> jnp.dtype:
    """The elements a cache array holds (bfloat16 for ``uint16`` bits)."""
    return jnp.dtype(jnp.bfloat16) if buf.dtype == BITS else buf.dtype


def to_stored(new: jax.Array, buf: jax.Array) -> jax.Array:
    """``new`` (keys or values) rounded to ``buf``'s elements, as ``buf`` stores them."""
    if buf.dtype == BITS:
        return jax.lax.bitcast_convert_type(new.astype(jnp.bfloat16), BITS)
    if buf.dtype == QUANT:
        return quantize(new)
    return new.astype(buf.dtype)


def _zero_layers(cfg: ModelConfig, shape: tuple[int, ...], dtype: jnp.dtype,
                 native: bool = False) -> tuple[tuple, tuple]:
    """Zeroed keys and values, one ``shape`` array each per layer (``[..., H]``; an int8 cache's
    rows are ``H + 4`` wide), stored as ``dtype`` is (``native``: bfloat16 as itself)."""
    store = storage(dtype, native)
    shape = (*shape[:-1], stored_width(dtype, shape[-1]))
    return (tuple(jnp.zeros(shape, store) for _ in range(cfg.n_layers)),
            tuple(jnp.zeros(shape, store) for _ in range(cfg.n_layers)))


@struct.dataclass
class KVCache:
    """Keys and values of every slot. ``k[l]``, ``v[l]``: ``[S, K, T, H]`` (``uint16`` bits for
    a bfloat16 cache, ``[S, K, T, H + 4]`` int8s and scales for an int8 one: see ``dtype``)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def dtype(self) -> jnp.dtype:
        """The elements' type: float32, float16, bfloat16 or int8."""
        return element_type(self.k[0])

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @classmethod
    def zeros(cls, cfg: ModelConfig, slots: int, max_len: int, dtype: jnp.dtype) -> KVCache:
        return cls(*_zero_layers(cfg, (slots, cfg.n_kv_heads, max_len, cfg.head_dim), dtype))


def cache_bytes(cfg: ModelConfig, slots: int, max_len: int, dtype: jnp.dtype) -> int:
    """2 · L · S · T · K · H · bytes per element (an int8 cache: ``H + 4`` bytes a vector, its scale's)."""
    itemsize = jnp.dtype(dtype).itemsize
    return 2 * cfg.n_layers * slots * max_len * cfg.n_kv_heads * stored_width(dtype, cfg.head_dim) * itemsize


def write_prefix(cache: KVCache, prefix_k: tuple[jax.Array, ...], prefix_v: tuple[jax.Array, ...],
                 slot: jax.Array) -> KVCache:
    """Write one prompt's keys/values (``[P, K, H]`` per layer) at positions ``0..P-1`` of ``slot``."""
    zero = jnp.zeros((), jnp.int32)

    def put(buf: jax.Array, pre: jax.Array) -> jax.Array:
        block = to_stored(jnp.swapaxes(pre, 0, 1)[None], buf)  # [1, K, P, H]
        return jax.lax.dynamic_update_slice(buf, block, (slot, zero, zero, zero))

    return KVCache(k=tuple(map(put, cache.k, prefix_k)), v=tuple(map(put, cache.v, prefix_v)))


def write_step(buf: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Write one new position per slot: ``buf [S, K, T, H]``, ``new [S, K, H]``, ``positions [S]``.

    Positions at or past ``T`` (inactive slots) are dropped rather than clamped.
    """
    slots = jnp.arange(buf.shape[0])
    return buf.at[slots, :, positions].set(to_stored(new, buf), mode="drop")


def write_chunks(buf: jax.Array, new: jax.Array, slots: jax.Array, positions: jax.Array) -> jax.Array:
    """Write rows of positions: ``buf [S, K, T, H]``, ``new [R, C, K, H]``, ``slots [R]``,
    ``positions [R, C]``. Positions at or past ``T`` (padding) are dropped."""
    return buf.at[slots[:, None], :, positions].set(to_stored(new, buf), mode="drop")


def copy_prefix(cache: KVCache, src: jax.Array, dst: jax.Array, n: jax.Array, block: int) -> KVCache:
    """Copy positions ``0..n-1`` of slot ``src`` into slot ``dst`` (whole blocks of ``block``
    positions: what follows ``n`` in the last block is copied too, and is overwritten before
    ``dst`` reads it). The work follows ``n``, not the cache length."""
    zero = jnp.zeros((), jnp.int32)

    def body(i: jax.Array, bufs: tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]):
        def one(buf: jax.Array) -> jax.Array:
            blk = jax.lax.dynamic_slice(buf, (src, zero, i * block, zero), (1, buf.shape[1], block, buf.shape[3]))
            return jax.lax.dynamic_update_slice(buf, blk, (dst, zero, i * block, zero))

        return tuple(map(one, bufs[0])), tuple(map(one, bufs[1]))

    k, v = jax.lax.fori_loop(0, (n + block - 1) // block, body, (cache.k, cache.v))
    return KVCache(k=k, v=v)


@struct.dataclass
class PagedKVCache:
    """Keys and values in pages: ``k[l]``, ``v[l]``: ``[P, K, B, H]`` (``uint16`` bits for bfloat16,
    ``[P, K, B, H + 4]`` int8s and scales for int8: ``quantize``), or ``[K, P, B, H]`` (bfloat16 as
    itself) where ``kernel``, the decode attention that reads the pool, is a Pallas kernel
    (``heads_first``; module docstring). ``stacked``: ``k`` and ``v`` are each one array
    ``[L, P, K, B, H]`` (float32 or bfloat16 bits), for the loop over layers (``model.loops_layers``),
    whose kernels read and write layer ``l`` in place."""

    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    kernel: str = struct.field(pytree_node=False, default="xla")

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, tuple)

    def _layer0(self) -> jax.ShapeDtypeStruct:
        """Layer 0's pool as a shape (no slice of a stacked pool is made)."""
        a = self.k
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype) if self.stacked else a[0]

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """One layer's keys (or values): ``[P, K, B, H]`` (``[K, P, B, H]`` heads first)."""
        return tuple(self._layer0().shape)

    @property
    def num_layers(self) -> int:
        return self.k.shape[0] if self.stacked else len(self.k)

    def arrays(self) -> tuple[jax.Array, ...]:
        """Every array the pool is made of (two when stacked, two per layer else)."""
        return (self.k, self.v) if self.stacked else (*self.k, *self.v)

    @property
    def heads_first(self) -> bool:
        return self.kernel != "xla"

    @property
    def dtype(self) -> jnp.dtype:
        return element_type(self._layer0())

    @property
    def pages(self) -> int:
        return self._layer0().shape[1 if self.heads_first else 0]

    @property
    def page_size(self) -> int:
        return self._layer0().shape[2]

    @classmethod
    def zeros(cls, cfg: ModelConfig, pages: int, page_size: int, dtype: jnp.dtype,
              kernel: str = "xla", stacked: bool = False) -> PagedKVCache:
        heads_first = kernel != "xla"
        shape = (cfg.n_kv_heads, pages) if heads_first else (pages, cfg.n_kv_heads)
        if stacked:
            if heads_first or jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
                raise ValueError("a stacked pool is [L, P, K, B, H] of float32 or bfloat16")
            from jserve import cpu_kernels  # the stacked pool is the CPU kernels' (model.loops_layers)

            shape = (cfg.n_layers, *shape, page_size, cfg.head_dim)
            store = storage(dtype, False)
            # Resident page by page as sequences write it, not all at once (``lazy_zeros``).
            return cls(cpu_kernels.lazy_zeros(shape, store), cpu_kernels.lazy_zeros(shape, store), kernel=kernel)
        return cls(*_zero_layers(cfg, (*shape, page_size, cfg.head_dim), dtype, native=heads_first), kernel=kernel)


def page_at(table: jax.Array, slots: jax.Array, positions: jax.Array, pages: int, page_size: int) -> jax.Array:
    """The page holding each of ``positions`` of ``slots`` (broadcast together) in ``table [S, M]``;
    ``pages`` (no page: writes there are dropped) for positions at or past ``M * page_size``."""
    m = table.shape[1]
    block = positions // page_size
    page = table[slots, jnp.clip(block, 0, m - 1)]
    return jnp.where((block >= 0) & (block < m), page, pages)


def read_pages(buf: jax.Array, pages: jax.Array, heads_first: bool = False) -> jax.Array:
    """``buf [P, K, B, H]`` (``heads_first``: ``[K, P, B, H]``) at ``pages [R]`` → ``[R, K, B, H]``;
    a page index past the pool (no page) reads the last page, which the caller masks."""
    axis = 1 if heads_first else 0
    out = jnp.take(buf, jnp.minimum(pages, buf.shape[axis] - 1), axis=axis, mode="clip")
    return jnp.swapaxes(out, 0, 1) if heads_first else out


def write_paged(buf: jax.Array, new: jax.Array, table: jax.Array, slots: jax.Array,
                positions: jax.Array, heads_first: bool = False) -> jax.Array:
    """Write ``new [..., K, H]`` at ``positions [...]`` of ``slots [...]`` (broadcast) through
    ``table``: page ``table[s, p // B]``, offset ``p % B``. No page, or a position past the table
    (padding, inactive slots), writes nothing. ``heads_first``: ``buf`` is ``[K, P, B, H]``."""
    p, b = buf.shape[1 if heads_first else 0], buf.shape[2]
    page = page_at(table, slots, positions, p, b)
    if heads_first:  # the indexed axes are adjacent: the result is [K, ..., H]
        return buf.at[:, page, positions % b].set(jnp.moveaxis(to_stored(new, buf), -2, 0), mode="drop")
    return buf.at[page, :, positions % b].set(to_stored(new, buf), mode="drop")


def copy_pages(cache: PagedKVCache, src: jax.Array, dst: jax.Array, n: jax.Array) -> PagedKVCache:
    """Copy page ``src[i]`` onto page ``dst[i]`` for ``i < n`` (every layer's keys and values);
    a ``dst`` past the pool is skipped. The work follows ``n``."""
    zero = jnp.zeros((), jnp.int32)
    axis = 1 if cache.heads_first or cache.stacked else 0  # the pages' axis

    def body(i: jax.Array, bufs: tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]):
        def one(buf: jax.Array) -> jax.Array:
            p = buf.shape[axis]
            size = buf.shape[:axis] + (1,) + buf.shape[axis + 1:]

            def at(page: jax.Array) -> tuple[jax.Array, ...]:
                return (zero,) * axis + (page,) + (zero,) * (buf.ndim - 1 - axis)

            page = jax.lax.dynamic_slice(buf, at(jnp.minimum(src[i], p - 1)), size)
            d = dst[i]
            keep = jax.lax.dynamic_slice(buf, at(jnp.minimum(d, p - 1)), size)
            page = jnp.where(d < p, page, keep)
            return jax.lax.dynamic_update_slice(buf, page, at(jnp.minimum(d, p - 1)))

        return tuple(map(one, bufs[0])), tuple(map(one, bufs[1]))

    if cache.stacked:  # one array each: the same body over a one-element tuple
        (k,), (v,) = jax.lax.fori_loop(0, n, body, ((cache.k,), (cache.v,)))
    else:
        k, v = jax.lax.fori_loop(0, n, body, (cache.k, cache.v))
    return cache.replace(k=k, v=v)


def write_paged_layer(buf: jax.Array, layer: jax.Array, new: jax.Array, table: jax.Array, slots: jax.Array,
                      positions: jax.Array) -> jax.Array:
    """``write_paged`` into layer ``layer`` (traced) of a stacked pool ``buf [L, P, K, B, H]``, in place."""
    p, b = buf.shape[1], buf.shape[3]
    page = page_at(table, slots, positions, p, b)
    return buf.at[layer, page, :, positions % b].set(to_stored(new, buf), mode="drop")
