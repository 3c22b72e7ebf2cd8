"""The paged KV pool's host side: page allocation, page tables, the prefix cache over pages."""

import numpy as np
import pytest

from jserve.config import tiny_config
from jserve.kv_cache import cache_bytes
from jserve.kv_pages import (
    NO_PAGE,
    PAGE_SIZE,
    ROOT_KEY,
    PagePool,
    chain_key,
    default_kv_memory,
    kv_bytes_per_position,
    page_bytes,
    pages_for_memory,
    parse_memory_size,
)

B = 4  # a small page size keeps token lists readable


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def check_invariants(pool: PagePool) -> None:
    """Independent accounting from the page table alone: every page is held (its refcount equals
    how many slots list it), cached, or free, exactly one of the three."""
    listed = pool.table[pool.table != NO_PAGE]
    counts = np.bincount(listed, minlength=pool.num_pages)
    for page in range(pool.num_pages):
        assert pool.refcount(page) == counts[page] >= 0
    st = pool.stats()
    assert st.in_use == int(np.count_nonzero(counts))
    assert st.shared == int(np.count_nonzero(counts > 1))
    assert st.in_use + st.cached + st.free == st.pages == pool.num_pages
    for s in range(pool.slots):
        row = pool.table[s]
        n = int(np.count_nonzero(row != NO_PAGE))
        assert (row[:n] != NO_PAGE).all() and (row[n:] == NO_PAGE).all()  # pages lead the row
        assert len(set(row[:n].tolist())) == n  # no page twice in one sequence


# ----- sizes


@pytest.mark.parametrize("text, size", [
    ("512MiB", 512 << 20), ("4GiB", 4 << 30), ("4gib", 4 << 30), ("1.5GB", 1_500_000_000), ("100", 100),
    ("100B", 100), ("2K", 2048), ("2KiB", 2048), ("2KB", 2000), (" 3 MiB ", 3 << 20), ("1Ti", 1 << 40),
    ("0.5G", 1 << 29),
])
def test_parse_memory_size_reads_binary_and_decimal_units(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text, words", [
    ("", "cannot read"), ("MiB", "cannot read"), ("-1GiB", "cannot read"), ("12 parsecs", "unknown memory unit"),
    ("0", "must be positive"), ("0.0001B", "must be positive"), ("1e9", "cannot read"),
])
def test_parse_memory_size_refuses_with_a_precise_message(text, words):
    with pytest.raises(ValueError, match=words):
        parse_memory_size(text)


def test_page_bytes_match_todays_cache_bytes_per_position():
    cfg = tiny_config()
    for dtype in ("float32", "bfloat16"):
        jdtype = {"float32": np.float32, "bfloat16": "bfloat16"}[dtype]
        assert page_bytes(cfg, dtype) == cache_bytes(cfg, 1, PAGE_SIZE, jdtype)
    # int8: one byte per value plus a float32 scale per (position, head) vector, keys and values
    assert kv_bytes_per_position(2, 3, 64, "int8") == 2 * 2 * 3 * (64 + 4)
    assert kv_bytes_per_position(2, 3, 64, np.dtype(np.float32)) == 2 * 2 * 3 * 64 * 4
    with pytest.raises(ValueError, match="unknown KV dtype"):
        kv_bytes_per_position(2, 3, 64, "float64")


def test_default_kv_memory_equals_slots_times_max_len_reservation_and_gives_back_as_many_pages():
    cfg = tiny_config()
    mem = default_kv_memory(cfg, slots=8, max_len=1024, kv_dtype="float32")
    assert mem == cache_bytes(cfg, 8, 1024, np.float32)
    assert pages_for_memory(mem, cfg, "float32") == 8 * 1024 // PAGE_SIZE
    # a max_len that is not whole pages is rounded up per slot, as the cache is today
    assert default_kv_memory(cfg, 2, 130, "float32") == 2 * 2 * page_bytes(cfg, "float32")


def test_pages_for_memory_floors_and_refuses_a_budget_below_one_page():
    cfg = tiny_config()
    one = page_bytes(cfg, "bfloat16")
    assert pages_for_memory(one * 5 + one - 1, cfg, "bfloat16") == 5
    assert pages_for_memory(f"{one * 3}B", cfg, "bfloat16") == 3
    assert pages_for_memory("1GiB", cfg, "float32") == (1 << 30) // page_bytes(cfg, "float32")
    with pytest.raises(ValueError, match="holds no page"):
        pages_for_memory(one - 1, cfg, "bfloat16")


def test_page_size_is_the_attention_block():
    from jserve.model import ATTN_BLOCK

    assert PAGE_SIZE == ATTN_BLOCK


