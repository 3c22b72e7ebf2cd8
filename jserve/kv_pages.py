"""The host side of a paged KV pool: which page holds which positions of which slot, and the
prefix cache over pages.

The device side (not here) is one preallocated array of ``P`` pages per layer, each page holding
``PAGE_SIZE`` consecutive positions of one sequence (the attention block, ``model.ATTN_BLOCK``).
This module decides, on the host, which pages a slot's positions live in and writes that into a
page table, ``[S, M]`` int32 (``M`` pages per slot at most), ``NO_PAGE`` where a slot has no page.
A slot's position ``t`` lives at offset ``t % PAGE_SIZE`` of page ``table[s, t // PAGE_SIZE]``.

Pages are taken as a sequence grows (``ensure``) and given back when it ends (``release``). Full
pages whose KV has been written can be registered in the prefix cache (``commit``), keyed by a hash
chain of their tokens: a page's key is the hash of its parent page's key and its own tokens, so the
same 128 tokens after different prefixes are different pages. A later sequence starting with the
same tokens takes those pages by reference (``admit``); a page counts its holders, and when the
last one releases it a registered page stays cached (its KV intact) until its memory is needed,
then the least recently used cached page is evicted. A sequence releases its pages last-first, so
a chain's later pages are evicted before its earlier ones and a cached page's parent is always
cached too.

A sequence's last, partly filled page is kept too when it ends (``release`` with its tokens): a
*tail*, keyed by its parent page's key, evicted like any cached page. A later sequence whose
tokens run on into a tail takes the tail page over and overwrites it past what it shares
(``admit_reusing``); or it copies the page of a live sequence, or a cached full page after the
same parent (e.g. a system prompt's last page, filled up by a question), it shares more with. So a
prompt reuses every cached token, not only whole pages, and always computes its last token in a
page it owns.

Axis letters: S slots, M pages per slot, P pages in the pool.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Positions per page: the attention block (``jserve.model.ATTN_BLOCK``), so a page is the unit the
# blockwise attention folds in one step. Kept literal here so this module needs no jax.
PAGE_SIZE = 128
NO_PAGE = -1  # a page-table entry with no page behind it
ROOT_KEY = b"jserve-kv-pages-root"

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mi": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "ti": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_KV_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_memory_size(text: str) -> int:
    """Bytes in ``text``: a number and an optional unit. ``KiB/MiB/GiB/TiB`` (and ``K/M/G/T``,
    ``Ki/Mi/Gi/Ti``) are powers of 1024, ``KB/MB/GB/TB`` powers of 1000, ``B`` or none bytes;
    units ignore case. ``"512MiB"`` → 536870912, ``"1.5GB"`` → 1500000000."""
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"cannot read a memory size from {text!r}: expected a number and a unit, e.g. 512MiB or 4GiB")
    number, unit = m.groups()
    scale = _UNITS.get(unit.lower())
    if scale is None:
        raise ValueError(f"unknown memory unit {unit!r} in {text!r}: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB")
    size = int(float(number) * scale)
    if size <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return size


def kv_bytes_per_position(n_layers: int, n_kv_heads: int, head_dim: int, kv_dtype: str | np.dtype) -> int:
    """Bytes one position of one sequence takes in the pool: keys and values of every layer.
    ``int8`` pages carry one float32 scale per (position, KV head) vector besides the int8 values
    (the layout of the Pallas GPU kernel's ``k_scales_pages``)."""
    name = str(np.dtype(kv_dtype)) if not isinstance(kv_dtype, str) else kv_dtype
    if name not in _KV_ITEMSIZE:
        raise ValueError(f"unknown KV dtype {kv_dtype!r}: expected one of {', '.join(_KV_ITEMSIZE)}")
    per_vector = head_dim * _KV_ITEMSIZE[name]
    if name == "int8":
        per_vector += 4
    return 2 * n_layers * n_kv_heads * per_vector


def page_bytes(cfg, kv_dtype: str | np.dtype, page_size: int = PAGE_SIZE) -> int:
    """Bytes of one page of the pool for model config ``cfg`` (a ``ModelConfig``)."""
    return page_size * kv_bytes_per_position(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, kv_dtype)


def pages_for_memory(budget: int | str, cfg, kv_dtype: str | np.dtype, page_size: int = PAGE_SIZE) -> int:
    """Whole pages that fit in ``budget`` (bytes, or a size such as ``"512MiB"``) for ``cfg``."""
    size = parse_memory_size(budget) if isinstance(budget, str) else int(budget)
    per_page = page_bytes(cfg, kv_dtype, page_size)
    pages = size // per_page
    if pages < 1:
        raise ValueError(f"a KV memory of {size} bytes holds no page: one page of {page_size} positions "
                         f"takes {per_page} bytes for this model in {kv_dtype}")
    return pages


def default_kv_memory(cfg, slots: int, max_len: int, kv_dtype: str | np.dtype, page_size: int = PAGE_SIZE) -> int:
    """What ``slots x max_len`` positions (each slot rounded up to whole pages) take: the default
    ``--kv-memory``, so a server sized as before gets as many positions as before."""
    pages_per_slot = -(-max_len // page_size)
    return slots * pages_per_slot * page_bytes(cfg, kv_dtype, page_size)


def chain_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a page holding ``tokens`` after the page keyed ``parent``
    (``ROOT_KEY`` for a sequence's first page)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


@dataclass(frozen=True)
class PoolStats:
    pages: int  # in the pool
    in_use: int  # held by at least one live sequence
    cached: int  # held by none, kept for the prefix cache (evictable)
    free: int  # holding nothing
    shared: int  # in use by two or more sequences
    evictions: int  # cached pages given up for new ones, ever
    hit_tokens: int  # prompt positions taken from the cache instead of computed, ever

    @property
    def usage(self) -> float:
        """Fraction of pages in use (cached pages can be taken back at any time)."""
        return self.in_use / self.pages


def shared_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of two token sequences, at most ``limit``."""
    n = max(0, min(limit, len(a), len(b)))
    x, y = np.asarray(a[:n], np.int64), np.asarray(b[:n], np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def _tail_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    return chain_key(b"tail:" + parent, tokens)


class _Slot:
    __slots__ = ("pages", "committed", "last_key")

    def __init__(self) -> None:
        self.pages: list[int] = []
        self.committed = 0  # leading pages registered in (or found in) the prefix cache
        self.last_key = ROOT_KEY  # key of page ``committed - 1``


class PagePool:
    """Pages of a KV pool over ``slots`` sequences of at most ``max_pages`` pages each.

    ``table`` (``[S, M]`` int32) is the page table to hand to the device each step; it changes
    only through this object's methods.
    """

    def __init__(self, num_pages: int, slots: int, max_pages: int, page_size: int = PAGE_SIZE) -> None:
        if num_pages < 1 or slots < 1 or max_pages < 1 or page_size < 1:
            raise ValueError(f"a pool needs at least one page, slot and page per slot; got {num_pages=}, "
                             f"{slots=}, {max_pages=}, {page_size=}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.max_pages = max_pages
        self.table = np.full((slots, max_pages), NO_PAGE, dtype=np.int32)
        self._refs = np.zeros(num_pages, dtype=np.int32)
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unheld pages; oldest first
        self._key_of: dict[int, bytes] = {}  # registered page -> its chain key
        self._page_of: dict[bytes, int] = {}  # chain key -> registered page
        self._slots: list[_Slot | None] = [None] * slots
        self._tails: dict[bytes, dict[int, np.ndarray]] = {}  # parent key -> {tail page: its tokens}
        self._tail_parent: dict[int, bytes] = {}  # tail page -> its parent key
        self._children: dict[bytes, dict[int, np.ndarray]] = {}  # parent key -> {full page: its tokens}
        self._child_parent: dict[int, bytes] = {}  # registered full page -> its parent key
        self._evictions = 0
        self._hit_tokens = 0
        self._writes: np.ndarray | None = None  # ``table_for_writes``, built from ``_writes_of``
        self._writes_of = self.table

    # ----- queries

    @property
    def slots(self) -> int:
        return self.table.shape[0]

    def holds(self, slot: int) -> bool:
        """Whether ``slot`` holds a sequence (``admit`` without ``release`` since)."""
        return self._slots[slot] is not None

    def committed(self, slot: int) -> int:
        """Leading pages of ``slot`` registered in (or found in) the prefix cache."""
        return self._live(slot).committed

    def pages_of(self, slot: int) -> list[int]:
        return list(self._live(slot).pages)

    def refcount(self, page: int) -> int:
        return int(self._refs[page])

    def capacity(self, slot: int) -> int:
        """Positions ``slot`` can hold with the pages it has."""
        return len(self._live(slot).pages) * self.page_size

    def available(self) -> int:
        """Pages that can be handed out now: free ones and cached ones that would be evicted."""
        return len(self._free) + len(self._evictable)

    def table_for_writes(self) -> np.ndarray:
        """``table`` with ``NO_PAGE`` replaced by ``num_pages``, one past the last page: a scatter
        with ``mode="drop"`` drops writes there, where a -1 would wrap round to the last page.
        Read-only, and the same array while ``table`` is unchanged (an engine sends it to the
        device again only when it changed: ``JaxEngine._with_table``)."""
        if self._writes is None or not np.array_equal(self._writes_of, self.table):
            self._writes_of = self.table.copy()
            self._writes = np.where(self.table == NO_PAGE, self.num_pages, self.table).astype(np.int32)
            self._writes.setflags(write=False)
        return self._writes

    def pages_needed(self, length: int) -> int:
        return -(-length // self.page_size)

    def stats(self) -> PoolStats:
        in_use = int(np.count_nonzero(self._refs))
        return PoolStats(pages=self.num_pages, in_use=in_use, cached=len(self._evictable), free=len(self._free),
                         shared=int(np.count_nonzero(self._refs > 1)), evictions=self._evictions,
                         hit_tokens=self._hit_tokens)

    def lookup(self, tokens: Sequence[int]) -> list[int]:
        """Cached pages holding a prefix of ``tokens``, in order, without taking them: whole pages
        only, and never the page holding the last token (its logits must be computed)."""
        pages: list[int] = []
        key = ROOT_KEY
        usable = (len(tokens) - 1) // self.page_size
        for i in range(min(usable, self.max_pages)):
            key = chain_key(key, tokens[i * self.page_size:(i + 1) * self.page_size])
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def match(self, tokens: Sequence[int], live: dict[int, Sequence[int]] | None = None) -> int:
        """Positions of ``tokens`` that ``admit_reusing`` would take from the pool now (whole
        cached pages, then a tail or a live sequence's partial page), taking nothing."""
        pages = self.lookup(tokens)
        return len(pages) * self.page_size + self._partial(tokens, pages, live or {})[1]

    def _partial(self, tokens: Sequence[int], pages: list[int],
                 live: dict[int, Sequence[int]]) -> tuple[tuple[str, int] | None, int]:
        """After the cached ``pages``, the best source of the next page's shared positions: a tail
        ``("tail", page)`` or a live sequence's page ``("live", page)``, with the positions shared."""
        base = len(pages) * self.page_size
        limit = min(len(tokens) - 1 - base, self.page_size)
        if limit <= 0 or len(pages) >= self.max_pages:
            return None, 0
        key = self._key_of[pages[-1]] if pages else ROOT_KEY
        best, shared = None, 0
        rest = tokens[base:]
        for page, toks in self._tails.get(key, {}).items():
            n = shared_prefix(toks, rest, limit)
            if n > shared:
                best, shared = ("tail", page), n
        for page, toks in self._children.get(key, {}).items():  # a cached full page, in part
            n = shared_prefix(toks, rest, limit)
            if n > shared:
                best, shared = ("full", page), n
        k = len(pages)
        for slot, toks in live.items():
            state = self._slots[slot]
            if state is None or len(state.pages) <= k or len(toks) <= base:
                continue
            n = shared_prefix(toks, tokens, base + limit) - base
            if n > shared:
                best, shared = ("live", state.pages[k]), n
        return best, shared

    # ----- a sequence's life

    def admit_reusing(self, slot: int, tokens: Sequence[int],
                      live: dict[int, Sequence[int]] | None = None) -> tuple[int, list[tuple[int, int]]]:
        """``admit``, then also the positions shared with a tail (taken over: the sequence owns
        that page and overwrites it past them), with the partial page of a ``live`` sequence
        (slot -> the tokens its pages hold) or with the first positions of a cached full page,
        copied into a new page. Returns the positions reused
        (less than ``len(tokens)``) and the page copies ``(from, to)`` the device must make before
        the sequence's next call."""
        cached = self.admit(slot, tokens)
        state = self._slots[slot]
        source, shared = self._partial(tokens, state.pages, live or {})
        copies: list[tuple[int, int]] = []
        if source is not None and source[0] == "tail":
            page = source[1]
            self._hold(page)
            self._unregister(page)
        elif source is not None:
            src = source[1]
            pinned = self._refs[src] == 0  # a cached page nobody holds: not evicted for its own copy
            if self.available() <= int(pinned):
                return cached, copies
            if pinned:
                self._hold(src)
            page = self._take()
            if pinned:
                self._refs[src] -= 1
                self._evictable[src] = None
            copies.append((src, page))
        else:
            return cached, copies
        self.table[slot, len(state.pages)] = page
        state.pages.append(page)
        self._hit_tokens += shared
        return cached + shared, copies


    def admit(self, slot: int, tokens: Sequence[int]) -> int:
        """Start a sequence of prompt ``tokens`` in ``slot``: take by reference the cached pages
        holding its longest cached prefix. Returns how many of its positions are already in the
        pool (a multiple of the page size, less than ``len(tokens)``); the caller computes the rest,
        after ``ensure`` gives it pages to write them into."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside 0..{self.slots - 1}")
        if self._slots[slot] is not None:
            raise ValueError(f"slot {slot} already holds a sequence; release it first")
        state = _Slot()
        for page in self.lookup(tokens):
            self._hold(page)
            state.pages.append(page)
            state.last_key = self._key_of[page]
        state.committed = len(state.pages)
        self._slots[slot] = state
        self.table[slot, :len(state.pages)] = state.pages
        cached = len(state.pages) * self.page_size
        self._hit_tokens += cached
        return cached

    def ensure(self, slot: int, length: int) -> bool:
        """Give ``slot`` pages for positions ``0..length-1``, taking free pages first, then evicting
        the least recently used cached ones. All or nothing: when the pool cannot supply them now,
        returns False and takes no page (the caller waits or preempts). A length that no pool
        state could ever hold (more than ``max_pages`` pages) raises ValueError."""
        state = self._live(slot)
        need = self.pages_needed(length)
        if need > self.max_pages:
            raise ValueError(f"{length} positions need {need} pages of {self.page_size}; a slot holds at most "
                             f"{self.max_pages} ({self.max_pages * self.page_size} positions)")
        more = need - len(state.pages)
        if more <= 0:
            return True
        if more > self.available():
            return False
        for _ in range(more):
            page = self._take()
            self.table[slot, len(state.pages)] = page
            state.pages.append(page)
        return True

    def commit(self, slot: int, tokens: Sequence[int]) -> int:
        """Register in the prefix cache the full pages of ``slot`` whose KV has been written;
        ``tokens`` are the sequence's tokens at positions ``0..n-1`` for the ``n`` positions
        written. A page whose key is already cached (the same tokens computed by another
        sequence) stays private to this one. Returns how many pages were newly registered."""
        state = self._live(slot)
        full = min(len(tokens) // self.page_size, len(state.pages))
        added = 0
        for i in range(state.committed, full):
            key = chain_key(state.last_key, tokens[i * self.page_size:(i + 1) * self.page_size])
            page = state.pages[i]
            if key not in self._page_of:
                self._register(page, key, state.last_key, tokens[i * self.page_size:(i + 1) * self.page_size],
                               self._child_parent, self._children)
                added += 1
            state.last_key = key
            state.committed = i + 1
        return added

    def release(self, slot: int, tokens: Sequence[int] | None = None) -> None:
        """End ``slot``'s sequence: drop its hold on each page, last page first. A page nobody
        holds any more stays cached if registered (most recently used, so evicted last), and is
        free otherwise. With ``tokens`` (those at positions ``0..n-1``, whose KV is written) its
        full pages are committed first and its partly filled last page is kept as a tail."""
        state = self._live(slot)
        if tokens is not None and len(tokens):
            self.commit(slot, tokens)
            full = len(tokens) // self.page_size
            rest = tokens[full * self.page_size:]
            if len(rest) and full < len(state.pages) and full == state.committed:
                page = state.pages[full]
                key = _tail_key(state.last_key, rest)
                if self._refs[page] == 1 and page not in self._key_of and key not in self._page_of:
                    self._register(page, key, state.last_key, rest, self._tail_parent, self._tails)
        for page in reversed(state.pages):
            if self._refs[page] <= 0:
                raise RuntimeError(f"page {page} released with refcount {self._refs[page]}")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)
        self.table[slot] = NO_PAGE
        self._slots[slot] = None

    def reset(self) -> None:
        """Every page free, no sequence, nothing cached (the device's pool was rebuilt)."""
        self.__init__(self.num_pages, self.slots, self.max_pages, self.page_size)

    def clear_cache(self) -> int:
        """Forget every cached page nobody holds (e.g. after the weights change). Returns how many."""
        n = len(self._evictable)
        while self._evictable:
            page, _ = self._evictable.popitem(last=False)
            self._unregister(page)
            self._free.append(page)
        return n

    # ----- internals

    def _live(self, slot: int) -> _Slot:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside 0..{self.slots - 1}")
        state = self._slots[slot]
        if state is None:
            raise ValueError(f"slot {slot} holds no sequence")
        return state

    def _hold(self, page: int) -> None:
        if self._refs[page] == 0:
            self._evictable.pop(page, None)
        self._refs[page] += 1

    def _take(self) -> int:
        if self._free:
            page = self._free.pop()
        else:
            page, _ = self._evictable.popitem(last=False)
            self._unregister(page)
            self._evictions += 1
        self._refs[page] = 1
        return page

    def _register(self, page: int, key: bytes, parent: bytes, tokens: Sequence[int], parent_of: dict[int, bytes],
                  index: dict[bytes, dict[int, np.ndarray]]) -> None:
        """Cache ``page`` under ``key``, found from ``parent``'s key by its ``tokens``: a full page
        (``_child_parent``, ``_children``) or a partly filled tail (``_tail_parent``, ``_tails``)."""
        self._page_of[key] = page
        self._key_of[page] = key
        parent_of[page] = parent
        index.setdefault(parent, {})[page] = np.asarray(tokens, np.int64)

    def _unregister(self, page: int) -> None:
        del self._page_of[self._key_of.pop(page)]
        for parent_of, index in ((self._child_parent, self._children), (self._tail_parent, self._tails)):
            parent = parent_of.pop(page, None)
            if parent is not None:
                siblings = index[parent]
                del siblings[page]
                if not siblings:
                    del index[parent]
