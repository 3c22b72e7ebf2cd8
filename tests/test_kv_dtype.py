"""The KV cache's element type (``--kv-dtype``): its bytes, its plumbing from the command line, and
what attention computes from a lower-precision cache (bfloat16, float16, int8 with scales)."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve import model
from jserve.config import tiny_config
from jserve.kv_cache import KVCache, cache_bytes, dequantize, quantize, storage
from jserve.kv_pages import page_bytes
from jserve.serving_config import KV_DTYPES, EngineConfig, add_engine_flags

from .test_model import _chunks, _run_chunks


@pytest.mark.parametrize("kv_dtype, itemsize, extra", [("float32", 4, 0), ("bfloat16", 2, 0), ("float16", 2, 0),
                                                        ("int8", 1, 4)])  # int8: a float32 scale per vector
def test_engine_state_holds_the_cache_in_kv_dtype_and_its_bytes_follow(tiny_ckpt, kv_dtype, itemsize, extra):
    from jserve.llm import load_engine

    eng = load_engine(tiny_ckpt, EngineConfig(slots=3, max_len=96, kv_dtype=kv_dtype), warmup=False).engine
    cache = eng._state_shape.cache
    cfg = eng.cfg
    assert {x.dtype for x in cache.arrays()} == {storage(kv_dtype)}  # bfloat16 as uint16 bits
    assert cache.num_layers == cfg.n_layers
    assert cache.layer_shape == (eng.pages.num_pages, cfg.n_kv_heads, eng.page_size, cfg.head_dim + extra)
    counted = sum(x.size * x.dtype.itemsize for x in cache.arrays())
    assert counted == 2 * cfg.n_layers * 3 * eng.cache_len * cfg.n_kv_heads * (cfg.head_dim * itemsize + extra)
    assert counted == cache_bytes(cfg, 3, eng.cache_len, eng.cache_dtype)
    # What --kv-memory and the "KV pool of N pages" log line count is what the pool holds.
    assert counted == eng.pages.num_pages * page_bytes(cfg, kv_dtype, eng.page_size)


def test_int8_kv_memory_buys_the_pages_its_bytes_with_scales_allow(tiny_ckpt):
    from jserve.llm import load_engine

    cfg = load_engine(tiny_ckpt, EngineConfig(slots=2, max_len=64, kv_dtype="int8"), warmup=False).engine.cfg
    per_page = 2 * cfg.n_layers * cfg.n_kv_heads * 128 * (cfg.head_dim + 4)
    eng = load_engine(tiny_ckpt, EngineConfig(slots=2, max_len=256, kv_dtype="int8", kv_memory=7 * per_page + 1),
                      warmup=False).engine
    assert eng.page_size == 128 and eng.pages.num_pages == 7
    assert sum(x.nbytes for x in eng.init_state().cache.arrays()) == 7 * per_page


def test_kv_dtype_defaults_to_bfloat16_none_follows_dtype_and_bad_names_are_refused(tiny_ckpt):
    from jserve.llm import load_engine

    assert load_engine(tiny_ckpt, EngineConfig(slots=2, max_len=64), warmup=False).engine.cache_dtype == jnp.bfloat16
    eng = load_engine(tiny_ckpt, EngineConfig(slots=2, max_len=64, kv_dtype=None), warmup=False).engine
    assert eng.cache_dtype == jnp.float32
    with pytest.raises(ValueError, match="kv_dtype must be one of float32, bfloat16, float16, int8, got 'int4'"):
        load_engine(tiny_ckpt, EngineConfig(slots=2, max_len=64, kv_dtype="int4"), warmup=False)


def test_kv_dtype_flag_reaches_the_servers_engine_config():
    from jserve import server

    for name in ("float16", "int8"):
        args = server.build_parser().parse_args(["--kv-dtype", name])
        assert server.engine_config(args).kv_dtype == name
    assert server.engine_config(server.build_parser().parse_args([])).kv_dtype == EngineConfig().kv_dtype
    ap = argparse.ArgumentParser()
    add_engine_flags(ap)
    with pytest.raises(SystemExit):
        ap.parse_args(["--kv-dtype", "int4"])
    assert set(KV_DTYPES) == {"float32", "bfloat16", "float16", "int8"}
    assert "{float32,bfloat16,float16,int8}" in ap.format_help()  # the choices, as --help lists them
    text = ap.format_help()
    kv_help = " ".join(text[text.index("\n  --kv-dtype"):text.index("\n  --kv-memory")].split())
    assert "int8 = each key and value vector as int8 with a float32 scale" in kv_help


def _forward_with(params, cfg, seq, attend):
    t = len(seq)
    pos = jnp.broadcast_to(jnp.arange(t), (1, t))
    x = model.embed_tokens(params, cfg, jnp.asarray(seq[None]))
    for i in range(len(params.layers)):
        x, _ = model._layer(params.layers[i], x, pos, None, None, (), cfg=cfg, rep=model.layer_rep(cfg, i),
                            groups=(params.qkv_groups, params.mlp_groups, params.expert_groups), attend=attend)
    return x, None, None


@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.float16, jnp.int8])
def test_a_low_precision_cache_gives_the_forward_with_rounded_keys_and_values(kv_dtype):
    cfg = tiny_config()
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    seq = np.random.default_rng(5).integers(0, cfg.vocab_size, size=150)
    # Prompt chunks through extend, then one decode step per remaining token, all through a cache of kv_dtype.
    hidden, cache = _run_chunks(params, cfg, seq, [[c] for c in _chunks(130)], rows=2, cache_dtype=kv_dtype)
    assert cache.dtype == jnp.dtype(kv_dtype)
    got = [np.asarray(model.unembed(params, cfg, jnp.asarray(hidden)))]
    step = jax.jit(model.decode_step, static_argnums=1)
    for pos in range(130, len(seq)):
        tokens = jnp.zeros((3,), jnp.int32).at[1].set(seq[pos])
        positions = jnp.full((3,), 256).at[1].set(pos)
        out, cache = step(params, cfg, tokens, positions, cache, jnp.int32(pos // model.attention_block(256) + 1))
        got.append(np.asarray(out)[1:2])
    got = np.concatenate(got)
    x, _, _ = _forward_with(params, cfg, seq, _rounding(kv_dtype))
    want = np.asarray(model.unembed(params, cfg, x))[0]
    x32, _, _ = _forward_with(params, cfg, seq, model._attend_forward)
    off32 = np.abs(np.asarray(model.unembed(params, cfg, x32))[0] - want)
    if kv_dtype != jnp.int8:
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)  # as the float32 cache vs forward (test_model)
        # The rounding is really there: the float32 forward differs by far more than the tolerance.
        assert np.max(off32) > 1e-3
        return
    # int8: the first layer's cached keys and values are the numpy reference's quantization of the
    # forward's, bit for bit. Later layers' inputs differ from the forward's in the last float bits
    # (sums in another order), which now and then moves a value across a rounding boundary: one
    # step of max|x|/127. So the logits are held to what that allows, 20x closer than unrounded.
    _, ks, vs = model.forward(params, cfg, jnp.asarray(seq[None]))
    for cached, fresh in ((cache.k[0], ks[0]), (cache.v[0], vs[0])):
        q, scale = _quantize_reference(np.asarray(fresh)[0])  # [T, K, H]
        rows = np.asarray(cached)[1].transpose(1, 0, 2)[:len(seq)]  # [T, K, H + 4]
        np.testing.assert_array_equal(rows[..., :-4], q)
        np.testing.assert_array_equal(np.ascontiguousarray(rows[..., -4:]).view("<f4")[..., 0], scale)
    off = np.abs(got - want)
    assert off.max() < 0.02 and off.mean() < 1e-3
    assert off32.max() > 0.1 and off32.mean() > 20 * off.mean()


def _absmax_int8(x):
    """Each vector of ``x [..., H]`` as symmetric int8 with scale max|x| / 127, and back."""
    s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127
    return jnp.where(s > 0, jnp.round(x / jnp.where(s > 0, s, 1)), 0) * s


def _rounding(dtype):
    def rounded(x):
        return _absmax_int8(x) if dtype == jnp.int8 else x.astype(dtype).astype(x.dtype)

    def attend(q, k, v, spec, ck, cv, aux, cfg):
        return model._attend_forward(q, rounded(k), rounded(v), spec, ck, cv, aux, cfg)

    return attend


@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.float16, jnp.int8])
def test_a_low_precision_cache_stays_bitwise_the_same_wherever_chunks_are_cut(kv_dtype):
    cfg = tiny_config()
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    seq = np.random.default_rng(4).integers(0, cfg.vocab_size, size=200)
    aligned = _chunks(200)
    h0, c0 = _run_chunks(params, cfg, seq, [aligned[i:i + 1] for i in range(len(aligned))], rows=2,
                         cache_dtype=kv_dtype)
    shifted = _chunks(200, first=5)
    h1, c1 = _run_chunks(params, cfg, seq, [shifted[i:i + 3] for i in range(0, len(shifted), 3)], rows=8,
                         filler_seed=0, cache_dtype=kv_dtype)
    assert np.array_equal(h1, h0)
    for a, b in zip(c1.k + c1.v, c0.k + c0.v):
        assert a.dtype == storage(kv_dtype)
        assert np.array_equal(np.asarray(a)[1, :, :200], np.asarray(b)[1, :, :200])


def _quantize_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax int8 per vector (last axis), in numpy: int8 values and float32 scales
    max|x| / 127 (as max|x| times float32(1/127): the cache's, the same inside and outside a jit)."""
    scale = np.abs(x).max(axis=-1) * np.float32(1 / 127)  # float32 times float32
    safe = np.where(scale > 0, scale, np.float32(1))[..., None]
    return np.clip(np.rint(x / safe), -127, 127).astype(np.int8), scale  # rint: ties to even


