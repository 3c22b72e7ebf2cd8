"""The row-invariant paged-attention kernel (cpu_kernels.paged_attention) against the XLA blockwise
loops it replaces (attention._attend_chunks / _attend_blocks over the same page pool and table), on
the families' attention shapes, and bitwise: a query's output is the same alone or amid any rows,
any queries per row, any n_blocks, through the decode or the extend call site.
Both paths run where the CPU allows (AVX2 and the portable generic path).
"""

from __future__ import annotations

import numpy as np
import pytest

from jserve import cpu_kernels as ck

jax = pytest.importorskip("jax")
jnp = jax.numpy

from jserve.attention import AttnSpec, _attend_blocks, _attend_chunks  # noqa: E402
from jserve.kv_cache import BITS  # noqa: E402

pytestmark = pytest.mark.skipif(not ck.available(), reason=f"CPU kernels unavailable: {ck.describe()}")


def _isas() -> list[str]:
    return ["generic", "avx2"] if ck.available() and ck._state().has_avx2 else ["generic"]


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.bfloat16), BITS))


def _pool(rng, pages: int, kh: int, b: int, h: int, bf16: bool):
    k = rng.standard_normal((pages, kh, b, h)).astype(np.float32)
    v = rng.standard_normal((pages, kh, b, h)).astype(np.float32)
    if bf16:
        return jnp.asarray(_bf16_bits(k)), jnp.asarray(_bf16_bits(v))
    return jnp.asarray(k), jnp.asarray(v)


