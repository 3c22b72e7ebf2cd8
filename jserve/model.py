"""A Llama-family decoder as pure functions over a params pytree and a KV cache.

RMSNorm, RoPE (with optional Llama-3 frequency scaling), grouped-query attention, SwiGLU MLP,
tied or untied embeddings. Q/K/V and gate/up projections are fused (one matmul each), which
is faster on every backend; the checkpoint keeps them apart (see ``checkpoint.py``).

Axis letters: B batch, T/P time, S slots, N heads, K kv heads, G = N/K, H head dim,
D model dim, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jserve.config import ModelConfig
from jserve.kv_cache import KVCache, write_chunks, write_step
from jserve.quant import QuantArray, dense, take_rows

Weight = jax.Array | QuantArray

# Cache positions per decode-attention block (``_attend_blocks``): measured on XLA:CPU at
# 16 slots x ~1,000 live positions, 64 and 128 were fastest, 256 1.4x and 512 2.4x slower.
ATTN_BLOCK = 128


@struct.dataclass
class LayerParams:
    attn_norm: jax.Array  # [D]
    wqkv: Weight  # [D, (N + 2K) H]
    wo: Weight  # [N H, D]
    mlp_norm: jax.Array  # [D]
    w_gate_up: Weight  # [D, 2F]
    w_down: Weight  # [F, D]


@struct.dataclass
class Params:
    embed: Weight  # [V, D]
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array  # [D]; its dtype is the activation dtype
    lm_head: Weight | None  # [D, V]; None when tied to ``embed``
    # Blocks of the fused matrices' columns, one per tensor-parallel shard (see sharding.py):
    # wqkv holds [q, k, v] of each group in turn, w_gate_up [gate, up] of each group.
    qkv_groups: int = struct.field(pytree_node=False, default=1)
    mlp_groups: int = struct.field(pytree_node=False, default=1)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``[H/2]`` (float32), with Llama-3 scaling when the config asks."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float32) / h))
    sc = cfg.rope_scaling
    if sc is None:
        return inv.astype(np.float32)
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x [..., T, heads, H]`` by ``positions [..., T]`` (HF's rotate-half convention)."""
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [..., T, H/2]
    cos = jnp.cos(ang)[..., None, :]
    sin = jnp.sin(ang)[..., None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def _split_qkv(cfg: ModelConfig, qkv: jax.Array, groups: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``[..., (N + 2K) H]`` in ``groups`` blocks of ``[q, k, v]`` → ``[..., N, H]``, ``[..., K, H]`` x 2."""
    lead, h = qkv.shape[:-1], cfg.head_dim
    n, k = cfg.n_heads // groups, cfg.n_kv_heads // groups
    x = qkv.reshape(*lead, groups, n + 2 * k, h)
    q = x[..., :n, :].reshape(*lead, cfg.n_heads, h)
    kk = x[..., n : n + k, :].reshape(*lead, cfg.n_kv_heads, h)
    v = x[..., n + k :, :].reshape(*lead, cfg.n_kv_heads, h)
    return q, kk, v


def _mlp(layer: LayerParams, x: jax.Array, groups: int) -> jax.Array:
    gu = dense(x, layer.w_gate_up)
    lead, f = gu.shape[:-1], gu.shape[-1] // 2
    gu = gu.reshape(*lead, groups, 2, f // groups)
    gate, up = gu[..., 0, :].reshape(*lead, f), gu[..., 1, :].reshape(*lead, f)
    return dense(jax.nn.silu(gate) * up, layer.w_down)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """``q [B, T, K, G, H]``, ``k/v [B, S, K, H]``, ``mask [B, T, S]`` → ``[B, T, K, G, H]``."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", p, v)


def _attend_step(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """One query per slot against the whole cache, masked: ``q [S, K, G, H]``, ``k/v [S, K, T, H]``,
    ``mask [S, T]`` → ``[S, K, G, H]``. Its cost follows ``T``; serving uses ``_attend_blocks``,
    and this dense form stays as the reference the tests hold the blocked one to."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qf = q.astype(jnp.float32)[:, :, :, None, :]  # [S, K, G, 1, H]
    s = jnp.sum(qf * k[:, :, None].astype(jnp.float32), axis=-1) * scale  # [S, K, G, T]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.sum(p[..., None] * v[:, :, None].astype(jnp.float32), axis=3)  # [S, K, G, H]
    return out.astype(v.dtype)


def attention_block(cache_len: int) -> int:
    """Positions per attention block for a cache of ``cache_len`` (which it divides)."""
    return min(ATTN_BLOCK, cache_len)


def padded_cache_len(max_len: int) -> int:
    """``max_len`` rounded up to whole attention blocks: the length the cache is allocated with."""
    b = attention_block(max_len)
    return -(-max_len // b) * b


def _attend_blocks(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                   n_blocks: jax.Array) -> jax.Array:
    """One query per slot against the first ``n_blocks`` blocks of the cache, with an online softmax.

    ``q [S, K, G, H]``, ``k/v [S, K, T, H]``, ``positions [S]`` (slot s attends to ``0..positions[s]``),
    ``n_blocks`` a traced scalar → ``[S, K, G, H]``. The work follows the longest live sequence, not
    ``T``. Blocks have a fixed size and are folded in one after another, and a block wholly past a
    slot's position adds exact zeros (its scores are -inf, the running max and sum are multiplied by
    exactly 1): a slot's result is bitwise the same however many blocks its neighbours need.
    """
    s_, kh, g, h = q.shape
    b = attention_block(k.shape[2])
    qf = q.astype(jnp.float32) * (1.0 / math.sqrt(h))
    offsets = jnp.arange(b)

    def fold(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]):
        m, denom, acc = carry
        start = i * b
        kb = jax.lax.dynamic_slice_in_dim(k, start, b, axis=2).astype(jnp.float32)  # [S, K, B, H]
        vb = jax.lax.dynamic_slice_in_dim(v, start, b, axis=2).astype(jnp.float32)
        s = jnp.sum(qf[:, :, :, None, :] * kb[:, :, None], axis=-1)  # [S, K, G, B]
        valid = (start + offsets)[None, :] <= positions[:, None]  # [S, B]
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
    _, denom, acc = jax.lax.fori_loop(0, n_blocks, fold, init)
    return (acc / jnp.where(denom > 0, denom, 1.0)[..., None]).astype(v.dtype)


def _pairwise_sum(x: jax.Array) -> jax.Array:
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
                   n_blocks: jax.Array) -> jax.Array:
    """Rows of queries against their slots' caches, block by block with an online softmax.

    ``q [R, C, K, G, H]`` (row r: ``C`` consecutive positions of slot ``slots[r]``), ``k/v [S, K, T, H]``,
    ``positions [R, C]`` (a query attends to its slot's positions ``0..position``), ``n_blocks`` a traced
    scalar covering every row → ``[R, C, K, G, H]``. As in ``_attend_blocks``, a block past a query's
    position adds exact zeros, so a query's result does not depend on how many blocks the call reads.
    """
    r, c, kh, g, h = q.shape
    b = attention_block(k.shape[2])
    qf = (q.astype(jnp.float32) * (1.0 / math.sqrt(h))).transpose(0, 2, 3, 1, 4).reshape(r, kh, g * c, h)
    qpos = jnp.broadcast_to(positions[:, None, :], (r, g, c)).reshape(r, g * c)  # [R, GC]
    offsets = jnp.arange(b)

    def fold(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]):
        m, denom, acc = carry
        start = i * b
        kb = jnp.take(jax.lax.dynamic_slice_in_dim(k, start, b, axis=2), slots, axis=0).astype(jnp.float32)
        vb = jnp.take(jax.lax.dynamic_slice_in_dim(v, start, b, axis=2), slots, axis=0).astype(jnp.float32)
        s = jnp.einsum("rkqh,rkbh->rkqb", qf, kb)  # [R, K, GC, B]
        valid = (start + offsets)[None, None, :] <= qpos[:, :, None]  # [R, GC, B]
        s = jnp.where(valid[:, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        denom = denom * alpha + _pairwise_sum(p)
        acc = acc * alpha[..., None] + jnp.einsum("rkqb,rkbh->rkqh", p, vb)
        return m_new, denom, acc

    init = (jnp.full((r, kh, g * c), -jnp.inf, jnp.float32), jnp.zeros((r, kh, g * c), jnp.float32),
            jnp.zeros((r, kh, g * c, h), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(0, n_blocks, fold, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]  # [R, K, GC, H]
    return out.reshape(r, kh, g, c, h).transpose(0, 3, 1, 2, 4).astype(v.dtype)


def embed_tokens(params: Params, tokens: jax.Array) -> jax.Array:
    return take_rows(params.embed, tokens, params.final_norm.dtype)


def unembed(params: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm and output projection: ``[..., D]`` → float32 logits ``[..., V]``."""
    x = rms_norm(x, params.final_norm, cfg.norm_eps)
    if params.lm_head is None:
        return dense(x, params.embed, transpose=True).astype(jnp.float32)
    return dense(x, params.lm_head).astype(jnp.float32)


Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, tuple[jax.Array, jax.Array]]]