def test_int8_quantization_equals_a_numpy_reference_and_rounds_ties_to_even():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 3, 5, 64)) * rng.uniform(0.01, 30, (4, 3, 5, 1))).astype(np.float32)
    x[0, 0, 0] = 0  # a vector of zeros: scale 0, values 0
    x[0, 0, 1] = 0
    x[0, 0, 1, 3] = -1e-30  # a tiny vector (its scale still a normal float32)
    x[1, 0, 0] = 0
    x[1, 0, 0, :6] = [127, 0.5, 1.5, 2.5, -2.5, -3.5]  # scale exactly 1: halves are ties
    packed = np.asarray(quantize(jnp.asarray(x)))
    assert packed.shape == (4, 3, 5, 68) and packed.dtype == np.int8
    q, scale = _quantize_reference(x)
    np.testing.assert_array_equal(packed[..., :64], q)
    np.testing.assert_array_equal(np.ascontiguousarray(packed[..., 64:]).view("<f4")[..., 0], scale)
    assert packed[1, 0, 0, :6].tolist() == [127, 0, 2, 2, -2, -4]
    assert not packed[0, 0, 0].any() and packed[0, 0, 1, 3] == -127
    back = np.asarray(dequantize(jnp.asarray(packed)))
    np.testing.assert_array_equal(back, q.astype(np.float32) * scale[..., None])
    assert np.all(np.abs(back - x) <= scale[..., None] / 2 * (1 + 1e-6))  # at most half a step off
    # What the cache reads: attention's widen and a KVCache of int8 hold the same.
    from jserve.attention import widen

    np.testing.assert_array_equal(np.asarray(widen(jnp.asarray(packed))), back)
    assert KVCache.zeros(tiny_config(), 2, 32, jnp.int8).k[0].shape == (2, 2, 32, 16 + 4)


