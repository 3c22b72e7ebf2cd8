"""Several processes, one model: ``jax.distributed`` plus a leader that tells followers what to run.

Every process of a multi-host run holds some of the mesh's devices, and a sharded computation
only runs when *every* process launches it, in the same order. Process 0 (the leader) runs the
orchestrator and the gRPC server; its engine is a ``LeaderEngine``, which before each engine
call broadcasts a small fixed-size command (the op, the slot, the prompt's token ids or the
rows of prompt chunks, the sampling row) to the others with ``multihost_utils.broadcast_one_to_all``. Each other process
(a follower) runs ``follow``: receive a command, make the same engine call, repeat, until the
leader says stop. Results are read on the leader only.

While the leader is idle it sends a no-op now and then, so followers blocked in the broadcast
never sit in one collective long enough to time out.
"""

from __future__ import annotations

import logging
import threading
import time

import jax
import numpy as np

from jserve.engine import ChunkRow, DecodeState, JaxEngine
from jserve.engine_api import Step, StepResult
from jserve.sampling import SamplingParams, seed_to_key

log = logging.getLogger(__name__)

NOOP, INIT, BEGIN, COPY, EXTEND, GENERATE, RELEASE, STOP = range(8)
OP_NAMES = ("noop", "init", "begin", "copy", "extend", "generate", "release", "stop")
# Command layout (int32): op, slot, payload length, top_k, key (2 words), logprobs (-1: none),
# 6 float32 fields as bits, payload: a prompt's tokens (begin); source, count (copy); per row
# slot, start, count, final, then ``chunk`` tokens (extend).
FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
HEADER = 7 + len(FLOATS)
HEARTBEAT_S = 5.0


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """``jax.distributed.initialize``; arguments left out come from JAX's environment detection
    (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, or a TPU slice / SLURM)."""
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    log.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def encode(op: int, width: int, slot: int = 0, tokens: list[int] | None = None,
           params: SamplingParams | None = None, seed: int = 0) -> np.ndarray:
    cmd = np.zeros((HEADER + width,), np.int32)
    cmd[0], cmd[1] = op, slot
    if tokens is not None:
        cmd[2] = len(tokens)
        cmd[HEADER:HEADER + len(tokens)] = tokens
    if params is not None:
        cmd[3] = params.top_k
        cmd[4:6] = seed_to_key(seed).view(np.int32)
        cmd[6] = -1 if params.logprobs is None else params.logprobs
        cmd[7:HEADER] = np.array([getattr(params, f) for f in FLOATS], np.float32).view(np.int32)
    return cmd


def decode(cmd: np.ndarray) -> tuple[int, int, list[int], SamplingParams, int]:
    """``(op, slot, tokens, sampling params, seed)`` of a command."""
    op, slot, n, top_k = (int(x) for x in cmd[:4])
    hi, lo = (int(x) for x in cmd[4:6].view(np.uint32))
    logprobs = int(cmd[6])
    floats = cmd[7:HEADER].view(np.float32)
    params = SamplingParams(top_k=top_k, logprobs=None if logprobs < 0 else logprobs,
                            **{f: float(v) for f, v in zip(FLOATS, floats)})
    return op, slot, cmd[HEADER:HEADER + n].tolist(), params, (hi << 32) | lo


def payload_width(engine: JaxEngine) -> int:
    return max(engine.cache_len, engine.max_rows * (4 + engine.chunk))


def encode_rows(rows: list[ChunkRow], chunk: int) -> list[int]:
    out = []
    for r in rows:
        out += [r.slot, r.start, len(r.tokens), int(r.final)] + list(r.tokens) + [0] * (chunk - len(r.tokens))
    return out


def decode_rows(words: list[int], chunk: int) -> list[ChunkRow]:
    rows, step = [], 4 + chunk
    for i in range(0, len(words), step):
        slot, start, n, final = words[i:i + 4]
        rows.append(ChunkRow(slot, start, words[i + 4:i + 4 + n], bool(final)))
    return rows


