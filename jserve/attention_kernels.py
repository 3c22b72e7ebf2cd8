"""Decode attention over a paged KV pool, one interface over several implementations.

``paged_attention(q, k_pages, v_pages, page_table, lengths, ...)``: one query per slot against that
slot's pages. The pool layout is ``[K, P, B, H]`` per layer for keys and for values (P pages of B
positions), the layout JAX's Pallas paged-attention kernels for GPU and TPU read as it lies. A
slot's position ``t`` is at ``[:, page_table[s, t // B], t % B]``; ``lengths[s]`` positions are
visible (the query sits at position ``lengths[s] - 1``), and a slot of length 0 gets zeros.
Page-table entries past a slot's end may be ``NO_PAGE`` (-1) or any stale page: positions past the
end contribute exact zeros in every implementation, so a slot's result does not depend on what
other pages hold.

Implementations (``IMPLS``), chosen by platform unless named:

- ``"xla"``: pure XLA (gather the slot's pages, masked softmax). The CPU path and the oracle the
  kernels are tested against; supports everything (soft cap, sliding window).
- ``"pallas_gpu"``: ``jax.experimental.pallas.ops.gpu.paged_attention`` (Triton). Soft cap; no
  sliding window (such layers fall back to ``"xla"`` when the implementation is chosen here).
- ``"pallas_tpu"``: ``jax.experimental.pallas.ops.tpu.ragged_paged_attention``. Soft cap and
  sliding window. It reads keys and values interleaved in one ``[P, B, 2K, H]`` array, head dims
  in multiples of 128 and a tileable number of KV heads; the adapter converts and pads (a copy of
  the pool per call: a serving integration should keep the pool in that layout on TPU).
- ``"pallas_tpu_paged"``: ``jax.experimental.pallas.ops.tpu.paged_attention``, the older TPU
  kernel on the ``[K, P, B, H]`` layout. Soft cap; no sliding window. It reads keys and values as
  bfloat16 whatever the pool holds (the kernel rounds each block it loads), so it is exact on a
  bfloat16 pool (the default ``--kv-dtype``) and rounds a float32 one.

``interpret=True`` runs a Pallas kernel on CPU (GPU kernels through ``interpret=True``, TPU kernels
under ``pltpu.force_tpu_interpret_mode()``), which is how the tests check them without a device.

The engine (``engine_kernel``, ``pool_decode``): its decode steps (``extend`` rows of one position)
call the platform's kernel on the pool as it lies, ``[K, P, B, H]`` (``kv_cache.PagedKVCache.kernel``
fixes the layout): ``"pallas_gpu"`` on a GPU, ``"pallas_tpu_paged"`` on a TPU (the ragged kernel
would need keys and values interleaved in one array, a copy of the pool per step here), ``"xla"``
on CPU and in any sharded engine (pool ``[P, K, B, H]``). Layers a kernel cannot do
(``layer_impl``: a sliding window on these two; on the GPU a head dim or page size not a power of
two), prompt chunks and speculative checks stay on the XLA blockwise attention, which reads either
layout. ``JSERVE_ATTENTION=xla|pallas_gpu|pallas_tpu_paged`` (or the engine's ``attention=``)
overrides the platform's choice; a kernel for another platform than JAX's backend runs in
interpret mode (tests force the GPU layout and kernel through the whole engine on CPU).

Axis letters: S slots, N query heads, K KV heads, G = N/K, H head dim, P pages, B positions per
page, M pages per slot, T = M·B positions per slot.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

NO_PAGE = -1  # as in ``jserve.kv_pages``
IMPLS = ("xla", "pallas_gpu", "pallas_tpu", "pallas_tpu_paged")
_SUPPORTS_WINDOW = {"xla": True, "pallas_gpu": False, "pallas_tpu": True, "pallas_tpu_paged": False}


PLATFORM = {"pallas_gpu": "gpu", "pallas_tpu": "tpu", "pallas_tpu_paged": "tpu"}  # where a kernel runs natively
# What the engine's pool can be read by in place (``pallas_tpu`` reads an interleaved layout).
ENGINE_KERNELS = ("xla", "pallas_gpu", "pallas_tpu_paged")


def default_impl(platform: str | None = None) -> str:
    """The implementation for ``platform`` (default: JAX's default backend): on a TPU the paged
    kernel, which reads the engine's ``[K, P, B, H]`` pool in place (``"pallas_tpu"`` by name)."""
    platform = platform or jax.default_backend()
    return {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu",
            "tpu": "pallas_tpu_paged"}.get(platform, "xla")


def choose_impl(window: int | None = None, platform: str | None = None, impl: str | None = None) -> str:
    """``impl`` (default: the platform's kernel), or ``"xla"`` where it cannot do what a layer needs."""
    impl = impl or default_impl(platform)
    return impl if window is None or _SUPPORTS_WINDOW[impl] else "xla"


def layer_impl(kernel: str, window: int | None, head_dim: int, page_size: int) -> str:
    """The engine's ``kernel`` for a layer of this shape, or ``"xla"`` where it cannot do it: a
    sliding window (``choose_impl``), or on ``"pallas_gpu"`` a head dim or page size that is not a
    power of two (Triton loads blocks of a power-of-two size: a page block is ``[pages, B, H]``)."""
    impl = choose_impl(window, impl=kernel)
    if impl == "pallas_gpu" and not (_power_of_two(head_dim) and _power_of_two(page_size)):
        return "xla"
    return impl


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def engine_kernel(requested: str | None = None, sharded: bool = False, quantized_kv: bool = False) -> str:
    """The decode-attention kernel an engine's pool is laid out for: ``requested``, else
    ``JSERVE_ATTENTION``, else the platform's (``default_impl``); ``"xla"`` when ``sharded`` (the
    kernels run on one device's pool) or the pool is int8 with scales (``quantized_kv``: the
    kernels read float pages)."""
    name = requested or os.environ.get("JSERVE_ATTENTION") or None
    if name is None:
        return "xla" if sharded or quantized_kv else default_impl()
    if quantized_kv and name != "xla":
        raise ValueError(f"attention kernel {name!r} reads float pages; an int8 KV cache uses 'xla'")
    if name not in ENGINE_KERNELS:
        why = " (it reads keys and values interleaved, not the pool)" if name == "pallas_tpu" else ""
        raise ValueError(f"attention kernel {name!r}{why}: the engine takes one of {ENGINE_KERNELS}")
    if sharded and name != "xla":
        raise ValueError(f"attention kernel {name!r} runs on one device's pool; a sharded engine uses 'xla'")
    return name


def interprets(impl: str) -> bool:
    """Whether ``impl`` runs in Pallas interpret mode here: a kernel off its platform."""
    return impl in PLATFORM and jax.default_backend() != PLATFORM[impl]


def pool_decode(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, table: jax.Array, lengths: jax.Array, *,
                scale: float, softcap: float | None, kernel: str) -> jax.Array:
    """The engine's decode attention through ``kernel``: one query per row ``q [R, N, H]`` against
    the pool ``k_pool/v_pool [K, P, B, H]`` as it lies, row r's pages ``table [R, M]`` (entries of
    P or more: no page), ``lengths [R]`` positions visible (0: a padding row, zeros) → ``[R, N, H]``
    in ``q``'s dtype. The GPU kernel is given queries of the pool's dtype (a Triton dot takes one
    type: a bfloat16 pool multiplies bfloat16 queries, with float32 sums); the TPU kernel widens
    both itself."""
    p = k_pool.shape[1]
    qk = q.astype(k_pool.dtype) if kernel == "pallas_gpu" else q
    out = paged_attention(qk, k_pool, v_pool, jnp.minimum(table, p - 1), lengths,
                          scale=scale, softcap=softcap, impl=kernel, interpret=interprets(kernel))
    return out.astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "window", "impl", "interpret"))