def _block(params: Params, cfg: ModelConfig, layer: LayerParams, x: jax.Array, positions: jax.Array,
           inv_freq: np.ndarray, attend: Attend) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One decoder layer, shared by every entry point: ``x [..., D]`` at ``positions [...]``.

    ``attend(q, k, v)`` gets the rotated queries ``[..., N, H]`` and keys/values ``[..., K, H]``,
    does what the entry point needs (write the cache, attend to it) and returns the attention
    output ``[..., N·H]`` and the layer's keys/values as that entry point keeps them."""
    h = rms_norm(x, layer.attn_norm, cfg.norm_eps)
    q, k, v = _split_qkv(cfg, dense(h, layer.wqkv), params.qkv_groups)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    o, kv = attend(q, k, v)
    x = x + dense(o, layer.wo)
    x = x + _mlp(layer, rms_norm(x, layer.mlp_norm, cfg.norm_eps), params.mlp_groups)
    return x, kv


def forward(
    params: Params, cfg: ModelConfig, tokens: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Causal forward over fresh sequences ``tokens [B, T]`` starting at position 0.

    Returns the final hidden states ``[B, T, D]`` (before the final norm) and each layer's
    keys and values ``[B, T, K, H]``. Padding after a sequence's end does not affect the
    positions before it (causal mask), so a padded prompt is exact up to its length.
    """
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    inv_freq = rope_inv_freq(cfg)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    x = embed_tokens(params, tokens)

    def attend(q: jax.Array, k: jax.Array, v: jax.Array):
        q = q.reshape(b, t, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim)
        return _attend(q, k, v, mask).reshape(b, t, cfg.n_heads * cfg.head_dim), (k, v)

    ks, vs = [], []
    for layer in params.layers:
        x, (k, v) = _block(params, cfg, layer, x, pos, inv_freq, attend)
        ks.append(k)
        vs.append(v)
    return x, tuple(ks), tuple(vs)


def logits_all(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Float32 logits ``[B, T, V]`` at every position (reference checks, perplexity)."""
    x, _, _ = forward(params, cfg, tokens)
    return unembed(params, cfg, x)


def prefill(
    params: Params, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Prompt forward: ``tokens [B, P]`` padded, true ``lengths [B]``.

    Returns logits at each prompt's last real position ``[B, V]`` and the prompt's keys and
    values ``[B, P, K, H]`` per layer, ready to be written into a slot of the cache.
    """
    x, ks, vs = forward(params, cfg, tokens)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    return unembed(params, cfg, last), ks, vs


def decode_step(
    params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache,
    n_blocks: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """One token for every slot: ``tokens [S]`` at ``positions [S]``.

    Writes each slot's new key/value at its own position, attends to positions
    ``0..position`` of that slot, and returns float32 logits ``[S, V]`` and the cache.
    Slots whose position is ``>= T`` (inactive) write nothing. With ``n_blocks`` (a traced
    scalar: how many attention blocks cover the longest live sequence) attention reads only
    those blocks; without it, the whole cache, masked (the reference form).
    """
    s_ = tokens.shape[0]
    t = cache.max_len
    inv_freq = rope_inv_freq(cfg)
    mask = jnp.arange(t)[None, :] <= positions[:, None]  # [S, T]
    x = embed_tokens(params, tokens[:, None])  # [S, 1, D]
    new_k, new_v = [], []
    for i, layer in enumerate(params.layers):

        def attend(q: jax.Array, k: jax.Array, v: jax.Array, i: int = i):  # q [S, 1, N, H], k/v [S, 1, K, H]
            # Written before attending: reading the donated cache first would make XLA copy it.
            ck = write_step(cache.k[i], k[:, 0], positions)
            cv = write_step(cache.v[i], v[:, 0], positions)
            q = q.reshape(s_, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim)
            if n_blocks is None:
                o = _attend_step(q, ck, cv, mask)
            else:
                o = _attend_blocks(q, ck, cv, positions, n_blocks)
            return o.reshape(s_, 1, cfg.n_heads * cfg.head_dim), (ck, cv)

        x, (ck, cv) = _block(params, cfg, layer, x, positions[:, None], inv_freq, attend)
        new_k.append(ck)
        new_v.append(cv)
    return unembed(params, cfg, x[:, 0]), KVCache(k=tuple(new_k), v=tuple(new_v))


def extend(
    params: Params, cfg: ModelConfig, tokens: jax.Array, slots: jax.Array, starts: jax.Array,
    counts: jax.Array, cache: KVCache, n_blocks: jax.Array,
) -> tuple[jax.Array, KVCache]:
    """Run chunks of new tokens into their slots: the one primitive behind prefill.

    ``tokens [R, C]``: row r holds ``counts[r]`` tokens of slot ``slots[r]`` for positions
    ``starts[r]...`` (a padding row has count 0; several rows may extend the same slot at
    consecutive offsets). Every layer first writes the rows' keys/values into the cache, then each
    token attends to its slot's positions ``0..its own``: what the cache held before the call
    and what this call wrote. ``n_blocks`` (traced) must cover the furthest position of any row.
    Returns the hidden states ``[R, C, D]`` (before the final norm) and the cache.

    Each token's result is computed row-wise by the same fixed-shape matmuls, so it does not
    depend on where a chunk boundary fell or which other rows shared the call.
    """
    r, c = tokens.shape
    m = r * c
    t = cache.max_len
    inv_freq = rope_inv_freq(cfg)
    pos = starts[:, None] + jnp.arange(c)[None, :]  # [R, C]
    write_pos = jnp.where(jnp.arange(c)[None, :] < counts[:, None], pos, t)  # padding writes nothing
    flat_pos = pos.reshape(m)
    x = embed_tokens(params, tokens.reshape(m))  # [M, D]
    new_k, new_v = [], []
    for i, layer in enumerate(params.layers):

        def attend(q: jax.Array, k: jax.Array, v: jax.Array, i: int = i):  # q [M, N, H], k/v [M, K, H]
            ck = write_chunks(cache.k[i], k.reshape(r, c, cfg.n_kv_heads, cfg.head_dim), slots, write_pos)
            cv = write_chunks(cache.v[i], v.reshape(r, c, cfg.n_kv_heads, cfg.head_dim), slots, write_pos)
            q = q.reshape(r, c, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim)
            return _attend_chunks(q, ck, cv, slots, pos, n_blocks).reshape(m, cfg.n_heads * cfg.head_dim), (ck, cv)

        x, (ck, cv) = _block(params, cfg, layer, x, flat_pos, inv_freq, attend)
        new_k.append(ck)
        new_v.append(cv)
    return x.reshape(r, c, -1), KVCache(k=tuple(new_k), v=tuple(new_v))


def init_params(cfg: ModelConfig, key: jax.Array, dtype: jnp.dtype = jnp.float32) -> Params:
    """Random weights (scaled normal) for tests and benchmarks of shapes."""
    d, f, h = cfg.dim, cfg.ffn_dim, cfg.head_dim
    qkv_out = (cfg.n_heads + 2 * cfg.n_kv_heads) * h
    keys = iter(jax.random.split(key, 4 * cfg.n_layers + 2))

    def normal(shape: tuple[int, ...], fan_in: int) -> jax.Array:
        return (jax.random.normal(next(keys), shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)

    layers = tuple(
        LayerParams(
            attn_norm=jnp.ones((d,), dtype),
            wqkv=normal((d, qkv_out), d),
            wo=normal((cfg.n_heads * h, d), cfg.n_heads * h),
            mlp_norm=jnp.ones((d,), dtype),
            w_gate_up=normal((d, 2 * f), d),
            w_down=normal((f, d), f),
        )
        for _ in range(cfg.n_layers)
    )
    lm_head = None if cfg.tie_embeddings else normal((d, cfg.vocab_size), d)
    return Params(embed=normal((cfg.vocab_size, d), 1), layers=layers,
                  final_norm=jnp.ones((d,), dtype), lm_head=lm_head)
