"""The loop over layers (model.loops_layers): weights and the page pool stacked over layers, one
``fori_loop`` whose kernels read and write layer ``l`` of each stack in place. A compiled call then
holds one layer's program instead of one per layer (the server's memory: scripts/bench_memory.py), and
it must give the unrolled program's bits: the kernels on a stack equal the kernels on that layer alone,
and an engine serving through the loop equals one serving the layers unrolled
(``JSERVE_LOOP_LAYERS=0``), tokens and logprobs, with prompts across pages and sampling."""

from __future__ import annotations

import re

import numpy as np
import pytest

from jserve import cpu_kernels as ck

jax = pytest.importorskip("jax")
jnp = jax.numpy

pytestmark = pytest.mark.skipif(not ck.available(), reason=f"CPU kernels unavailable: {ck.describe()}")


def _isas() -> list[str]:
    return ["generic", "avx2"] if ck._state().has_avx2 else ["generic"]


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("fmt", ["f32", "q8_0", "q4_1"])
def test_stacked_matmul_reads_the_layer_in_place(fmt, isa):
    from jserve.blocks import quantize_blocks

    rng = np.random.default_rng(0)
    layers, n, k = 3, 40, 64
    ws = [rng.standard_normal((n, k)).astype(np.float32) for _ in range(layers)]
    if fmt == "f32":
        parts = [(jnp.asarray(w), None, None) for w in ws]
    else:
        bs = [quantize_blocks(w, fmt) for w in ws]
        parts = [(jnp.asarray(b.qs), jnp.asarray(b.d), None if b.m is None else jnp.asarray(b.m)) for b in bs]
    stack = [None if parts[0][j] is None else jnp.stack([p[j] for p in parts]) for j in range(3)]
    x = jnp.asarray(rng.standard_normal((5, k)).astype(np.float32))
    norms = jnp.asarray(rng.standard_normal((layers, k)).astype(np.float32))
    res = jnp.asarray(rng.standard_normal((5, n)).astype(np.float32))

    @jax.jit
    def stacked(x, layer):
        return ck.matmul_isa(x, fmt, *stack, isa=isa, layer=layer, norm=norms, eps=1e-5, residual=res)

    for layer in range(layers):
        alone = ck.matmul_isa(x, fmt, *parts[layer], isa=isa, norm=norms[layer], eps=1e-5, residual=res)
        got = stacked(x, jnp.int32(layer))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(alone))
    with pytest.raises(Exception, match="layer index outside the stack"):
        jax.block_until_ready(stacked(x, jnp.int32(layers)))


@pytest.mark.parametrize("bf16", [False, True])
def test_stacked_attention_reads_the_layer_in_place(bf16):
    from jserve.kv_cache import BITS

    rng = np.random.default_rng(1)
    layers, pages, kh, g, b, h = 3, 4, 2, 2, 16, 16
    pools = rng.standard_normal((2, layers, pages, kh, b, h)).astype(np.float32)
    if bf16:
        pools = np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(pools, jnp.bfloat16), BITS))
    k, v = jnp.asarray(pools[0]), jnp.asarray(pools[1])
    table = jnp.asarray([[2, 0, 1, 3]], jnp.int32)
    q = jnp.asarray(rng.standard_normal((1, 3, kh, g, h)).astype(np.float32))
    pos = jnp.asarray([[5, 20, 40]], jnp.int32)
    slots = jnp.zeros((1,), jnp.int32)
    for layer in range(layers):
        alone = ck.paged_attention(q, pos, k[layer], v[layer], table, slots, scale=0.25)
        got = ck.paged_attention(q, pos, k, v, table, slots, scale=0.25, layer=jnp.int32(layer))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(alone))