class LeaderEngine:
    """``JaxEngine`` on process 0 that mirrors every call to the follower processes."""

    def __init__(self, engine: JaxEngine):
        self.engine = engine
        self.slots, self.max_len, self.max_prompt_len = engine.slots, engine.max_len, engine.max_prompt_len
        self.vocab_size, self.top_logprobs = engine.vocab_size, engine.top_logprobs
        self.chunk, self.max_rows, self.mask_words = engine.chunk, engine.max_rows, engine.mask_words
        self.speculate = 0  # verify is not mirrored: ``LLM`` builds none across processes
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._closed = threading.Event()
        threading.Thread(target=self._heartbeat, name="jserve-heartbeat", daemon=True).start()

    def _send(self, op: int, **fields) -> None:
        from jax.experimental import multihost_utils

        multihost_utils.broadcast_one_to_all(encode(op, payload_width(self.engine), **fields))
        self._last = time.monotonic()

    def _heartbeat(self) -> None:
        while not self._closed.wait(HEARTBEAT_S / 2):
            with self._lock:
                if not self._closed.is_set() and time.monotonic() - self._last > HEARTBEAT_S:
                    self._send(NOOP)

    def init_state(self) -> DecodeState:
        with self._lock:
            self._send(INIT)
            return self.engine.init_state()

    def begin(self, state: DecodeState, slot: int, prompt: list[int], params: SamplingParams,
              seed: int) -> DecodeState:
        self.engine.check_prompt(len(prompt))  # refuse before telling anyone
        with self._lock:
            self._send(BEGIN, slot=slot, tokens=prompt, params=params, seed=seed)
            return self.engine.begin(state, slot, prompt, params, seed)

    def copy(self, state: DecodeState, src: int, dst: int, n: int) -> DecodeState:
        with self._lock:
            self._send(COPY, slot=dst, tokens=[src, n])
            return self.engine.copy(state, src, dst, n)

    def extend(self, state: DecodeState, rows: list[ChunkRow], masks=None):
        if masks is not None:  # LLM refuses structured output across processes: masks are not mirrored
            raise ValueError("structured output is not supported across several processes")
        self.engine.rows_bucket(len(rows))
        with self._lock:
            self._send(EXTEND, tokens=encode_rows(rows, self.engine.chunk))
            return self.engine.extend(state, rows)

    def generate(self, state: DecodeState, mask=None, slots=None):
        if mask is not None:
            raise ValueError("structured output is not supported across several processes")
        with self._lock:
            self._send(GENERATE)
            state, result = self.engine.generate(state)  # every slot: the followers run the same call
        return Step(state, result if slots is None else StepResult(result.packed[np.asarray(slots, np.int32)]))

    def release(self, state: DecodeState, slot: int) -> DecodeState:
        with self._lock:
            self._send(RELEASE, slot=slot)
            return self.engine.release(state, slot)

    def ready_rows(self) -> int:
        return self.engine.ready_rows()  # every call was compiled at start: several processes warm up alike

    def is_ready(self, key: tuple) -> bool:
        return self.engine.is_ready(key)

    def check_prompt(self, n: int) -> None:
        self.engine.check_prompt(n)

    # No speculative decoding across processes (``speculate`` is 0): the orchestrator never drafts,
    # and a verify call reaching here is refused rather than run on process 0 alone.
    def verify_bucket(self, n: int) -> int:
        return self.engine.verify_bucket(n)

    def verify_width(self, n_draft: int, rows_bucket: int = 1) -> int:
        return self.engine.verify_width(n_draft, rows_bucket)

    def ready_widths(self, rows_bucket: int) -> tuple[int, ...]:
        return ()

    def verify(self, state: DecodeState, rows, width: int | None = None):
        raise ValueError("speculative decoding is not supported across several processes")

    def close(self) -> None:
        with self._lock:
            if not self._closed.is_set():
                self._closed.set()
                self._send(STOP)


def follow(engine: JaxEngine) -> int:
    """Run the leader's engine calls on this process until it says stop; returns calls made."""
    from jax.experimental import multihost_utils

    state, calls = None, 0
    log.info("process %d following process 0", jax.process_index())
    while True:
        cmd = multihost_utils.broadcast_one_to_all(np.zeros((HEADER + payload_width(engine),), np.int32))
        op, slot, tokens, params, seed = decode(np.asarray(cmd))
        if op == STOP:
            log.info("leader stopped; %d calls followed", calls)
            return calls
        if op == NOOP:
            continue
        calls += 1
        if op == INIT:
            state = engine.init_state()
        elif op == BEGIN:
            state = engine.begin(state, slot, tokens, params, seed)
        elif op == COPY:
            state = engine.copy(state, tokens[0], slot, tokens[1])
        elif op == EXTEND:
            state, _ = engine.extend(state, decode_rows(tokens, engine.chunk))
        elif op == GENERATE:
            state, _ = engine.generate(state)
        elif op == RELEASE:
            state = engine.release(state, slot)
        else:
            raise RuntimeError(f"unknown command {op} from the leader")
