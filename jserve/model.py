"""A decoder-only transformer as pure functions over a params pytree and a KV cache.

Llama's layer: RMSNorm, RoPE (with optional Llama-3 or linear frequency scaling), grouped-query
attention, a gated MLP (SwiGLU), tied or untied embeddings. The other families are the same
layer with a few differences, each switched on by a ``ModelConfig`` field and written once
here (``_layer``): Q/K/V biases, per-head q/k norms, norms on the attention and MLP outputs,
GeGLU, scaled embeddings, a score scale and soft caps, sliding-window layers (whose attention
reads only the cache blocks inside the window), per-layer RoPE bases, and a mixture of experts
in place of the MLP. Q/K/V and gate/up projections are fused (one matmul each), which is
faster on every backend; the checkpoint keeps them apart (see ``checkpoint.py``).

Axis letters: B batch, T/P time, S slots, N heads, K kv heads, G = N/K, H head dim,
D model dim, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jserve.attention import (  # noqa: F401 (re-exported: callers name them model.X)
    ATTN_BLOCK,
    AttnSpec,
    _attend,
    _attend_blocks,
    _attend_chunks,
    _attend_step,
    _cap,
    _first_block,
    _in_window,
    attend_paged_cpu,
    attention_block,
    attn_spec,
    padded_cache_len,
    paged_kernel,
    pairwise_sum,
    widen,
)
from jserve.blocks import BlockArray, float_for_kernels, fuses, kernels_loaded, matmul_fused
from jserve.cache_attention import (
    _attend_chunks_cache,
    _attend_chunks_stacked,
    _attend_step_cache,
    _attend_step_stacked,
)
from jserve.config import ModelConfig
from jserve.kv_cache import KVCache, PagedKVCache
from jserve.quant import QuantArray, dense, dense_experts, take_rows
from jserve.rope import apply_rope, rope_inv_freq, rope_scale  # noqa: F401 (re-exported: model.X)

Weight = jax.Array | QuantArray | BlockArray


@struct.dataclass
class LayerParams:
    attn_norm: jax.Array  # [D]
    wqkv: Weight  # [D, (N + 2K) H]
    wo: Weight  # [N H, D]
    mlp_norm: jax.Array  # [D]
    w_gate_up: Weight | None  # [D, 2F]; None in a mixture-of-experts layer
    w_down: Weight | None  # [F, D]
    # Only in the families that have them (see ``ModelConfig``):
    bqkv: jax.Array | None = None  # [(N + 2K) H], laid out like wqkv's columns
    q_norm: jax.Array | None = None  # [H]
    k_norm: jax.Array | None = None  # [H]
    post_attn_norm: jax.Array | None = None  # [D]
    post_mlp_norm: jax.Array | None = None  # [D]
    router: jax.Array | None = None  # [D, E]
    experts_gate_up: Weight | None = None  # [E, D, 2F]
    experts_down: Weight | None = None  # [E, F, D]


@struct.dataclass
class Params:
    embed: Weight  # [V, D]
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array  # [D]; its dtype is the activation dtype
    lm_head: Weight | None  # [D, V]; None when tied to ``embed``
    # The layers stacked (every leaf with a leading axis L; ``layers`` is then empty): built by
    # ``stack_layers`` for the loop over layers (``loops_layers``), read through ``layer_params``.
    stacked: LayerParams | None = None
    # Blocks of the fused matrices' columns, one per tensor-parallel shard (see sharding.py):
    # wqkv holds [q, k, v] of each group in turn, w_gate_up [gate, up] of each group.
    qkv_groups: int = struct.field(pytree_node=False, default=1)
    mlp_groups: int = struct.field(pytree_node=False, default=1)
    expert_groups: int = struct.field(pytree_node=False, default=1)  # of experts_gate_up's columns


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    # A fixed-order sum: XLA:CPU's mean gave a row other bits at some row counts (65 rows of 64).
    ms = pairwise_sum(xf * xf)[..., None] / xf.shape[-1]
    xf = xf * jax.lax.rsqrt(ms + eps)
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


def _activation(cfg: ModelConfig) -> Callable[[jax.Array], jax.Array]:
    return jax.nn.silu if cfg.activation == "silu" else functools.partial(jax.nn.gelu, approximate=True)


def _gated(cfg: ModelConfig, gu: jax.Array, groups: int) -> jax.Array:
    """``[..., 2F]`` in ``groups`` blocks of ``[gate, up]`` → ``act(gate) * up`` ``[..., F]``."""
    lead, f = gu.shape[:-1], gu.shape[-1] // 2
    gu = gu.reshape(*lead, groups, 2, f // groups)
    gate, up = gu[..., 0, :].reshape(*lead, f), gu[..., 1, :].reshape(*lead, f)
    return _activation(cfg)(gate) * up


def _mlp(cfg: ModelConfig, layer: LayerParams, x: jax.Array, groups: int) -> jax.Array:
    return dense(_gated(cfg, dense(x, layer.w_gate_up), groups), layer.w_down)


def normed_dense(x: jax.Array, norm: jax.Array, eps: float, w: Weight) -> jax.Array:
    """``dense(rms_norm(x, norm, eps), w)``: one kernel call where the kernels fuse it (the norm
    computed inside, row by row), else the two apart."""
    if fuses(x, w) and norm.dtype == jnp.float32:
        return matmul_fused(x, w, norm=norm, eps=eps)
    return dense(rms_norm(x, norm, eps), w)


def _residual_dense(x: jax.Array, h: jax.Array, w: Weight) -> jax.Array:
    """``x + dense(h, w)``, the add inside the kernel call where it fuses (the same bits)."""
    if fuses(h, w) and x.dtype == jnp.float32:
        return matmul_fused(h, w, residual=x)
    return x + dense(h, w)


def _mlp_residual(cfg: ModelConfig, layer: LayerParams, x: jax.Array, groups: int) -> jax.Array:
    """``x + _mlp(rms_norm(x))``: the norm fused into the gate/up call and the residual add into the
    down call, where the kernels fuse them. (The activation stays an XLA op: fused into the down
    call with a scalar exp it measured slower at 8-16 rows.)"""
    gu = normed_dense(x, layer.mlp_norm, cfg.norm_eps, layer.w_gate_up)
    return _residual_dense(x, _gated(cfg, gu, groups), layer.w_down)


def _moe(cfg: ModelConfig, layer: LayerParams, x: jax.Array, groups: int) -> jax.Array:
    """A mixture of experts in place of the MLP: each token's output is the sum of its top
    ``experts_per_token`` experts' MLPs, weighted by the router's softmax probabilities (rescaled
    to sum to 1 with ``moe_renormalize``). Every expert runs on every token as one batched
    matmul and the weights of the experts not chosen are exact zeros: a fixed shape whatever
    the routing, and with the experts sharded over the mesh each device runs its own."""
    lead, d = x.shape[:-1], x.shape[-1]
    xs = x.reshape(-1, d)  # [M, D]
    probs = jax.nn.softmax(dense(xs, layer.router).astype(jnp.float32), axis=-1)  # [M, E]
    top, chosen = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.moe_renormalize:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    weights = jnp.sum(jax.nn.one_hot(chosen, cfg.n_experts, dtype=jnp.float32) * top[..., None], axis=1)
    e = cfg.n_experts
    h = _gated(cfg, dense_experts(jnp.broadcast_to(xs, (e, *xs.shape)), layer.experts_gate_up), groups)
    out = dense_experts(h, layer.experts_down)  # [E, M, D]
    y = jnp.einsum("emd,me->md", out.astype(jnp.float32), weights)
    return y.astype(x.dtype).reshape(*lead, d)



def embed_tokens(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    x = take_rows(params.embed, tokens, params.final_norm.dtype)
    return x if cfg.embed_scale is None else x * jnp.asarray(cfg.embed_scale, x.dtype)


def unembed(params: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm and output projection: ``[..., D]`` → float32 logits ``[..., V]``."""
    head = params.embed if params.lm_head is None else params.lm_head
    if fuses(x, head) and params.final_norm.dtype == jnp.float32:
        logits = matmul_fused(x, head, norm=params.final_norm, eps=cfg.norm_eps)
    else:
        x = rms_norm(x, params.final_norm, cfg.norm_eps)
        if params.lm_head is None:
            logits = dense(x, params.embed, transpose=True).astype(jnp.float32)
        else:
            logits = dense(x, params.lm_head).astype(jnp.float32)
    return _cap(logits, cfg.final_softcap)