# ----- allocation


def test_pages_are_taken_as_a_sequence_grows_and_returned_when_it_ends():
    pool = PagePool(num_pages=6, slots=2, max_pages=4, page_size=B)
    assert pool.admit(0, toks(0, 3)) == 0
    assert pool.table[0].tolist() == [NO_PAGE] * 4
    assert pool.ensure(0, 3)
    assert pool.pages_of(0) == [0] and pool.capacity(0) == 4
    assert pool.ensure(0, 4) and pool.pages_of(0) == [0]  # still one page
    assert pool.ensure(0, 5) and pool.pages_of(0) == [0, 1]
    assert pool.table[0].tolist() == [0, 1, NO_PAGE, NO_PAGE]
    assert pool.ensure(0, 2) and pool.pages_of(0) == [0, 1]  # never shrinks
    check_invariants(pool)
    assert pool.stats().in_use == 2 and pool.stats().free == 4
    pool.release(0)
    assert pool.table[0].tolist() == [NO_PAGE] * 4
    st = pool.stats()
    assert (st.in_use, st.cached, st.free) == (0, 0, 6)  # nothing committed: nothing cached
    check_invariants(pool)


def test_full_pool_ensure_returns_false_and_takes_nothing():
    pool = PagePool(num_pages=3, slots=2, max_pages=4, page_size=B)
    pool.admit(0, toks(0, 5))
    assert pool.ensure(0, 8)
    pool.admit(1, toks(100, 5))
    before = pool.table.copy()
    assert not pool.ensure(1, 9)  # needs 3, one is left: all or nothing
    assert (pool.table == before).all() and pool.stats().free == 1
    assert pool.ensure(1, 4)
    assert not pool.ensure(0, 9)
    assert pool.available() == 0
    check_invariants(pool)
    pool.release(1)
    assert pool.ensure(0, 9)  # pages came back
    check_invariants(pool)


def test_a_length_no_pool_could_hold_raises_precisely():
    pool = PagePool(num_pages=100, slots=1, max_pages=2, page_size=B)
    pool.admit(0, [1])
    with pytest.raises(ValueError, match=r"9 positions need 3 pages of 4; a slot holds at most 2 \(8 positions\)"):
        pool.ensure(0, 9)
    assert pool.ensure(0, 8)


def test_slot_misuse_raises_precisely():
    pool = PagePool(num_pages=4, slots=2, max_pages=2, page_size=B)
    with pytest.raises(ValueError, match="slot 1 holds no sequence"):
        pool.release(1)
    with pytest.raises(ValueError, match="slot 0 holds no sequence"):
        pool.ensure(0, 1)
    with pytest.raises(ValueError, match="outside 0..1"):
        pool.admit(2, [1])
    pool.admit(1, [1])
    with pytest.raises(ValueError, match="slot 1 already holds a sequence"):
        pool.admit(1, [1])
    pool.release(1)
    with pytest.raises(ValueError, match="slot 1 holds no sequence"):
        pool.release(1)  # a second release never drives a refcount negative
    check_invariants(pool)
    with pytest.raises(ValueError, match="at least one page"):
        PagePool(num_pages=0, slots=1, max_pages=1)


# ----- the prefix cache


def run_prompt(pool: PagePool, slot: int, tokens: list[int]) -> int:
    """Admit, allocate and 'compute' a prompt, registering its full pages; returns cached positions."""
    cached = pool.admit(slot, tokens)
    assert pool.ensure(slot, len(tokens))
    pool.commit(slot, tokens)
    return cached


def test_a_second_sequence_shares_the_first_ones_full_pages_by_reference():
    pool = PagePool(num_pages=10, slots=3, max_pages=4, page_size=B)
    prompt = toks(0, 10)  # pages [0..3] [4..7] and a partial [8, 9]
    assert run_prompt(pool, 0, prompt) == 0
    first = pool.pages_of(0)
    assert pool.admit(1, prompt) == 8  # two full pages; the last token's page is computed
    assert pool.pages_of(1) == first[:2]
    assert pool.refcount(first[0]) == pool.refcount(first[1]) == 2
    assert pool.ensure(1, 10)
    assert pool.pages_of(1)[2] != first[2]  # the partial page is private
    assert pool.stats().shared == 2 and pool.stats().hit_tokens == 8
    check_invariants(pool)