def _table(rng, slots: int, m: int, pages: int, lengths: list[int], b: int) -> np.ndarray:
    """Distinct pages for each slot's blocks up to its length; past it a stale page, -1 or no page (>= P)."""
    perm = rng.permutation(pages)
    t = np.empty((slots, m), np.int32)
    used = 0
    for s in range(slots):
        need = -(-lengths[s] // b)
        t[s, :need] = perm[used:used + need]
        used += need
        junk = [-1, pages + 3, int(perm[0]), pages]
        for i in range(need, m):
            t[s, i] = junk[(s + i) % len(junk)]
    return t


# (KV heads, G, head dim, soft cap, window): shapes of the families jserve loads, KV heads cut to
# keep the tests fast: SmolLM2 (3, 3, 64), Llama 3.2 (G 4, 64), Qwen2.5 (G 7, 64), Qwen3 (G 2, 128),
# Phi-3 (G 1, 96), Mistral (G 4, 128, window), Gemma 2 (G 2, 256, cap 50, window), Gemma 3 (G 4, 256, window).
SHAPES = [(3, 3, 64, None, None), (2, 4, 64, None, None), (1, 7, 64, None, None), (2, 2, 128, None, None),
          (2, 1, 96, None, None), (2, 4, 128, None, 40), (2, 2, 256, 50.0, 37), (1, 4, 256, None, 19)]


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_xla_paged_loops(shape, bf16, isa):
    kh, g, h, cap, window = shape
    rng = np.random.default_rng(kh * 1000 + g * 100 + h)
    b, m, pages, slots = 16, 6, 30, 4
    lengths = [1, 40, 96, 17]  # positions written per slot (the last query sits at length - 1)
    k, v = _pool(rng, pages, kh, b, h, bf16)
    table = jnp.asarray(_table(rng, slots, m, pages, lengths, b))
    spec = AttnSpec(1.0 / np.sqrt(h), cap, window)
    # extend form: rows of C consecutive positions ending at each slot's last one
    c = 5
    row_slots = jnp.asarray([1, 2, 3, 0], jnp.int32)
    pos = np.stack([np.arange(lengths[s] - c, lengths[s]) for s in (1, 2, 3, 0)]).astype(np.int32)
    pos[3] = [0, 0, 0, 0, 0]  # slot 0 has one position: its row repeats it
    q = jnp.asarray(rng.standard_normal((4, c, kh, g, h)) * 2, jnp.float32)
    n_blocks = jnp.int32(m)
    ref = _attend_chunks(q, k, v, row_slots, jnp.asarray(pos), n_blocks, jnp.int32(pos.min()), spec, table)
    out = ck.paged_attention(q, jnp.asarray(pos), k, v, table, row_slots, scale=spec.scale, softcap=cap,
                             window=window, isa=isa)
    scale = float(jnp.max(jnp.abs(ref)))
    assert float(jnp.max(jnp.abs(out - ref))) <= 2e-6 * max(scale, 1.0)
    # decode form: one query per slot at its last position
    qd = q[:, -1]
    dpos = jnp.asarray([lengths[s] - 1 for s in range(slots)], jnp.int32)
    ref_d = _attend_blocks(qd[jnp.asarray([3, 0, 1, 2])], k, v, dpos, n_blocks, spec, table)
    out_d = ck.paged_attention(qd[jnp.asarray([3, 0, 1, 2])][:, None], dpos[:, None], k, v, table,
                               jnp.arange(slots, dtype=jnp.int32), scale=spec.scale, softcap=cap, window=window,
                               isa=isa)[:, 0]
    assert float(jnp.max(jnp.abs(out_d - ref_d))) <= 2e-6 * max(float(jnp.max(jnp.abs(ref_d))), 1.0)


@pytest.mark.parametrize("isa", _isas())
def test_query_past_the_table_gives_zeros_and_reads_nothing(isa):
    rng = np.random.default_rng(1)
    k, v = _pool(rng, 4, 1, 8, 16, False)
    table = jnp.asarray([[0, 1], [-1, -1]], jnp.int32)
    q = jnp.asarray(rng.standard_normal((2, 3, 1, 2, 16)), jnp.float32)
    pos = jnp.asarray([[16, 99, -1], [16, 16, 16]], jnp.int32)  # M * B = 16: all past the table
    out = ck.paged_attention(q, pos, k, v, table, jnp.asarray([0, 1], jnp.int32), scale=0.25, isa=isa)
    assert np.array_equal(np.asarray(out), np.zeros(q.shape, np.float32))


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[6]])
def test_a_query_is_bitwise_the_same_in_any_call(shape, isa):
    """A needle (slot, position) alone, amid R = 1..9 rows of C = 1 or 16 queries with random
    neighbours, at any place, through the decode form (C = 1, slots = arange) or the extend form."""
    kh, g, h, cap, window = shape
    rng = np.random.default_rng(7)
    b, m, pages, slots = 16, 8, 64, 9
    lengths = [int(x) for x in rng.integers(1, m * b, slots)]
    lengths[4] = 77
    k, v = _pool(rng, pages, kh, b, h, True)
    table = jnp.asarray(_table(rng, slots, m, pages, lengths, b))
    kw = dict(scale=1.0 / np.sqrt(h), softcap=cap, window=window, isa=isa)
    needle_q = rng.standard_normal((kh, g, h)).astype(np.float32)
    needle_pos, needle_slot = 70, 4

    def run(r: int, c: int, row: int, col: int) -> np.ndarray:
        q = rng.standard_normal((r, c, kh, g, h)).astype(np.float32)
        sl = rng.integers(0, slots, r).astype(np.int32)
        pos = np.stack([rng.integers(0, lengths[s], c) for s in sl]).astype(np.int32)
        q[row, col], sl[row], pos[row, col] = needle_q, needle_slot, needle_pos
        out = ck.paged_attention(jnp.asarray(q), jnp.asarray(pos), k, v, table, jnp.asarray(sl), **kw)
        return np.asarray(out)[row, col]

    alone = run(1, 1, 0, 0)
    for r in range(1, 10):
        for c in (1, 16):
            got = run(r, c, int(rng.integers(r)), int(rng.integers(c)))
            assert np.array_equal(got, alone), (r, c)
    # decode form: row s is slot s, one query each (its neighbours at their own last positions)
    q = rng.standard_normal((slots, 1, kh, g, h)).astype(np.float32)
    q[needle_slot, 0] = needle_q
    pos = np.asarray([[n - 1] for n in lengths], np.int32)
    pos[needle_slot, 0] = needle_pos
    out = ck.paged_attention(jnp.asarray(q), jnp.asarray(pos), k, v, table, jnp.arange(slots, dtype=jnp.int32), **kw)
    assert np.array_equal(np.asarray(out)[needle_slot, 0], alone)


def test_model_call_sites_agree_bitwise_and_use_the_kernel():
    """decode_step's and extend's attention (model._attend_step_cache / _attend_chunks_cache, the paged
    branch) give a query the same bits, however many other rows and whatever n_blocks; the kernel ran."""
    from jserve import model
    from jserve.config import tiny_config

    cfg = tiny_config(n_heads=6, n_kv_heads=2, head_dim=32)
    rng = np.random.default_rng(3)
    b, m, pages = 16, 4, 24
    kp, vp = _pool(rng, pages, cfg.n_kv_heads, b, cfg.head_dim, True)
    table = jnp.asarray(_table(rng, 3, m, pages, [40, 50, 30], b))
    spec = model.attn_spec(cfg, 0)
    nq = cfg.n_heads * cfg.head_dim
    qs = rng.standard_normal((3, 8, cfg.n_heads, cfg.head_dim)).astype(np.float32)
    new_k = rng.standard_normal((3, 8, cfg.n_kv_heads, cfg.head_dim)).astype(np.float32)
    new_v = rng.standard_normal((3, 8, cfg.n_kv_heads, cfg.head_dim)).astype(np.float32)
    calls = ck.attention_calls()
    # extend: slot 1 positions 30..37 as one row of 8, written then attended
    slots_e = jnp.asarray([1], jnp.int32)
    pos_e = jnp.arange(30, 38, dtype=jnp.int32)[None]
    aux = (slots_e, pos_e, pos_e, jnp.int32(m), jnp.int32(30), table)
    o_e, (ck_e, cv_e) = model._attend_chunks_cache(jnp.asarray(qs[1]), jnp.asarray(new_k[1]), jnp.asarray(new_v[1]),
                                                   spec, kp, vp, aux, cfg)
    assert ck.attention_calls() > calls
    # decode: positions 30..36 written by extend, then position 37 for slot 1 amid two other slots
    for n_blocks in (3, 4):
        pos_d = jnp.asarray([20, 37, 10], jnp.int32)
        def one(shape, needle):
            return jnp.asarray(rng.standard_normal(shape), jnp.float32).at[1, 0].set(needle)
        qd = one((3, 1, cfg.n_heads, cfg.head_dim), qs[1, 7])
        kd = one((3, 1, cfg.n_kv_heads, cfg.head_dim), new_k[1, 7])
        vd = one((3, 1, cfg.n_kv_heads, cfg.head_dim), new_v[1, 7])
        o_d, _ = model._attend_step_cache(qd, kd, vd, spec, ck_e, cv_e, (pos_d, jnp.int32(n_blocks), table), cfg)
        assert np.array_equal(np.asarray(o_d)[1, 0], np.asarray(o_e).reshape(8, nq)[7])


