"""Ahead-of-time warm-up of an engine's calls, and what is ready to serve.

``Warmup`` is the half of ``JaxEngine`` that compiles: ``warmup`` compiles (ahead of time) every
call serving uses, the ones any request needs before it returns (and runs them once) and the rest
on a background thread, each published (``is_ready``) only once compiled, so serving never traces
or compiles. The engine gives it its calls' arguments (``_warmup_calls``, built from the engine's
buckets) and its jitted functions; the engine's methods look up ``_compiled`` and call what is
there.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import jax
import numpy as np

from jserve.sampling import SamplingParams, SlotSampling

if TYPE_CHECKING:
    from jserve.engine_steps import DecodeState

log = logging.getLogger("jserve.engine")  # the engine's log: warm-up is its phase (scripts set its level)
WARMUP_THREAD = "jserve-warmup"  # the background phase's thread


class Warmup:
    """Compiled executables and the background phase of ``warmup`` (a base of ``JaxEngine``).

    ``_compiled`` holds the executables compiled (those before SERVING also run once), keyed
    ("extend", rows), ("verify", rows, width), (name, 0): only these serve requests. Written by the
    background thread, read by the serving one (single dict operations, atomic in CPython: never
    iterated while it may grow)."""

    def _init_warmup(self) -> None:
        self._compiled: dict[tuple, jax.stages.Compiled] = {}
        self._spare: DecodeState | None = None  # a fresh state made by warmup: ``init_state``'s first answer
        self.background_keys: tuple[tuple, ...] = ()  # what the last warmup left to its background phase, in order
        self.compile_seconds: dict[tuple, tuple[float, float, float]] = {}  # key: trace, lower, compile (or load)
        self._warmed = False  # before warmup every call compiles on first use, as a plain jit does
        self._background: threading.Thread | None = None
        self._stop = threading.Event()

    def is_ready(self, key: tuple) -> bool:
        """Whether the call ``key`` (``("extend", rows)``, ``("verify", rows, width)``, ...) serves
        without compiling: compiled by ``warmup`` (or, before warmup, always: every call then
        compiles on first use)."""
        return not self._warmed or key in self._compiled

    def ready_rows(self) -> int:
        """The most rows one ``extend`` call takes now without compiling (``max_rows`` once the
        background phase of ``warmup`` is done); a caller with more splits them over several calls."""
        return max((r for r in self.chunk_rows if self.is_ready(("extend", r))), default=self.chunk_rows[0])

    def ready_widths(self, rows_bucket: int) -> tuple[int, ...]:
        """The widths of ``widths_for(rows_bucket)`` that ``verify`` takes now without compiling."""
        return tuple(w for w in self.widths_for(rows_bucket) if self.is_ready(("verify", rows_bucket, w)))

    def _warmup_calls(self) -> dict[tuple, tuple[tuple, dict]]:
        """Each call's arguments besides the state (as serving passes them), in the order warm-up
        runs them: begin, copy, every ``generate`` bucket, every ``extend`` bucket, every ``verify``
        shape, release."""
        i32 = np.int32(0)
        calls: dict[tuple, tuple[tuple, dict]] = {
            ("begin", 0): ((), dict(slot=i32, prompt=np.zeros((self.cache_len,), np.int32), n=np.int32(1),
                                    sampling=SlotSampling.from_params(SamplingParams(), 0))),
            ("copy", 0): ((), dict(src=np.zeros((self.max_pages,), np.int32), dst=np.zeros((self.max_pages,), np.int32),
                                   n=i32)),
        }
        for r in self.decode_rows:
            calls[("generate", r)] = ((self.params,), dict(slots=np.zeros((r,), np.int32), live=np.zeros((r,), bool),
                                                           masks=self._no_masks[r]))
        for r in self.chunk_rows:
            z = np.zeros((r,), np.int32)
            calls[("extend", r)] = ((self.params,), dict(tokens=np.zeros((r, self.chunk), np.int32), slots=z, starts=z,
                                                         counts=z, finals=np.zeros((r,), bool),
                                                         masks=self._no_mask_rows[r]))
        calls[("resume", 0)] = ((), dict(slot=i32, last=i32, length=np.int32(1), steps=np.int32(1),
                                         counts=np.zeros((self.vocab_size,), np.int32)))
        for r in self.verify_rows if self.speculate else ():
            for w in self.widths_for(r):
                z = np.zeros((r,), np.int32)
                calls[("verify", r, w)] = ((self.params,), dict(drafts=np.zeros((r, w - 1), np.int32), slots=z,
                                                                n_draft=z, live=np.zeros((r,), bool)))
        calls[("release", 0)] = ((), dict(slot=i32))
        return calls

    def _compile(self, key: tuple, args: tuple, kwargs: dict, quick: bool = False) -> jax.stages.Compiled:
        """Trace, lower and compile (or, with the persistent cache, load) the call ``key``; its
        seconds in each go to ``compile_seconds``. ``quick``: with LLVM's optimizations off
        (``QUICK``: same bits, compiled in a fraction of the time, runs slower)."""
        jitted = {"begin": self._begin, "copy": self._copy, "extend": self._extend, "generate": self._generate,
                  "verify": self._verify, "release": self._release, "resume": self._resume}[key[0]]
        t0 = time.perf_counter()
        traced = jitted.trace(*args, state=self._state_shape, **kwargs)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        compiled = lowered.compile(QUICK_OPTIONS) if quick else lowered.compile()
        self.compile_seconds[key] = (t1 - t0, t2 - t1, time.perf_counter() - t2)
        return compiled

    def _compile_now(self, keys: list[tuple], calls: dict[tuple, tuple[tuple, dict]],
                     quick: set[tuple]) -> dict[tuple, jax.stages.Compiled]:
        """``_compile`` each of ``keys`` (those in ``quick`` quickly) on up to ``compile_threads()``
        threads (XLA compiles, and loads from the persistent cache, without holding the GIL: one
        call traces while another compiles), the first keys first; returned in ``keys``' order."""
        workers = min(compile_threads(), len(keys)) if jax.process_count() == 1 else 1
        if workers <= 1:
            return {key: self._compile(key, *calls[key], quick=key in quick) for key in keys}
        with ThreadPoolExecutor(workers, thread_name_prefix="jserve-compile") as pool:
            futures = {key: pool.submit(self._compile, key, *calls[key], quick=key in quick) for key in keys}
        return {key: f.result() for key, f in futures.items()}

    @staticmethod
    def _run_once(fn: jax.stages.Compiled, args: tuple, kwargs: dict, state: DecodeState) -> DecodeState:
        out = fn(*args, state=state, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def warmup(self, background: bool = True) -> float:
        """Compile (ahead of time) every call serving uses: the initial state, begin, copy, every
        ``extend`` row bucket, generate, every ``verify`` shape, release. Returns seconds taken
        until the engine can serve any request.

        The compiled executables are kept and called directly, so serving never traces or
        compiles, and with JAX's persistent cache a restart only traces and loads. Those compiled
        before returning are also run once, on a throwaway state: an executable's first run
        carries a one-off cost (0.01-0.2 s on XLA:CPU for SmolLM2 at the defaults), paid here,
        not by the first request; the background phase's are not (see ``_compile_rest``).

        ``background`` (with one process): only what any request needs is done before returning
        (init, begin, copy, the smallest ``extend`` bucket, the decode step over every slot,
        release), compiled on ``compile_threads()`` threads; the decode steps over fewer slots,
        the larger buckets, then the ``verify`` shapes, are compiled by a background thread, in
        that order, each usable (``is_ready``) only when done. Until then prompts run in calls of
        the smallest bucket, decode steps compute every slot's row, and no step verifies.
        ``close`` stops that thread; ``wait_ready`` waits for it. With several processes every
        process must run the same calls in the same order, so everything is done here, in this
        order, on each (one thread).
        """
        self.close()  # a previous warm-up's background phase
        t0 = time.perf_counter()
        calls = self._warmup_calls()
        # Any request is served by these: its first token from the smallest extend bucket, then the
        # decode step over every slot (``decode_bucket``'s fallback until the smaller ones are ready).
        # Heaviest first, so that the threads of ``_compile_now`` finish together.
        now = [("generate", self.decode_rows[-1]), ("extend", self.chunk_rows[0]), ("copy", 0), ("begin", 0),
               ("release", 0)]
        if not background or jax.process_count() > 1:
            now = list(calls)
        quick = {key for key in now if key[0] in QUICK} if background and jax.process_count() == 1 else set()
        later = {key: call for key, call in _background_order(calls).items() if key not in now or key in quick}
        init = self._init.lower().compile()  # the orchestrator's first state, and recovery's
        # The first state ``init_state`` hands out, zeroed while the calls compile (dispatch is
        # asynchronous; 3 GiB at 16 x 4096: seconds the first request would otherwise wait for).
        self._spare = None
        spare = init()
        compiled = self._compile_now(now, calls, quick)
        release_freed_memory()
        compiled = {key: compiled[key] for key in calls if key in compiled}  # run once in the calls' order
        tc = time.perf_counter() - t0
        # Each executable once, on the first state itself (a second state beside it would be the
        # server's peak memory: 180 MiB at the defaults), which is then dropped and made again, zeroed
        # while the server starts listening. Not through the public methods: warm-up is not serving.
        tr = time.perf_counter()
        self._run_each_once(spare, compiled, calls)
        del spare
        release_freed_memory()
        self._spare = init()
        self._compiled[("init", 0)] = init
        self._compiled.update(compiled)
        self._warmed = True
        seconds = time.perf_counter() - t0
        log.info("SERVING-ready calls compiled in %.1f s (%d calls on %d threads; run once in %.1f s); compiling %d "
                 "more in the background%s", tc, len(compiled) + 1,
                 min(compile_threads(), len(now)) if jax.process_count() == 1 else 1,
                 time.perf_counter() - tr, len(later), f": {', '.join(_key_name(k) for k in later)}" if later else "")
        log.info("SERVING-ready calls, seconds to trace + lower + compile (or load) each: %s",
                 self.describe_compile_seconds(now))
        self.background_keys = tuple(later)
        if later:
            self._stop = threading.Event()  # this phase's own: one abandoned by ``close`` may still be compiling
            self._background = threading.Thread(target=self._compile_rest, args=(later, self._stop),
                                                 name=WARMUP_THREAD, daemon=True)
            atexit.register(self._stop_and_wait)  # a daemon thread inside XLA must not outlive the interpreter
            self._background.start()
        return seconds

    def _run_each_once(self, state: DecodeState, compiled: dict[tuple, jax.stages.Compiled],
                       calls: dict[tuple, tuple[tuple, dict]]) -> None:
        """Run each of ``compiled`` once, in its order, on ``state`` (donated: the caller drops it and
        makes a fresh one): an executable's first run carries a one-off cost, paid here. Returns when
        the runs are done, so the state's memory is free when the caller drops its last reference."""
        for key, fn in compiled.items():
            state = self._run_once(fn, *calls[key], state)
        if not self.row_invariant and ("generate", self.slots) in compiled:  # and ``generate``'s ``_take``
            key = ("generate", self.slots)
            state, packed = compiled[key](*calls[key][0], state=state, **calls[key][1])
            self._take(packed, np.zeros((self.slots,), np.int32))
        jax.block_until_ready(state)

    def _compile_rest(self, calls: dict[tuple, tuple[tuple, dict]], stop: threading.Event) -> None:
        """The background phase of ``warmup``: each call compiled, then published in ``_compiled``
        (in place of its quick compilation, for a ``QUICK`` call), until done or ``stop`` (``close``).

        Not run once here: that would need a throwaway decode state beside the serving one (180 MiB
        at the defaults, at the top of the server's peak memory, ``scripts/bench_memory.py``), and
        a call's first run costs little more than its next (0.01-0.2 s more, on XLA:CPU for SmolLM2
        at the defaults, cached or freshly compiled), paid once by the first step that uses it."""
        t0, done = time.perf_counter(), 0
        try:
            for key, call in calls.items():
                if stop.is_set():
                    break
                fn = self._compile(key, *call)
                if stop.is_set():
                    break
                self._compiled[key] = fn
                done += 1
                release_freed_memory()
        except Exception:  # serving goes on with what is ready
            log.exception("background compilation failed after %d of %d calls", done, len(calls))
        finally:
            atexit.unregister(self._stop_and_wait)
        log.info("background compilation %s: %d of %d calls ready in %.1f s (trace + lower + compile each: %s)",
                 "stopped" if done < len(calls) else "done", done, len(calls), time.perf_counter() - t0,
                 self.describe_compile_seconds(list(calls)))

    def describe_compile_seconds(self, keys: list[tuple]) -> str:
        """``generate 8 0.52+0.41+1.20, ...``: each call's seconds to trace, lower and compile."""
        return ", ".join(f"{_key_name(k)} {'+'.join(f'{x:.2f}' for x in self.compile_seconds[k])}"
                         for k in keys if k in self.compile_seconds)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for ``warmup``'s background phase; True when no call is left to compile."""
        thread = self._background
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def close(self) -> None:
        """Stop ``warmup``'s background phase, without waiting: the call it is compiling (seconds,
        inside XLA) is abandoned, and nothing more is published; serving goes on with what is
        ready. ``LLM.close`` calls this. (While the abandoned call compiles, interpreter exit
        waits for it: the server leaves with ``os._exit`` instead.)"""
        self._stop.set()

    def _stop_and_wait(self) -> None:
        """At interpreter exit: stop the background phase and wait for the call it is compiling,
        so that XLA's compiler is not running when JAX tears its backends down."""
        self._stop.set()
        thread = self._background
        if thread is not None and thread is not threading.current_thread():
            thread.join()


_LIBC = None


def release_freed_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``): XLA's compiler frees
    ~90 MiB of scratch per compiled call that glibc otherwise keeps, so without this the server's
    resident memory grows by that much per call compiled at start-up (``scripts/bench_memory.py``).
    False where there is no glibc (nothing to do)."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
            _LIBC and _LIBC.malloc_trim  # noqa: B018 (musl, macOS: no malloc_trim)
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