def test_the_page_holding_the_last_prompt_token_is_never_taken_from_the_cache():
    pool = PagePool(num_pages=10, slots=2, max_pages=4, page_size=B)
    run_prompt(pool, 0, toks(0, 8))
    assert len(pool.lookup(toks(0, 9))) == 2
    assert len(pool.lookup(toks(0, 8))) == 1
    pool.release(0)
    assert pool.admit(0, toks(0, 8)) == 4  # the second page holds token 7: computed again
    pool.release(0)
    assert pool.admit(0, toks(0, 9)) == 8
    pool.release(0)
    assert pool.admit(1, toks(0, 4)) == 0


def test_a_page_shared_by_two_sequences_survives_one_ending():
    pool = PagePool(num_pages=4, slots=2, max_pages=4, page_size=B)
    run_prompt(pool, 0, toks(0, 9))
    run_prompt(pool, 1, toks(0, 9))
    shared = pool.pages_of(0)[:2]
    pool.release(0)
    assert pool.pages_of(1)[:2] == shared
    assert [pool.refcount(p) for p in shared] == [1, 1]
    # the pool is short of pages: only the first sequence's private page is free, shared ones are not taken
    pool.admit(0, toks(50, 3))
    assert pool.ensure(0, 4)
    assert not pool.ensure(0, 8)
    assert not set(pool.pages_of(0)) & set(shared)
    assert pool.stats().evictions == 0
    check_invariants(pool)


def test_cached_pages_outlive_their_requests_and_count_as_cached_not_in_use():
    pool = PagePool(num_pages=8, slots=2, max_pages=4, page_size=B)
    run_prompt(pool, 0, toks(0, 10))
    pool.release(0)
    st = pool.stats()
    assert (st.in_use, st.cached, st.free) == (0, 2, 6)
    assert st.usage == 0.0
    assert pool.admit(1, toks(0, 12)) == 8
    st = pool.stats()
    assert (st.in_use, st.cached, st.free) == (2, 0, 6)
    assert st.usage == 2 / 8
    check_invariants(pool)


def test_hash_chains_tell_the_same_page_after_different_prefixes_apart():
    pool = PagePool(num_pages=12, slots=2, max_pages=4, page_size=B)
    common = [7, 7, 7, 7]
    run_prompt(pool, 0, [1, 2, 3, 4] + common + [9])
    pool.release(0)
    assert pool.admit(1, [5, 6, 7, 8] + common + [9]) == 0  # same second page, other first page
    pool.release(1)
    assert pool.admit(1, [1, 2, 3, 4] + common + [0]) == 8
    assert chain_key(ROOT_KEY, common) != chain_key(chain_key(ROOT_KEY, [1, 2, 3, 4]), common)
    assert chain_key(ROOT_KEY, [1, 2, 3, 4]) == chain_key(ROOT_KEY, np.array([1, 2, 3, 4], np.int32))


def test_partial_pages_are_never_cached_and_commit_is_incremental():
    pool = PagePool(num_pages=8, slots=2, max_pages=4, page_size=B)
    seq = toks(0, 6)
    pool.admit(0, seq)
    pool.ensure(0, 6)
    assert pool.commit(0, seq) == 1
    assert pool.commit(0, seq) == 0  # idempotent
    seq += [100, 101, 102]  # decode grows the sequence to 9 positions
    pool.ensure(0, 9)
    assert pool.commit(0, seq) == 1
    pool.release(0)
    assert pool.stats().cached == 2 and pool.stats().free == 6
    assert pool.admit(1, seq + [5]) == 8  # generated tokens' pages are found too


def test_a_duplicate_page_computed_concurrently_stays_private_and_is_freed():
    pool = PagePool(num_pages=8, slots=2, max_pages=4, page_size=B)
    prompt = toks(0, 6)
    for slot in (0, 1):  # both admitted before either committed: neither finds the other
        assert pool.admit(slot, prompt) == 0
        pool.ensure(slot, 6)
    assert pool.commit(0, prompt) == 1
    assert pool.commit(1, prompt) == 0
    pool.release(1)
    assert pool.stats().cached == 0  # its duplicate page is free, not cached
    pool.release(0)
    assert pool.stats().cached == 1
    check_invariants(pool)


def test_eviction_takes_free_pages_first_then_least_recently_used_cached_pages():
    pool = PagePool(num_pages=6, slots=3, max_pages=3, page_size=B)
    a, b = [1] * 4 + [2] * 4 + [3], [4] * 4 + [5] * 4 + [6]
    run_prompt(pool, 0, a)  # pages 0, 1 (cached) and 2
    run_prompt(pool, 1, b)  # pages 3, 4 (cached) and 5
    pa, pb = pool.pages_of(0)[:2], pool.pages_of(1)[:2]
    pool.release(0)  # a released first: least recently used
    pool.release(1)
    assert pool.stats().free == 2 and pool.stats().cached == 4
    pool.admit(2, toks(1000, 12))
    assert pool.ensure(2, 12)  # two free pages, then one eviction: a's last page (a leaf goes before its root)
    assert pool.stats().evictions == 1
    assert pool.pages_of(2)[2] == pa[1]
    assert pool.lookup(a + [0]) == pa[:1]
    assert pool.lookup(b + [0]) == pb
    check_invariants(pool)


