"""A mock engine whose tokens can be worked out by hand, for exact and fast orchestrator tests.

It implements ``jserve.engine_api.Engine`` on the host, with no JAX: a slot's cache is a list of
the tokens fed to it, and the next token after a sequence is ``next_token(seq) = (seq[-1] + 1) %
vocab_size`` (so prompt ``[3, 9]`` continues ``10, 11, 12, ...``). ``verify`` keeps each drafted
token that equals the rule's, then the rule's own next one, as the real engine does.

It checks what the orchestrator asks of it, and raises when the contract is broken: chunks must
go where the slot's cache holds every position before them, a prompt's last chunk must leave the cache
holding exactly the prompt given to ``begin`` (so a prefix reused or copied from the wrong slot,
or a chunk at the wrong place, fails the request), a step must not touch a slot that was never
started. Every call is logged (``calls``), ``before_step[n]()`` runs at the start of the n-th
decode step (``generate`` or ``verify``), on the loop's thread, a step waits while ``steps_open``
is cleared, and ``fail`` injects a fault.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import numpy as np

from jserve.engine_api import ACTIVE, LOGPROB, RESULT_COLS, TOKEN, ChunkRow, DraftRow, Step, StepResult
from jserve.sampling import SamplingParams

LOGPROB_VALUE = -0.25  # every token's logprob


def alternatives(token: int, n: int, vocab_size: int) -> list[tuple[int, float]]:
    """The top ``n`` (token, logprob) the mock reports beside ``token``: itself first, then the ids after it."""
    return [((token + j) % vocab_size, LOGPROB_VALUE - j) for j in range(n)]


def next_token(seq: list[int], vocab_size: int) -> int:
    return (seq[-1] + 1) % vocab_size


def continuation(prompt: list[int], n: int, vocab_size: int) -> list[int]:
    """The ``n`` tokens the rule gives after ``prompt`` (the independent reference)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq, vocab_size))
    return seq[len(prompt):]


@dataclasses.dataclass
class MockState:
    cache: list[list[int]]  # per slot: tokens whose keys/values are "cached"
    prompt: list[list[int] | None]  # per slot: the prompt given to ``begin``
    last: list[int]  # per slot: the token to feed next
    active: list[bool]


