"""The accelerator decode attention wired to the engine's page pool: the ``[K, P, B, H]`` layout the
Pallas kernels read in place (``kv_cache.PagedKVCache.kernel``), the kernels through the engine's
adapter (``attention_kernels.pool_decode``) against the XLA blockwise path on each family's shape,
the platform's choice and its override, and the tiny model through the whole engine with the GPU
layout and kernel forced.

On CPU the kernels run in Pallas interpret mode; with ``JSERVE_KERNELS_NATIVE=1`` (set by
``scripts/device_check.sh``) natively, and a kernel for another platform is skipped.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jserve import attention_kernels as ak
from jserve import checkpoint, model
from jserve.attention import AttnSpec, _attend_blocks
from jserve.config import tiny_config
from jserve.engine import JaxEngine
from jserve.kv_cache import PagedKVCache, copy_pages, read_pages, storage, to_stored, write_paged
from jserve.kv_pages import page_bytes
from jserve.llm import collect
from jserve.orchestrator import Orchestrator, Stream
from jserve.sampling import SamplingParams
from tests.test_attention_kernels import FAMILIES, NATIVE, TOL, B, M, P, make_case, needs

KERNELS = ["pallas_gpu", "pallas_tpu_paged"]


# ----- the layout


def test_heads_first_pool_reads_writes_and_copies_as_the_cpu_layout_does():
    """Every pool operation on ``[K, P, B, H]`` gives the transpose of what it gives on ``[P, K, B, H]``,
    checked against numpy indexing: writes through a table (no page, past the table: dropped),
    reads (a page past the pool reads the last), page copies (a destination past the pool skipped)."""
    rng = np.random.default_rng(0)
    kh, pages, b, h, s = 2, 5, 4, 3, 3
    base = rng.standard_normal((pages, kh, b, h)).astype(np.float32)
    table = np.array([[3, 0], [pages, 4], [1, pages]], np.int32)  # P: no page
    new = rng.standard_normal((s, 2, kh, h)).astype(np.float32)
    slots = np.arange(s)[:, None]
    positions = np.array([[5, 6], [1, 7], [2, 8]], np.int32)  # slot 1 pos 1 and slot 2 pos 5: no page; 8: past
    want = base.copy()
    for i in range(s):
        for j in range(2):
            blk, off = divmod(int(positions[i, j]), b)
            if blk < table.shape[1] and table[i, blk] < pages:
                want[table[i, blk], :, off] = new[i, j]
    args = [jnp.asarray(x) for x in (new, table, slots, positions)]
    cpu = write_paged(jnp.asarray(base), *args)
    acc = write_paged(jnp.asarray(base.transpose(1, 0, 2, 3)), *args, heads_first=True)
    np.testing.assert_array_equal(np.asarray(cpu), want)
    np.testing.assert_array_equal(np.asarray(acc), want.transpose(1, 0, 2, 3))

    idx = jnp.array([4, 0, pages, 2])
    want_read = want[[4, 0, pages - 1, 2]]
    np.testing.assert_array_equal(np.asarray(read_pages(cpu, idx)), want_read)
    np.testing.assert_array_equal(np.asarray(read_pages(acc, idx, heads_first=True)), want_read)

    src, dst = jnp.array([0, 3, 1], jnp.int32), jnp.array([2, pages, 4], jnp.int32)
    copied = want.copy()
    copied[2], copied[4] = want[0], want[1]
    for kernel, buf in (("xla", cpu), ("pallas_gpu", acc)):
        out = copy_pages(PagedKVCache(k=(buf,), v=(buf,), kernel=kernel), src, dst, jnp.int32(3))
        assert out.kernel == kernel and out.pages == pages and out.page_size == b
        got = np.asarray(out.k[0])
        np.testing.assert_array_equal(got if kernel == "xla" else got.transpose(1, 0, 2, 3), copied)


def test_the_kernels_pool_is_heads_first_and_stores_bfloat16_as_itself():
    cfg = tiny_config()
    cpu = PagedKVCache.zeros(cfg, 6, 16, jnp.bfloat16)
    acc = PagedKVCache.zeros(cfg, 6, 16, jnp.bfloat16, kernel="pallas_gpu")
    assert cpu.k[0].shape == (6, cfg.n_kv_heads, 16, cfg.head_dim) and cpu.k[0].dtype == jnp.uint16
    assert acc.k[0].shape == (cfg.n_kv_heads, 6, 16, cfg.head_dim) and acc.k[0].dtype == jnp.bfloat16
    assert acc.heads_first and not cpu.heads_first and acc.pages == cpu.pages == 6
    assert acc.dtype == cpu.dtype == jnp.bfloat16
    assert storage(jnp.bfloat16, native=True) == jnp.bfloat16


# ----- the kernels through the engine's adapter


def engine_case(n, kh, h, dtype=jnp.float32):
    """``make_case``'s pool and slots in the engine's terms: the table says no page with P (the
    pool's size), an idle slot sits at position T, and the XLA path reads the ``[P, K, B, H]``
    transpose (stored as the CPU pool stores ``dtype``)."""
    q, k, v, table, lengths = make_case(n, kh, h)
    table = np.where(table >= 0, table, P).astype(np.int32)
    positions = np.where(lengths > 0, lengths - 1, M * B).astype(np.int32)
    cpu_k, cpu_v = (to_stored(jnp.asarray(x.transpose(1, 0, 2, 3)), jnp.zeros((), storage(dtype))) for x in (k, v))
    acc_k, acc_v = (jnp.asarray(x, dtype) for x in (k, v))
    return q, (cpu_k, cpu_v), (acc_k, acc_v), table, lengths, positions


def xla_path(q, pool, table, positions, spec, heads_first=False):
    s, n, h = q.shape
    kh = pool[0].shape[0 if heads_first else 1]
    out = _attend_blocks(jnp.asarray(q).reshape(s, kh, n // kh, h), *pool, jnp.asarray(positions), jnp.int32(M),
                         spec, jnp.asarray(table), heads_first)
    return np.asarray(out).reshape(s, n, h)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_kernel_on_the_engines_pool_equals_the_xla_blockwise_path(kernel, family):
    """The layer the kernel does (the family's full-attention layers: these kernels have no window)
    equals ``_attend_blocks`` with the table on the CPU layout; a windowed layer goes to XLA, which
    reads the kernel's layout bitwise as it reads its own."""
    needs(kernel)
    _, n, kh, h, softcap, window = family
    q, cpu, acc, table, lengths, positions = engine_case(n, kh, h)
    scale = 2.0 ** -round(np.log2(np.sqrt(h)))  # a power of two keeps the kernels' pre-scaled queries exact
    spec = AttnSpec(scale, softcap, None)
    want = xla_path(q, cpu, table, positions, spec)
    got = np.asarray(ak.pool_decode(jnp.asarray(q), *acc, jnp.asarray(table), jnp.asarray(lengths), scale=scale,
                                    softcap=softcap, kernel=kernel))
    live = lengths > 0  # an idle slot: zeros from the kernel; the XLA path's row there is never used
    err = float(np.max(np.abs(got[live] - want[live])))
    print(f"{kernel} {family[0]} on the engine's pool: max abs error {err:.2e}")
    assert err <= TOL
    assert (got[~live] == 0).all()
    if window is not None:
        wspec = AttnSpec(scale, softcap, window)
        assert ak.choose_impl(window, impl=kernel) == "xla"
        np.testing.assert_array_equal(xla_path(q, acc, table, positions, wspec, heads_first=True)[live],
                                      xla_path(q, cpu, table, positions, wspec)[live])


def test_a_bfloat16_pool_through_the_gpu_kernel_equals_the_cpu_pools_bits():
    """A bfloat16 pool: the kernel reads it as bfloat16 (queries given its type), the XLA path the
    CPU pool's ``uint16`` bits widened; queries that bfloat16 holds exactly give the same scores."""
    needs("pallas_gpu")
    q, cpu, acc, table, lengths, positions = engine_case(8, 2, 128, jnp.bfloat16)
    assert cpu[0].dtype == jnp.uint16 and acc[0].dtype == jnp.bfloat16
    spec = AttnSpec(0.0625, 30.0, None)
    want = xla_path(q, cpu, table, positions, spec)
    got = np.asarray(ak.pool_decode(jnp.asarray(q), *acc, jnp.asarray(table), jnp.asarray(lengths), scale=0.0625,
                                    softcap=30.0, kernel="pallas_gpu"))
    live = lengths > 0
    assert got.dtype == np.float32
    assert np.max(np.abs(got[live] - want[live])) < 2e-2  # the kernel rounds its output to bfloat16


# ----- the choice


def test_the_engine_kernel_is_the_platforms_unless_named_and_xla_when_sharded(monkeypatch):
    monkeypatch.delenv("JSERVE_ATTENTION", raising=False)
    assert ak.engine_kernel() == ak.default_impl()
    assert ak.engine_kernel(sharded=True) == "xla"
    assert ak.engine_kernel("pallas_tpu_paged") == "pallas_tpu_paged"
    monkeypatch.setenv("JSERVE_ATTENTION", "pallas_gpu")
    assert ak.engine_kernel() == "pallas_gpu"
    assert ak.engine_kernel("xla") == "xla"  # the engine's own option wins
    with pytest.raises(ValueError, match="runs on one device's pool; a sharded engine uses 'xla'"):
        ak.engine_kernel(sharded=True)
    monkeypatch.setenv("JSERVE_ATTENTION", "pallas_tpu")
    with pytest.raises(ValueError, match=r"'pallas_tpu' \(it reads keys and values interleaved"):
        ak.engine_kernel()
    with pytest.raises(ValueError, match="attention kernel 'flash': the engine takes one of"):
        ak.engine_kernel("flash")
    monkeypatch.delenv("JSERVE_ATTENTION")
    with monkeypatch.context() as m:  # an int8 pool (values and scales in one row) stays on XLA
        m.setattr(ak, "default_impl", lambda platform=None: "pallas_gpu")
        assert ak.engine_kernel(quantized_kv=True) == "xla"
    with pytest.raises(ValueError, match="reads float pages; an int8 KV cache uses 'xla'"):
        ak.engine_kernel("pallas_gpu", quantized_kv=True)
    # Layers the kernel cannot do stay on XLA: a window; on the GPU a head dim or page size Triton cannot load.
    assert ak.layer_impl("pallas_gpu", None, 64, 128) == "pallas_gpu"
    assert ak.layer_impl("pallas_gpu", 4096, 64, 128) == ak.layer_impl("pallas_tpu_paged", 4096, 64, 128) == "xla"
    assert ak.layer_impl("pallas_gpu", None, 80, 128) == ak.layer_impl("pallas_gpu", None, 64, 96) == "xla"
    assert ak.layer_impl("pallas_tpu_paged", None, 80, 96) == "pallas_tpu_paged"
    assert ak.layer_impl("xla", None, 64, 128) == "xla"
    assert ak.interprets("pallas_gpu") == (jax.default_backend() != "gpu")
    assert not ak.interprets("xla")


WINDOWED = dict(sliding_window=48, sliding_layers=(True, False), attn_softcap=30.0)  # Gemma 2's pattern


def _primitives(jaxpr) -> list[str]:
    out = []
    for eqn in jaxpr.eqns:
        out.append(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out.extend(_primitives(sub))
    return out


def test_decode_rows_call_the_kernel_on_the_layers_it_does_and_prompt_chunks_do_not():
    """The engine's decode step (``extend`` rows of one position) calls the Pallas kernel in each
    layer without a window; a windowed layer and rows of several positions stay on XLA."""
    cfg = tiny_config(max_position_embeddings=256, **WINDOWED)
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    cache = PagedKVCache.zeros(cfg, 4, 128, jnp.float32, kernel="pallas_gpu")
    table = jnp.full((2, 2), 4, jnp.int32)

    def calls(width: int) -> int:
        tokens = jnp.zeros((2, width), jnp.int32)
        z = jnp.zeros((2,), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda c: model.extend(params, cfg, tokens, z, z, z + 1, c, jnp.int32(1), table))(cache)
        return _primitives(jaxpr.jaxpr).count("pallas_call")

    assert calls(1) == 1  # layer 1; layer 0 has the window
    assert calls(16) == 0
    assert cfg.window(0) is not None and cfg.window(1) is None


def test_model_steps_on_the_kernels_pool_equal_the_cpu_pools():
    """``extend`` (a prompt chunk, then a decode row) and ``decode_step`` on a pool laid out for the
    GPU kernel: logits within float32 rounding of the CPU layout's, and the pages written the same."""
    needs("pallas_gpu")
    cfg = tiny_config(max_position_embeddings=256, tie_embeddings=False, **WINDOWED)
    params = model.init_params(cfg, jax.random.PRNGKey(1))
    table = jnp.array([[2, 0], [1, 3]], jnp.int32)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(3, 500, (2, 16)), jnp.int32)
    slots, starts = jnp.arange(2, dtype=jnp.int32), jnp.array([0, 100], jnp.int32)
    extend = jax.jit(model.extend, static_argnums=1)
    decode_step = jax.jit(model.decode_step, static_argnums=1)
    outs = {}
    for kernel in ("xla", "pallas_gpu"):
        cache = PagedKVCache.zeros(cfg, 4, 128, jnp.float32, kernel=kernel)
        _, cache = extend(params, cfg, tokens, slots, starts, jnp.full((2,), 16, jnp.int32), cache, jnp.int32(1),
                          table)
        x, cache = extend(params, cfg, tokens[:, :1], slots, starts + 16, jnp.ones((2,), jnp.int32), cache,
                          jnp.int32(1), table)
        step, cache = decode_step(params, cfg, tokens[:, 1], starts + 17, cache, jnp.int32(1), table)
        k = np.asarray(cache.k[1])
        outs[kernel] = (np.asarray(model.unembed(params, cfg, x[:, 0])), np.asarray(step),
                        k if kernel == "xla" else k.transpose(1, 0, 2, 3))
    for want, got in zip(outs["xla"][:2], outs["pallas_gpu"][:2]):
        assert np.max(np.abs(want - got)) <= (TOL if NATIVE else 1e-5)
    np.testing.assert_allclose(outs["pallas_gpu"][2], outs["xla"][2], atol=TOL if NATIVE else 1e-5, rtol=0)


# ----- the whole engine


@pytest.fixture(scope="module")
def windowed_model():
    cfg = tiny_config(max_position_embeddings=384, tie_embeddings=False, **WINDOWED)  # untied: no copying of inputs
    return cfg, checkpoint.to_params(cfg, checkpoint.random_weights(cfg))


def _serve(cfg, params, attention, kv_dtype):
    """A greedy request, then one whose prompt starts with its first page (a prefix-cache hit), then
    two at once through a pool of three pages that both outgrow (one is preempted and resumed)."""
    eng = JaxEngine(cfg, params, slots=2, max_len=384, max_prompt_len=200, top_logprobs=2, cache_dtype=kv_dtype,
                    kv_memory=3 * page_bytes(cfg, jnp.dtype(kv_dtype).name), attention=attention, chunk_rows=(4,))
    assert eng.init_state().cache.kernel == eng.attention == attention
    rng = np.random.default_rng(1)
    first = rng.integers(3, 500, 140).tolist()
    again = first[:130] + rng.integers(3, 500, 6).tolist()
    both = [rng.integers(3, 500, n).tolist() for n in (100, 110)]  # a page each, two each by the end
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    orch = Orchestrator(eng, None, max_waiting=8, kv_headroom=0)
    try:
        results = [collect(list(orch.submit(p, sp, Stream()))) for p in (first, again)]
        results += [collect(list(s)) for s in [orch.submit(p, sp, Stream()) for p in both]]
        return results, orch.preemptions
    finally:
        orch.shutdown(drain=False, timeout=30)


_XLA_RUNS: dict = {}


# The GPU kernel on a float32 pool; the TPU kernel on a bfloat16 one (it reads keys and values as
# bfloat16 whatever the pool holds: ``attention_kernels``).
@pytest.mark.parametrize("kernel,kv_dtype", [("pallas_gpu", jnp.float32), ("pallas_tpu_paged", jnp.bfloat16)])
def test_the_engine_with_the_accelerator_layout_and_kernel_gives_the_cpu_paths_tokens(windowed_model, kernel,
                                                                                       kv_dtype):
    """The tiny model (a windowed layer on XLA over the kernel's layout, a soft-capped layer through
    the kernel) served with a prefix-cache hit and a preemption: the same greedy tokens as the CPU
    layout with XLA's attention on a pool of the same type, and log-probabilities within float32
    rounding."""
    needs(kernel)
    key = jnp.dtype(kv_dtype).name
    if key not in _XLA_RUNS:
        _XLA_RUNS[key] = _serve(*windowed_model, "xla", kv_dtype)
    want, pre_want = _XLA_RUNS[key]
    got, pre_got = _serve(*windowed_model, kernel, kv_dtype)
    assert pre_want >= 1 and pre_got >= 1
    assert got[1].cached_tokens >= 128 and want[1].cached_tokens == got[1].cached_tokens
    for w, g in zip(want, got):
        assert g.error is None and g.completion_tokens == 40
        assert g.token_ids == w.token_ids
        err = np.max(np.abs(np.asarray(g.logprobs) - np.asarray(w.logprobs)))
        print(f"{kernel} engine: max abs logprob error {err:.2e}")
        # (float32 rounding: the CPU path's attention is its own FFI kernel, a polynomial exp and
        # its own order of sums, where the kernels built with one; 1.7e-5 measured over 40 tokens)
        assert err <= (TOL if NATIVE else 5e-5)


def test_bfloat16_weights_and_kv_are_the_default_on_gpu_and_tpu(tmp_path, monkeypatch):
    """``EngineConfig.dtype`` None takes the platform's type (``default_dtype``), and the KV cache
    follows it; CPU keeps float32 weights. Forced to the GPU's answer here, the loaded engine holds
    bfloat16 weights and a bfloat16 pool."""
    from jserve import llm
    from jserve.serving_config import EngineConfig, default_dtype

    assert default_dtype("gpu") == default_dtype("tpu") == "bfloat16"
    assert default_dtype("cpu") == "float32"
    assert EngineConfig().dtype is None
    tiny_ckpt = tmp_path / "tiny"  # no tokenizer: nothing here needs the real checkpoint
    cfg = tiny_config()
    checkpoint.save(tiny_ckpt, cfg, checkpoint.random_weights(cfg), None)
    cpu = llm.load_engine(tiny_ckpt, EngineConfig(slots=1, max_len=64, kv_dtype=None), warmup=False)
    assert cpu.dtype == default_dtype() and cpu.engine.params.final_norm.dtype == jnp.dtype(default_dtype())
    monkeypatch.setattr(llm, "default_dtype", lambda: "bfloat16")
    acc = llm.load_engine(tiny_ckpt, EngineConfig(slots=1, max_len=64, kv_dtype=None), warmup=False)
    assert acc.dtype == "bfloat16" and acc.engine.params.final_norm.dtype == jnp.bfloat16
    assert acc.engine.init_state().cache.dtype == jnp.bfloat16