def test_reuse_refreshes_a_pages_recency():
    pool = PagePool(num_pages=4, slots=2, max_pages=4, page_size=B)
    a, b = [1] * 4 + [0], [2] * 4 + [0]
    run_prompt(pool, 0, a)
    pool.release(0)
    run_prompt(pool, 0, b)
    pool.release(0)
    assert pool.admit(1, a) == 4  # a used again: now b is the least recently used
    pool.release(1)
    pool.admit(0, toks(100, 12))
    assert pool.ensure(0, 12)  # 2 free + 1 evicted
    assert pool.lookup(b) == [] and len(pool.lookup(a)) == 1
    check_invariants(pool)


def test_pages_held_by_live_sequences_are_never_evicted():
    pool = PagePool(num_pages=3, slots=2, max_pages=3, page_size=B)
    run_prompt(pool, 0, toks(0, 9))  # all three pages held
    pool.admit(1, [5])
    assert not pool.ensure(1, 1)
    assert pool.stats().evictions == 0
    pool.release(0)
    assert pool.ensure(1, 12)  # the free partial page first, then two evictions
    assert pool.stats().evictions == 2 and pool.stats().cached == 0
    check_invariants(pool)


def test_clear_cache_frees_unheld_cached_pages_only():
    pool = PagePool(num_pages=6, slots=2, max_pages=3, page_size=B)
    run_prompt(pool, 0, toks(0, 9))
    run_prompt(pool, 1, toks(50, 9))
    pool.release(0)
    assert pool.clear_cache() == 2
    assert pool.lookup(toks(0, 9)) == []
    assert len(pool.lookup(toks(50, 9))) == 2  # still held: still findable
    check_invariants(pool)