class MockEngine:
    """``Engine`` over ``slots`` slots. ``rows``: the most rows an ``extend`` call takes;
    ``speculate``: the most drafts ``verify`` checks per row (0: none); ``gate``: when given,
    ``init_state`` waits for it (a test queues requests, then opens it: admission is then exact)."""

    def __init__(self, slots: int = 2, max_len: int = 64, vocab_size: int = 64, chunk: int = 4, rows: int = 2,
                 speculate: int = 0, gate: threading.Event | None = None, top_logprobs: int = 0,
                 max_prompt_len: int | None = None):
        self.slots, self.max_len, self.vocab_size, self.chunk = slots, max_len, vocab_size, chunk
        self.max_prompt_len = max_len - 1 if max_prompt_len is None else max_prompt_len
        self.top_logprobs = top_logprobs  # alternatives: the token, then the next ids, logprobs LOGPROB_VALUE - j
        self.mask_words = -(-vocab_size // 32)
        self.speculate = speculate
        self.rows = rows
        self.gate = gate
        self.calls: list[tuple] = []  # ("begin", slot, prompt) ("copy", src, dst, n) ("extend", rows) ...
        self.steps = 0  # decode steps (generate and verify calls)
        self.before_step: dict[int, Callable[[], None]] = {}
        self.steps_open = threading.Event()  # cleared: each decode step waits for it (``held`` counts them)
        self.steps_open.set()
        self.held = 0
        self.fail: dict[str, int] = {}  # call name -> the call number (1-based) that raises once
        self._counts: dict[str, int] = {}

    # ---- what tests read -------------------------------------------------------------------
    def log(self, name: str) -> list[tuple]:
        return [c[1:] for c in self.calls if c[0] == name]

    # ---- the contract ----------------------------------------------------------------------
    @property
    def max_rows(self) -> int:
        return self.rows

    def _called(self, name: str, *args) -> None:
        n = self._counts[name] = self._counts.get(name, 0) + 1
        self.calls.append((name, *args))
        if self.fail.get(name) == n:
            raise RuntimeError(f"injected {name} fault")

    def init_state(self) -> MockState:
        if self.gate is not None:
            self.gate.wait(60)
        self._called("init_state")
        s = self.slots
        return MockState(cache=[[] for _ in range(s)], prompt=[None] * s, last=[0] * s, active=[False] * s)

    def check_prompt(self, n: int) -> None:
        if not 1 <= n <= self.max_prompt_len:
            raise ValueError(f"prompt of {n} tokens must have 1..max_prompt_len={self.max_prompt_len} tokens")

    def begin(self, state: MockState, slot: int, prompt: list[int], params: SamplingParams, seed: int) -> MockState:
        self._called("begin", slot, list(prompt))
        self.check_prompt(len(prompt))
        if state.active[slot]:
            raise AssertionError(f"begin in slot {slot}, which is live")
        state.prompt[slot] = list(prompt)  # its cache keeps what it held: a prompt may reuse a prefix of it
        return state

    def copy(self, state: MockState, src: int, dst: int, n: int) -> MockState:
        self._called("copy", src, dst, n)
        if n > len(state.cache[src]):
            raise AssertionError(f"copy of {n} positions from slot {src}, which holds {len(state.cache[src])}")
        state.cache[dst] = state.cache[src][:n]
        return state

    def extend(self, state: MockState, rows: list[ChunkRow], masks: np.ndarray | None = None) -> Step[MockState]:
        self._called("extend", [(r.slot, r.start, list(r.tokens), r.final) for r in rows])
        if not 1 <= len(rows) <= self.rows:
            raise AssertionError(f"extend of {len(rows)} rows (at most {self.rows})")
        out = np.zeros((len(rows), RESULT_COLS + 2 * self.top_logprobs), np.float32)
        for i, row in enumerate(rows):
            cache = state.cache[row.slot]
            if state.prompt[row.slot] is None or state.active[row.slot]:
                raise AssertionError(f"extend of slot {row.slot}, which was not begun")
            if not 1 <= len(row.tokens) <= self.chunk:
                raise AssertionError(f"a chunk of {len(row.tokens)} tokens (at most {self.chunk})")
            if row.start > len(cache):
                raise AssertionError(f"chunk at {row.start} of slot {row.slot}, whose cache ends at {len(cache)}")
            del cache[row.start:]  # what it held past here is overwritten
            cache.extend(row.tokens)
            if row.final:
                if cache != state.prompt[row.slot]:
                    raise AssertionError(f"slot {row.slot} holds {cache}, not its prompt {state.prompt[row.slot]}")
                token = next_token(cache, self.vocab_size)
                state.last[row.slot], state.active[row.slot] = token, True
                out[i] = self._row(token)
        return Step(state, StepResult(out))

    def _row(self, token: int) -> np.ndarray:
        """A packed result row for ``token`` (active), with its alternatives."""
        row = np.zeros(RESULT_COLS + 2 * self.top_logprobs, np.float32)
        row[[TOKEN, LOGPROB, ACTIVE]] = token, LOGPROB_VALUE, 1.0
        for j, (t, lp) in enumerate(alternatives(token, self.top_logprobs, self.vocab_size)):
            row[RESULT_COLS + j], row[RESULT_COLS + self.top_logprobs + j] = t, lp
        return row

    def _step(self, name: str, *args) -> None:
        self.steps += 1
        action = self.before_step.pop(self.steps, None)
        if action is not None:
            action()
        if not self.steps_open.is_set():
            self.held += 1
            self.steps_open.wait(60)
        self._called(name, *args)

    def _feed(self, state: MockState, slot: int) -> int:
        """Feed a live slot its last token; returns the rule's next one."""
        cache = state.cache[slot]
        if len(cache) >= self.max_len:
            raise AssertionError(f"slot {slot} is full")
        cache.append(state.last[slot])
        return next_token(cache, self.vocab_size)

    def generate(self, state: MockState, mask: np.ndarray | None = None,
                 slots: list[int] | None = None) -> Step[MockState]:
        slots = list(range(self.slots)) if slots is None else list(slots)
        self._step("generate", slots)
        out = np.zeros((len(slots), RESULT_COLS + 2 * self.top_logprobs), np.float32)
        for i, slot in enumerate(slots):
            if state.active[slot]:
                state.last[slot] = self._feed(state, slot)
                out[i] = self._row(state.last[slot])
        return Step(state, StepResult(out))

    def widths_for(self, rows_bucket: int) -> tuple[int, ...]:
        return (1, self.speculate + 1) if self.speculate else ()

    def verify_bucket(self, n: int) -> int:
        if not 1 <= n <= self.slots:
            raise ValueError(f"verify takes 1..{self.slots} rows, got {n}")
        return next(b for b in (1, 2, 4, 8, 16, 32, 64, self.slots) if b >= n)

    def verify_width(self, n_draft: int, rows_bucket: int = 1) -> int:
        w = next((w for w in self.widths_for(rows_bucket) if w > n_draft), None)
        if w is None or n_draft < 0:
            raise ValueError(f"{n_draft} drafted tokens exceed speculate={self.speculate}")
        return w

    def verify(self, state: MockState, rows: list[DraftRow], width: int | None = None) -> Step[MockState]:
        self._step("verify", [(r.slot, list(r.draft)) for r in rows], width)
        if not self.speculate:
            raise AssertionError("verify on an engine built without speculation")
        width = self.verify_width(max(len(r.draft) for r in rows)) if width is None else width
        out = np.zeros((len(rows), width, RESULT_COLS + 2 * self.top_logprobs), np.float32)
        for i, (slot, draft) in enumerate(rows):
            if len(draft) >= width:
                raise AssertionError(f"a draft of {len(draft)} tokens at width {width}")
            if not state.active[slot]:
                continue
            kept = [self._feed(state, slot)]
            for d in draft:
                if d != kept[-1]:
                    break
                state.last[slot] = d
                kept.append(self._feed(state, slot))
            state.last[slot] = kept[-1]
            for j, token in enumerate(kept):
                out[i, j] = self._row(token)
        return Step(state, StepResult(out))

    def ready_widths(self, rows_bucket: int) -> tuple[int, ...]:
        return self.widths_for(rows_bucket)

    def ready_rows(self) -> int:
        return self.rows

    def is_ready(self, key: tuple) -> bool:
        return True

    def release(self, state: MockState, slot: int) -> MockState:
        self._called("release", slot, self.steps)
        state.active[slot] = False
        return state


class LetterTokenizer:
    """Token t is the letter ``"abcdefghijklmnopqrstuvwxyz"[t % 26]``: text is worked out by hand too."""

    @staticmethod
    def text(tokens: list[int]) -> str:
        return "".join(chr(ord("a") + t % 26) for t in tokens)

    def detokenizer(self, skip_special_tokens: bool = True) -> _Letters:
        return _Letters()


class _Letters:
    def add(self, token: int) -> str:
        return LetterTokenizer.text([token])

    def flush(self) -> str:
        return ""


# ---- a real tokenizer whose text is worked out by hand -------------------------------------------
LETTERS = [*"abcdefghijklmnopqrstuvwxyz", " ", ".", "\n"]  # ids 0..28: one character each
BOS, UNK, EOS = 29, 30, 31  # "<s>", "<unk>", "</s>": special (left out of text)
LETTERS_VOCAB = 32
# "<s>user hi\n<s>assistant ": a chat ends in " " (26), so its reply runs ". \n <s> <unk> </s>" (27..31).
LETTERS_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<s>assistant {% endif %}")


def letters_text(tokens: list[int]) -> str:
    """What ``letters_tokenizer`` decodes ``tokens`` to (special ones left out), by the table above."""
    return "".join(LETTERS[t] for t in tokens if t < len(LETTERS))


def letters_ids(text: str) -> list[int]:
    return [LETTERS.index(c) if c in LETTERS else UNK for c in text]


def letters_tokenizer():
    """A ``jserve.tokenizer.TextTokenizer`` (a real ``tokenizers`` BPE without merges: one token a
    character) whose vocabulary is ``LETTERS`` plus three special tokens, with a chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    from jserve.tokenizer import TextTokenizer, TokenizerConfig

    vocab = {c: i for i, c in enumerate(LETTERS)}
    tok = Tokenizer(models.BPE(vocab={**vocab, "<s>": BOS, "<unk>": UNK, "</s>": EOS}, merges=[], unk_token="<unk>"))
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("<unk>", special=True),
                            AddedToken("</s>", special=True)])
    tok.decoder = decoders.Fuse()
    assert tok.token_to_id("<s>") == BOS and tok.token_to_id("</s>") == EOS
    return TextTokenizer(tok, TokenizerConfig(bos_token_id=BOS, eos_token_ids=(EOS,), chat_template=LETTERS_TEMPLATE,
                                              special_ids=(BOS, UNK, EOS)))