def compile_threads() -> int:
    """Threads compiling the SERVING-ready calls: ``JSERVE_COMPILE_THREADS``, default half the CPU
    count (at least 1, at most 4); 1 compiles them one after another. Each LLVM compilation holds
    ~150 MiB of scratch while it runs, and on 2 cores two at once were no faster from a cold cache
    (SmolLM2 at the defaults: 6.4 s against 5.4 s one at a time, peak RSS 916 against 764 MiB;
    from a warm cache 1.0-1.2 s against 1.3-1.4 s, scripts/bench_memory.py)."""
    value = os.environ.get("JSERVE_COMPILE_THREADS", "")
    if not value:
        return min(max(1, (os.cpu_count() or 1) // 2), 4)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"JSERVE_COMPILE_THREADS must be a positive integer, got {value!r}")
    return int(value)


# Calls compiled before SERVING with LLVM's optimizations off, then again (optimized) in the
# background, which replaces them when ready: ``copy`` (slot to slot, whole blocks: the same bits
# either way, tests/test_warmup.py) compiled in 0.53 s instead of 6.1 s and ran 2-4x slower
# (1,000 positions: 97-168 ms against 22-72 ms), on XLA:CPU at the defaults (8 x 1024), 2 busy cores.
QUICK = frozenset({"copy"})
QUICK_OPTIONS = {"xla_backend_optimization_level": 0}


def _background_order(calls: dict[tuple, tuple[tuple, dict]]) -> dict[tuple, tuple[tuple, dict]]:
    """The background phase's order: the decode steps over fewer slots first (one stream's step),
    ``copy`` optimized (``QUICK``), the larger ``extend`` buckets, then ``verify``'s shapes
    (``calls``' order within each)."""
    rank = {"generate": 0, "copy": 1, "extend": 2}
    return dict(sorted(calls.items(), key=lambda kv: rank.get(kv[0][0], 3)))


def _key_name(key: tuple) -> str:
    """``("verify", 4, 5)`` -> ``verify 4x5``; ``("extend", 8)`` -> ``extend 8``."""
    return f"{key[0]} {'x'.join(map(str, key[1:]))}"
