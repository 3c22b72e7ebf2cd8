"""Engine invariants: no recompilation after warm-up, donation, packed step results."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from jserve import checkpoint
from jserve.engine import ACTIVE, TOKEN, ChunkRow, JaxEngine, decode_buckets
from jserve.sampling import SamplingParams

from .compile_watch import CompileWatch
from .conftest import QUANT_MODES

# int8-dynamic is not among them: its weights are int8's (the same QuantArray pytree, the same
# buckets, state and donation); only the inside of each matmul differs (rows quantized too), which
# these invariants do not see and tests/test_quant.py, test_families.py and test_batch_invariance.py check.
ENGINE_MODES = [(jnp.float32, q) for q in QUANT_MODES] + [(jnp.bfloat16, None)]


@pytest.fixture(scope="module", params=ENGINE_MODES, ids=["f32", "int8", "bf16"])
def engine(tiny_ckpt, request):
    dtype, quant = request.param
    cfg, params, _ = checkpoint.load(tiny_ckpt, dtype, quantize=quant)
    eng = JaxEngine(cfg, params, slots=3, max_len=96, max_prompt_len=40, top_logprobs=2, cache_dtype=dtype)
    with CompileWatch() as watch:
        eng.warmup(background=False)  # every bucket now, inside the watch
    eng.warmup_traces = watch.count
    return eng


def test_warmup_compiles_every_bucket_and_the_watch_sees_it(engine):
    # At least extend per row bucket and generate are traced: the watch is not blind.
    # (begin, copy and release may be shared with an earlier engine in this process: same shapes.)
    assert engine.warmup_traces >= len(engine.chunk_rows) + 1


def test_serving_after_warmup_compiles_nothing_and_donation_is_clean(engine):
    rng = np.random.default_rng(0)
    state = engine.init_state()
    with CompileWatch() as watch, warnings.catch_warnings():
        warnings.simplefilter("error")  # "Some donated buffers were not usable" would raise here
        for i, n in enumerate([1, 5, 16, 17, 33, 40, 2, 30]):
            p = SamplingParams(temperature=[0.0, 0.7][i % 2], top_k=i, top_p=0.9, repetition_penalty=1.1)
            state, _ = engine.prefill(state, i % engine.slots, rng.integers(0, engine.vocab_size, n).tolist(), p,
                                      seed=i)
            if i and n < 40:  # a prefix copied from another slot, then a chunk run after it
                state = engine.copy(state, (i - 1) % engine.slots, (i + 1) % engine.slots, n)
                state = engine.begin(state, (i + 1) % engine.slots, [3] * (n + 1), p, seed=i)
                state, _ = engine.extend(state, [ChunkRow((i + 1) % engine.slots, n, [3], True)])
                state = engine.release(state, (i + 1) % engine.slots)
            for _ in range(3):
                state, out = engine.generate(state)
                np.asarray(out)
            state = engine.release(state, i % engine.slots)
    watch.assert_nothing_traced()


def test_step_result_packs_tokens_logprobs_flags_and_top_alternatives(engine):
    state = engine.init_state()
    state, first = engine.prefill(state, 1, [5, 6, 7], SamplingParams(temperature=0.0, logprobs=2), seed=0)
    assert first.shape == (3 + 2 * 2,) and first[ACTIVE] == 1.0
    state, out = engine.generate(state)
    out = np.asarray(out)
    assert out.shape == (3, 3 + 2 * 2)
    assert out[:, ACTIVE].tolist() == [0.0, 1.0, 0.0]
    tok, logprob, top_ids, top_lp = out[1, TOKEN], out[1, 1], out[1, 3:5], out[1, 5:7]
    assert top_ids[0] == tok and np.isclose(top_lp[0], logprob)  # greedy: the best is the chosen one
    assert logprob <= 0 and top_lp[0] >= top_lp[1]
    engine.release(state, 1)


def _pool(state):
    """The first of the state's KV arrays: layer 0's keys, or the stacked keys (``model.loops_layers``)."""
    return state.cache.k if state.cache.stacked else state.cache.k[0]


def test_old_state_is_donated(engine):
    state = engine.init_state()
    new = engine.begin(state, 0, [1, 2, 3], SamplingParams(temperature=0.0), seed=0)
    assert _pool(state).is_deleted()
    state, _ = engine.extend(new, [ChunkRow(0, 0, [1, 2, 3], True)])
    assert _pool(new).is_deleted()
    new = engine.copy(state, 0, 1, 3)
    assert _pool(state).is_deleted()  # the cache was updated in place, not copied
    new, _ = engine.generate(new)
    engine.release(new, 0)


def test_no_logprob_work_when_no_slot_asks(engine):
    state = engine.init_state()
    state, first = engine.prefill(state, 0, [5, 6, 7], SamplingParams(temperature=0.0), seed=0)
    assert first[1:].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    state, out = engine.generate(state)
    out = np.asarray(out)
    assert out[0, 1] == 0.0 and not out[0, 3:].any()  # the log-softmax and top-k branches did not run
    # One slot asking for the chosen token's logprob only: it gets it, and still no top-k runs.
    state, _ = engine.prefill(state, 2, [8, 9], SamplingParams(temperature=0.0, logprobs=0), seed=0)
    state, out = engine.generate(state)
    out = np.asarray(out)
    assert out[2, 1] < 0 and not out[:, 3:].any()
    engine.release(state, 0)


@pytest.fixture(scope="module")
def invariant_engine(tiny_ckpt):
    """Float weights on the row-invariant CPU kernels: steps compute the live slots only."""
    cfg, params, _ = checkpoint.load(tiny_ckpt, jnp.float32)
    eng = JaxEngine(cfg, params, slots=4, max_len=96, max_prompt_len=40, top_logprobs=2)
    if not eng.row_invariant:
        pytest.skip("the CPU kernels are not built here: every step computes every slot")
    return eng


def _decode(engine, live: list[int], steps: int) -> dict[int, np.ndarray]:
    """Each slot of ``live``'s packed rows over ``steps`` steps computing those slots only; every
    slot holds a prompt (the others idle)."""
    rng = np.random.default_rng(3)
    state = engine.init_state()
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.9, top_p=0.9, logprobs=1),
              SamplingParams(temperature=1.1, top_k=30, repetition_penalty=1.2, logprobs=0),
              SamplingParams(temperature=0.7, min_p=0.05, frequency_penalty=0.4, logprobs=2)]
    for slot in range(engine.slots):
        n = 5 + 7 * (slot % 4) + slot // 4
        state, _ = engine.prefill(state, slot, rng.integers(3, engine.vocab_size, n).tolist(), params[slot % 4],
                                  seed=slot)
    rows = {slot: [] for slot in live}
    for _ in range(steps):
        state, packed = engine.generate(state, slots=None if len(live) == engine.slots else live)
        packed = np.asarray(packed)
        assert packed.shape[0] == engine.decode_bucket(len(live))  # only the live rows' bucket is computed
        for i, slot in enumerate(live):
            rows[slot].append(packed[i])
    return {slot: np.stack(r) for slot, r in rows.items()}


def test_generate_over_live_slots_equals_every_slot_bitwise(invariant_engine):
    """A slot's tokens, logprobs and top alternatives are the same bits computed alone (one row),
    beside two others (a 4-row bucket with a padding row), or in the every-slot step."""
    assert invariant_engine.decode_rows == (1, 2, 4)
    every = _decode(invariant_engine, [0, 1, 2, 3], 12)
    assert all(r[:, ACTIVE].all() for r in every.values())
    for live in ([2], [1], [0, 2, 3], [1, 3]):
        got = _decode(invariant_engine, live, 12)
        for slot in live:
            assert got[slot].tobytes() == every[slot].tobytes(), (live, slot)


def test_decode_buckets_bound_the_rows_computed_beyond_the_live_ones():
    assert decode_buckets(1) == (1,) and decode_buckets(4) == (1, 2, 4) and decode_buckets(8) == (1, 2, 4, 8)
    assert decode_buckets(32) == (1, 2, 4, 8, 12, 16, 20, 24, 28, 32)
    for slots in range(1, 130):
        buckets = decode_buckets(slots)
        assert buckets[0] == 1 and buckets[-1] == slots and list(buckets) == sorted(set(buckets))
        for live in range(1, slots + 1):
            r = next(b for b in buckets if b >= live)
            assert r < 2 * live or r == 1, (slots, live, r)
            assert live <= 8 or r <= 1.5 * live, (slots, live, r)
            assert live <= 16 or r <= 1.25 * live, (slots, live, r)


def test_a_step_in_a_between_bucket_equals_the_every_slot_step_bitwise(tiny_ckpt):
    """Nine live slots of sixteen take the 12-row call; each slot's rows are the every-slot step's."""
    cfg, params, _ = checkpoint.load(tiny_ckpt, jnp.float32)
    eng = JaxEngine(cfg, params, slots=16, max_len=96, max_prompt_len=40, top_logprobs=2)
    if not eng.row_invariant:
        pytest.skip("the CPU kernels are not built here: every step computes every slot")
    assert eng.decode_bucket(9) == 12 and eng.decode_bucket(13) == 16
    every = _decode(eng, list(range(16)), 5)
    got = _decode(eng, [0, 2, 3, 5, 7, 8, 11, 12, 15], 5)
    for slot in got:
        assert got[slot].tobytes() == every[slot].tobytes(), slot


def test_steps_over_any_live_slots_compile_nothing_after_warmup(engine):
    """Every live count takes a warmed-up call: a row bucket where rows are invariant, else the
    every-slot step and its rows taken in one shape."""
    state = engine.init_state()
    for slot in range(engine.slots):
        state, _ = engine.prefill(state, slot, [1, 2, 3 + slot], SamplingParams(temperature=0.0), slot)
    with CompileWatch() as watch:
        for live in ([1], [0, 2], [2, 1], [0, 1, 2], None):
            state, out = engine.generate(state, slots=live)
            rows = np.asarray(out)[:len(live or range(engine.slots))]
            assert (rows[:, ACTIVE] == 1).all()
    watch.assert_nothing_traced()