def _engine(monkeypatch, loop: bool, quantize: str | None):
    from jserve import checkpoint
    from jserve.config import tiny_config
    from jserve.engine import JaxEngine

    monkeypatch.setenv("JSERVE_LOOP_LAYERS", "1" if loop else "0")
    cfg = tiny_config(n_layers=4, max_position_embeddings=512)
    params = checkpoint.to_params(cfg, checkpoint.random_weights(cfg, seed=3), quantize=quantize)
    eng = JaxEngine(cfg, params, slots=3, max_len=384, max_prompt_len=300, top_logprobs=2, speculate=2)
    assert eng.loop_layers == loop
    return eng


def _serve(eng, prompts, params):
    from jserve.llm import collect
    from jserve.orchestrator import Orchestrator, Stream

    orch = Orchestrator(eng, None, max_waiting=16)
    try:
        streams = [orch.submit(p, params[i], Stream()) for i, p in enumerate(prompts)]
        return [collect(list(s)) for s in streams]
    finally:
        orch.shutdown(drain=False, timeout=30)


@pytest.mark.parametrize("quantize", [None, "q4_1"])
def test_engine_through_the_loop_equals_the_layers_unrolled(monkeypatch, quantize):
    from jserve.sampling import SamplingParams

    rng = np.random.default_rng(2)
    # A prompt across two pages (128 positions each), a short one, and one that repeats itself (drafts).
    prompts = [[int(t) for t in rng.integers(3, 500, size=n)] for n in (200, 9)] + [[7, 8, 9, 10] * 12]
    params = [SamplingParams(max_tokens=40, temperature=0.0),
              SamplingParams(max_tokens=40, temperature=0.9, top_p=0.9, seed=11),
              SamplingParams(max_tokens=40, temperature=0.0)]
    loop, unrolled = _engine(monkeypatch, True, quantize), _engine(monkeypatch, False, quantize)
    assert loop.init_state().cache.stacked and not unrolled.init_state().cache.stacked
    got, want = _serve(loop, prompts, params), _serve(unrolled, prompts, params)
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids and len(a.token_ids) > 0
        np.testing.assert_array_equal(np.asarray(a.logprobs, np.float32), np.asarray(b.logprobs, np.float32))

    # One layer's program per call: the decode step's module is a loop, a fraction of the unrolled one.
    def text(eng) -> str:
        from jserve import model

        state = eng.init_state()
        s = eng.slots

        def step(params, cache, table):
            return model.decode_step(params, eng.cfg, jnp.zeros((s,), jnp.int32), jnp.zeros((s,), jnp.int32), cache,
                                     jnp.int32(1), table)

        return jax.jit(step).lower(eng.params, state.cache, state.table).compile().as_text()

    def kernel_calls(module: str) -> int:  # custom calls into the kernels in the module's text
        return len(re.findall(r" custom-call\(", module))

    looped, flat = text(loop), text(unrolled)
    assert re.search(r" while\(", looped) and not re.search(r" while\(", flat)
    per_layer = (kernel_calls(flat) - kernel_calls(looped)) // (loop.cfg.n_layers - 1)
    assert per_layer >= 5  # qkv, o, gate/up, down, attention: each once in the loop's body
    assert kernel_calls(flat) == loop.cfg.n_layers * per_layer + 1  # and the output projection


def test_lazy_zeros_are_zeros_whatever_memory_they_get():
    """The stacked pool's zeros (``cpu_kernels.lazy_zeros``) write only what is not already zero: a
    buffer reused from earlier garbage must still come back all zeros."""
    make = jax.jit(lambda: ck.lazy_zeros((3, 5, 1000), jnp.float32))
    for _ in range(3):
        garbage = jnp.full((3, 5, 1000), 7.0, jnp.float32) + 0  # freed before the next zeros are made
        del garbage
        z = make()
        assert z.shape == (3, 5, 1000) and not np.asarray(z).any()
    big = jax.jit(lambda: ck.lazy_zeros((2, 1 << 23), jnp.uint16))()  # 32 MiB: fresh pages
    assert not np.asarray(big).any()