Attend = Callable[..., tuple[jax.Array, tuple[jax.Array, jax.Array]]]


def layer_rep(cfg: ModelConfig, i: int) -> int:
    """The first layer whose static spec (RoPE frequencies and scale, ``AttnSpec``) is layer ``i``'s:
    layers with the same representative are traced by the same function (``_run_layer``)."""
    key = (cfg.rope(i), attn_spec(cfg, i))
    return next(j for j in range(i + 1) if (cfg.rope(j), attn_spec(cfg, j)) == key)


def _layer(layer: LayerParams, x: jax.Array, positions: jax.Array, ck: jax.Array | None, cv: jax.Array | None,
           aux: tuple, *, cfg: ModelConfig, rep: int, groups: tuple[int, int, int],
           attend: Attend) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """A decoder layer (any whose ``layer_rep`` is ``rep``), shared by every entry point: ``x [..., D]``
    at ``positions [...]``; ``groups`` the params' (qkv, mlp, expert) groups.

    ``attend(q, k, v, spec, ck, cv, aux, cfg)`` gets the rotated queries ``[..., N, H]``, keys/values
    ``[..., K, H]``, the layer's ``AttnSpec``, its cache buffers ``ck``/``cv`` (None where there is
    no cache) and the entry point's ``aux`` arrays; it does what the entry point needs (write the
    cache, attend to it) and returns the attention output ``[..., N·H]`` and the layer's
    keys/values as that entry point keeps them."""
    inv_freq = rope_inv_freq(cfg, rep)
    qkv = normed_dense(x, layer.attn_norm, cfg.norm_eps, layer.wqkv)
    if layer.bqkv is not None:
        qkv = qkv + layer.bqkv.astype(qkv.dtype)
    q, k, v = _split_qkv(cfg, qkv, groups[0])
    if layer.q_norm is not None:
        q, k = rms_norm(q, layer.q_norm, cfg.norm_eps), rms_norm(k, layer.k_norm, cfg.norm_eps)
    scale = rope_scale(cfg, rep)
    q, k = apply_rope(q, positions, inv_freq, scale), apply_rope(k, positions, inv_freq, scale)
    o, kv = attend(q, k, v, attn_spec(cfg, rep), ck, cv, aux, cfg)
    if layer.post_attn_norm is None:
        x = _residual_dense(x, o, layer.wo)
    else:
        x = x + rms_norm(dense(o, layer.wo), layer.post_attn_norm, cfg.norm_eps)
    if layer.router is None and layer.post_mlp_norm is None:
        return _mlp_residual(cfg, layer, x, groups[1]), kv
    h = rms_norm(x, layer.mlp_norm, cfg.norm_eps)
    m = _mlp(cfg, layer, h, groups[1]) if layer.router is None else _moe(cfg, layer, h, groups[2])
    if layer.post_mlp_norm is not None:
        m = rms_norm(m, layer.post_mlp_norm, cfg.norm_eps)
    return x + m, kv


