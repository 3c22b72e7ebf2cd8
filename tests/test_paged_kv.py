"""The paged KV pool wired into the engine and the orchestrator: pages taken as sequences grow,
admission that waits and preemption that resumes with the same tokens, when the pool is smaller
than every request at once; the edge's refusal of what can never fit; the pool's metrics."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jserve import checkpoint
from jserve.config import tiny_config
from jserve.engine import ChunkRow, JaxEngine
from jserve.kv_pages import PagePool, page_bytes
from jserve.llm import collect
from jserve.orchestrator import Orchestrator, Stream
from jserve.request import InvalidRequestError, Limits, fit
from jserve.sampling import SamplingParams

MAX_LEN = 384  # three pages of 128 positions per slot


@pytest.fixture(scope="module", params=["bfloat16", "int8"])
def engine(request):
    """Every test below with a bfloat16 pool and an int8 one (int8 values and their scales in pages)."""
    cfg = tiny_config(max_position_embeddings=MAX_LEN)
    params = checkpoint.to_params(cfg, checkpoint.random_weights(cfg))
    # Three slots, four pages: one sequence's worth and a page.
    eng = JaxEngine(cfg, params, slots=3, max_len=MAX_LEN, max_prompt_len=200, top_logprobs=2,
                    kv_memory=4 * page_bytes(cfg, request.param), cache_dtype=getattr(jnp, request.param))
    assert eng.paged and eng.pages.num_pages == 4 and eng.page_size == 128
    assert eng.init_state().cache.dtype == jnp.dtype(request.param)
    return eng


@pytest.fixture(scope="module")
def f32_engine():
    """``engine``'s model and shapes with a float32 pool: the reference for the lower precisions."""
    cfg = tiny_config(max_position_embeddings=MAX_LEN)
    params = checkpoint.to_params(cfg, checkpoint.random_weights(cfg))
    return JaxEngine(cfg, params, slots=3, max_len=MAX_LEN, max_prompt_len=200, top_logprobs=2,
                     kv_memory=4 * page_bytes(cfg, "float32"), cache_dtype=jnp.float32)


def _run_all(eng, prompts, params, **kw):
    orch = Orchestrator(eng, None, max_waiting=64, **kw)
    try:
        streams = [orch.submit(p, params[i], Stream()) for i, p in enumerate(prompts)]
        results = [collect(list(s)) for s in streams]
        return results, orch.preemptions, orch.pages.stats()
    finally:
        orch.shutdown(drain=False, timeout=30)


def _fp(r):
    return r.token_ids, np.asarray(r.logprobs, np.float32).tobytes(), r.finish_reason


