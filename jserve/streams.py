"""What the orchestrator serves: requests, their output streams, finish reasons, events, errors.

A ``Request`` is queued by ``Orchestrator.submit`` and written to its ``Stream`` (iterated from a
thread, or with ``async for``); the last ``StreamOutput`` carries a ``FinishReason``. The
orchestrator reports what happens to requests (for metrics) as ``Event``s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from jserve.speculative import Drafting, PromptLookup

if TYPE_CHECKING:  # (imported where used: ``FinishReason`` and ``Stream`` load no JAX)
    from jserve.engine_api import TokenOut
    from jserve.orchestrator import Orchestrator
    from jserve.output import Output, StreamOutput
    from jserve.sampling import SamplingParams
    from jserve.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


class FinishReason(enum.StrEnum):
    """Why a request ended (``StreamOutput.finish_reason``); each equals its string value."""

    STOP = "stop"  # a stop token (EOS unless ignored) or stop string
    LENGTH = "length"  # max_tokens, or the slot's context is full
    CANCELLED = "cancelled"  # withdrawn by its client
    DEADLINE = "deadline"  # its deadline passed
    ERROR = "error"  # it failed (``StreamOutput.error`` says how)
    SHUTDOWN = "shutdown"  # cut by a shutdown (no drain, or the drain ran out of time): worth retrying elsewhere
    SLOW_READER = "slow_reader"  # its consumer left too much output undelivered


STOP, LENGTH, CANCELLED, DEADLINE, ERROR, SHUTDOWN, SLOW_READER = FinishReason


class Event(enum.StrEnum):
    """What the orchestrator reports to its ``on_event(event, request, value)`` observer. ``value``:
    seconds since arrival (tokens, finishes), tokens (prefix lookups, drafts), else 0. Each equals
    its string value (``finished:<reason>`` for the finishes)."""

    REJECTED = "rejected"  # refused: the waiting queue was full
    FIRST_TOKEN = "first_token"
    TOKEN = "token"
    PREFIX_LOOKUP = "prefix_lookup"  # value: prompt tokens reused from the prefix cache
    PREEMPTED = "preempted"  # a running request gave back its KV pages (resumed later); value 0
    SPEC_DRAFTED = "spec_drafted"  # value: tokens drafted and checked by a verify step
    SPEC_ACCEPTED = "spec_accepted"  # value: drafted tokens kept
    FINISHED_STOP = "finished:stop"
    FINISHED_LENGTH = "finished:length"
    FINISHED_CANCELLED = "finished:cancelled"
    FINISHED_DEADLINE = "finished:deadline"
    FINISHED_ERROR = "finished:error"
    FINISHED_SHUTDOWN = "finished:shutdown"
    FINISHED_SLOW_READER = "finished:slow_reader"

    @staticmethod
    def finished(reason: FinishReason | str) -> Event:
        return _FINISHED[FinishReason(reason)]


_FINISHED = {r: Event["FINISHED_" + r.name] for r in FinishReason}


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

    def ended(self, now: float) -> FinishReason | None:
        """Why it must end now other than by its own tokens, if it must."""
        # A passed deadline wins over a cancel: a gRPC client whose deadline passes also cancels
        # its call, and that request ran out of time rather than being withdrawn.
        if self.deadline is not None and now >= self.deadline:
            return DEADLINE
        if self.slow_reader:
            return SLOW_READER
        if self.cancelled:
            return CANCELLED
        return None

    def unstarted(self, reason: FinishReason, error: str | None = None) -> StreamOutput:
        """The one piece of a request that ends before its first token."""
        from jserve.output import StreamOutput

        return StreamOutput("", [], [], [], len(self.prompt_ids), 0, finish_reason=reason, error=error)

    def deliver(self, out: StreamOutput, max_undelivered: int) -> None:
        """Hand ``out`` to the sink. A sink that raises cancels its own request only; a consumer
        that leaves more than ``max_undelivered`` pieces unread has its request ended (a slow reader)."""
        try:
            self.sink(out)
        except Exception:
            log.exception("output of request %s could not be delivered; cancelling it", self.request_id)
            self.cancelled = True
        if out.finish_reason is None and self.backlog() > max_undelivered:  # ended before the next step
            log.warning("request %s: %d pieces undelivered; ending it", self.request_id, self.backlog())
            self.slow_reader = True


@dataclasses.dataclass
class Running:
    """A request that holds a slot: prefilling, or live (decoding)."""

    req: Request
    slot: int
    output: Output  # its text, stops and logprobs as tokens come (``jserve.output``)
    prompt_done: int = 0  # prompt tokens whose keys/values are in the slot (reused or dispatched)
    live_since: float = float("inf")  # when its first token was handled (it streams from then on)
    spec: Drafting | None = None  # speculative decoding: this run drafts (``jserve.speculative``)
    seed: int = 0  # its sampling seed (kept for a resumption after preemption)
    refeed: list[int] | None = None  # preempted: the tokens to run in again (prompt and output but the last)

    @classmethod
    def start(cls, req: Request, slot: int, reused: int, tokenizer: TextTokenizer | None,
              eos_token_ids: frozenset[int], top_logprobs: int, speculate: bool) -> Running:
        """``req`` in ``slot`` with ``reused`` prompt tokens cached; ``speculate``: it drafts."""
        from jserve.output import Output

        p = req.params
        detok = tokenizer.detokenizer(p.skip_special_tokens) if tokenizer is not None else None
        output = Output(p, len(req.prompt_ids), detok, eos_token_ids, top_logprobs, req.matcher, cached_tokens=reused)
        spec = Drafting(PromptLookup(req.prompt_ids)) if speculate else None
        return cls(req=req, slot=slot, output=output, prompt_done=reused, spec=spec)

    @property
    def generated(self) -> int:
        return self.output.generated

    def take(self, token: TokenOut) -> tuple[str | None, StreamOutput]:
        """Take one new token; returns its finish reason (or None) and the piece to hand out.
        Raises if the token is refused (structured output)."""
        reason, out = self.output.add(token)
        if self.spec is not None:
            self.spec.append(out.token_ids[0])
        return reason, out

    def draft_room(self, spec_tokens: int, max_len: int) -> int:
        """The most tokens it may draft now: ``spec_tokens``, within its max_tokens and its slot."""
        length = len(self.req.prompt_ids) + self.generated - 1  # the position of the last token
        return min(spec_tokens, self.req.params.max_tokens - self.generated - 1, max_len - 1 - length)

    def cache_tokens(self) -> np.ndarray:
        """Token ids whose keys/values this run has put in its slot (the last output token has
        not been fed to a step yet)."""
        prompt = self.req.prompt_ids
        fed = self.fed
        if self.prompt_done < len(fed):
            return np.asarray(fed[:self.prompt_done], np.int64)
        return np.asarray(prompt + self.output.token_ids[:-1], np.int64)

    @property
    def fed(self) -> list[int]:
        """The tokens its prefill runs in: the prompt, or after a preemption ``refeed``."""
        return self.req.prompt_ids if self.refeed is None else self.refeed

    def written(self) -> int:
        """Positions whose keys/values it has put in its pages (``len(cache_tokens())``)."""
        if self.prompt_done < len(self.fed):
            return self.prompt_done
        return len(self.req.prompt_ids) + max(self.generated - 1, 0)


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


def allowed_masks(matchers: Mapping[int, Any], rows: int, words: int) -> np.ndarray | None:
    """The engine's allowed-token bitmasks ``[rows, words]`` int32 for the rows whose request is
    constrained (``matchers``: row -> its matcher or None; the other rows allow everything), or
    None when none is."""
    if all(m is None for m in matchers.values()):
        return None
    from jserve.structured import fill_mask

    masks = np.full((rows, words), -1, np.int32)
    for i, matcher in matchers.items():
        if matcher is not None:
            fill_mask(matcher, masks[i])
    return masks