# One function per layer spec, traced once and called per layer: inside a jitted caller the calls
# are inlined by XLA, so the program (and every bit) is the unrolled one's, but tracing and lowering
# cost one layer per spec instead of all of them.
_layer_once = jax.jit(_layer, static_argnames=("cfg", "rep", "groups", "attend"))


def trace_layers_once() -> bool:
    """Whether entry points call ``_layer`` through one jitted function per layer spec (the
    default) or trace every layer unrolled (``JSERVE_UNROLLED_LAYERS=1``): the same program and
    bits either way (tests/test_model.py), fewer seconds tracing and lowering (scripts/bench_trace.py).
    Read when a caller is traced, so it is set for the process before anything is compiled."""
    return os.environ.get("JSERVE_UNROLLED_LAYERS", "") in ("", "0")


def layer_params(params: Params, i: int | jax.Array) -> LayerParams:
    """Layer ``i``'s weights: ``params.layers[i]``, or a view of layer ``i`` of ``params.stacked``
    (``i`` may be traced): its matrices are the whole stacks with the index (``BlockArray.layer``),
    which the kernels read in place; its vectors are sliced (a few hundred bytes)."""
    if params.stacked is None:
        return params.layers[i]
    return jax.tree.map(lambda w: w.replace(layer=i) if isinstance(w, BlockArray) else w[i], params.stacked,
                        is_leaf=lambda w: isinstance(w, BlockArray))


def stack_layers(params: Params) -> Params:
    """``params`` with its layers stacked into ``params.stacked`` (``layers`` empty): one array per
    weight instead of one per layer and weight, for the loop over layers (``loops_layers``)."""
    if params.stacked is not None:
        return params
    stacked = jax.tree.map(lambda *ws: jnp.stack(ws), *params.layers)
    return params.replace(layers=(), stacked=stacked)


