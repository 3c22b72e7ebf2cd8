"""The orchestrator: a bounded waiting queue, slots, and the decode loop (continuous batching).

One background thread owns the engine and its decode state. Each turn of its loop ends
cancelled and expired requests, dispatches the next decode step for all live slots, then one
``extend`` call that runs the next chunks of the prompts being prefilled, oldest first (at most
``prefill_budget`` prompt tokens while streams that went live before the oldest of them arrived
are decoding, so they keep their pace; else the engine's largest call), and only then handles
the previous turn's tokens (copied to the host once; detokenized incrementally, checked against
EOS, stop ids, stop strings and max_tokens, delivered), so the host's per-token work overlaps
the device's next step. Then it admits waiting requests into free slots. A request that
finishes while the next step is already on the device has that one extra token dropped; its
slot is released before the step after.

Prefix caching: a slot keeps the keys/values of what it last held (prompt and output) until it
is needed again, and the host keeps the token ids they belong to. A new request takes the free
slot whose tokens share the longest prefix with its prompt (else the least recently used one),
or copies a longer prefix from any other slot, live or idle, and computes only the rest.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import jax
import numpy as np

from jserve.engine import ACTIVE, ChunkRow, Engine
from jserve.output import CANCELLED, DEADLINE, ERROR, LENGTH, STOP, Output, StreamOutput
from jserve.sampling import SamplingParams
from jserve.speculative import MIN_RATE, RETRY_STEPS, Acceptance, PromptLookup, SpecPolicy
from jserve.structured import fill_mask
from jserve.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

__all__ = ["CANCELLED", "DEADLINE", "ERROR", "LENGTH", "STOP", "Orchestrator", "Request", "Stream",
           "StreamOutput"]
SHUTDOWN = "shutdown"  # cut by a shutdown (no drain, or the drain ran out of time): worth retrying elsewhere
SLOW_READER = "slow_reader"  # ended because its consumer left too much output undelivered


def _shared(a: np.ndarray, b: np.ndarray, limit: int) -> int:
    """Length of the common prefix of two token arrays, at most ``limit``."""
    n = min(limit, len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def _consumed(state) -> bool:
    """Whether a donated state's buffers are gone (a call took it and then failed)."""
    leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "is_deleted")]
    return any(x.is_deleted() for x in leaves)


class QueueFullError(RuntimeError):
    """The waiting queue is at capacity; retry later."""


class ShuttingDownError(RuntimeError):
    """The orchestrator no longer accepts work."""


class EngineDeadError(ShuttingDownError):
    """The engine failed and could not be rebuilt: nothing more will be served by this process."""


@dataclasses.dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    sink: Callable[[StreamOutput], None]  # called on the orchestrator thread; must not block
    deadline: float | None = None  # time.monotonic() seconds
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False
    backlog: Callable[[], int] = lambda: 0  # pieces handed to ``sink`` that the consumer has not taken yet
    slow_reader: bool = False
    matcher: Any = None  # structured output: an llguidance matcher (``jserve.structured``), else None


@dataclasses.dataclass
class _Running:
    req: Request
    slot: int
    output: Output  # its text, stops and logprobs as tokens come (``jserve.output``)
    prompt_done: int = 0  # prompt tokens whose keys/values are in the slot (reused or dispatched)
    live_since: float = float("inf")  # when its first token was handled (it streams from then on)
    drafter: PromptLookup | None = None  # speculative decoding: this run drafts (``jserve.speculative``)
    acceptance: Acceptance = dataclasses.field(default_factory=Acceptance)
    drafted: int = 0  # tokens drafted for the verify step in flight
    draft_hint: bool = False  # whether its latest handled token left a draft to propose

    @property
    def generated(self) -> int:
        return self.output.generated

    def cache_tokens(self) -> np.ndarray:
        """Token ids whose keys/values this run has put in its slot (the last output token has
        not been fed to a step yet)."""
        prompt = self.req.prompt_ids
        if self.prompt_done < len(prompt):
            return np.asarray(prompt[:self.prompt_done], np.int64)
        return np.asarray(prompt + self.output.token_ids[:-1], np.int64)


