"""Structured output: the tokens a constrained request may take next, from llguidance.

A ``Constraint`` (``jserve.constraint``: JSON schema, any JSON object, regular expression, or a
choice among strings) is compiled at the edge into an ``llguidance.LLMatcher``; a bad schema or regex is an
``InvalidRequestError`` there. Compiled matchers are kept (the last ``Grammars.CACHED`` distinct
constraints): a request whose constraint was seen before (an agent resends the same tools every
turn) gets a copy of the kept one, in microseconds instead of the milliseconds a compile takes.
While the request runs, the orchestrator asks its matcher for the bitmask of allowed tokens
before each step (``mask``), the engine applies it on the device inside the step, and the matcher
consumes each sampled token (``advance``). When the grammar is complete (the JSON object closed,
the regex matched as far as it can go) the request ends with finish reason ``stop``.
Unconstrained requests carry no matcher and cost nothing here.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

import numpy as np

from jserve.constraint import KINDS, MAX_CHOICES, MAX_CONSTRAINT_CHARS, Constraint
from jserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

__all__ = ["KINDS", "MAX_CHOICES", "MAX_CONSTRAINT_CHARS", "Constraint", "Grammars", "advance", "fill_mask"]


class Grammars:
    """Compiles constraints into matchers over one tokenizer (built once, on first use), keeping
    the ``CACHED`` most recently used ones compiled: each request gets its own copy."""

    CACHED = 32

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._source = tokenizer
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._eos = eos_token_ids
        self._tok = None
        self._unusable: str | None = None  # why llguidance cannot take this tokenizer, once it refused it
        self._lock = threading.Lock()
        self._compiled: collections.OrderedDict[Constraint, Any] = collections.OrderedDict()  # never advanced
        self.compiles = 0  # constraints compiled (the others were copied)

    def _tokenizer(self):
        with self._lock:
            if self._tok is None:
                if self._source is None:
                    raise InvalidRequestError("structured output needs the checkpoint's tokenizer")
                if self._unusable is None:
                    try:
                        self._tok = self._source.llguidance_tokenizer(self.vocab_size, self._eos)
                    except (ValueError, TypeError, RuntimeError) as e:  # a tokenizer llguidance cannot read
                        reason = (str(e).splitlines() or [type(e).__name__])[0]
                        self._unusable = ("structured output (response_format, tools, guided_*) is not available "
                                          f"with this model's tokenizer: llguidance refused it ({reason})")
                        log.warning("%s", self._unusable)
                if self._tok is None:  # refused now or before: every such request gets the reason, a 400
                    raise InvalidRequestError(self._unusable, code="unsupported_parameter")
            return self._tok

    def matcher(self, constraint: Constraint):
        """A fresh matcher for ``constraint`` (a copy of the compiled one when it was compiled
        before); ``InvalidRequestError`` if it does not compile (such a constraint is not kept)."""
        if not isinstance(constraint.value, (str, tuple)):  # unhashable (a list of choices): not kept
            return self._compile(constraint)
        with self._lock:
            kept = self._compiled.get(constraint)
            if kept is not None:
                self._compiled.move_to_end(constraint)
                return kept.deep_copy()
        m = self._compile(constraint)
        with self._lock:
            self._compiled[constraint] = m
            self._compiled.move_to_end(constraint)
            while len(self._compiled) > self.CACHED:
                self._compiled.popitem(last=False)
            return m.deep_copy()

    def _compile(self, constraint: Constraint):
        from llguidance import LLMatcher

        grammar = constraint.grammar()
        tok = self._tokenizer()
        m = LLMatcher(tok, grammar, log_level=0)
        if m.is_error():
            raise InvalidRequestError(f"the {constraint.kind} constraint is invalid: {m.get_error()}")
        with self._lock:
            self.compiles += 1
        return m


def fill_mask(matcher, out: np.ndarray) -> None:
    """Write ``matcher``'s allowed-token bitmask into ``out`` (``[words]`` int32, contiguous; bit i of
    word w: token 32 w + i)."""
    matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.size * out.itemsize)


def advance(matcher, token: int) -> str | None:
    """Feed a sampled token; ``"stop"`` when the grammar is complete, ``"error: ..."`` if the
    matcher refuses it (it cannot, when its mask was applied), else None."""
    matcher.consume_token(token)
    if matcher.is_error():
        return "error: " + matcher.get_error()
    if matcher.is_stopped():
        return "stop"
    return None
