"""The orchestrator: the decode loop over an engine's slots (continuous batching).

One background thread owns the engine (``jserve.engine_api.Engine``) and its decode state. Each
turn of its loop ends cancelled and expired requests, dispatches the next decode step for all live
slots, then one ``extend`` call that runs the next chunks of the prompts being prefilled, oldest
first (at most ``prefill_budget`` prompt tokens while streams that went live before the oldest of
them arrived are decoding, so they keep their pace; else the engine's largest call), and only then
handles the previous turn's tokens (copied to the host once; turned into pieces by their
``Output``, delivered), so the host's per-token work overlaps the device's next step. Then it
admits waiting requests into free slots. A request that finishes while the next step is already
on the device has that one extra token dropped; its slot is released before the step after.

The waiting queue is ``jserve.waiting``'s; slot and prefix placement ``jserve.placement``'s; which
steps check drafts ``jserve.speculative``'s; requests, streams and finish reasons ``jserve.streams``'.

With a paged engine (``engine.paged``: its KV cache a pool of pages, ``jserve.kv_pages``) a slot
holds no memory: a request takes pages for its prompt when admitted (reusing cached pages and
partial pages of the prefix cache, ``PagePool.admit_reusing``), one more as it grows, and gives them
back when it ends, its written pages kept in the prefix cache. When the pool cannot hold a
request's prompt it waits (first in line); when a running request cannot grow, the youngest
request holding pages is preempted (``_preempt``): its pages go back to the prefix cache, and it
resumes first in line, its tokens run in again (mostly from that cache) and its sampling state
restored, so it produces the tokens it would have produced.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from jserve.engine_api import Engine, StepResult, TokenOut, consumed
from jserve.output import StreamOutput
from jserve.paged_scheduling import PagedScheduling
from jserve.placement import Slots, prompt_chunks, worth_waiting
from jserve.sampling import SamplingParams
from jserve.speculative import GENERATE, SpecPolicy, could_verify, plan_verify
from jserve.streams import (
    CANCELLED,
    DEADLINE,
    ERROR,
    LENGTH,
    SHUTDOWN,
    SLOW_READER,
    STOP,
    EngineDeadError,
    Event,
    FinishReason,
    QueueFullError,
    Request,
    Running,
    ShuttingDownError,
    Stream,
    allowed_masks,
)
from jserve.tokenizer import TextTokenizer
from jserve.waiting import WaitingQueue

log = logging.getLogger(__name__)

__all__ = ["CANCELLED", "DEADLINE", "ERROR", "LENGTH", "SHUTDOWN", "SLOW_READER", "STOP", "EngineDeadError",
           "Event", "FinishReason", "Orchestrator", "QueueFullError", "Request", "ShuttingDownError", "Stream",
           "StreamOutput"]


class _Turn(NamedTuple):
    """A turn's calls whose tokens are not handled yet: decode step's and extend's, with {row: run}."""

    step: StepResult | None
    step_owners: dict[int, Running]
    extend: StepResult | None
    extend_owners: dict[int, Running]

    def constrained_first(self) -> tuple[_Turn, _Turn]:
        """The turn's rows of constrained runs (structured output), and the others'."""
        parts = []
        for pick in (True, False):
            step = {i: run for i, run in self.step_owners.items() if (run.req.matcher is not None) == pick}
            ext = {i: run for i, run in self.extend_owners.items() if (run.req.matcher is not None) == pick}
            parts.append(_Turn(self.step, step, self.extend, ext))
        return parts[0], parts[1]