def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                    lengths: jax.Array, *, scale: float, softcap: float | None = None, window: int | None = None,
                    impl: str | None = None, interpret: bool = False) -> jax.Array:
    """``q [S, N, H]``, ``k_pages/v_pages [K, P, B, H]``, ``page_table [S, M]`` int32, ``lengths [S]``
    int32 → ``[S, N, H]`` in ``q``'s dtype. Scores are ``q·k · scale``, soft-capped by ``softcap``;
    with ``window`` a query sees itself and the ``window - 1`` positions before it. ``impl`` None:
    ``choose_impl(window)``."""
    impl = impl or choose_impl(window)
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLS}")
    if window is not None and not _SUPPORTS_WINDOW[impl]:
        raise ValueError(f"{impl} has no sliding window; use 'xla' for window={window} layers")
    _check_shapes(q, k_pages, v_pages, page_table, lengths)
    lengths = lengths.astype(jnp.int32)
    page_table = page_table.astype(jnp.int32)
    if impl == "xla":
        return _xla(q, k_pages, v_pages, page_table, lengths, scale, softcap, window)
    if impl == "pallas_gpu":
        return _pallas_gpu(q, k_pages, v_pages, page_table, lengths, scale, softcap, interpret)
    if impl == "pallas_tpu":
        return _pallas_tpu_ragged(q, k_pages, v_pages, page_table, lengths, scale, softcap, window, interpret)
    return _pallas_tpu_paged(q, k_pages, v_pages, page_table, lengths, scale, softcap, interpret)


