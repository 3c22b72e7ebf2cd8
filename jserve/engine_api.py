"""The engine contract: every call the orchestrator makes, and the packed result a step returns.

An engine holds a fixed number of slots (``S``). The orchestrator owns which request is in which
slot; the engine owns the decode state (``State``: opaque to the orchestrator, passed in and
returned by every call, since a JAX engine donates it) and runs the device calls:

- ``begin`` starts a request in a slot, ``copy`` reuses another slot's cached prefix;
- ``extend`` runs prompt chunks (``ChunkRow``) of several slots in one call; a row that ends its
  prompt samples the request's first token;
- ``generate`` advances the live slots by one token; ``verify`` does that and also checks drafted
  tokens per slot (speculative decoding), keeping as many as the model agrees with;
- ``release`` frees a slot on the device.

Every step returns a ``Step``: the new state and a ``StepResult``, one packed array left where
the engine made it (a device array: the loop dispatches the next step before reading it, and
reading it is one device-to-host copy). ``StepResult.host()`` reads it into a ``HostResult``, which
gives each row's tokens as ``TokenOut`` (token, logprob, top alternatives) and whether the row
was active. The packed layout, for engines: ``[R, RESULT_COLS + 2 * top_logprobs]`` float32 for
``extend`` and ``generate``, ``[R, W, ...]`` for ``verify`` (``W`` positions per row, ``ACTIVE``
set on the tokens kept); columns ``TOKEN``, ``LOGPROB``, ``ACTIVE``, then ``top_logprobs`` token
ids, then their logprobs.

``tests/mock_engine.py`` implements this contract with outputs that can be worked out by hand.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Protocol, TypeVar

import numpy as np

if TYPE_CHECKING:
    from jserve.sampling import SamplingParams

# Columns of the packed per-step result ``[R, RESULT_COLS + 2 * top_logprobs]`` (float32).
TOKEN, LOGPROB, ACTIVE = 0, 1, 2
RESULT_COLS = 3

State = TypeVar("State")
Packed = Any  # the packed result: a device array (``jax.Array``) or a host ``np.ndarray``


@dataclasses.dataclass(frozen=True)
class ChunkRow:
    """One row of an ``extend`` call: ``tokens`` (at most ``chunk``) of ``slot`` from position
    ``start``; ``final`` when they end the prompt (the first token is then sampled)."""

    slot: int
    start: int
    tokens: list[int]
    final: bool


def consumed(state: Any) -> bool:
    """Whether a donated state's buffers are gone (a call took it and then failed): the caller
    must start from a new one (``init_state``)."""
    import jax  # only an engine on JAX donates (and JAX is loaded by then)

    return any(x.is_deleted() for x in jax.tree.leaves(state) if hasattr(x, "is_deleted"))


class TokenOut(NamedTuple):
    """One token a step produced for a row: its id, its logprob, and the top alternatives (ids and
    logprobs, best first; as many as the engine's ``top_logprobs``)."""

    token: int
    logprob: float
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    def top(self, n: int) -> list[tuple[int, float]]:
        """The best ``n`` alternatives as (token, logprob) pairs."""
        return [(int(i), float(v)) for i, v in zip(self.top_ids[:n], self.top_logprobs[:n])]


@dataclasses.dataclass(frozen=True)
class HostResult:
    """A step's result on the host, row by row (row i is the call's i-th row: ``rows[i]`` of
    ``extend`` and ``verify``, ``slots[i]`` of ``generate``)."""

    packed: np.ndarray  # [R, cols] or [R, W, cols]

    @property
    def verified(self) -> bool:
        """Whether rows hold several positions (a ``verify`` step's)."""
        return self.packed.ndim == 3

    def active(self, i: int) -> bool:
        """Whether row i produced a token (a final prompt chunk, a live slot)."""
        first = self.packed[i, 0] if self.verified else self.packed[i]
        return bool(first[ACTIVE] > 0.5)

    def tokens(self, i: int) -> list[TokenOut]:
        """The tokens row i kept: its one token (``extend``, ``generate``), or a ``verify`` row's
        accepted drafts then the model's own; empty when the row is inactive."""
        row = self.packed[i]
        rows = row[None] if not self.verified else row[:int(np.sum(row[:, ACTIVE] > 0.5))]
        n = (self.packed.shape[-1] - RESULT_COLS) // 2
        return [TokenOut(int(r[TOKEN]), float(r[LOGPROB]), r[RESULT_COLS:RESULT_COLS + n].astype(np.int64),
                         r[RESULT_COLS + n:RESULT_COLS + 2 * n]) for r in rows if r[ACTIVE] > 0.5]


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One step call's result, left where the engine made it (``packed``: a device array or a host
    ``np.ndarray``) until ``host()`` reads it. ``np.asarray(result)`` gives the packed array."""

    packed: Packed

    def host(self) -> HostResult:
        return HostResult(np.asarray(self.packed))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.packed, dtype)


class Step(NamedTuple, Generic[State]):
    """What ``extend``, ``generate`` and ``verify`` return: ``state, result = engine.generate(...)``."""

    state: State
    result: StepResult


def step(out: tuple[Any, Packed]) -> Step:
    """A ``Step`` from a compiled call's ``(state, packed)``."""
    return Step(out[0], StepResult(out[1]))