def test_pages_follow_the_table_not_the_slot(engine):
    """The same sequence through pages placed anywhere in the pool gives the same bits."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 500, 150).tolist()
    outs = []
    for order in ([0, 1], [3, 2]):
        pool = engine.new_page_pool()
        pool.admit(1, [])
        pool._free = [p for p in range(4) if p not in order][::-1] + order[::-1]  # hand out ``order`` first
        assert pool.ensure(1, 200) and pool.pages_of(1) == order
        state = engine.init_state()
        state = engine.begin(state, 1, prompt, SamplingParams(temperature=0.0, logprobs=2), 0,
                             table=pool.table_for_writes())
        for a in range(0, len(prompt), engine.chunk):
            state, first = engine.extend(state, [ChunkRow(1, a, prompt[a:a + engine.chunk],
                                                          a + engine.chunk >= len(prompt))],
                                         table=pool.table_for_writes())
        rows = [np.asarray(first)[0]]
        for _ in range(20):
            state, out = engine.generate(state, slots=[1], table=pool.table_for_writes())
            rows.append(np.asarray(out)[0])
        outs.append(np.stack(rows))
    assert outs[0].tobytes() == outs[1].tobytes()


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_a_pool_too_small_for_all_waits_preempts_and_resumes_with_the_same_tokens(engine, sampling):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 500, n).tolist() for n in (120, 100, 110)]
    if sampling == "greedy":
        params = [SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True, logprobs=1)] * 3
    else:
        params = [SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.3,
                                 seed=7 + i, max_tokens=90, ignore_eos=True, logprobs=1) for i in range(3)]
    # No headroom: admission takes whatever prompt fits, so growth must preempt.
    together, preemptions, stats = _run_all(engine, prompts, params, kv_headroom=0)
    # Three sequences of 190-210 positions need six pages; the pool has four.
    assert preemptions >= 1
    assert all(r.completion_tokens == 90 and r.error is None for r in together)
    assert stats.in_use == 0 and stats.free + stats.cached == 4
    alone = [_run_all(engine, [p], [sp])[0][0] for p, sp in zip(prompts, params)]
    assert [_fp(r) for r in together] == [_fp(r) for r in alone]


def test_admission_keeps_headroom_so_a_tight_pool_does_not_preempt(engine):
    """Many chats through a pool that holds two of them grown: without headroom admission
    over-commits the pool and growth preempts; with a page of headroom per running request it
    admits only what can grow, preempts nobody, and every output equals the request run alone."""
    rng = np.random.default_rng(4)
    lengths = rng.integers(70, 120, 8)
    prompts = [rng.integers(3, 500, int(n)).tolist() for n in lengths]
    params = [SamplingParams(temperature=0.0, max_tokens=int(t), ignore_eos=True, logprobs=1)
              for t in rng.integers(60, 110, 8)]
    # Each sequence ends on its second page (129-229 positions): four pages hold two at once.
    assert all(128 < n + sp.max_tokens <= 256 for n, sp in zip(lengths, params))
    over, over_preemptions, _ = _run_all(engine, prompts, params, kv_headroom=0)
    kept, preemptions, stats = _run_all(engine, prompts, params)
    assert over_preemptions >= 2 and preemptions == 0
    assert all(r.completion_tokens == sp.max_tokens and r.error is None for r, sp in zip(kept, params))
    assert stats.in_use == 0
    alone = [_run_all(engine, [p], [sp])[0][0] for p, sp in zip(prompts, params)]
    assert [_fp(r) for r in kept] == [_fp(r) for r in alone] == [_fp(r) for r in over]


def test_tenants_system_prompts_stay_warm_and_equal_computing_them(engine):
    """Two tenants' system prompts, each asked twice in turn: the second time takes the whole
    system prompt from the pool (copied out of the first ask's full page; the other tenant's pages
    stayed cached meanwhile), and its output is bitwise what computing the whole prompt gives."""
    rng = np.random.default_rng(5)
    # Each system prompt ends inside its first page, which the first ask's question fills up.
    systems = [rng.integers(3, 500, 120).tolist() for _ in range(2)]
    prompts = [systems[t] + rng.integers(3, 500, 6).tolist() for t in (0, 1, 0, 1)]
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=1)
    orch = Orchestrator(engine, None, max_waiting=8)
    try:
        warm = [collect(list(orch.submit(p, sp, Stream()))) for p in prompts]  # one at a time
    finally:
        orch.shutdown(drain=False, timeout=30)
    assert [r.cached_tokens for r in warm] == [0, 0, 120, 120]
    cold = _run_all(engine, prompts[2:], [sp, sp], prefix_cache=False)[0]
    assert [_fp(r) for r in warm[2:]] == [_fp(r) for r in cold]


def test_recomputed_keys_equal_the_decode_steps(engine):
    """What preemption relies on: a generated token's keys/values run in again by ``extend`` are
    bitwise those the decode step wrote (so the next tokens are too)."""
    rng = np.random.default_rng(2)
    prompt = rng.integers(3, 500, 40).tolist()
    sp = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=1)
    first = _run_all(engine, [prompt], [sp], prefix_cache=False)[0][0]
    # The prompt and the first 20 tokens run in as one prompt: the next tokens are the same.
    again = _run_all(engine, [prompt + first.token_ids[:20]],
                     [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1)],
                     prefix_cache=False)[0][0]
    assert again.token_ids == first.token_ids[20:]
    assert np.asarray(again.logprobs, np.float32).tobytes() == np.asarray(first.logprobs[20:], np.float32).tobytes()


def test_greedy_tokens_stay_close_to_a_float32_pools(engine, f32_engine):
    """bfloat16 and int8 pools against a float32 one on the same model: each prompt's greedy tokens
    agree until a near tie (a divergence only where float32's two best log-probabilities are
    within 0.05), the chosen tokens' logprobs before it within 0.05, and most tokens agree."""
    rng = np.random.default_rng(6)
    prompts = [rng.integers(3, 500, int(n)).tolist() for n in (30, 70, 100, 130)]
    sp = [SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2)] * len(prompts)
    want = _run_all(f32_engine, prompts, sp)[0]
    got = _run_all(engine, prompts, sp)[0]
    same = 0
    for a, b in zip(want, got):
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        same += n
        np.testing.assert_allclose(b.logprobs[:n], a.logprobs[:n], atol=0.05)
        if n < len(a.token_ids):
            top = sorted(a.top_logprobs[n].values(), reverse=True)
            assert top[0] - top[1] < 0.05, f"diverged at {n} where float32's best led by {top[0] - top[1]}"
    assert same >= 0.75 * 32 * len(prompts)
    assert any(a.logprobs != b.logprobs for a, b in zip(want, got))  # the rounding is there to see