def _check_shapes(q, k_pages, v_pages, page_table, lengths) -> None:
    s, n, h = q.shape
    if k_pages.shape != v_pages.shape or k_pages.ndim != 4:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} must both be [K, P, B, H]")
    kh, _, _, hk = k_pages.shape
    if hk != h or n % kh:
        raise ValueError(f"q {q.shape} does not fit pages {k_pages.shape}: head dims differ or N % K != 0")
    if page_table.ndim != 2 or page_table.shape[0] != s or lengths.shape != (s,):
        raise ValueError(f"page_table {page_table.shape} must be [S, M] and lengths {lengths.shape} [S] for S={s}")


def _valid_positions(lengths: jax.Array, t: int, window: int | None) -> jax.Array:
    """``[S, T]``: position t of slot s is visible from its query at ``lengths[s] - 1``."""
    pos = jnp.arange(t)[None, :]
    ok = pos < lengths[:, None]
    return ok if window is None else ok & (pos > lengths[:, None] - 1 - window)


def _xla(q, k_pages, v_pages, page_table, lengths, scale, softcap, window) -> jax.Array:
    s, n, h = q.shape
    kh, _, b, _ = k_pages.shape
    m = page_table.shape[1]
    table = jnp.where(page_table >= 0, page_table, 0)  # NO_PAGE reads page 0, masked below

    def gather(pages: jax.Array) -> jax.Array:  # [K, P, B, H] -> [S, K, T, H]
        return jnp.take(pages, table, axis=1).transpose(1, 0, 2, 3, 4).reshape(s, kh, m * b, h)

    valid = _valid_positions(lengths, m * b, window)  # [S, T]
    k = gather(k_pages).astype(jnp.float32)
    v = jnp.where(valid[:, None, :, None], gather(v_pages).astype(jnp.float32), 0.0)  # stale NaNs too
    qf = q.astype(jnp.float32).reshape(s, kh, n // kh, h) * scale
    scores = jnp.einsum("skgh,skth->skgt", qf, k)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(valid[:, None, None], scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("skgt,skth->skgh", p, v) / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(s, n, h).astype(q.dtype)


def _divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _pallas_gpu(q, k_pages, v_pages, page_table, lengths, scale, softcap, interpret) -> jax.Array:
    from jax.experimental.pallas.ops.gpu import paged_attention as gpu_kernel

    m = page_table.shape[1]
    k_splits = _divisor_at_most(m, 16)  # the kernel splits a slot's pages into this many partitions
    per_block = max(d for d in (1, 2, 4, 8) if (m // k_splits) % d == 0)  # Triton: power-of-two blocks
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)  # the kernel has no score scale
    out = gpu_kernel.paged_attention(
        qs, k_pages, v_pages, jnp.where(page_table >= 0, page_table, 0), lengths,
        block_h=16, pages_per_compute_block=per_block, k_splits=k_splits, interpret=interpret,
        attn_logits_soft_cap=softcap)
    return jnp.where((lengths > 0)[:, None, None], out, 0).astype(q.dtype)


def _tileable_kv_heads(kh: int, dtype: jnp.dtype) -> int:
    """The least KV head count >= ``kh`` the ragged TPU kernel can tile (keys and values
    interleaved: 2K rows, packed ``32 / bits`` to a word)."""
    packing = 32 // (jnp.dtype(dtype).itemsize * 8)
    k = kh
    while True:
        rows = 2 * k
        if rows % packing == 0 and (rows // packing in (1, 2, 4, 8) or (rows // packing) % 8 == 0):
            return k
        k += 1


def to_ragged_layout(k_pages: jax.Array, v_pages: jax.Array) -> jax.Array:
    """``[K, P, B, H]`` keys and values → the ragged TPU kernel's ``[P, B, 2K, H]`` (k at even heads)."""
    kh, p, b, h = k_pages.shape
    return jnp.stack([k_pages, v_pages], axis=1).transpose(2, 3, 0, 1, 4).reshape(p, b, 2 * kh, h)


def _pad_heads(q, k_pages, v_pages):
    """Zero KV heads (and the query heads that read them) up to a tileable count, and zero head dims
    up to a multiple of 128: zero dims add nothing to a score, and the extra heads are dropped."""
    s, n, h = q.shape
    kh = k_pages.shape[0]
    g = n // kh
    kp = _tileable_kv_heads(kh, k_pages.dtype)
    hp = -(-h // 128) * 128
    qg = jnp.pad(q.reshape(s, kh, g, h), ((0, 0), (0, kp - kh), (0, 0), (0, hp - h))).reshape(s, kp * g, hp)
    pad = ((0, kp - kh), (0, 0), (0, 0), (0, hp - h))
    return qg, jnp.pad(k_pages, pad), jnp.pad(v_pages, pad)


def _ragged_kernel():
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    return ragged_paged_attention


def _pallas_tpu_ragged(q, k_pages, v_pages, page_table, lengths, scale, softcap, window, interpret) -> jax.Array:
    from jax.experimental.pallas import tpu as pltpu

    s, n, h = q.shape
    kh = k_pages.shape[0]
    m = page_table.shape[1]
    qp, kp, vp = _pad_heads(q, k_pages, v_pages)
    blocks = {}
    if interpret:  # the tuned sizes look up the TPU generation
        blocks = dict(num_kv_pages_per_block=_divisor_at_most(m, 8), num_queries_per_block=8)
    call = functools.partial(
        _ragged_kernel(), qp, to_ragged_layout(kp, vp),
        jnp.maximum(lengths, 1),  # the kernel wants each query inside its sequence; length-0 slots zeroed below
        jnp.where(page_table >= 0, page_table, 0), jnp.arange(s + 1, dtype=jnp.int32),
        jnp.array([s], jnp.int32), sm_scale=scale, sliding_window=window, soft_cap=softcap, **blocks)
    if interpret:
        with pltpu.force_tpu_interpret_mode():
            out = call()
    else:
        out = call()
    g = n // kh
    out = out.reshape(s, -1, g, out.shape[-1])[:, :kh, :, :h].reshape(s, n, h)
    return jnp.where((lengths > 0)[:, None, None], out, 0).astype(q.dtype)


def _pallas_tpu_paged(q, k_pages, v_pages, page_table, lengths, scale, softcap, interpret) -> jax.Array:
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_kernel

    m = page_table.shape[1]
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    call = functools.partial(
        tpu_kernel, qs, k_pages, v_pages, jnp.maximum(lengths, 1), jnp.where(page_table >= 0, page_table, 0),
        attn_logits_soft_cap=softcap, pages_per_compute_block=_divisor_at_most(m, 8))
    if interpret:
        with pltpu.force_tpu_interpret_mode():
            out = call()
    else:
        out = call()
    return jnp.where((lengths > 0)[:, None, None], out, 0).astype(q.dtype)