class DraftRow(NamedTuple):
    """One row of a ``verify`` call: a live slot and the tokens drafted for it (maybe none)."""

    slot: int
    draft: list[int]


class Engine(Protocol[State]):
    """What the orchestrator needs from an engine (``jserve.engine.JaxEngine`` in production)."""

    slots: int  # S: batch slots
    max_len: int  # positions per slot (prompt and output)
    max_prompt_len: int
    vocab_size: int
    top_logprobs: int  # alternatives packed per result row
    chunk: int  # prompt positions per ``extend`` row
    mask_words: int  # int32 words of one allowed-token bitmask (``ceil(V / 32)``)
    speculate: int  # the most drafted tokens ``verify`` checks per slot (0: no speculative decoding)

    @property
    def max_rows(self) -> int:
        """The most rows one ``extend`` call takes."""

    def init_state(self) -> State: ...

    def check_prompt(self, n: int) -> None:
        """Raise ``ValueError`` unless a prompt of ``n`` tokens fits."""

    def begin(self, state: State, slot: int, prompt: list[int], params: SamplingParams, seed: int) -> State:
        """Start a request in ``slot`` (its sampling parameters, penalties over ``prompt``)."""

    def copy(self, state: State, src: int, dst: int, n: int) -> State:
        """Copy the first ``n`` cached positions of slot ``src`` into slot ``dst``."""

    def extend(self, state: State, rows: list[ChunkRow], masks: np.ndarray | None = None) -> Step[State]:
        """Run ``rows`` (at most ``ready_rows()``); result row r is ``rows[r]``'s first token when
        it is final, else inactive. ``masks [max_rows, mask_words]``: allowed first tokens per row."""

    def generate(self, state: State, mask: np.ndarray | None = None,
                 slots: list[int] | None = None) -> Step[State]:
        """One token for each live slot of ``slots`` (default all); result row i is ``slots[i]``'s.
        ``mask [S, mask_words]``: allowed tokens per slot (indexed by slot)."""

    def verify(self, state: State, rows: list[DraftRow], width: int | None = None) -> Step[State]:
        """A decode step that also checks each row's draft; result ``[R, width, cols]``, row i is
        ``rows[i]``'s with ``ACTIVE`` set on the tokens kept (accepted drafts, then one more)."""

    def verify_bucket(self, n: int) -> int:
        """The row count a ``verify`` call of ``n`` rows is padded to."""

    def verify_width(self, n_draft: int, rows_bucket: int = 1) -> int:
        """The narrowest width at ``rows_bucket`` rows that holds a draft of ``n_draft`` tokens."""

    def ready_widths(self, rows_bucket: int) -> tuple[int, ...]:
        """The ``verify`` widths at ``rows_bucket`` rows that run now without compiling."""

    def ready_rows(self) -> int:
        """The most rows one ``extend`` call takes now without compiling."""

    def is_ready(self, key: tuple) -> bool:
        """Whether the call ``key`` (``("extend", rows)``, ``("verify", rows, width)``, ...) runs
        without compiling."""

    def release(self, state: State, slot: int) -> State:
        """Free ``slot`` on the device (inactive; its cached positions stay for ``copy``)."""
