"""The model's two entry points against its own full forward, on a tiny random model."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve import model
from jserve.config import tiny_config
from jserve.kv_cache import KVCache, write_prefix


def _setup(**over):
    cfg = tiny_config(**over)
    return cfg, model.init_params(cfg, jax.random.PRNGKey(0))


@pytest.mark.parametrize("over", [{}, {"n_kv_heads": 1, "tie_embeddings": False}, {"n_kv_heads": 4}])
def test_decode_with_cache_reproduces_full_forward(over):
    cfg, params = _setup(**over)
    rng = np.random.default_rng(0)
    seq = rng.integers(0, cfg.vocab_size, size=24)
    full = np.asarray(model.logits_all(params, cfg, jnp.array(seq[None])))[0]  # [T, V]

    n_prompt, bucket, slots, slot = 9, 16, 3, 1
    padded = np.zeros(bucket, np.int32)
    padded[:n_prompt] = seq[:n_prompt]
    logits, ks, vs = model.prefill(params, cfg, jnp.array(padded[None]), jnp.array([n_prompt]))
    np.testing.assert_allclose(np.asarray(logits)[0], full[n_prompt - 1], atol=1e-4, rtol=1e-4)

    cache = KVCache.zeros(cfg, slots, 32, jnp.float32)
    cache = write_prefix(cache, tuple(k[0] for k in ks), tuple(v[0] for v in vs), jnp.int32(slot))
    step = jax.jit(model.decode_step, static_argnums=1)
    for pos in range(n_prompt, len(seq)):
        tokens = jnp.array(rng.integers(0, cfg.vocab_size, size=slots)).at[slot].set(seq[pos])
        positions = jnp.full((slots,), 32).at[slot].set(pos)
        logits, cache = step(params, cfg, tokens, positions, cache)
        np.testing.assert_allclose(np.asarray(logits)[slot], full[pos], atol=1e-4, rtol=1e-4)


def test_prefill_padding_does_not_change_the_result():
    cfg, params = _setup()
    prompt = np.arange(3, 14)
    out = []
    for bucket in (16, 32):
        padded = np.full(bucket, 7, np.int32)
        padded[: len(prompt)] = prompt
        logits, ks, _ = model.prefill(params, cfg, jnp.array(padded[None]), jnp.array([len(prompt)]))
        out.append((np.asarray(logits), np.asarray(ks[0])[0, : len(prompt)]))
    np.testing.assert_allclose(out[0][0], out[1][0], atol=1e-5)
    np.testing.assert_allclose(out[0][1], out[1][1], atol=1e-6)


def test_decode_slot_ignores_other_slots_and_masked_positions():
    """A slot's logits do not depend on other slots' tokens or on cache entries past its length."""
    cfg, params = _setup()
    rng = np.random.default_rng(1)
    base = KVCache.zeros(cfg, 4, 16, jnp.float32)
    noisy = KVCache(k=tuple(jnp.array(rng.normal(size=k.shape), jnp.float32) for k in base.k),
                    v=tuple(jnp.array(rng.normal(size=v.shape), jnp.float32) for v in base.v))
    # Slot 2 holds the same 5 positions in both caches; everything else differs.
    clean = KVCache(k=tuple(b.at[2, :, :5].set(n[2, :, :5]) for b, n in zip(base.k, noisy.k)),
                    v=tuple(b.at[2, :, :5].set(n[2, :, :5]) for b, n in zip(base.v, noisy.v)))
    la, _ = model.decode_step(params, cfg, jnp.array([1, 2, 3, 4]), jnp.array([7, 9, 5, 2]), noisy)
    lb, _ = model.decode_step(params, cfg, jnp.array([9, 8, 3, 6]), jnp.array([16, 16, 5, 16]), clean)
    np.testing.assert_array_equal(np.asarray(la)[2], np.asarray(lb)[2])


def test_decode_writes_only_active_positions():
    cfg, params = _setup()
    cache = KVCache.zeros(cfg, 3, 8, jnp.float32)
    _, out = model.decode_step(params, cfg, jnp.array([1, 2, 3]), jnp.array([2, 8, 0]), cache)
    written = np.abs(np.asarray(out.k[0])).sum(axis=(1, 3)) > 0  # [S, T]
    expect = np.zeros((3, 8), bool)
    expect[0, 2] = expect[2, 0] = True
    np.testing.assert_array_equal(written, expect)


def test_llama3_rope_scaling_changes_only_low_frequencies():
    from jserve.config import RopeScaling

    cfg = tiny_config(head_dim=64, n_heads=2, n_kv_heads=1, rope_theta=500000.0)
    scaled = tiny_config(head_dim=64, n_heads=2, n_kv_heads=1, rope_theta=500000.0,
                         rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
    a, b = model.rope_inv_freq(cfg), model.rope_inv_freq(scaled)
    wavelen = 2 * np.pi / a
    np.testing.assert_allclose(b[wavelen < 64 / 4], a[wavelen < 64 / 4])  # high frequencies untouched
    np.testing.assert_allclose(b[wavelen > 64], a[wavelen > 64] / 8)  # low frequencies divided by factor


SPEC = model.AttnSpec(0.25, None, None)  # head_dim 16, no cap, no window


def _random_cache(rng, slots: int, kv: int, t: int, h: int) -> tuple[jax.Array, jax.Array]:
    return (jnp.array(rng.normal(size=(slots, kv, t, h)), jnp.float32),
            jnp.array(rng.normal(size=(slots, kv, t, h)), jnp.float32))


def test_blocked_attention_matches_the_dense_reference():
    rng = np.random.default_rng(3)
    t = 4 * model.ATTN_BLOCK
    k, v = _random_cache(rng, 5, 2, t, 16)
    q = jnp.array(rng.normal(size=(5, 2, 3, 16)), jnp.float32)
    positions = jnp.array([0, 5, model.ATTN_BLOCK - 1, model.ATTN_BLOCK, t - 1])
    mask = jnp.arange(t)[None, :] <= positions[:, None]
    dense = np.asarray(model._attend_step(q, k, v, mask, SPEC))
    blocked = np.asarray(jax.jit(model._attend_blocks, static_argnums=5)(q, k, v, positions, jnp.int32(4), SPEC))
    np.testing.assert_allclose(blocked, dense, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 5, model.ATTN_BLOCK, model.ATTN_BLOCK + 9])
def test_blocked_attention_with_a_window_matches_the_masked_dense_reference(window):
    """A sliding window with soft-capped scores: the blocked form skips the blocks wholly before
    the earliest slot's window and still equals the dense form masked to each window."""
    rng = np.random.default_rng(3)
    t = 4 * model.ATTN_BLOCK
    k, v = _random_cache(rng, 5, 2, t, 16)
    q = jnp.array(rng.normal(size=(5, 2, 3, 16)), jnp.float32) * 3
    positions = jnp.array([3 * model.ATTN_BLOCK + 1, 2 * model.ATTN_BLOCK + 7, model.ATTN_BLOCK + 2, t - 1, t])
    spec = model.AttnSpec(0.2, 2.0, window)
    kpos = jnp.arange(t)[None, :]
    mask = (kpos <= positions[:, None]) & (kpos > positions[:, None] - window)
    dense = np.asarray(model._attend_step(q, k, v, mask, spec))
    blocked = np.asarray(jax.jit(model._attend_blocks, static_argnums=5)(q, k, v, positions, jnp.int32(4), spec))
    np.testing.assert_allclose(blocked[:4], dense[:4], atol=2e-6, rtol=1e-5)
    # The same slots one at a time (the first block read differs) give the same bits.
    for s in range(4):
        alone = jnp.where(jnp.arange(5) == s, positions, t)
        one = np.asarray(jax.jit(model._attend_blocks, static_argnums=5)(q, k, v, alone, jnp.int32(4), spec))
        np.testing.assert_array_equal(one[s], blocked[s])