def loops_layers(params: Params, cfg: ModelConfig) -> bool:
    """Whether ``decode_step`` and ``extend`` may run the layers as one loop (``lax.fori_loop``) over
    stacked weights and a stacked page pool, so a compiled call holds one layer's program instead of
    ``n_layers`` copies of it (XLA:CPU keeps each executable's optimized module and buffer
    assignment: ~80 MiB per call for SmolLM2's 30 layers unrolled). It needs every matmul through the
    CPU kernels (which read layer ``l`` of a stack in place), every layer with the same static spec
    (RoPE, window, scale: ``layer_rep`` 0) and no mixture of experts. ``JSERVE_LOOP_LAYERS=0`` turns
    it off (the layers unrolled, the same bits: tests/test_loop_layers.py)."""
    if os.environ.get("JSERVE_LOOP_LAYERS", "") == "0" or cfg.n_experts > 0 or cfg.n_layers < 2:
        return False
    if not row_invariant(params):
        return False
    return all(layer_rep(cfg, i) == 0 for i in range(cfg.n_layers))


def _run_layer(params: Params, cfg: ModelConfig, i: int, x: jax.Array, positions: jax.Array, ck: jax.Array | None,
               cv: jax.Array | None, aux: tuple, attend: Attend) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Layer ``i`` (``_layer``): traced once per spec, or unrolled (``trace_layers_once``)."""
    fn = _layer_once if trace_layers_once() else _layer
    return fn(layer_params(params, i), x, positions, ck, cv, aux, cfg=cfg, rep=layer_rep(cfg, i),
              groups=(params.qkv_groups, params.mlp_groups, params.expert_groups), attend=attend)


def _loop_layers(params: Params, cfg: ModelConfig, x: jax.Array, positions: jax.Array, cache: PagedKVCache,
                 aux: tuple, attend: Attend) -> tuple[jax.Array, PagedKVCache]:
    """Every layer as one ``fori_loop`` over ``params.stacked`` and the stacked pool (``loops_layers``):
    ``attend`` gets ``aux + (layer,)``."""
    groups = (params.qkv_groups, params.mlp_groups, params.expert_groups)

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]):
        x, k, v = carry
        x, (k, v) = _layer(layer_params(params, i), x, positions, k, v, (*aux, i), cfg=cfg, rep=0, groups=groups,
                           attend=attend)
        return x, k, v

    x, k, v = jax.lax.fori_loop(0, cfg.n_layers, body, (x, cache.k, cache.v))
    return x, cache.replace(k=k, v=v)


def _attend_forward(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttnSpec, ck: None, cv: None, aux: tuple,
                    cfg: ModelConfig):
    """``forward``'s attention: fresh sequences ``q [B, T, N, H]``, ``k/v [B, T, K, H]``, causal."""
    b, t = q.shape[:2]
    q = q.reshape(b, t, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim)
    mask = jnp.broadcast_to(_in_window(jnp.arange(t)[None, :], jnp.arange(t)[:, None], spec.window), (b, t, t))
    return _attend(q, k, v, mask, spec).reshape(b, t, cfg.n_heads * cfg.head_dim), (k, v)


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
    x = embed_tokens(params, cfg, tokens)
    ks, vs = [], []
    for i in range(cfg.n_layers):
        x, (k, v) = _run_layer(params, cfg, i, x, pos, None, None, (), _attend_forward)
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


@functools.cache
def _with_kernel(attend: Attend, kernel: str) -> Attend:
    """``attend`` for a page pool read by ``kernel`` (``kv_cache.PagedKVCache.kernel``): one object
    per pair, so ``_layer_once``'s static ``attend`` is traced once."""
    return attend if kernel == "xla" else functools.partial(attend, kernel=kernel)


def decode_step(
    params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache | PagedKVCache,
    n_blocks: jax.Array | None = None, table: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | PagedKVCache]:
    """One token for every slot: ``tokens [S]`` at ``positions [S]``.

    Writes each slot's new key/value at its own position, attends to positions
    ``0..position`` of that slot, and returns float32 logits ``[S, V]`` and the cache.
    Slots whose position is ``>= T`` (inactive) write nothing. With ``n_blocks`` (a traced
    scalar: how many attention blocks cover the longest live sequence) attention reads only
    those blocks; without it, the whole cache, masked (the reference form). With ``table [S, M]``
    (and ``n_blocks``) ``cache`` is a ``PagedKVCache`` read and written through that page table.
    """
    x = embed_tokens(params, cfg, tokens[:, None])  # [S, 1, D]
    if getattr(cache, "stacked", False):
        x, cache = _loop_layers(params, cfg, x, positions[:, None], cache, (positions, n_blocks, table),
                                _attend_step_stacked)
        return unembed(params, cfg, x[:, 0]), cache
    attend = _with_kernel(_attend_step_cache, getattr(cache, "kernel", "xla"))
    new_k, new_v = [], []
    for i in range(cfg.n_layers):
        x, (ck, cv) = _run_layer(params, cfg, i, x, positions[:, None], cache.k[i], cache.v[i],
                                 (positions, n_blocks, table), attend)
        new_k.append(ck)
        new_v.append(cv)
    return unembed(params, cfg, x[:, 0]), cache.replace(k=tuple(new_k), v=tuple(new_v))


