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

Every step returns the state and one packed result array (one device-to-host copy per step):
``[R, RESULT_COLS + 2 * top_logprobs]`` float32 for ``extend`` and ``generate``, ``[R, W, ...]``
for ``verify`` (``W`` positions per row, ``ACTIVE`` set on the tokens kept). Its columns:
``TOKEN``, ``LOGPROB``, ``ACTIVE``, then ``top_logprobs`` (token, logprob) pairs.

``tests/mock_engine.py`` implements this contract with outputs that can be worked out by hand.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

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


def kept(result: np.ndarray, i: int) -> np.ndarray:
    """The tokens ``[K, cols]`` of row ``i`` of a step's packed result on the host: its one token
    (``extend``, ``generate``), or the tokens a ``verify`` row kept (accepted drafts, then the
    model's own; at least one row, inactive if the slot was)."""
    row = result[i]
    if result.ndim == 2:
        return row[None]
    return row[:max(int(np.sum(row[:, ACTIVE] > 0.5)), 1)]


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

    def extend(self, state: State, rows: list[ChunkRow],
               masks: np.ndarray | None = None) -> tuple[State, Packed]:
        """Run ``rows`` (at most ``ready_rows()``); result row r is ``rows[r]``'s first token when
        it is final, else inactive. ``masks [max_rows, mask_words]``: allowed first tokens per row."""

    def generate(self, state: State, mask: np.ndarray | None = None,
                 slots: list[int] | None = None) -> tuple[State, Packed]:
        """One token for each live slot of ``slots`` (default all); result row i is ``slots[i]``'s.
        ``mask [S, mask_words]``: allowed tokens per slot (indexed by slot)."""

    def verify(self, state: State, rows: list[DraftRow],
               width: int | None = None) -> tuple[State, Packed]:
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