class Stream:
    """A request's output stream, usable from threads (iterate) or asyncio (``async for``).

    The last ``StreamOutput`` carries the finish reason. ``cancel()`` ends the request; its slot
    is free before the next decode step.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop
        self._q: queue.Queue | asyncio.Queue = asyncio.Queue() if loop else queue.Queue()
        self._orch: Orchestrator | None = None
        self._put = self._taken = 0  # each written by one thread only: the producer, the consumer
        self.request: Request | None = None

    def backlog(self) -> int:
        """Pieces put and not yet taken by the consumer."""
        return self._put - self._taken

    def put(self, out: StreamOutput) -> None:
        self._put += 1
        if self._loop is None:
            self._q.put(out)
            return
        try:
            self._loop.call_soon_threadsafe(self._q.put_nowait, out)
        except RuntimeError:  # the consumer's event loop is closed: nobody will read this stream
            if self.request is not None:
                self.request.cancelled = True

    def cancel(self) -> None:
        if self._orch is not None and self.request is not None:
            self._orch.cancel(self.request)

    def __iter__(self) -> Iterator[StreamOutput]:
        while True:
            out = self._q.get()
            self._taken += 1
            yield out
            if out.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[StreamOutput]:
        while True:
            out = await self._q.get()
            self._taken += 1
            yield out
            if out.finish_reason is not None:
                return


class Orchestrator:
    """Continuous batching over an ``Engine``'s fixed slots. Thread-safe ``submit``/``cancel``."""

    def __init__(self, engine: Engine, tokenizer: TextTokenizer | None, eos_token_ids: tuple[int, ...] = (),
                 max_waiting: int = 256, prefill_budget: int = 64,
                 on_event: Callable[[str, Request, float], None] | None = None, pipeline: bool = True,
                 on_fatal: Callable[[str], None] | None = None, max_undelivered: int = 1024,
                 prefix_cache: bool = True, speculate: bool = True):
        self.engine = engine
        # Speculative decoding, when the engine checks drafts (``speculate`` > 0): the default for
        # requests that do not say (``SamplingParams.speculate``).
        self.spec_tokens = getattr(engine, "speculate", 0) if hasattr(engine, "verify") else 0
        self.speculate = speculate
        self.policy = SpecPolicy()  # when a step checks drafts (replaceable, e.g. by tests)
        self.prefix_cache = prefix_cache
        self.max_undelivered = max_undelivered  # pieces a consumer may leave unread before its request ends
        self.pipeline = pipeline
        self._on_fatal = on_fatal  # called once, on the loop thread, if the engine dies
        self.dead: str | None = None
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_waiting = max_waiting
        self.prefill_budget = prefill_budget
        self._on_event = on_event or (lambda kind, req, value: None)
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._free: collections.deque[int] = collections.deque(range(engine.slots))
        self._running: dict[int, _Running] = {}  # slot -> run: live on device, or its last chunk dispatched
        self._prefilling: dict[int, _Running] = {}  # slot -> run whose prompt is still being run in (FIFO)
        self._slot_tokens: list[np.ndarray] = [np.zeros((0,), np.int64)] * engine.slots  # idle slots' cache
        self._slot_used = [0.0] * engine.slots  # when each slot was last released (least recently used first)
        self._stopping = False
        self._aborting = False  # shutdown without (or past) its drain: the loop cuts everything
        self._seeds = np.random.default_rng()
        self._ids = itertools.count()
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="jserve-orchestrator", daemon=True)
        self._thread.start()

    # ---- public, any thread -------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._prefilling)

    @property
    def slots_in_use(self) -> int:
        return self.engine.slots - len(self._free)

    def submit(self, prompt_ids: list[int], params: SamplingParams, stream: Stream, request_id: str | None = None,
               deadline: float | None = None, block: bool = False, matcher: Any = None) -> Stream:
        """Queue a validated request. Raises ``QueueFullError`` when full (unless ``block``).
        ``matcher``: the request's compiled constraint (``jserve.structured``), if any."""
        req = Request(prompt_ids=list(prompt_ids), params=params, sink=stream.put, deadline=deadline,
                      request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
                      backlog=stream.backlog, matcher=matcher)
        stream.request, stream._orch = req, self
        with self._cv:
            while True:
                if self.dead is not None:
                    raise EngineDeadError(self.dead)
                if self._stopping:
                    raise ShuttingDownError("server is shutting down; not accepting new requests")
                if len(self._waiting) < self.max_waiting:
                    break
                if not block:
                    self._on_event("rejected", req, 0.0)
                    raise QueueFullError(f"waiting queue is full ({self.max_waiting} requests); retry later")
                self._cv.wait(0.05)
            self._waiting.append(req)
            self._cv.notify_all()
        return stream

    def cancel(self, req: Request) -> None:
        """End ``req``. One still waiting leaves the queue at once (its place is free for the next
        request) and gets its final message here; a running one is ended by the loop, whose slot
        is free before the step after next."""
        with self._cv:
            req.cancelled = True
            try:
                self._waiting.remove(req)
                waiting = True
            except ValueError:
                waiting = False
            self._cv.notify_all()
        if waiting:
            self._end_unstarted(req, self._ended(req, time.monotonic()) or CANCELLED)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting work; finish (``drain``) or cut what is in flight. True if all ended.

        Requests cut (at once without ``drain``, or when ``timeout`` runs out) end with finish
        reason ``shutdown``. Only the loop thread touches the running requests: it is asked to
        cut them, so nothing here races it."""
        with self._cv:
            self._stopping = True
            if not drain:
                self._aborting = True
            self._cv.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cv:
                self._aborting = True
                self._cv.notify_all()
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
        with self._cv:
            self.dead = message
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._cv.notify_all()
        runs = list(self._running.values()) + list(self._prefilling.values())
        ends = [functools.partial(self._finish, run, ERROR, error=message) for run in runs]
        ends += [functools.partial(self._end_unstarted, req, ERROR, error=message) for req in waiting]
        self._running.clear()
        self._prefilling.clear()
        for end in ends:
            try:
                end()
            except Exception:  # a failing hook must not keep the others from their final message
                log.exception("could not end a request of the dead engine")
        if self._on_fatal is not None:
            self._on_fatal(message)

    def _serve(self) -> None:
        state = self.engine.init_state()
        in_flight = None  # (packed result, slot -> run at dispatch) of the step whose tokens are not yet handled
        while True:
            with self._cv:
                while not self._busy() and not self._waiting and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._busy() and not self._waiting:
                    return
            try:
                state = self._end_cancelled_and_expired(state)
                spec = self._drafting()
                if in_flight is not None and (self._constrained() or spec):
                    # A constrained request's next mask, and a draft, depend on the last token: no overlap now.
                    state = self._handle_step(state, *in_flight)
                    in_flight = None
                    state = self._end_cancelled_and_expired(state)
                dispatched = None
                if self._running:  # step n+1 goes to the device before step n's tokens are handled
                    state, dispatched = self._step(state, spec and self._drafting() and not self._constrained())
                if self._prefilling:  # then the next prompt chunks
                    state, ext_packed, ext_owners = self._extend(state)
                    gen = dispatched or (None, {}, None, {})
                    dispatched = (gen[0], gen[1], ext_packed, ext_owners)
                if not self.pipeline and dispatched is not None:
                    in_flight, dispatched = dispatched, None
                if in_flight is not None:
                    state = self._handle_step(state, *in_flight)
                in_flight = dispatched
                state = self._admit(state)
            except Exception as e:  # the device state may be gone: fail what runs, start clean
                log.exception("decode loop failed; ending %d running requests", self.num_running)
                for run in list(self._running.values()) + list(self._prefilling.values()):
                    try:
                        self._finish(run, ERROR, error=f"internal error: {e}")
                    except Exception:  # a broken consumer ends its own request only, not the engine
                        log.exception("could not end request %s", run.req.request_id)
                self._running.clear()
                self._prefilling.clear()
                self._free = collections.deque(range(self.engine.slots))
                self._slot_tokens = [np.zeros((0,), np.int64)] * self.engine.slots  # the cache is rebuilt empty
                in_flight = None
                state = self.engine.init_state()  # if this fails too, the engine is dead (see _loop)
            with self._cv:
                self._cv.notify_all()  # wake blocked submitters: the queue may have room

    def _step(self, state, spec: bool):
        """Dispatch the next decode step: ``verify`` with the live runs' drafts when ``spec`` and
        the policy expects more tokens per second from it, else ``generate``. In a ``spec`` turn
        (synchronous anyway) the call is waited for and timed, for the policy."""
        chosen = self._spec_rows() if spec else None
        t0 = time.perf_counter()
        if chosen is not None:
            rows, width = chosen
            state, packed = self.engine.verify(state, rows, width)
            owners = {i: self._running[slot] for i, (slot, _) in enumerate(rows)}
            kind = self.policy.kind(self.engine.verify_bucket(len(rows)), width)
        else:
            live = sorted(self._running)  # the step computes these rows only (bucketed)
            state, packed = self.engine.generate(state, self._masks(), live)
            owners, kind = {i: self._running[slot] for i, slot in enumerate(live)}, "generate"
        self.steps += 1
        for run in self._running.values():  # steps since each last drafted (see ``RETRY_STEPS``)
            run.acceptance.idle = 0 if run.drafted else run.acceptance.idle + 1
        if spec:
            jax.block_until_ready(packed)
            self.policy.observe(kind, time.perf_counter() - t0)
        return state, (packed, owners, None, {})

    @staticmethod
    def _may_draft(run: _Running) -> bool:
        acc = run.acceptance
        return run.drafter is not None and (acc.rate >= MIN_RATE or acc.idle >= RETRY_STEPS)

    def _drafting(self) -> bool:
        """Whether a verify step could pay this turn: every live run speculates, and the policy
        says so if each run that had a draft after its last handled token finds a full one. Only
        then is the turn synchronous (drafts follow the last token, which may still be on the
        device). A live request that does not speculate (opted out, or constrained) keeps every
        step plain: its output is bitwise what it would be alone."""
        runs = self._running.values()
        if not runs or any(run.drafter is None for run in runs):
            return False
        hints = [run.acceptance for run in runs if run.draft_hint and self._may_draft(run)]
        bucket = self.engine.verify_bucket(len(self._running))
        widths = self.engine.ready_widths(bucket)  # shapes still compiling in the background are not offered
        options = {w: sum(acc.expected(min(self.spec_tokens, w - 1)) for acc in hints) for w in widths}
        return bool(widths) and self.policy.could_pay(len(self._running), bucket, options)

    def _spec_rows(self) -> tuple[list[tuple[int, list[int]]], int] | None:
        """Every live slot with its draft and the verify call's width, if verifying them is
        expected to pay; else None."""
        e = self.engine
        rows, accs = [], []
        for slot, run in self._running.items():
            draft: list[int] = []
            if self._may_draft(run):
                length = len(run.req.prompt_ids) + run.generated - 1  # the position of the last token
                room = min(self.spec_tokens, run.req.params.max_tokens - run.generated - 1, e.max_len - 1 - length)
                draft = run.drafter.propose(room) if room > 0 else []
            rows.append((slot, draft))
            accs.append(run.acceptance)
        bucket = e.verify_bucket(len(rows))
        need = e.verify_width(max(len(d) for _, d in rows), bucket)
        widths = [w for w in e.ready_widths(bucket) if w <= need]
        if not widths:
            return None
        if any(d and acc.idle >= RETRY_STEPS for acc, (_, d) in zip(accs, rows)):
            widths = [widths[-1]]  # a draft unchecked for long is checked whole: its acceptance is re-measured
        options = {w: sum(acc.expected(min(len(d), w - 1)) for acc, (_, d) in zip(accs, rows)) for w in widths}
        width = self.policy.choose(len(rows), bucket, options)
        if width is None:
            return None
        rows = [(slot, draft[:width - 1]) for slot, draft in rows]
        for slot, draft in rows:
            self._running[slot].drafted = len(draft)
        return rows, width

    def _constrained(self) -> bool:
        return any(run.req.matcher is not None for run in self._running.values())

    def _masks(self) -> np.ndarray | None:
        """Allowed tokens per slot for the next step (None when no live request is constrained)."""
        if not self._constrained():
            return None
        masks = np.full((self.engine.slots, self.engine.mask_words), -1, np.int32)
        for slot, run in self._running.items():
            if run.req.matcher is not None:
                fill_mask(run.req.matcher, masks[slot])
        return masks

    def _busy(self) -> bool:
        return bool(self._running or self._prefilling)

    def _end_cancelled_and_expired(self, state):
        now = time.monotonic()
        for run in list(self._running.values()) + list(self._prefilling.values()):
            reason = SHUTDOWN if self._aborting else self._ended(run.req, now)
            if reason:
                state = self._release(state, run)
                self._finish(run, reason)
        with self._cv:
            keep = collections.deque()
            ended = []
            for req in self._waiting:
                reason = SHUTDOWN if self._aborting else self._ended(req, now)
                if reason:
                    ended.append((req, reason))
                else:
                    keep.append(req)
            self._waiting = keep
        for req, reason in ended:
            self._end_unstarted(req, reason)
        return state

    def _end_unstarted(self, req: Request, reason: str, error: str | None = None) -> None:
        """Finish a request that never got a slot (or whose prefill failed)."""
        self._on_event("finished:" + reason, req, time.monotonic() - req.arrival)
        req.sink(StreamOutput("", [], [], [], len(req.prompt_ids), 0, finish_reason=reason, error=error))

    @staticmethod
    def _ended(req: Request, now: float) -> str | None:
        # A passed deadline wins over a cancel: a gRPC client whose deadline passes also cancels
        # its call, and that request ran out of time rather than being withdrawn.
        if req.deadline is not None and now >= req.deadline:
            return DEADLINE
        if req.slow_reader:
            return SLOW_READER
        if req.cancelled:
            return CANCELLED
        return None

    def _admit(self, state):
        """Give waiting requests free slots (oldest first): pick the slot, reuse or copy a cached
        prefix, and queue the rest of the prompt for ``_extend``. A request whose prompt starts
        like one still being prefilled, by at least a chunk more than any slot holds yet, waits
        for that prefix to be computed and then copies it (a burst sharing a system prompt
        computes it once); requests behind it are not held up."""
        skipped = 0
        while self._free:
            with self._cv:
                if skipped >= len(self._waiting) or skipped > self.engine.slots:
                    break
                req = self._waiting[skipped]
                if self._wait_for_prefix(req.prompt_ids):
                    skipped += 1
                    continue
                del self._waiting[skipped]
            reason = self._ended(req, time.monotonic())
            if reason:  # cancelled or expired while waiting: never reaches the device
                self._end_unstarted(req, reason)
                continue
            slot, src, reuse = self._place(req.prompt_ids)
            self._free.remove(slot)
            seed = req.params.seed if req.params.seed is not None else int(self._seeds.integers(2**63))
            detok = (self.tokenizer.detokenizer(req.params.skip_special_tokens) if self.tokenizer is not None
                     else None)
            output = Output(req.params, len(req.prompt_ids), detok, self.eos_token_ids, self.engine.top_logprobs,
                            req.matcher, cached_tokens=reuse)
            run = _Running(req=req, slot=slot, output=output, prompt_done=reuse)
            wants = req.params.speculate if req.params.speculate is not None else self.speculate
            if self.spec_tokens and wants and req.matcher is None:
                run.drafter = PromptLookup(req.prompt_ids)
            try:
                state = self.engine.begin(state, slot, req.prompt_ids, req.params, seed)
            except Exception as e:
                log.exception("could not start %s", req.request_id)
                self._free.appendleft(slot)
                self._end_unstarted(req, ERROR, error=f"could not start the request: {e}")
                if _consumed(state):  # the donated state is gone: the loop rebuilds it
                    raise
                continue
            self._prefilling[slot] = run  # from here the loop's recovery ends it if a call below fails
            if src is not None:
                state = self.engine.copy(state, src, slot, reuse)
            self._slot_tokens[slot] = np.zeros((0,), np.int64)  # what it held is now being overwritten
            if self.prefix_cache:
                self._on_event("prefix_lookup", req, float(reuse))
        return state

    def _wait_for_prefix(self, prompt: list[int]) -> bool:
        if not self.prefix_cache or not self._prefilling:
            return False
        ids = np.asarray(prompt, np.int64)
        limit = len(ids) - 1
        pending = max(_shared(np.asarray(run.req.prompt_ids, np.int64), ids, limit)
                      for run in self._prefilling.values())
        least = max(1, self.engine.chunk // 2)  # worth a wait: half a chunk (a chat template's system prompt)
        if pending < least:
            return False
        held = max(_shared(t, ids, limit) for t in self._cached_tokens())
        return pending - held >= least

    def _cached_tokens(self) -> list[np.ndarray]:
        out = [self._slot_tokens[s] for s in self._free]
        out += [run.cache_tokens() for run in (*self._running.values(), *self._prefilling.values())]
        return out

    def _place(self, prompt: list[int]) -> tuple[int, int | None, int]:
        """``(slot, source slot to copy from or None, prompt tokens reused)`` for a new prompt.

        At most ``len(prompt) - 1`` tokens are reused: the last one is always run, for its logits."""
        if not self.prefix_cache:
            return self._free[0], None, 0
        ids = np.asarray(prompt, np.int64)
        limit = len(ids) - 1

        def shared(tokens: np.ndarray) -> int:
            return _shared(tokens, ids, limit)

        free = {s: shared(self._slot_tokens[s]) for s in self._free}
        # The free slot with the longest shared prefix; among equals the least recently used.
        slot = max(free, key=lambda s: (free[s], -self._slot_used[s]))
        busy = {s: shared(run.cache_tokens()) for s, run in (*self._running.items(), *self._prefilling.items())}
        best = max((*free.items(), *busy.items()), key=lambda kv: kv[1])
        if best[1] > free[slot]:
            return slot, best[0], best[1]
        return slot, None, free[slot]

    def _extend(self, state):
        """Dispatch the next prompt chunks, oldest request first. Returns the state, the packed
        result and ``{row: run}`` for rows that end a prompt (those runs are live from here on)."""
        e = self.engine
        rows_max = e.ready_rows()  # larger calls may still be compiling in the background
        head = next(iter(self._prefilling.values()))
        if any(run.live_since < head.req.arrival for run in self._running.values()):
            # Streams that were live (had their first token) before the oldest prompt arrived keep
            # their pace: this call holds them up by at most ``prefill_budget`` tokens. Streams that
            # went live after it arrived (the rest of a burst it came in with) do not make it wait.
            rows_max = max(1, min(rows_max, self.prefill_budget // e.chunk))
        rows: list[ChunkRow] = []
        owners: dict[int, _Running] = {}
        for slot, run in list(self._prefilling.items()):
            prompt = run.req.prompt_ids
            while len(rows) < rows_max and run.prompt_done < len(prompt):
                start = run.prompt_done
                chunk = prompt[start:start + e.chunk]
                run.prompt_done += len(chunk)
                final = run.prompt_done == len(prompt)
                if final:
                    owners[len(rows)] = run
                    del self._prefilling[slot]
                    self._running[slot] = run
                rows.append(ChunkRow(slot=slot, start=start, tokens=chunk, final=final))
            if len(rows) >= rows_max:
                break
        masks = None
        if any(run.req.matcher is not None for run in owners.values()):
            masks = np.full((e.max_rows, e.mask_words), -1, np.int32)
            for i, run in owners.items():
                if run.req.matcher is not None:
                    fill_mask(run.req.matcher, masks[i])
        state, packed = e.extend(state, rows, masks)
        return state, packed, owners

    def _handle_step(self, state, packed, owners: dict[int, _Running], ext_packed, ext_owners: dict[int, _Running]):
        """Hand each request its token from one turn's packed results: the decode step's
        (``owners``: row -> run when it was dispatched), then the first tokens of prompts that
        ended in the ``extend`` call after it (``ext_owners``: row -> run). A run that ended since
        (stop, cancel, ...) had one step too many on the device: its token is dropped here and
        never reaches a client."""
        for result, owned in ((packed, owners), (ext_packed, ext_owners)):
            if not owned:
                continue
            result = np.asarray(result)  # one device-to-host copy per call
            for i, run in owned.items():
                if self._running.get(run.slot) is not run:
                    continue
                row = result[i]
                if result.ndim == 3:  # a verify step: the kept tokens at the start of the row
                    kept = int(np.sum(row[:, ACTIVE] > 0.5))
                    if run.drafted:
                        run.acceptance.update(run.drafted, kept - 1)
                        self._on_event("spec_drafted", run.req, float(run.drafted))
                        self._on_event("spec_accepted", run.req, float(kept - 1))
                        run.drafted = 0
                    row = row[:max(kept, 1)]
                else:
                    row = row[None]
                if row[0, ACTIVE] < 0.5:
                    raise RuntimeError(f"slot {run.slot} is running on the host but inactive on device")
                for token_row in row:
                    state = self._on_token(state, run, token_row)
                    if self._running.get(run.slot) is not run:  # it ended: the rest is dropped
                        break
        return state

    def _on_token(self, state, run: _Running, row: np.ndarray):
        try:
            reason, out = self._advance(run, row)
        except Exception as e:
            log.exception("request %s failed", run.req.request_id)
            state = self._release(state, run)
            self._finish(run, ERROR, error=str(e))
            return state
        if reason is not None:
            state = self._release(state, run)
        now = time.monotonic()
        elapsed = now - run.req.arrival
        if run.generated == 1:
            run.live_since = now
        # Counted before it is delivered: a client that has its piece sees it in the metrics.
        self._on_event("first_token" if run.generated == 1 else "token", run.req, elapsed)
        if reason is not None:
            self._on_event("finished:" + reason, run.req, elapsed)
        try:
            run.req.sink(out)
        except Exception:  # a broken consumer ends its own request only
            log.exception("output of request %s could not be delivered; cancelling it", run.req.request_id)
            run.req.cancelled = True
        if reason is None and run.req.backlog() > self.max_undelivered:  # ended before the next step
            log.warning("request %s: %d pieces undelivered; ending it", run.req.request_id, run.req.backlog())
            run.req.slow_reader = True
        return state

    def _advance(self, run: _Running, row: np.ndarray) -> tuple[str | None, StreamOutput]:
        """Take one new token for ``run``; returns its finish reason (or None) and the output piece."""
        reason, out = run.output.add(row)
        if run.drafter is not None:
            run.drafter.append(out.token_ids[0])
            run.draft_hint = bool(run.drafter.propose(1))
        return reason, out

    def _release(self, state, run: _Running):
        for table in (self._running, self._prefilling):
            if table.get(run.slot) is run:
                # Released on the device first: if that raises, the run is still running here and
                # the loop's recovery ends it with its one final (error) message.
                state = self.engine.release(state, run.slot)
                del table[run.slot]
                self._slot_tokens[run.slot] = run.cache_tokens()  # kept for the next prompt sharing it
                self._slot_used[run.slot] = time.monotonic()
                self._free.append(run.slot)
        return state

    def _finish(self, run: _Running, reason: str, error: str | None = None) -> None:
        self._on_event("finished:" + reason, run.req, time.monotonic() - run.req.arrival)
        run.req.sink(run.output.finish(reason, error))