def test_loading_the_default_model_leaves_only_its_blocks_and_norms_live(real_ckpt):
    """No float32 copy of a block matrix (nor any other array) stays live after the load and the
    engine build: the live device bytes grow by exactly the params' bytes, which are the GGUF's
    blocks and the float norms (and the engine's all-tokens-allowed masks); the state's KV cache is
    allocated in ``kv_dtype``."""
    import gc

    from jserve import checkpoint
    from jserve.engine import JaxEngine
    from jserve.quant import weight_bytes

    gc.collect()
    before = {id(x) for x in jax.live_arrays()}
    cfg, params, _ = checkpoint.load(real_ckpt)
    eng = JaxEngine(cfg.for_context(128), params, slots=2, max_len=128, cache_dtype=jnp.bfloat16)
    del params  # the engine holds its own (stacked over layers: model.loops_layers)
    gc.collect()
    new = [x for x in jax.live_arrays() if id(x) not in before]
    _, w = checkpoint.load_weights(real_ckpt)
    stored = sum(w[k].nbytes for k in w if k in checkpoint.block_keys(w) or k[-2:] in ("_d", "_m"))
    norms = sum(w[k].nbytes for k in ("attn_norm", "mlp_norm", "final_norm"))
    masks = sum(m.nbytes for m in (*eng._no_masks.values(), *eng._no_mask_rows.values()))  # all-allowed masks
    assert sum(x.nbytes for x in new) - masks == weight_bytes(eng.params) == stored + norms
    assert not any(x.dtype == jnp.float32 and x.size >= cfg.dim * cfg.dim for x in new)
    state = eng.init_state()
    kv = cache_bytes(eng.cfg, 2, eng.cache_len, jnp.bfloat16)
    assert sum(x.nbytes for x in state.cache.arrays()) == kv
    assert state.cache.dtype == jnp.bfloat16 and {x.dtype for x in state.cache.arrays()} == {jnp.dtype(jnp.uint16)}
