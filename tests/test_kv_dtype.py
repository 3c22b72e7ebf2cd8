"""The KV cache's element type (``--kv-dtype``): its bytes, its plumbing from the command line, and
what attention computes from a lower-precision cache."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve import model
from jserve.config import tiny_config
from jserve.kv_cache import cache_bytes, storage
from jserve.serving_config import KV_DTYPES, EngineConfig, add_engine_flags

from .test_model import _chunks, _run_chunks


@pytest.mark.parametrize("kv_dtype, itemsize", [("float32", 4), ("bfloat16", 2), ("float16", 2)])
def test_engine_state_holds_the_cache_in_kv_dtype_and_its_bytes_follow(tiny_ckpt, kv_dtype, itemsize):
    from jserve.llm import load_engine

    eng = load_engine(tiny_ckpt, EngineConfig(slots=3, max_len=96, kv_dtype=kv_dtype), warmup=False).engine
    cache = eng._state_shape.cache
    cfg = eng.cfg
    assert {x.dtype for x in cache.k + cache.v} == {storage(kv_dtype)}  # bfloat16 as uint16 bits
    assert len(cache.k) == len(cache.v) == cfg.n_layers
    counted = sum(x.size * x.dtype.itemsize for x in cache.k + cache.v)
    assert counted == 2 * cfg.n_layers * 3 * eng.cache_len * cfg.n_kv_heads * cfg.head_dim * itemsize
    assert counted == cache_bytes(cfg, 3, eng.cache_len, eng.cache_dtype)


def test_kv_dtype_defaults_to_bfloat16_none_follows_dtype_and_bad_names_are_refused(tiny_ckpt):
    from jserve.llm import load_engine

    assert load_engine(tiny_ckpt, EngineConfig(slots=2, max_len=64), warmup=False).engine.cache_dtype == jnp.bfloat16
    eng = load_engine(tiny_ckpt, EngineConfig(slots=2, max_len=64, kv_dtype=None), warmup=False).engine
    assert eng.cache_dtype == jnp.float32
    with pytest.raises(ValueError, match="kv_dtype must be one of float32, bfloat16, float16, got 'int4'"):
        load_engine(tiny_ckpt, EngineConfig(slots=2, max_len=64, kv_dtype="int4"), warmup=False)


def test_kv_dtype_flag_reaches_the_servers_engine_config():
    from jserve import server

    args = server.build_parser().parse_args(["--kv-dtype", "float16"])
    assert server.engine_config(args).kv_dtype == "float16"
    assert server.engine_config(server.build_parser().parse_args([])).kv_dtype == EngineConfig().kv_dtype
    ap = argparse.ArgumentParser()
    add_engine_flags(ap)
    with pytest.raises(SystemExit):
        ap.parse_args(["--kv-dtype", "int4"])
    assert set(KV_DTYPES) == {"float32", "bfloat16", "float16"}


def _forward_with(params, cfg, seq, attend):
    t = len(seq)
    pos = jnp.broadcast_to(jnp.arange(t), (1, t))
    x = model.embed_tokens(params, cfg, jnp.asarray(seq[None]))
    for i in range(len(params.layers)):
        x, _ = model._layer(params.layers[i], x, pos, None, None, (), cfg=cfg, rep=model.layer_rep(cfg, i),
                            groups=(params.qkv_groups, params.mlp_groups, params.expert_groups), attend=attend)
    return x, None, None


@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.float16])
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
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)  # as the float32 cache vs forward (test_model)
    # The rounding is really there: the float32 forward differs by far more than the tolerance.
    x32, _, _ = _forward_with(params, cfg, seq, model._attend_forward)
    assert np.max(np.abs(np.asarray(model.unembed(params, cfg, x32))[0] - want)) > 1e-3


def _rounding(dtype):
    def attend(q, k, v, spec, ck, cv, aux, cfg):
        return model._attend_forward(q, k.astype(dtype).astype(k.dtype), v.astype(dtype).astype(v.dtype), spec, ck,
                                     cv, aux, cfg)

    return attend


@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.float16])
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
    assert sum(x.nbytes for x in state.cache.k + state.cache.v) == kv
    assert state.cache.dtype == jnp.bfloat16 and state.cache.k[0].dtype == jnp.uint16