def test_random_traffic_keeps_refcounts_and_cached_contents_exact():
    """Random admissions, growth, commits and releases over a few shared prefixes. The test keeps
    its own record of the tokens written into each page; every page the cache hands out must hold
    exactly the tokens of the prompt positions it stands for."""
    rng = np.random.default_rng(0)
    pool = PagePool(num_pages=14, slots=4, max_pages=5, page_size=B)
    content: dict[int, list[int]] = {}
    seqs: dict[int, list[int]] = {}
    prefixes = [rng.integers(0, 3, size=12).tolist() for _ in range(3)]
    hits = 0
    for _ in range(600):
        slot = int(rng.integers(0, pool.slots))
        if slot not in seqs:
            tokens = prefixes[rng.integers(0, 3)][: int(rng.integers(1, 13))] + rng.integers(0, 3, 3).tolist()
            cached = pool.admit(slot, tokens)
            hits += cached
            for i, page in enumerate(pool.pages_of(slot)):
                assert content[page] == tokens[i * B:(i + 1) * B]
            if not pool.ensure(slot, len(tokens)):
                pool.release(slot)
                continue
            for i in range(cached // B, pool.pages_needed(len(tokens))):  # the 'prefill' writes
                content[pool.pages_of(slot)[i]] = tokens[i * B:(i + 1) * B]
            seqs[slot] = tokens
            pool.commit(slot, tokens)
        elif rng.random() < 0.3 or len(seqs[slot]) >= pool.max_pages * B:
            pool.release(slot)
            del seqs[slot]
        else:
            tokens = seqs[slot]
            if pool.ensure(slot, len(tokens) + 1):
                tokens.append(int(rng.integers(0, 3)))
                page = pool.pages_of(slot)[(len(tokens) - 1) // B]
                content[page] = tokens[(len(tokens) - 1) // B * B:len(tokens)]
                pool.commit(slot, tokens)
        check_invariants(pool)
    assert hits > 0 and pool.stats().evictions > 0  # the run exercised sharing and eviction


def test_table_for_writes_sends_missing_pages_out_of_bounds_so_a_dropping_scatter_drops_them():
    import jax.numpy as jnp

    pool = PagePool(num_pages=3, slots=2, max_pages=2, page_size=B)
    pool.admit(0, [1])
    pool.ensure(0, 1)
    table = pool.table_for_writes()
    assert table.tolist() == [[0, 3], [3, 3]] and table.dtype == np.int32
    buf = jnp.zeros((3, B))  # [P, B]: write position 5 of every slot
    out = buf.at[table[:, 5 // B], 5 % B].set(1.0, mode="drop")
    assert float(out.sum()) == 0.0  # slot 0 has no page for position 5, slot 1 none at all
    out = buf.at[table[:, 0], 0].set(1.0, mode="drop")
    assert out[0, 0] == 1.0 and float(out.sum()) == 1.0
    wrapped = buf.at[pool.table[:, 5 // B], 5 % B].set(1.0, mode="drop")
    assert wrapped[2, 5 % B] == 1.0  # why: with the raw table, -1 wraps round onto the last page



def test_a_sequences_partial_last_page_is_kept_as_a_tail_and_taken_over_in_place():
    pool = PagePool(4, 2, 3, page_size=4)
    pool.admit(0, [])
    pool.ensure(0, 7)
    first = pool.pages_of(0)
    pool.release(0, [1, 2, 3, 4, 5, 6, 7])  # one full page committed, three positions of the next kept
    assert pool.stats().cached == 2 and pool.stats().free == 2
    reused, copies = pool.admit_reusing(1, [1, 2, 3, 4, 5, 6, 9, 9])
    # The full page by reference, then the tail's two shared positions: its page, taken over, no copy.
    assert (reused, copies) == (6, []) and pool.pages_of(1) == first
    assert pool.match([1, 2, 3, 4, 5, 6, 7, 8]) == 4  # the tail is no longer cached: it is being overwritten
    pool.release(1, [1, 2, 3, 4, 5, 6, 9])
    assert pool.match([1, 2, 3, 4, 5, 6, 9, 1]) == 7


def test_a_live_sequences_partial_page_is_copied_into_a_page_of_its_own():
    pool = PagePool(4, 2, 3, page_size=4)
    pool.admit(0, [])
    pool.ensure(0, 6)
    live = {0: [1, 2, 3, 4, 5, 6]}
    reused, copies = pool.admit_reusing(1, [1, 2, 3, 4, 5, 7], live)
    # Nothing committed yet: the live sequence's first page is copied (one page at most per admission).
    assert reused == 4 and copies == [(pool.pages_of(0)[0], pool.pages_of(1)[0])]
    pool.release(1)
    pool.commit(0, [1, 2, 3, 4, 5, 6])
    reused, copies = pool.admit_reusing(1, [1, 2, 3, 4, 5, 7], live)
    assert reused == 5
    assert pool.pages_of(1)[0] == pool.pages_of(0)[0] and copies == [(pool.pages_of(0)[1], pool.pages_of(1)[1])]
    assert pool.refcount(pool.pages_of(0)[1]) == 1  # copied, not shared: both write their own


def test_tails_are_evicted_like_cached_pages_and_reset_empties_the_pool():
    pool = PagePool(2, 2, 2, page_size=4)
    for tokens in ([1, 2], [3, 4]):
        pool.admit(0, [])
        pool.ensure(0, 2)
        pool.release(0, tokens)
    assert pool.stats().cached == 2
    pool.admit(1, [])
    assert pool.ensure(1, 4)  # the oldest tail is evicted
    assert pool.match([1, 2, 9]) == 0 and pool.match([3, 4, 9]) == 2
    pool.reset()
    assert pool.stats().free == 2 and not pool.holds(1)


def test_a_cached_full_pages_first_positions_are_copied_and_the_page_is_not_evicted_for_it():
    pool = PagePool(3, 2, 3, page_size=4)
    pool.admit(0, [])
    pool.ensure(0, 6)
    pool.release(0, [1, 2, 3, 7, 8])  # a full page [1, 2, 3, 7] cached, and a tail after it
    assert pool.stats().cached == 2 and pool.stats().free == 1
    source = pool.lookup([1, 2, 3, 7, 0])[0]
    # A prompt sharing three positions of that page (a system prompt, then another question).
    reused, copies = pool.admit_reusing(1, [1, 2, 3, 9, 9])
    assert reused == 3 and copies == [(source, pool.pages_of(1)[0])] and pool.pages_of(1)[0] != source
    assert pool.refcount(source) == 0 and pool.match([1, 2, 3, 7, 0]) == 4  # still cached, not shared
    pool.release(1)
    # The pool's only evictable page is the source (the tail is evicted for another sequence):
    # a copy would need another page, and never takes its own source, so nothing is copied.
    pool.admit(0, [])
    assert pool.ensure(0, 8) and pool.stats().evictions == 1 and pool.available() == 1
    assert pool.admit_reusing(1, [1, 2, 3, 9, 9]) == (0, [])
    assert pool.lookup([1, 2, 3, 7, 0]) == [source] and pool.refcount(source) == 0
