"""The orchestrator's scheduling over a paged KV pool (``engine.paged``; ``jserve.orchestrator``'s
loop calls these): admission that takes pages for a prompt, reusing the prefix cache's, or waits
first in line (``_admit_paged``); pages for each live run's next step, preempting the youngest run
holding pages when there are none (``_grow``, ``_preempt``: a preempted run keeps its tokens and
resumes first in line, run in again mostly from the prefix cache, with its sampling state); newly
filled pages registered in the prefix cache (``_commit``). A mixin of ``Orchestrator``: the state it
reads and writes (slots, runs, the waiting queue, ``pages``) is the orchestrator's.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from jserve.engine_api import consumed
from jserve.streams import ERROR, Event, Running

log = logging.getLogger("jserve.orchestrator")


class PagedScheduling:
    # Pages of headroom admission keeps for each run holding a slot (see ``_headroom``); the
    # orchestrator's ``kv_headroom``. 0: admit whenever the prompt fits (preemption absorbs growth).
    kv_headroom = 1

    # ---- paged KV (engine.paged) ----------------------------------------------------------
    def _table(self) -> dict[str, Any]:
        """The page table to hand a paged engine's call (none for an engine without pages)."""
        return {} if self.pages is None else {"table": self.pages.table_for_writes()}

    def _live_tokens(self) -> dict[int, np.ndarray]:
        """The tokens each slot in use has in its pages (partial pages a new prompt may copy)."""
        return {s: run.cache_tokens() for s, run in self._held().items()} if self.prefix_cache else {}

    def _commit(self, run: Running) -> None:
        """Register ``run``'s newly filled pages in the prefix cache (their KV is written, or
        dispatched before any call that could read them)."""
        pool = self.pages
        if pool is None or not self.prefix_cache:
            return
        if run.written() // pool.page_size > pool.committed(run.slot):
            pool.commit(run.slot, run.cache_tokens())

    def _admit_paged(self, state):
        """``_admit`` over a page pool: preempted runs first (oldest first), then waiting requests;
        each takes a free slot and pages for its prompt (reusing the prefix cache's), or waits,
        first in line, until the pool has them."""
        pool = self.pages
        skipped = 0
        while self._slots.free:
            run = self._preempted[0] if self._preempted else None
            if run is None:
                req, skipped = self._next_waiting(skipped)
                if req is None:
                    break
                tokens = req.prompt_ids
            else:
                req, tokens = run.req, run.refeed
            if pool.pages_needed(min(len(tokens) + 1, self.engine.max_len)) > pool.num_pages:
                message = (f"{len(tokens)} tokens need more KV pages than the pool's {pool.num_pages} of "
                           f"{pool.page_size} positions (--kv-memory)")
                if run is None:
                    self._end_unstarted(req, ERROR, error=message)
                else:
                    self._preempted.pop(0)
                    self._finish(run, ERROR, error=message)
                continue
            length = min(len(tokens) + (1 if run is None else 2), self.engine.max_len)
            if not self._headroom(req, tokens, length):
                if run is None:
                    self._waiting.put_front(req)
                break  # not now, first in line (the check below, after taking, is exact)
            slot = self._slots.take(tokens, {}, False).slot
            if self.prefix_cache:
                reuse, copies = pool.admit_reusing(slot, tokens, self._live_tokens())
            else:
                pool.admit(slot, [])
                reuse, copies = 0, []
            # Its prompt (a resumed run: its tokens) and the next step's positions (``_grow``); then
            # headroom: pages left for every run holding a slot, this one too, to grow for a while.
            if not pool.ensure(slot, length) or not self._headroom(req, tokens, length, slot):
                # Not now: back as it was, first in line; nothing behind it overtakes it.
                keep = reuse - (reuse % pool.page_size if copies else 0)
                pool.release(slot, tokens[:keep] if self.prefix_cache and keep else None)
                self._slots.untake(slot)
                if run is None:
                    self._waiting.put_front(req)
                break
            try:
                if run is None:
                    seed = req.params.seed if req.params.seed is not None else int(self._seeds.integers(2**63))
                    wants = req.params.speculate if req.params.speculate is not None else self.speculate
                    run = Running.start(req, slot, reuse, self.tokenizer, self.eos_token_ids, self.engine.top_logprobs,
                                        speculate=bool(self.spec_tokens and wants and req.matcher is None))
                    run.seed = seed
                    state = self.engine.begin(state, slot, req.prompt_ids, req.params, seed, **self._table())
                else:
                    self._preempted.pop(0)
                    run.slot, run.prompt_done = slot, reuse
                    state = self.engine.restart(state, slot, tokens + run.output.token_ids[-1:], req.params, run.seed,
                                                **self._table())
            except Exception as e:
                log.exception("could not start %s", req.request_id)
                pool.release(slot)
                self._slots.untake(slot)
                if run is not None and run.refeed is not None:
                    self._finish(run, ERROR, error=f"could not resume the request: {e}")
                else:
                    self._end_unstarted(req, ERROR, error=f"could not start the request: {e}")
                if consumed(state):  # the donated state is gone: the loop rebuilds it
                    raise
                continue
            self._prefilling[slot] = run  # from here the loop's recovery ends it if a call below fails
            if copies:
                state = self.engine.copy_pages(state, copies)
            self._slots.overwrite(slot)
            if self.prefix_cache and run.refeed is None:
                self._on_event(Event.PREFIX_LOOKUP, req, float(reuse))
        return state

    def _reserve(self, req, pages: int) -> int:
        """Pages ``req``, holding ``pages``, may still take soon: those to its last position (its
        prompt and ``max_tokens``), at most ``kv_headroom``."""
        budget = req.params.max_tokens if req.params.max_tokens is not None else self.engine.max_len
        final = min(len(req.prompt_ids) + budget, self.engine.max_len)
        return max(0, min(self.pages.pages_needed(final) - pages, self.kv_headroom))

    def _headroom(self, req, tokens, length: int, slot: int | None = None) -> bool:
        """Whether, with ``req`` given pages for ``length`` positions of ``tokens`` (in ``slot``,
        once it has them; before, counting its cached prefix as taken), the pool still has the
        pages every run holding a slot, ``req`` included, may take soon (``_reserve``), so that
        admitting it preempts nobody. A request alone in the pool needs no headroom (else it
        could wait for ever)."""
        held = self._held()
        if not held or self.kv_headroom <= 0:
            return True
        pool = self.pages
        need = sum(self._reserve(run.req, pool.capacity(s) // pool.page_size) for s, run in held.items())
        if slot is None:  # before taking pages: also those it would take (cached ones count too)
            need += pool.pages_needed(length) - len(pool.lookup(tokens))
        return pool.available() >= need + self._reserve(req, pool.pages_needed(length))

    def _grow(self, state, spec: bool) -> tuple[Any, bool]:
        """Pages for every live run's next step, oldest run first; a run that cannot get one
        preempts the youngest run holding pages (maybe itself). With ``spec`` also room for the
        drafts, where the pool has it without preempting (else no drafts this turn)."""
        pool = self.pages
        for run in sorted(self._running.values(), key=lambda r: r.req.arrival):
            if self._running.get(run.slot) is not run:
                continue  # preempted for an older one
            # Positions after this step: the prompt, the tokens handled, one maybe in flight, this one.
            need = min(len(run.req.prompt_ids) + run.generated + 1, self.engine.max_len)
            while not pool.ensure(run.slot, need):
                victim = max(self._held().values(), key=lambda r: r.req.arrival)
                state = self._preempt(state, victim)
                if victim is run:
                    break
        if spec:
            for run in self._running.values():
                need = min(len(run.req.prompt_ids) + run.generated + 1 + self.spec_tokens, self.engine.max_len)
                spec = spec and pool.ensure(run.slot, need)
        return state, spec

    def _preempt(self, state, run: Running):
        """Give back ``run``'s pages (its written pages stay in the prefix cache) and queue it to
        resume first: a run with output keeps it (``refeed``: its tokens to run in again), one
        without starts again as the request it was."""
        tokens = run.cache_tokens()
        for table in (self._running, self._prefilling):
            if table.get(run.slot) is run:
                state = self.engine.release(state, run.slot)
                del table[run.slot]
        self.pages.release(run.slot, tokens if self.prefix_cache else None)
        self._slots.release(run.slot, tokens, time.monotonic())
        self.preemptions += 1
        self._on_event(Event.PREEMPTED, run.req, 0.0)
        log.info("preempted %s (%d tokens) for KV pages", run.req.request_id, len(tokens))
        if run.generated == 0:  # nothing delivered: it starts again from the queue's head
            self._waiting.put_front(run.req)
            return state
        # All it had fed (maybe more than ``tokens``, when preempted again while running them in).
        run.refeed, run.prompt_done = list(run.req.prompt_ids) + run.output.token_ids[:-1], 0
        if run.spec is not None:
            run.spec.drafted = 0
        self._preempted.append(run)
        self._preempted.sort(key=lambda r: r.req.arrival)
        return state