class Orchestrator(PagedScheduling):
    """Continuous batching over an ``Engine``'s fixed slots. Thread-safe ``submit``/``cancel``."""

    def __init__(self, engine: Engine, tokenizer: TextTokenizer | None, eos_token_ids: tuple[int, ...] = (),
                 max_waiting: int = 256, prefill_budget: int = 64,
                 on_event: Callable[[Event, Request, float], None] | None = None, pipeline: bool = True,
                 on_fatal: Callable[[str], None] | None = None, max_undelivered: int = 1024,
                 prefix_cache: bool = True, speculate: bool = True, kv_headroom: int = 1):
        self.engine = engine
        if kv_headroom < 0:
            raise ValueError(f"kv_headroom must be a number of pages >= 0, got {kv_headroom}")
        self.kv_headroom = kv_headroom  # pages admission keeps free per running request (paged pool)
        self.spec_tokens = engine.speculate  # drafts a verify step checks per row (0: no speculation)
        self.speculate = speculate  # the default for requests that do not say (``SamplingParams.speculate``)
        self.policy = SpecPolicy()  # when a step checks drafts (replaceable, e.g. by tests)
        self.prefix_cache = prefix_cache
        self.max_undelivered = max_undelivered  # pieces a consumer may leave unread before its request ends
        self.pipeline = pipeline
        self._on_fatal = on_fatal  # called once, on the loop thread, if the engine dies
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.prefill_budget = prefill_budget
        self._on_event = on_event or (lambda kind, req, value: None)
        self._waiting = WaitingQueue(max_waiting)
        self._slots = Slots(engine.slots)  # free slots, and what idle slots' caches hold
        # With a paged engine, this loop's page pool (``kv_pages.PagePool``) for its decode state.
        self.pages = engine.new_page_pool() if getattr(engine, "paged", False) else None
        self._preempted: list[Running] = []  # preempted runs to resume, oldest first (they hold no slot)
        self.preemptions = 0
        self._running: dict[int, Running] = {}  # slot -> run: live on device, or its last chunk dispatched
        self._prefilling: dict[int, Running] = {}  # slot -> run whose prompt is still being run in (FIFO)
        self._seeds = np.random.default_rng()
        self._ids = itertools.count()
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="jserve-orchestrator", daemon=True)
        self._thread.start()

    # ---- public, any thread -------------------------------------------------------------
    @property
    def dead(self) -> str | None:
        """Why the engine died (then nothing more is served), or None."""
        return self._waiting.dead

    @property
    def max_waiting(self) -> int:
        return self._waiting.max_waiting

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._prefilling) + len(self._preempted)

    @property
    def slots_in_use(self) -> int:
        return self._slots.in_use

    def submit(self, prompt_ids: list[int], params: SamplingParams, stream: Stream, request_id: str | None = None,
               deadline: float | None = None, block: bool = False, matcher: Any = None) -> Stream:
        """Queue a validated request. Raises ``QueueFullError`` when full (unless ``block``).
        ``matcher``: the request's compiled constraint (``jserve.structured``), if any."""
        req = Request(prompt_ids=list(prompt_ids), params=params, sink=stream.put, deadline=deadline,
                      request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
                      backlog=stream.backlog, matcher=matcher)
        stream.request, stream._orch = req, self
        self._waiting.put(req, block, on_full=lambda: self._on_event(Event.REJECTED, req, 0.0))
        return stream

    def cancel(self, req: Request) -> None:
        """End ``req``. One still waiting leaves the queue at once (its place is free for the next
        request) and gets its final message here; a running one is ended by the loop, whose slot
        is free before the step after next."""
        if self._waiting.withdraw(req):
            self._end_unstarted(req, req.ended(time.monotonic()) or CANCELLED)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting work; finish (``drain``) or cut what is in flight. True if all ended.

        Requests cut (at once without ``drain``, or when ``timeout`` runs out) end with finish
        reason ``shutdown``. Only the loop thread touches the running requests: it is asked to
        cut them, so nothing here races it."""
        self._waiting.stop(abort=not drain)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._waiting.stop(abort=True)
            self._thread.join(5.0)
            return False
        return True

    # ---- the loop, orchestrator thread only ---------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # the engine cannot be (re)built, or the loop itself broke
            log.critical("the engine is dead: %s", e, exc_info=True)
            self._die(f"the engine failed and could not be restarted: {e}")

    def _die(self, message: str) -> None:
        """End every request with an error, refuse new ones, and tell ``on_fatal``."""
        waiting = self._waiting.kill(message)
        self._fail_running(message)
        for req in waiting:
            try:
                self._end_unstarted(req, ERROR, error=message)
            except Exception:  # a failing hook must not keep the others from their final message
                log.exception("could not end a request of the dead engine")
        if self._on_fatal is not None:
            self._on_fatal(message)

    def _fail_running(self, message: str) -> None:
        """End every request holding a slot with an error (each once, whatever its sink does)."""
        runs = list(self._held().values()) + self._preempted
        self._running.clear()
        self._prefilling.clear()
        self._preempted = []
        if self.pages is not None:
            self.pages.reset()  # the device's pool is rebuilt empty
        for run in runs:
            try:
                self._finish(run, ERROR, error=message)
            except Exception:  # a broken consumer ends its own request only, not the engine
                log.exception("could not end request %s", run.req.request_id)

    def _serve(self) -> None:
        state = self.engine.init_state()
        in_flight: _Turn | None = None  # the turn whose tokens are not yet handled
        while self._waiting.wait_for_work(lambda: bool(self._running or self._prefilling or self._preempted)):
            try:
                state = self._end_cancelled_and_expired(state)
                spec = self._drafting()
                if in_flight is not None and spec:  # a draft depends on the last token: no overlap now
                    state = self._handle_step(state, in_flight)
                    in_flight = None
                    state = self._end_cancelled_and_expired(state)
                elif in_flight is not None and self._constrained():
                    # A constrained request's next mask depends on its last token: its rows are
                    # handled now, the others' after the next step is dispatched, as usual.
                    now, in_flight = in_flight.constrained_first()
                    state = self._handle_step(state, now)
                    state = self._end_cancelled_and_expired(state)
                dispatched = None
                if self._running:  # step n+1 goes to the device before step n's tokens are handled
                    state, dispatched = self._step(state, spec and self._drafting() and not self._constrained())
                if self._prefilling:  # then the next prompt chunks
                    state, ext_result, ext_owners = self._extend(state)
                    gen = dispatched or _Turn(None, {}, None, {})
                    dispatched = _Turn(gen.step, gen.step_owners, ext_result, ext_owners)
                if not self.pipeline and dispatched is not None:
                    in_flight, dispatched = dispatched, None
                if in_flight is not None:
                    state = self._handle_step(state, in_flight)
                in_flight = dispatched
                state = self._admit(state)
            except Exception as e:  # the device state may be gone: fail what runs, start clean
                log.exception("decode loop failed; ending %d running requests", self.num_running)
                in_flight = None
                self._fail_running(f"internal error: {e}")
                self._slots.clear()  # the cache is rebuilt empty
                state = self.engine.init_state()  # if this fails too, the engine is dead (see _loop)
            self._waiting.wake()  # blocked submitters: the queue may have room

    def _step(self, state, spec: bool) -> tuple[Any, _Turn]:
        """Dispatch the next decode step: ``verify`` with the live runs' drafts when ``spec`` and
        the policy expects more tokens per second from it, else ``generate``. In a ``spec`` turn
        (synchronous anyway) the call is waited for and timed, for the policy."""
        if self.pages is not None:
            state, spec = self._grow(state, spec)
            if not self._running:
                return state, _Turn(None, {}, None, {})
        runs = [(s, r.spec, r.draft_room(self.spec_tokens, self.engine.max_len)) for s, r in self._running.items()]
        plan = plan_verify(self.engine, self.policy, runs) if spec else None  # (if verifying is expected to pay)
        t0 = time.perf_counter()
        if plan is not None:
            state, result = self.engine.verify(state, plan.rows, plan.width, **self._table())
            owners = {i: self._running[row.slot] for i, row in enumerate(plan.rows)}
            kind = self.policy.kind(self.engine.verify_bucket(len(plan.rows)), plan.width)
        else:
            live = sorted(self._running)  # the step computes these rows only (bucketed)
            matchers = {s: run.req.matcher for s, run in self._running.items()}
            masks = allowed_masks(matchers, self.engine.slots, self.engine.mask_words)
            state, result = self.engine.generate(state, masks, live, **self._table())
            owners, kind = {i: self._running[slot] for i, slot in enumerate(live)}, GENERATE
        self.steps += 1
        for run in self._running.values():
            if run.spec is not None:
                run.spec.stepped()
        if spec:
            jax.block_until_ready(result.packed)
            self.policy.observe(kind, time.perf_counter() - t0)
        return state, _Turn(result, owners, None, {})

    def _drafting(self) -> bool:
        """Whether a verify step could pay this turn (``speculative.could_verify``)."""
        runs = [run.spec for run in self._running.values()]
        return could_verify(self.engine, self.policy, runs, self.spec_tokens)

    def _constrained(self) -> bool:
        return any(run.req.matcher is not None for run in self._running.values())

    def _held(self) -> dict[int, Running]:
        """Every run holding a slot (slot -> run): the live ones, then those prefilling."""
        return {**self._running, **self._prefilling}

    def _end_cancelled_and_expired(self, state):
        now = time.monotonic()
        for run in self._held().values():
            reason = SHUTDOWN if self._waiting.aborting else run.req.ended(now)
            if reason:
                state = self._release(state, run)
                self._finish(run, reason)
        for run in list(self._preempted):
            reason = SHUTDOWN if self._waiting.aborting else run.req.ended(now)
            if reason:
                self._preempted.remove(run)
                self._finish(run, reason)
        for req, reason in self._waiting.take_ended(now):
            self._end_unstarted(req, reason)
        return state

    def _end_unstarted(self, req: Request, reason: FinishReason, error: str | None = None) -> None:
        """Finish a request that never got a slot (or whose prefill failed)."""
        self._on_event(Event.finished(reason), req, time.monotonic() - req.arrival)
        req.sink(req.unstarted(reason, error))

    def _admit(self, state):
        """Give waiting requests free slots (oldest first), reusing or copying a cached prefix; the rest
        of each prompt is run by ``_extend``. A prompt that shares half a chunk more with one still
        being prefilled than with any slot waits for that prefix and copies it (a burst sharing a
        system prompt computes it once); requests behind it are not held up."""
        if self.pages is not None:
            return self._admit_paged(state)
        skipped = 0
        while self._slots.free:
            req, skipped = self._next_waiting(skipped)
            if req is None:
                break
            busy = {s: run.cache_tokens() for s, run in self._held().items()} if self.prefix_cache else {}
            slot, src, reuse = self._slots.take(req.prompt_ids, busy, self.prefix_cache)
            seed = req.params.seed if req.params.seed is not None else int(self._seeds.integers(2**63))
            wants = req.params.speculate if req.params.speculate is not None else self.speculate
            run = Running.start(req, slot, reuse, self.tokenizer, self.eos_token_ids, self.engine.top_logprobs,
                                speculate=bool(self.spec_tokens and wants and req.matcher is None))
            try:
                state = self.engine.begin(state, slot, req.prompt_ids, req.params, seed)
            except Exception as e:
                log.exception("could not start %s", req.request_id)
                self._slots.untake(slot)
                self._end_unstarted(req, ERROR, error=f"could not start the request: {e}")
                if consumed(state):  # the donated state is gone: the loop rebuilds it
                    raise
                continue
            self._prefilling[slot] = run  # from here the loop's recovery ends it if a call below fails
            if src is not None:
                state = self.engine.copy(state, src, slot, reuse)
            self._slots.overwrite(slot)
            if self.prefix_cache:
                self._on_event(Event.PREFIX_LOOKUP, req, float(reuse))
        return state

    def _next_waiting(self, skipped: int) -> tuple[Request | None, int]:
        """The next waiting request to start (``WaitingQueue.take``), or None; one cancelled or
        expired while waiting is finished here and never reaches the device."""
        while True:
            req, skipped = self._waiting.take(skipped, self._wait_for_prefix, self.engine.slots)
            if req is None:
                return None, skipped
            reason = req.ended(time.monotonic())
            if not reason:
                return req, skipped
            self._end_unstarted(req, reason)

    def _wait_for_prefix(self, req: Request) -> bool:
        if not self.prefix_cache or not self._prefilling:
            return False
        pending = [np.asarray(run.req.prompt_ids, np.int64) for run in self._prefilling.values()]
        if self.pages is not None:
            held = self.pages.match(req.prompt_ids, self._live_tokens())
            least = max(1, self.engine.chunk // 2)
            return worth_waiting(req.prompt_ids, pending, [np.asarray(req.prompt_ids[:held], np.int64)], least)
        busy = (run.cache_tokens() for run in self._held().values())
        least = max(1, self.engine.chunk // 2)  # worth a wait: half a chunk (a chat template's system prompt)
        return worth_waiting(req.prompt_ids, pending, self._slots.cached(busy), least)

    def _extend(self, state):
        """Dispatch the next prompt chunks, oldest request first: the state, the step result and
        ``{row: run}`` for rows that end a prompt (those runs are live from here on)."""
        e = self.engine
        rows_max = e.ready_rows()  # larger calls may still be compiling in the background
        head = next(iter(self._prefilling.values()))
        if any(run.live_since < head.req.arrival for run in self._running.values()):
            # Streams that were live (had their first token) before the oldest prompt arrived keep
            # their pace: this call holds them up by at most ``prefill_budget`` tokens. Streams that
            # went live after it arrived (the rest of a burst it came in with) do not make it wait.
            rows_max = max(1, min(rows_max, self.prefill_budget // e.chunk))
        prompts = [(slot, run.fed, run.prompt_done) for slot, run in self._prefilling.items()]
        rows = prompt_chunks(prompts, rows_max, e.chunk)
        owners: dict[int, Running] = {}
        resumed: list[Running] = []
        for i, row in enumerate(rows):
            run = self._prefilling[row.slot]
            run.prompt_done = row.start + len(row.tokens)
            if row.final and run.refeed is not None:  # a preempted run: its state is restored, not sampled
                rows[i] = dataclasses.replace(row, final=False)
                resumed.append(run)
            elif row.final:
                owners[i] = run
            if row.final:
                del self._prefilling[row.slot]
                self._running[row.slot] = run
        masks = allowed_masks({i: run.req.matcher for i, run in owners.items()}, e.max_rows, e.mask_words)
        state, result = e.extend(state, rows, masks, **self._table())
        for run in resumed:
            state = e.resume(state, run.slot, run.refeed, run.output.token_ids)
            run.refeed = None
        for run in self._held().values():
            self._commit(run)
        return state, result, owners

    def _handle_step(self, state, turn: _Turn):
        """Hand each request its tokens from one turn's step results: the decode step's, then the
        first tokens of prompts that ended in the ``extend`` call after it. A run that ended since
        (stop, cancel, ...) had one step too many on the device: its token is dropped here."""
        for result, owned in ((turn.step, turn.step_owners), (turn.extend, turn.extend_owners)):
            if not owned:
                continue
            host = result.host()  # one device-to-host copy per call
            for i, run in owned.items():
                if self._running.get(run.slot) is not run:
                    continue
                tokens = host.tokens(i)
                if not tokens:
                    raise RuntimeError(f"slot {run.slot} is running on the host but inactive on device")
                if host.verified and run.spec is not None and (drafted := run.spec.checked(len(tokens))):
                    self._on_event(Event.SPEC_DRAFTED, run.req, float(drafted))
                    self._on_event(Event.SPEC_ACCEPTED, run.req, float(len(tokens) - 1))
                for token in tokens:
                    state = self._on_token(state, run, token)
                    if self._running.get(run.slot) is not run:  # it ended: the rest is dropped
                        break
        return state

    def _on_token(self, state, run: Running, token: TokenOut):
        try:
            reason, out = run.take(token)
        except Exception as e:
            log.exception("request %s failed", run.req.request_id)
            state = self._release(state, run)
            self._finish(run, ERROR, error=str(e))
            return state
        if reason is not None:
            state = self._release(state, run)
        else:
            self._commit(run)
        now = time.monotonic()
        if run.generated == 1:
            run.live_since = now
        # Counted before it is delivered: a client that has its piece sees it in the metrics.
        self._on_event(Event.FIRST_TOKEN if run.generated == 1 else Event.TOKEN, run.req, now - run.req.arrival)
        if reason is not None:
            self._on_event(Event.finished(reason), run.req, now - run.req.arrival)
        run.req.deliver(out, self.max_undelivered)
        return state

    def _release(self, state, run: Running):
        for table in (self._running, self._prefilling):
            if table.get(run.slot) is run:
                # Released on the device first: if that raises, the run is still running here and
                # the loop's recovery ends it with its one final (error) message.
                state = self.engine.release(state, run.slot)
                del table[run.slot]
                if self.pages is not None:  # its written pages stay in the prefix cache
                    self.pages.release(run.slot, run.cache_tokens() if self.prefix_cache else None)
                self._slots.release(run.slot, run.cache_tokens(), time.monotonic())
        return state

    def _finish(self, run: Running, reason: FinishReason, error: str | None = None) -> None:
        self._on_event(Event.finished(reason), run.req, time.monotonic() - run.req.arrival)
        run.req.sink(run.output.finish(reason, error))