def extend(
    params: Params, cfg: ModelConfig, tokens: jax.Array, slots: jax.Array, starts: jax.Array,
    counts: jax.Array, cache: KVCache | PagedKVCache, n_blocks: jax.Array, table: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | PagedKVCache]:
    """Run chunks of new tokens into their slots: the one primitive behind prefill.

    ``tokens [R, C]``: row r holds ``counts[r]`` tokens of slot ``slots[r]`` for positions
    ``starts[r]...`` (a padding row has count 0; several rows may extend the same slot at
    consecutive offsets). Every layer first writes the rows' keys/values into the cache, then each
    token attends to its slot's positions ``0..its own``: what the cache held before the call
    and what this call wrote. ``n_blocks`` (traced) must cover the furthest position of any row.
    Returns the hidden states ``[R, C, D]`` (before the final norm) and the cache.

    Each token's result is computed row-wise by the same fixed-shape matmuls, so it does not
    depend on where a chunk boundary fell or which other rows shared the call. With ``table [S, M]``
    ``cache`` is a ``PagedKVCache`` read and written through that page table (``kv_cache``).
    """
    r, c = tokens.shape
    m = r * c
    t = cache.max_len if table is None else table.shape[1] * cache.page_size
    pos = starts[:, None] + jnp.arange(c)[None, :]  # [R, C]
    write_pos = jnp.where(jnp.arange(c)[None, :] < counts[:, None], pos, t)  # padding writes nothing
    first_pos = jnp.min(jnp.where(counts > 0, starts, t))
    x = embed_tokens(params, cfg, tokens.reshape(m))  # [M, D]
    if getattr(cache, "stacked", False):
        x, cache = _loop_layers(params, cfg, x, pos.reshape(m), cache,
                                (slots, pos, write_pos, n_blocks, first_pos, table), _attend_chunks_stacked)
        return x.reshape(r, c, -1), cache
    attend = _with_kernel(_attend_chunks_cache, getattr(cache, "kernel", "xla"))
    new_k, new_v = [], []
    for i in range(cfg.n_layers):
        x, (ck, cv) = _run_layer(params, cfg, i, x, pos.reshape(m), cache.k[i], cache.v[i],
                                 (slots, pos, write_pos, n_blocks, first_pos, table), attend)
        new_k.append(ck)
        new_v.append(cv)
    return x.reshape(r, c, -1), cache.replace(k=tuple(new_k), v=tuple(new_v))


def for_cpu_kernels(params: Params) -> Params:
    """``params`` with every float32 matrix as an ``f32`` ``BlockArray`` (``[O, I]``), multiplied
    through the row-invariant CPU kernels, so a row's bits never depend on how many rows a step
    has; unchanged where the kernels are not built (or not on CPU). Unsharded params only."""
    layers = tuple(
        layer.replace(wqkv=float_for_kernels(layer.wqkv), wo=float_for_kernels(layer.wo),
                      w_gate_up=None if layer.w_gate_up is None else float_for_kernels(layer.w_gate_up),
                      w_down=None if layer.w_down is None else float_for_kernels(layer.w_down),
                      router=None if layer.router is None else float_for_kernels(layer.router))
        for layer in params.layers)
    lm_head = None if params.lm_head is None else float_for_kernels(params.lm_head)
    return params.replace(embed=float_for_kernels(params.embed, transpose=False), layers=layers, lm_head=lm_head)


def row_invariant(params: Params) -> bool:
    """Whether every matmul of ``params`` runs through the row-invariant CPU kernels (float32 and
    block weights on CPU where the kernels are built): then a row's bits never depend on how many
    rows a call has, and steps may compute only the rows they need. Else (int8, bfloat16, XLA's
    path) the rows are invariant only at fixed shapes."""
    if not kernels_loaded():
        return False
    every = params.layers if params.stacked is None else (params.stacked,)
    layers = [w for layer in every for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down,
                                             layer.router, layer.experts_gate_up, layer.experts_down)]
    weights = [w for w in (*layers, params.embed, params.lm_head) if w is not None]
    return all(isinstance(w, BlockArray) and w.kernel for w in weights)


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
