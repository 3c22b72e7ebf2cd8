"""The engine: jit-compiled extend, generate and release over fixed batch slots.

A request is started in a slot with ``begin`` (its sampling parameters and penalty tables),
its prompt is run into that slot's cache by ``extend`` in chunks of ``chunk`` positions (rows
of several requests in one call; a row's last chunk samples the first token and makes the slot
live), ``copy`` reuses another slot's cached prefix, and ``generate`` advances the live slots
by one token (in a call of as many rows as they need, bucketed). ``verify`` is a decode step that
also checks drafted tokens per slot (speculative decoding) and keeps as many as the model agrees
with, plus its own next token; ``generate`` is its width-1 case, bitwise. On CPU every matmul runs
through row-invariant kernels (float weights too, ``model.for_cpu_kernels``), so a slot's bits do
not depend on how many rows a call has. All of them
take the decode state donated, so the cache is updated in place and the caller must use the
state they return. Shapes never change after ``warmup``, so serving compiles nothing: ``warmup``
compiles what any request needs (the decode step and the smallest ``extend`` call) before it
returns, and the rest (larger ``extend`` calls, ``verify``'s shapes) in the background, each used
only once it is ready (``ready_rows``, ``ready_widths``; warmup.py). The pure functions it jits,
and the ``DecodeState`` they take, are in engine_steps.py; this module chooses their shapes.

The KV cache is a pool of pages (``kv_cache.PagedKVCache``, sized by ``kv_memory``) and each call
that reads or writes it gets a page table, ``[S, M]``, in the state (a fixed shape: nothing
recompiles as it changes). The orchestrator places sequences in pages with its own
``kv_pages.PagePool`` (``new_page_pool``) and passes its table (``table=``); a caller that passes
none (scripts, tests, a sharded engine) gets each slot's fixed share of the engine's own pool,
today's layout. ``restart`` and ``resume`` bring back a preempted request.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jserve import engine_api, model
from jserve.attention_kernels import engine_kernel
from jserve.config import ModelConfig
from jserve.engine_api import ACTIVE, LOGPROB, RESULT_COLS, TOKEN, ChunkRow, Engine  # noqa: F401 (re-exported)
from jserve.engine_steps import (  # noqa: F401 (DecodeState, _pack, apply_bitmask re-exported)
    DecodeState,
    _begin,
    _copy,
    _extend,
    _generate,
    _pack,
    _release,
    _resume,
    _take_rows,
    _verify,
    apply_bitmask,
    mask_words,
)
from jserve.kv_cache import PagedKVCache, storage
from jserve.kv_pages import PagePool, page_bytes, pages_for_memory
from jserve.model import Params
from jserve.sampling import SamplingParams, SlotSampling
from jserve.sharding import Plan, state_sharding
from jserve.warmup import Warmup

log = logging.getLogger(__name__)

CHUNK = 16  # prompt positions per row of an ``extend`` call
# The row counts ``extend`` is compiled for (calls pad to the next one): any number of rows where
# every matmul is row-invariant (``model.row_invariant``), else at least 64 positions a call
# (XLA:CPU's matmul gives a row the same bits only from 48 rows up). Up to 8 rows with the CPU
# kernels: a row costs the same in a call of 8, 16 or 32 (32 rows as 4 calls of 8 took 0.86x the
# seconds of one call of 32, median of 5 interleaved rounds, SmolLM2 Q4_1 at the defaults), and
# each compiled call holds ~80 MiB of XLA's (its 30 layers' HLO and buffer assignment), so the
# 16- and 32-row calls cost ~160 MiB of resident memory for nothing (scripts/bench_memory.py).
CHUNK_ROWS = (1, 2, 4, 8)
CHUNK_ROWS_FIXED = (4, 8, 16, 32)


def decode_buckets(slots: int) -> tuple[int, ...]:
    """The row counts a decode step over ``slots`` slots is compiled for: powers of two up to 8
    (the default server's steps, each executable held in memory), 12 between 8 and 16 (at most half
    again the live rows), past 16 four per octave (20, 24, 28, 32, 40, 48, ...: at most a quarter
    more), and ``slots`` itself. On CPU a step's time grows with its rows."""
    rows = {slots}
    for i in range(slots.bit_length()):
        base = 1 << i
        rows.update(r for r in ((base,) if base < 8 else (base, base * 3 // 2) if base < 16
                                else (base, base * 5 // 4, base * 3 // 2, base * 7 // 4)) if r < slots)
    return tuple(sorted(rows))


def verify_widths(speculate: int) -> tuple[int, ...]:
    """Positions per row ``verify`` is compiled for with up to ``speculate`` drafted tokens: 1 (no
    draft: a decode step over the live slots only), 5, 9, 17, ... below ``speculate + 1``, and
    ``speculate + 1``. A step takes the narrowest that holds its longest draft, or a narrower one
    with the drafts cut when that is expected to pay (``SpecPolicy``)."""
    if speculate <= 0:
        return ()
    steps = {1 + (1 << i) for i in range(2, speculate.bit_length()) if 1 << i < speculate}
    return tuple(sorted({1, speculate + 1} | steps))




@dataclasses.dataclass
class JaxEngine(Warmup):
    """The JAX implementation of ``Engine``: one model on the default device, or sharded over
    ``plan``'s mesh (params already sharded by ``checkpoint.load``; the state is sharded here)."""

    cfg: ModelConfig
    params: Params
    slots: int = 8
    max_len: int = 1024
    max_prompt_len: int | None = None
    cache_dtype: jnp.dtype = jnp.float32
    top_logprobs: int = 0
    plan: Plan | None = None
    chunk: int = CHUNK
    chunk_rows: tuple[int, ...] | None = None  # default: CHUNK_ROWS, or CHUNK_ROWS_FIXED (see there)
    speculate: int = 0  # drafted tokens a ``verify`` call checks per slot (0: no speculative decoding)
    kv_memory: int | None = None  # bytes of KV pages (default: ``slots x max_len`` positions' worth)
    # The decode steps' attention kernel, which lays out the pool (``attention_kernels.engine_kernel``):
    # None for the platform's ("pallas_gpu" on a GPU, "pallas_tpu_paged" on a TPU, "xla" on CPU or
    # sharded), else "xla", "pallas_gpu" or "pallas_tpu_paged" (off its platform: interpret mode).
    attention: str | None = None

    def __post_init__(self) -> None:
        if self.max_prompt_len is None:
            self.max_prompt_len = self.max_len - 1
        if not 1 <= self.max_prompt_len < self.max_len:
            raise ValueError(f"max_prompt_len={self.max_prompt_len} must be in [1, max_len={self.max_len})")
        if self.max_len > self.cfg.max_position_embeddings:
            log.warning("max_len %d exceeds the model's trained context %d", self.max_len,
                        self.cfg.max_position_embeddings)
        if self.plan is None:  # float matrices through the row-invariant CPU kernels (where built)
            self.params = model.for_cpu_kernels(self.params)
        self.row_invariant = model.row_invariant(self.params)
        if self.chunk_rows is None:
            self.chunk_rows = CHUNK_ROWS if self.row_invariant else CHUNK_ROWS_FIXED
        if self.chunk < 1 or not self.chunk_rows or min(self.chunk_rows) < 1:
            raise ValueError(f"chunk={self.chunk} and chunk_rows={self.chunk_rows} must be positive")
        self.chunk_rows = tuple(sorted(set(self.chunk_rows)))
        # A call never needs more rows than every slot's longest prompt at once: the buckets past
        # the first that holds that many are never used, and are not compiled.
        need = self.slots * -(-self.max_prompt_len // self.chunk)
        self.chunk_rows = tuple(r for r in self.chunk_rows if r < need) + tuple(
            r for r in self.chunk_rows if r >= need)[:1]
        self.vocab_size = self.cfg.vocab_size
        self.attention = engine_kernel(self.attention, sharded=self.plan is not None,
                                       quantized_kv=np.dtype(self.cache_dtype) == np.int8)
        self.cache_len = model.padded_cache_len(self.max_len)
        # One loop over layers (stacked weights and pool, read in place by the CPU kernels) where
        # everything runs through them: each compiled call holds one layer's program (model.loops_layers).
        store = jnp.dtype(storage(self.cache_dtype))
        self.loop_layers = (self.plan is None and self.attention == "xla" and model.loops_layers(self.params, self.cfg)
                            and model.paged_kernel(jax.ShapeDtypeStruct((1,), store)))
        if self.loop_layers:
            self.params = model.stack_layers(self.params)
        self._init_pages()
        top_n = self.top_logprobs
        extend = functools.partial(_extend, cfg=self.cfg, top_n=top_n,
                                   out_rows=None if self.row_invariant else self.chunk_rows[-1])
        generate = functools.partial(_generate, cfg=self.cfg, top_n=top_n)
        verify = functools.partial(_verify, cfg=self.cfg, top_n=top_n)
        if self.speculate < 0:
            raise ValueError(f"speculate={self.speculate} must be >= 0")
        # ``verify`` is compiled for these row counts (live slots, rounded up) and positions per row
        # (last token + drafts): one stream checks its drafts in a call of k + 1 positions, not
        # slots x (k + 1), and a step with short or no drafts takes a narrower call (one position
        # per row: a decode step over the live slots only).
        self.verify_rows = tuple(sorted({min(1 << i, self.slots) for i in range(self.slots.bit_length() + 1)}))
        self.verify_widths = verify_widths(self.speculate)
        # ``generate`` is compiled for finer row counts (``decode_buckets``), a step computing the
        # live slots only, where rows are invariant; else every step computes every slot's row
        # (fixed shapes).
        self.decode_rows = (decode_buckets(self.slots) if self.row_invariant else (self.slots,))
        self._state_shape = jax.eval_shape(self._zeros)
        if self.plan is None:
            state_sh = result_sh = None
        else:  # outputs pinned to the shardings the next call expects, so donation stays in place
            state_sh = state_sharding(self._state_shape, self.plan)
            result_sh = self.plan.replicated()
            self._state_shape = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                             self._state_shape, state_sh)
        self._table_sharding = None if state_sh is None else state_sh.table
        self._table_sent: np.ndarray | None = None  # the page table the last call was given
        self._table_held: jax.Array | None = None  # the table in the state that call returned
        self._rows_cache: tuple = (None, None)  # ``_rows_on_device``'s last (key, device arrays)
        self.table_uploads = self.rows_uploads = 0  # host-to-device copies of page tables, of live rows
        self._init = jax.jit(self._zeros, out_shardings=state_sh)
        self._begin = jax.jit(_begin, donate_argnames=("state",), out_shardings=state_sh)
        self._copy = jax.jit(_copy, donate_argnames=("state",), out_shardings=state_sh)
        self._extend = jax.jit(extend, donate_argnames=("state",), out_shardings=(state_sh, result_sh))
        self._generate = jax.jit(generate, donate_argnames=("state",), out_shardings=(state_sh, result_sh))
        self._release = jax.jit(_release, donate_argnames=("state",), out_shardings=state_sh)
        self._resume = jax.jit(_resume, donate_argnames=("state",), out_shardings=state_sh)
        self._verify = jax.jit(verify, donate_argnames=("state",), out_shardings=(state_sh, result_sh))
        self._take = jax.jit(_take_rows, out_shardings=result_sh)
        self._init_warmup()  # executables compiled and run once by ``warmup`` (warmup.py)
        # All tokens allowed: what steps without a constrained request are given (kept on the device).
        self.mask_words = mask_words(self.vocab_size)
        self._no_masks = {r: jnp.full((r, self.mask_words), -1, jnp.int32) for r in self.decode_rows}
        self._no_mask_rows = {r: jnp.full((self._out_rows(r), self.mask_words), -1, jnp.int32) for r in self.chunk_rows}
        log.info("engine: %d slots x %d positions, KV pool of %d pages x %d positions (%.1f MiB), prompt chunks "
                 "of %d positions in %s rows, decode attention %s", self.slots, self.max_len, self.pages.num_pages,
                 self.page_size,
                 self.pages.num_pages * page_bytes(self.cfg, np.dtype(self.cache_dtype), self.page_size) / 2**20,
                 self.chunk, self.chunk_rows, self.attention)

    def _init_pages(self) -> None:
        """The KV pool's pages and the host's page table (``kv_pages.PagePool``). ``paged``: the
        orchestrator takes and gives back pages as sequences grow and end; otherwise (sharded
        over a mesh) each slot holds ``max_pages`` fixed pages from its first ``begin`` on."""
        self.page_size = model.attention_block(self.cache_len)
        self.max_pages = self.cache_len // self.page_size
        fixed = self.slots * self.max_pages
        self.paged = self.plan is None
        if self.kv_memory is None or not self.paged:
            if self.kv_memory is not None:
                log.warning("--kv-memory is ignored when sharded over a mesh: %d slots x %d positions are "
                            "reserved", self.slots, self.cache_len)
            num_pages = fixed
        else:
            num_pages = pages_for_memory(self.kv_memory, self.cfg, np.dtype(self.cache_dtype), self.page_size)
        self.pages = PagePool(num_pages, self.slots, self.max_pages, self.page_size)

    def new_page_pool(self) -> PagePool:
        """A page pool of this engine's shape for one decode state (the orchestrator's): its
        table is handed to every call that reads or writes the cache (``table=``)."""
        return PagePool(self.pages.num_pages, self.slots, self.max_pages, self.page_size)

    def _with_table(self, state: DecodeState, table: np.ndarray | None) -> DecodeState:
        """``state`` carrying a page table (``PagePool.table_for_writes``; None: the engine's own
        pool's, slot by slot): a few KiB copied to the device, only when it changed. A read-only
        table (``table_for_writes``' is, and stays the same array while the pool's table does)
        that is the one the last call was given, while ``state`` is what that call returned
        (every call passes the table through), is already on the device."""
        if table is None:
            table = self.pages.table_for_writes()
        if table is self._table_sent and not table.flags.writeable and state.table is self._table_held:
            return state
        self._table_sent, self._table_held = table, None
        self.table_uploads += 1
        if self.plan is not None:
            table = jax.device_put(table, self._table_sharding)
        return state.replace(table=table)

    def _held(self, out: tuple[DecodeState, jax.Array]) -> engine_api.Step[DecodeState]:
        """A step call's ``Step``, noting that its state holds the table the call was given."""
        self._table_held = out[0].table
        return engine_api.step(out)

    def _rows_on_device(self, rows: tuple[int, ...], r: int) -> tuple[jax.Array, jax.Array]:
        """``generate``'s ``slots [r]`` (``rows`` then zeros) and ``live [r]`` (the first
        ``len(rows)``), on the device: made once per set of live slots while it lasts (one
        stream's steps copy none to the device), not per step."""
        key = (rows, r)
        if self._rows_cache[0] != key:
            slot_arr = np.zeros((r,), np.int32)
            slot_arr[:len(rows)] = rows
            arrays = (slot_arr, np.arange(r) < len(rows))
            if self.plan is None:  # (over a mesh they go as they are, as the calls were compiled for)
                arrays = tuple(jax.device_put(arrays))
                self.rows_uploads += 1
            self._rows_cache = (key, arrays)
        return self._rows_cache[1]

    def _out_rows(self, rows: int) -> int:
        """Rows of an ``extend`` call's first-token logits (``_extend``'s ``out_rows``)."""
        return rows if self.row_invariant else self.chunk_rows[-1]

    @property
    def max_rows(self) -> int:
        """The most rows one ``extend`` call takes."""
        return self.chunk_rows[-1]

    def init_state(self) -> DecodeState:
        """A fresh state (every slot free, the cache zeros): the first after ``warmup`` was made
        during it (``Warmup._spare``), the others now."""
        spare, self._spare = self._spare, None
        if spare is not None:
            return spare
        init = self._compiled.get(("init", 0))
        return init() if init is not None else self._init()

    def _zeros(self) -> DecodeState:
        s, v = self.slots, self.cfg.vocab_size
        return DecodeState(
            cache=PagedKVCache.zeros(self.cfg, self.pages.num_pages, self.page_size, self.cache_dtype,
                                     self.attention, stacked=self.loop_layers),
            table=jnp.full((s, self.max_pages), self.pages.num_pages, jnp.int32),
            lengths=jnp.full((s,), self.cache_len, jnp.int32),
            last_tokens=jnp.zeros((s,), jnp.int32),
            steps=jnp.zeros((s,), jnp.int32),
            active=jnp.zeros((s,), bool),
            sampling=SlotSampling.empty(s),
            seen=jnp.zeros((s, v), bool),
            counts=jnp.zeros((s, v), jnp.int32),
        )

    def check_prompt(self, n: int) -> None:
        if not 1 <= n <= self.max_prompt_len:
            raise ValueError(f"prompt of {n} tokens must have 1..max_prompt_len={self.max_prompt_len} tokens")

    def begin(self, state: DecodeState, slot: int, prompt: list[int], params: SamplingParams,
              seed: int, table: np.ndarray | None = None) -> DecodeState:
        """Start a request in ``slot``. ``table``: the caller's page table, where it placed the
        slot's pages (None: the slot takes its fixed share of the engine's own pool)."""
        self.check_prompt(len(prompt))
        return self._start(state, slot, prompt, params, seed, table)

    def restart(self, state: DecodeState, slot: int, tokens: list[int], params: SamplingParams,
                seed: int, table: np.ndarray | None = None) -> DecodeState:
        """``begin`` for a preempted request resuming: ``tokens`` its prompt and every token it
        generated (marked seen); its positions are run in by non-final ``extend`` rows, then
        ``resume`` makes it live."""
        if not 1 <= len(tokens) <= self.max_len:
            raise ValueError(f"a resumed sequence of {len(tokens)} tokens must have 1..max_len={self.max_len}")
        return self._start(state, slot, tokens, params, seed, table)

    def resume(self, state: DecodeState, slot: int, tokens: list[int], generated: list[int]) -> DecodeState:
        """Make ``slot`` live again after ``restart`` and its extend rows: ``tokens`` (prompt and
        output but the last, all run in), ``generated`` the output so far: the next step feeds the
        last one, with the PRNG step and penalty counts it had (``_resume``)."""
        counts = np.bincount(np.asarray(generated, np.int64), minlength=self.vocab_size).astype(np.int32)
        fn = self._compiled.get(("resume", 0), self._resume)
        return fn(state=state, slot=np.int32(slot), last=np.int32(generated[-1]), length=np.int32(len(tokens)),
                  steps=np.int32(len(generated)), counts=counts[:self.vocab_size])

    def _start(self, state: DecodeState, slot: int, prompt: list[int], params: SamplingParams,
               seed: int, table: np.ndarray | None) -> DecodeState:
        if table is None:
            self._hold_pages(slot)
        padded = np.zeros((self.cache_len,), np.int32)
        padded[:len(prompt)] = prompt
        fn = self._compiled.get(("begin", 0), self._begin)
        state = fn(state=self._with_table(state, table), slot=np.int32(slot), prompt=padded, n=np.int32(len(prompt)),
                   sampling=SlotSampling.from_params(params, seed))
        self._table_held = state.table
        return state

    def _hold_pages(self, slot: int) -> None:
        """A slot the caller placed no sequence in (``pages.admit``) takes its fixed share of the
        pool, ``max_pages`` pages, and keeps it: the layout of an engine driven slot by slot."""
        if self.pages.holds(slot):
            return
        self.pages.admit(slot, [])
        if not self.pages.ensure(slot, self.cache_len):
            self.pages.release(slot)
            raise RuntimeError(f"the KV pool ({self.pages.num_pages} pages) has no {self.max_pages} pages "
                               f"free for slot {slot}")

    def copy(self, state: DecodeState, src: int, dst: int, n: int) -> DecodeState:
        """Copy positions ``0..n-1`` of slot ``src`` into slot ``dst`` (whole pages; pages the two
        share are left as they are)."""
        self._hold_pages(src)
        self._hold_pages(dst)
        nb = -(-n // self.page_size)
        table = self.pages.table
        return self.copy_pages(state, [(int(a), int(b)) for a, b in zip(table[src, :nb], table[dst, :nb]) if a != b])

    def copy_pages(self, state: DecodeState, pairs: list[tuple[int, int]]) -> DecodeState:
        """Copy page ``a`` onto page ``b`` for each ``(a, b)`` of ``pairs`` (at most ``max_pages``)."""
        if not pairs:
            return state
        if len(pairs) > self.max_pages:
            raise ValueError(f"{len(pairs)} page copies exceed one call's {self.max_pages}")
        src = np.zeros((self.max_pages,), np.int32)
        dst = np.full((self.max_pages,), self.pages.num_pages, np.int32)
        for i, (a, b) in enumerate(pairs):
            if not (0 <= a < self.pages.num_pages and 0 <= b < self.pages.num_pages):
                raise ValueError(f"page copy {a} -> {b} outside the pool of {self.pages.num_pages} pages")
            src[i], dst[i] = a, b
        fn = self._compiled.get(("copy", 0), self._copy)
        return fn(state=state, src=src, dst=dst, n=np.int32(len(pairs)))

    def rows_bucket(self, n: int) -> int:
        """The row count an ``extend`` call of ``n`` rows is padded to: the smallest ready bucket
        that holds them (else the smallest that does, which compiles)."""
        fits = [r for r in self.chunk_rows if n <= r]
        if not fits:
            raise ValueError(f"{n} rows exceed the largest extend call ({self.max_rows} rows)")
        return next((r for r in fits if self.is_ready(("extend", r))), fits[0])

    def extend(self, state: DecodeState, rows: list[ChunkRow], masks: np.ndarray | None = None,
               table: np.ndarray | None = None) -> engine_api.Step[DecodeState]:
        """Run ``rows`` (at most ``max_rows``); the packed result's row r is ``rows[r]``'s first
        token when it is final (``ACTIVE`` set), else zeros. ``masks [max_rows, mask_words]``:
        allowed first tokens per row (``apply_bitmask``), None for all."""
        r = self.rows_bucket(len(rows))
        tokens = np.zeros((r, self.chunk), np.int32)
        slots, starts, counts = (np.zeros((r,), np.int32) for _ in range(3))
        finals = np.zeros((r,), bool)
        for i, row in enumerate(rows):
            n = len(row.tokens)
            if not 1 <= n <= self.chunk or row.start < 0 or row.start + n > self.max_len:
                raise ValueError(f"bad chunk: {n} tokens at {row.start}")
            tokens[i, :n] = row.tokens
            slots[i], starts[i], counts[i], finals[i] = row.slot, row.start, n, row.final
        fn = self._compiled.get(("extend", r), self._extend)
        state = self._with_table(state, table)
        out = fn(self.params, state=state, tokens=tokens, slots=slots, starts=starts, counts=counts, finals=finals,
                 masks=self._no_mask_rows[r] if masks is None else masks[:self._out_rows(r)])
        return self._held(out)

    def prefill(self, state: DecodeState, slot: int, prompt: list[int], params: SamplingParams,
                seed: int) -> tuple[DecodeState, np.ndarray]:
        """``begin`` and every chunk of ``prompt`` into ``slot`` (no reuse), in calls of up to
        ``ready_rows()`` rows; returns the state and the first token's packed row. For scripts and
        tests: the orchestrator interleaves chunks with decode steps itself."""
        state = self.begin(state, slot, prompt, params, seed)
        rows = [ChunkRow(slot, a, prompt[a:a + self.chunk], a + self.chunk >= len(prompt))
                for a in range(0, len(prompt), self.chunk)]
        n = self.ready_rows()
        for i in range(0, len(rows), n):
            state, packed = self.extend(state, rows[i:i + n])
        return state, np.asarray(packed)[len(rows[i:i + n]) - 1]

    def decode_bucket(self, n: int) -> int:
        """The row count a ``generate`` call over ``n`` slots is padded to: the smallest of
        ``decode_rows`` that holds them and is ready, else every slot's (ready with the calls any
        request needs, see ``warmup``)."""
        fits = [r for r in self.decode_rows if r >= n]
        if not fits:
            raise ValueError(f"generate takes at most {self.slots} slots, got {n}")
        return next((r for r in fits if self.is_ready(("generate", r))), fits[-1])

    def generate(self, state: DecodeState, mask: np.ndarray | None = None,
                 slots: list[int] | None = None, table: np.ndarray | None = None) -> engine_api.Step[DecodeState]:
        """One token for each live slot of ``slots`` (default: every slot), in a call of
        ``decode_bucket(len(slots))`` rows: the packed result's row i is ``slots[i]``'s (``ACTIVE``
        clear for an inactive slot and for the padding rows after them). ``mask [slots, mask_words]``:
        allowed tokens per slot (``apply_bitmask``, indexed by slot), None for all. A slot's bits
        are the same in any bucket and beside any other slots. Where rows are not invariant
        (``row_invariant`` false) every step computes every slot's row in its place."""
        if not self.row_invariant and slots is not None:  # every slot's row at its place: fixed shapes
            state, result = self.generate(state, mask, table=table)
            idx = np.zeros((self.slots,), np.int32)  # one shape whatever the live count: compiled at warm-up
            idx[:len(slots)] = slots
            return engine_api.Step(state, engine_api.StepResult(self._take(result.packed, idx)))
        rows = tuple(range(self.slots)) if slots is None else tuple(int(s) for s in slots)
        n = len(rows)
        r = self.decode_bucket(n)
        slot_arr, live = self._rows_on_device(rows, r)
        if mask is None:
            masks = self._no_masks[r]
        else:
            masks = np.full((r, self.mask_words), -1, np.int32)
            masks[:n] = np.asarray(mask)[list(rows)]
        fn = self._compiled.get(("generate", r), self._generate)
        state = self._with_table(state, table)
        return self._held(fn(self.params, state=state, slots=slot_arr, live=live, masks=masks))

    def verify_bucket(self, n: int) -> int:
        """The row count a ``verify`` call of ``n`` rows is padded to."""
        r = next((b for b in self.verify_rows if b >= n), None)
        if r is None or n < 1:
            raise ValueError(f"verify takes 1..{self.slots} rows, got {n}")
        return r

    def widths_for(self, rows_bucket: int) -> tuple[int, ...]:
        """The widths ``verify`` is compiled for at ``rows_bucket`` rows: ``verify_widths``, except
        width 1 at every slot's row (that call would be the plain step over all slots, ``generate``)."""
        return tuple(w for w in self.verify_widths if w > 1 or rows_bucket < self.slots)

    def verify_width(self, n_draft: int, rows_bucket: int = 1) -> int:
        """The narrowest width of a ``verify`` call of ``rows_bucket`` rows whose longest draft has
        ``n_draft`` tokens."""
        w = next((w for w in self.widths_for(rows_bucket) if w > n_draft), None)
        if w is None or n_draft < 0:
            raise ValueError(f"{n_draft} drafted tokens exceed speculate={self.speculate}")
        return w

    def verify(self, state: DecodeState, rows: list[tuple[int, list[int]]],
               width: int | None = None, table: np.ndarray | None = None) -> engine_api.Step[DecodeState]:
        """A decode step with drafts (``_verify``): ``rows`` lists every live slot with its drafted
        tokens (at most ``speculate``, maybe none), and the packed result's row i (``[width, cols]``,
        ``ACTIVE`` on the tokens kept) is ``rows[i]``'s. ``width``: positions per row, one of
        ``widths_for(rows bucket)`` (default: the narrowest that holds the longest draft). A slot must have
        room for its drafts: ``length + len(draft) < max_len``."""
        if not self.speculate:
            raise ValueError("this engine was built without speculative decoding (speculate=0)")
        r = self.verify_bucket(len(rows))
        need = self.verify_width(max(len(d) for _, d in rows), r)
        if width is None:
            width = need
        elif width not in self.widths_for(r) or width < need:
            raise ValueError(f"verify width {width} must be one of {self.widths_for(r)} at {r} rows and hold "
                             f"the longest draft ({max(len(d) for _, d in rows)} tokens)")
        k = width - 1
        slots, n_draft = np.zeros((r,), np.int32), np.zeros((r,), np.int32)
        drafts = np.zeros((r, k), np.int32)
        live = np.zeros((r,), bool)
        for i, (slot, draft) in enumerate(rows):
            slots[i], n_draft[i], live[i] = slot, len(draft), True
            drafts[i, :len(draft)] = draft
        fn = self._compiled.get(("verify", r, width), self._verify)
        state = self._with_table(state, table)
        return self._held(fn(self.params, state=state, slots=slots, drafts=drafts, n_draft=n_draft, live=live))

    def release(self, state: DecodeState, slot: int) -> DecodeState:
        return self._compiled.get(("release", 0), self._release)(state=state, slot=np.int32(slot))