def test_blocked_attention_of_a_slot_is_bitwise_the_same_however_many_blocks_are_read():
    """Blocks past a slot's position add exact zeros: a short sequence beside a long one gets the
    same bits as alone, which is what keeps batch invariance with length-bounded attention."""
    rng = np.random.default_rng(4)
    t = 4 * model.ATTN_BLOCK
    k, v = _random_cache(rng, 3, 2, t, 16)
    q = jnp.array(rng.normal(size=(3, 2, 2, 16)), jnp.float32)
    positions = jnp.array([7, model.ATTN_BLOCK + 3, 2 * model.ATTN_BLOCK])
    attend = jax.jit(model._attend_blocks, static_argnums=5)
    own = [1, 2, 3]  # blocks each slot needs
    for n in range(1, 5):
        out = np.asarray(attend(q, k, v, positions, jnp.int32(n), SPEC))
        for s, need in enumerate(own):
            if n >= need:
                np.testing.assert_array_equal(out[s], np.asarray(attend(q, k, v, positions, jnp.int32(need), SPEC))[s])


def test_decode_with_blocked_attention_follows_the_dense_step():
    cfg, params = _setup()
    rng = np.random.default_rng(5)
    t = model.padded_cache_len(200)
    assert t % model.attention_block(t) == 0 and t >= 200
    cache = KVCache(*_random_cache(rng, 3, cfg.n_kv_heads, t, cfg.head_dim))
    cache = KVCache(k=(cache.k,) * cfg.n_layers, v=(cache.v,) * cfg.n_layers)
    tokens, positions = jnp.array([3, 4, 5]), jnp.array([150, 4, t])  # slot 2 inactive
    dense, _ = model.decode_step(params, cfg, tokens, positions, cache)
    n_blocks = jnp.int32(150 // model.attention_block(t) + 1)
    blocked, _ = jax.jit(model.decode_step, static_argnums=1)(params, cfg, tokens, positions, cache, n_blocks)
    np.testing.assert_allclose(np.asarray(blocked)[:2], np.asarray(dense)[:2], atol=1e-4, rtol=1e-4)


def _run_chunks(params, cfg, seq, calls, rows, slots=3, slot=1, t=256, filler_seed=None, cache_dtype=jnp.float32):
    """Run ``seq`` into ``slot`` by ``model.extend``: ``calls`` is a list of calls, each a list of
    ``(start, n)`` chunks (of at most 32). Returns hidden states ``[len(seq), D]`` and the cache."""
    ext = jax.jit(model.extend, static_argnums=1)
    cache = KVCache.zeros(cfg, slots, t, cache_dtype)
    rng = np.random.default_rng(filler_seed)
    hidden = {}
    for call in calls:
        tok, sl, st, ct = (np.zeros((rows, 32), np.int32), np.zeros(rows, np.int32), np.zeros(rows, np.int32),
                           np.zeros(rows, np.int32))
        for r, (a, n) in enumerate(call):
            tok[r, :n], sl[r], st[r], ct[r] = seq[a:a + n], slot, a, n
        if filler_seed is not None and len(call) < rows:  # another slot's chunk shares the call
            r = len(call)
            tok[r], sl[r], st[r], ct[r] = rng.integers(0, cfg.vocab_size, 32), (slot + 1) % slots, 0, 32
        furthest = max(a + n - 1 for a, n in call)
        x, cache = ext(params, cfg, tok, sl, st, ct, cache, jnp.int32(furthest // model.attention_block(t) + 1))
        x = np.asarray(x)
        for r, (a, n) in enumerate(call):
            for j in range(n):
                hidden[a + j] = x[r, j]
    return np.stack([hidden[i] for i in sorted(hidden)]), cache


def _chunks(length, first=32):
    out, a = [], 0
    for n in [first] + [32] * length:
        if a >= length:
            break
        out.append((a, min(n, length - a)))
        a += out[-1][1]
    return out


@pytest.mark.parametrize("over, t, n_seq, n_prompt", [
    ({}, 256, 170, 150),  # crosses an attention block (128)
    ({"n_kv_heads": 1, "tie_embeddings": False}, 256, 170, 150),
    ({}, 96, 90, 70),  # a cache shorter than one block: one block of 96, not a power of two
])
def test_extend_in_chunks_reproduces_full_forward_and_decode_continues(over, t, n_seq, n_prompt):
    cfg, params = _setup(**over)
    rng = np.random.default_rng(3)
    seq = rng.integers(0, cfg.vocab_size, size=n_seq)
    full = np.asarray(model.logits_all(params, cfg, jnp.array(seq[None])))[0]
    chunks = _chunks(n_prompt, first=7)
    hidden, cache = _run_chunks(params, cfg, seq, [chunks[i:i + 2] for i in range(0, len(chunks), 2)], rows=2,
                                t=t)
    logits = np.asarray(model.unembed(params, cfg, jnp.asarray(hidden[:n_prompt])))
    np.testing.assert_allclose(logits, full[:n_prompt], atol=1e-4, rtol=1e-4)
    step = jax.jit(model.decode_step, static_argnums=1)
    for pos in range(n_prompt, len(seq)):
        tokens = jnp.zeros((3,), jnp.int32).at[1].set(seq[pos])
        positions = jnp.full((3,), t).at[1].set(pos)
        out, cache = step(params, cfg, tokens, positions, cache, jnp.int32(pos // model.attention_block(t) + 1))
        np.testing.assert_allclose(np.asarray(out)[1], full[pos], atol=1e-4, rtol=1e-4)


def test_extend_is_bitwise_the_same_wherever_chunks_are_cut_and_whatever_shares_the_call():
    cfg, params = _setup()
    seq = np.random.default_rng(4).integers(0, cfg.vocab_size, size=200)
    aligned = _chunks(200)
    h0, c0 = _run_chunks(params, cfg, seq, [aligned[i:i + 1] for i in range(len(aligned))], rows=2)
    shifted = _chunks(200, first=5)
    h1, c1 = _run_chunks(params, cfg, seq, [shifted[i:i + 3] for i in range(0, len(shifted), 3)], rows=8,
                         filler_seed=0)
    h2, c2 = _run_chunks(params, cfg, seq, [aligned], rows=16, filler_seed=1)
    for h, c in ((h1, c1), (h2, c2)):
        assert np.array_equal(h, h0)
        for a, b in zip(c.k + c.v, c0.k + c0.v):
            assert np.array_equal(np.asarray(a)[1, :, :200], np.asarray(b)[1, :, :200])


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])  # int8: the scales ride in each row's last 4 bytes
def test_copy_prefix_copies_whole_blocks_of_one_slot_only(kv_dtype):
    from jserve.kv_cache import copy_prefix, to_stored

    cfg, _ = _setup()
    rng = np.random.default_rng(6)
    shape = (3, cfg.n_kv_heads, 64, cfg.head_dim)
    empty = KVCache.zeros(cfg, 3, 64, getattr(jnp, kv_dtype))
    cache = KVCache(k=tuple(to_stored(jnp.asarray(rng.standard_normal(shape), jnp.float32), b) for b in empty.k),
                    v=tuple(to_stored(jnp.asarray(rng.standard_normal(shape), jnp.float32), b) for b in empty.v))
    assert cache.dtype == jnp.dtype(kv_dtype)
    before = [np.asarray(x) for x in cache.k + cache.v]
    out = jax.jit(copy_prefix, static_argnums=4)(cache, jnp.int32(0), jnp.int32(2), jnp.int32(20), 16)
    for b, a in zip(before, out.k + out.v):
        a = np.asarray(a)
        assert np.array_equal(a[2, :, :32], b[0, :, :32])  # 20 positions, rounded up to 2 blocks of 16
        assert np.array_equal(a[2, :, 32:], b[2, :, 32:]) and np.array_equal(a[:2], b[:2])


@pytest.mark.parametrize("n", [1, 3, 96, 128])
def test_pairwise_sum_sums_any_width(n):
    x = np.random.default_rng(n).standard_normal((2, n)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model.pairwise_sum(jnp.asarray(x))), x.sum(-1), rtol=1e-5, atol=1e-5)


# Plain layers; Gemma 3's alternating sliding windows with a local RoPE base (two layer specs);
# float weights as the CPU kernels' blocks (``for_cpu_kernels``, where built).
LAYER_CASES = [({"n_layers": 4}, False),
               ({"n_layers": 6, "sliding_window": 8, "sliding_layers": (True, True, False) * 2,
                 "rope_local_theta": 500.0}, False),
               ({"n_layers": 4}, True)]


@pytest.mark.parametrize("over,kernels", LAYER_CASES)
def test_layers_traced_once_per_spec_equal_the_unrolled_layers_bitwise(over, kernels, monkeypatch):
    """``extend`` and ``decode_step`` give the same bits with every layer traced unrolled and with one
    traced function per layer spec, which traces ``_layer`` once per distinct spec, not per layer."""
    cfg, params = _setup(**over)
    if kernels:
        params = model.for_cpu_kernels(params)
    specs = {model.layer_rep(cfg, i) for i in range(cfg.n_layers)}
    assert len(specs) == (2 if "sliding_window" in over else 1)
    rng = np.random.default_rng(3)
    slots, t, r, c = 3, 32, 2, 4
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(r, c)), jnp.int32)
    rows = (jnp.array([1, 2], jnp.int32), jnp.array([0, 5], jnp.int32), jnp.array([4, 3], jnp.int32))
    traced = []
    real = model._layer

    def counting(*args, **kwargs):
        traced.append(kwargs["rep"])
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "_layer", counting)
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("JSERVE_UNROLLED_LAYERS", flag)
        monkeypatch.setattr(model, "_layer_once", jax.jit(counting, static_argnames=("cfg", "rep", "groups",
                                                                                      "attend")))
        traced.clear()
        cache = KVCache.zeros(cfg, slots, t, jnp.float32)
        # Fresh functions each time: jit's cache does not know the switch.
        x, cache = jax.jit(functools.partial(model.extend, cfg=cfg))(params, tokens=tokens, slots=rows[0],
                                                                      starts=rows[1], counts=rows[2], cache=cache,
                                                                      n_blocks=jnp.int32(1))
        logits, cache = jax.jit(functools.partial(model.decode_step, cfg=cfg))(
            params, tokens=jnp.array([7, 8, 9], jnp.int32), positions=jnp.array([t, 4, 7], jnp.int32), cache=cache,
            n_blocks=jnp.int32(1))
        out[flag] = (x, logits, cache)
        assert len(traced) == (2 * cfg.n_layers if flag == "1" else 2 * len(specs)), traced
    for unrolled, once in zip(jax.tree.leaves(out["1"]), jax.tree.leaves(out["0"]), strict=True):
        np.testing.assert_array_equal(np.asarray(unrolled), np.asarray(once))
    assert np.any(np.asarray(out["0"][1]) != 0)