def test_bad_operands_are_refused_at_the_edge():
    q = jnp.zeros((1, 1, 2, 2, 16), jnp.float32)
    k = jnp.zeros((4, 2, 8, 16), jnp.int8)
    t = jnp.zeros((1, 2), jnp.int32)
    args = (jnp.zeros((1, 1), jnp.int32), k, k, t, jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="float32 or uint16"):
        ck.paged_attention(q, *args, scale=1.0)
    kf = jnp.zeros((4, 3, 8, 16), jnp.float32)
    with pytest.raises(ValueError, match=r"pools must be \[P, 2, B, 16\]"):
        ck.paged_attention(q, args[0], kf, kf, t, args[4], scale=1.0)
    with pytest.raises(ValueError, match="positions"):
        ck.paged_attention(q, jnp.zeros((2, 1), jnp.int32), kf[:, :2], kf[:, :2], t, args[4], scale=1.0)


@pytest.mark.parametrize(("dtype", "per_layer"), [("float32", 1), ("bfloat16", 1), ("float16", 0)])
def test_engine_runs_the_kernel_once_per_layer_for_float32_and_bfloat16_pools(dtype, per_layer):
    from jserve import model
    from jserve.config import tiny_config
    from jserve.engine import JaxEngine
    from jserve.sampling import SamplingParams

    cfg = tiny_config()
    params = model.for_cpu_kernels(model.init_params(cfg, jax.random.key(0)))
    eng = JaxEngine(cfg, params, slots=2, max_len=256, max_prompt_len=200, cache_dtype=jnp.dtype(dtype))
    state = eng.init_state()
    before = ck.attention_calls()
    eng.prefill(state, 0, list(range(1, 40)), SamplingParams(temperature=0.0, max_tokens=5), 0)
    assert ck.attention_calls() - before == per_layer * cfg.n_layers


def test_switch_keeps_the_xla_loop(monkeypatch):
    from jserve.attention import paged_kernel

    pool = jnp.zeros((2, 1, 8, 16), jnp.float32)
    assert paged_kernel(pool)
    assert not paged_kernel(pool.astype(jnp.int8))  # int8 pages etc. stay on XLA's path
    monkeypatch.setenv("JSERVE_CPU_ATTENTION", "0")
    assert not paged_kernel(pool)


def test_head_dim_not_a_multiple_of_8_takes_the_generic_path():
    rng = np.random.default_rng(5)
    k, v = _pool(rng, 6, 1, 8, 12, False)
    table = jnp.asarray([[2, 0, 5], [1, 3, 4]], jnp.int32)
    q = jnp.asarray(rng.standard_normal((2, 2, 1, 3, 12)), jnp.float32)
    pos = jnp.asarray([[9, 10], [20, 23]], jnp.int32)
    slots = jnp.asarray([0, 1], jnp.int32)
    ref = _attend_chunks(q, k, v, slots, pos, jnp.int32(3), jnp.int32(9), AttnSpec(0.3, None, None), table)
    out = ck.paged_attention(q, pos, k, v, table, slots, scale=0.3, isa="auto")
    assert float(jnp.max(jnp.abs(out - ref))) <= 2e-6 * max(float(jnp.max(jnp.abs(ref))), 1.0)
    assert np.array_equal(np.asarray(out), np.asarray(ck.paged_attention(q, pos, k, v, table, slots, scale=0.3,
                                                                          isa="generic")))
    if "avx2" in _isas():
        with pytest.raises(ValueError, match="multiple of 8"):
            ck.paged_attention(q, pos, k, v, table, slots, scale=0.3, isa="avx2")
