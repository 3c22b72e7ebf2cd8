"""One request's output as it streams: detokenizing, stop tokens and strings, logprobs, finish.

The orchestrator's loop schedules steps; each new token (``engine_api.TokenOut``) is handed to the
request's ``Output``, which turns it into the piece a client sees (``StreamOutput``) and says
whether the request ends there. Everything about text lives here: the incremental detokenizer,
stop token ids (EOS unless ``ignore_eos``), stop strings (text held back while it may still grow
into one, cut where one starts), ``max_tokens``, structured output's verdict, logprobs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jserve.engine_api import TokenOut
from jserve.sampling import SamplingParams
from jserve.stops import StopMatcher
from jserve.structured import advance
from jserve.tokenizer import IncrementalDetokenizer

STOP, LENGTH, CANCELLED, DEADLINE, ERROR = "stop", "length", "cancelled", "deadline", "error"


@dataclasses.dataclass
class StreamOutput:
    """One piece of a request's stream: the text and tokens new since the previous piece.

    ``finish_reason`` is set on the last piece only (stop, length, cancelled, deadline, error).
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache


class Output:
    """The output of one request: ``add`` each new token, ``finish`` once it ends
    other than by its own token (cancel, deadline, error, shutdown).

    ``detok``: the request's incremental detokenizer (None: token ids only, no text or stop
    strings); ``eos_token_ids``: what ends it unless ``ignore_eos``; ``top_logprobs``: the
    alternatives the engine packs per row; ``matcher``: structured output's matcher, or None;
    ``cached_tokens``: prompt tokens reused from the prefix cache (reported on every piece)."""

    def __init__(self, params: SamplingParams, prompt_tokens: int, detok: IncrementalDetokenizer | None,
                 eos_token_ids: frozenset[int] | tuple[int, ...] = (), top_logprobs: int = 0,
                 matcher: Any = None, cached_tokens: int = 0):
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.detok = detok
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos
                                                            else frozenset(eos_token_ids))
        self.stops = StopMatcher(params.stop)
        self.top_logprobs = top_logprobs
        self.matcher = matcher
        self.cached_tokens = cached_tokens
        self.token_ids: list[int] = []
        self.text = ""  # detokenized so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of ``text`` handed out

    @property
    def generated(self) -> int:
        return len(self.token_ids)

    def add(self, new: TokenOut) -> tuple[str | None, StreamOutput]:
        """Take one new token (with its logprob and top alternatives); returns its finish reason
        (or None) and the piece to hand out. Raises if structured output rejects it."""
        p = self.params
        token = new.token
        self.token_ids.append(token)
        tops = []
        if p.logprobs and self.top_logprobs:
            tops = [new.top(min(p.logprobs, self.top_logprobs))]
        reason = None
        start = len(self.text)
        if token in self.stop_ids:
            reason = STOP
        else:
            if self.detok is not None:
                self.text += self.detok.add(token)
            if self.matcher is not None:
                verdict = advance(self.matcher, token)
                if verdict is not None and verdict.startswith("error"):
                    raise RuntimeError(f"structured output: {verdict}")
                if verdict == "stop":  # the grammar is complete: nothing else may follow
                    reason = STOP
        if reason is None and self.generated >= p.max_tokens:
            reason = LENGTH
        if reason is not None and self.detok is not None:
            self.text += self.detok.flush()
        end = len(self.text)
        if p.stop and self.detok is not None:
            hit = self.stops.feed(self.text[start:])
            if hit is not None:
                end = hit
                self.text = self.text[:end]
                reason = STOP
            elif reason is None:
                end = len(self.text) - self.stops.held_back
        piece = self.text[self.emitted:end]
        self.emitted = end
        lps = [new.logprob] if p.logprobs is not None else []
        return reason, StreamOutput(text=piece, token_ids=[token], logprobs=lps, top_logprobs=tops,
                                    prompt_tokens=self.prompt_tokens, completion_tokens=self.generated,
                                    finish_reason=reason, cached_tokens=self.cached_tokens)

    def finish(self, reason: str, error: str | None = None) -> StreamOutput:
        """The last piece of a request that ended for ``reason`` after its last token's piece: the
        text held back for a stop string that never came (none after an error)."""
        tail = ""
        if reason != ERROR and self.detok is not None:
            tail = self.text[self.emitted:] + self.detok.flush()
            self.emitted = len(self.text)
        return StreamOutput(tail, [], [], [], self.prompt_tokens, self.generated, finish_reason=reason,
                            error=error, cached_tokens=self.cached_tokens)