def test_prefix_pages_are_shared_by_reference(engine):
    rng = np.random.default_rng(3)
    system = rng.integers(3, 500, 140).tolist()  # one full page and a partial one
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=1)
    orch = Orchestrator(engine, None, max_waiting=8)
    try:
        a = collect(list(orch.submit(system + [7, 8], sp, Stream())))
        b = collect(list(orch.submit(system + [9], sp, Stream())))
        stats = orch.pages.stats()
    finally:
        orch.shutdown(drain=False, timeout=30)
    assert a.cached_tokens == 0 and b.cached_tokens == len(system)
    assert stats.hit_tokens == len(system)
    cold = _run_all(engine, [system + [9]], [sp], prefix_cache=False)[0][0]
    assert _fp(b) == _fp(cold)


def test_a_request_that_can_never_fit_is_refused_at_the_edge():
    limits = Limits(vocab_size=100, max_len=4096, max_prompt_len=4000, max_logprobs=0, max_token_bytes=None,
                    kv_positions=1024)
    ok = fit(list(range(1000)), SamplingParams(max_tokens=24), limits)
    assert ok.max_tokens == 24
    assert fit(list(range(1000)), SamplingParams(), limits).max_tokens == 24  # the rest of the pool
    with pytest.raises(InvalidRequestError, match="1024 positions the KV cache holds"):
        fit(list(range(1000)), SamplingParams(max_tokens=25), limits)
    with pytest.raises(InvalidRequestError, match="KV cache holds at most 1024"):
        fit(list(range(1024)), SamplingParams(max_tokens=1), limits)


def test_pool_metrics():
    from jserve.metrics import ServingMetrics

    pool = PagePool(8, 2, 4, page_size=4)
    pool.admit(0, [])
    pool.ensure(0, 9)  # three pages
    pool.release(0, list(range(8)))  # two full pages cached, the third (no tokens) free
    pool.admit(1, [])
    pool.ensure(1, 4)
    m = ServingMetrics()
    m.bind(2, lambda: 0, lambda: 1, lambda: 1)
    m.bind_pages(pool.stats)
    m.on_event("preempted", object(), 0.0)
    text = m.exposition()[0].decode()
    assert 'jserve_kv_pages{state="cached"} 2.0' in text
    assert 'jserve_kv_pages{state="in_use"} 1.0' in text
    assert 'jserve_kv_pages{state="free"} 5.0' in text
    assert "jserve_kv_cache_usage_ratio 0.125" in text
    assert "jserve_preemptions_total 1.0" in text


def test_a_stream_sends_its_page_table_and_live_rows_only_when_they_change(engine, monkeypatch):
    """A decode step copies the page table and its live slots' rows to the device only when they
    changed (one stream's steps mostly send neither), and its tokens and logprobs are the ones
    steps that send both every time give."""
    prompt = np.random.default_rng(3).integers(3, 500, 100).tolist()
    sp = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=5, max_tokens=120, ignore_eos=True, logprobs=1)

    def run():
        tables, rows = engine.table_uploads, engine.rows_uploads
        (result,), _, _ = _run_all(engine, [prompt], [sp])
        return result, engine.table_uploads - tables, engine.rows_uploads - rows

    cached, tables, rows = run()
    # Its table changes when it takes pages: its prompt's (sent with ``begin``), then one more at
    # 128 positions (220 in all); its one live row is sent with its first step.
    assert cached.completion_tokens == 120
    assert tables <= 3 and rows <= 1

    def fresh_table(pool):  # what every call got before: a new, writable array (sent every time)
        return np.where(pool.table < 0, pool.num_pages, pool.table).astype(np.int32)

    monkeypatch.setattr(PagePool, "table_for_writes", fresh_table)
    every, tables, _ = run()
    assert tables >= 120  # the counter counts: here every call sent its table
    assert _fp(cached) == _fp(every)
