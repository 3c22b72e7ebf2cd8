"""Warm-up in two phases: serving starts once the calls every request needs are compiled; the
larger ``extend`` buckets and ``verify``'s shapes follow in the background, each used only once
it is ready, and nothing is ever compiled on a request's path.

The background phase is held at each call it would compile (``Hold``), so what is ready while
requests are served is decided by the test, not by timing."""

from __future__ import annotations

import collections
import gc
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from jserve import LLM, SamplingParams
from jserve.engine import JaxEngine
from jserve.speculative import SpecPolicy

from .compile_watch import CompileWatch

WARMUP_THREAD = "jserve-warmup"


class Hold:
    """Holds the background phase before each call it compiles until ``allow``-ed to go on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self._cv = threading.Condition()
        self.allowed = 0  # background compilations that may start
        self.started = 0
        self.free = False
        real = JaxEngine._compile

        def held(engine, key, args, kwargs, **kw):
            if threading.current_thread().name == WARMUP_THREAD:
                with self._cv:
                    self.started += 1
                    self._cv.notify_all()
                    self._cv.wait_for(lambda: self.free or self.started <= self.allowed)
            return real(engine, key, args, kwargs, **kw)

        monkeypatch.setattr(JaxEngine, "_compile", held)

    def allow(self, n: int) -> None:
        with self._cv:
            self.allowed += n
            self._cv.notify_all()

    def release(self) -> None:
        with self._cv:
            self.free = True
            self._cv.notify_all()

    def wait_started(self, n: int, timeout: float = 300.0) -> None:
        with self._cv:
            assert self._cv.wait_for(lambda: self.started >= n, timeout)


@pytest.fixture
def hold(monkeypatch):
    h = Hold(monkeypatch)
    yield h
    h.release()  # never leave a thread waiting (it would hold up the interpreter's exit)


class AlwaysVerify(SpecPolicy):
    """Verifies at every chance, at the widest width offered: a verify shape not offered is never used."""

    def could_pay(self, live: int, rows_bucket: int, options: dict[int, float]) -> bool:
        return True

    def choose(self, live: int, rows_bucket: int, options: dict[int, float]) -> int:
        return max(options)


class Calls:
    """Rows of every ``extend`` call and shape of every ``verify`` call the engine makes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.extend: list[int] = []
        self.verify: list[tuple[int, int]] = []
        self.generate: list[int] = []  # rows bucket of each decode step
        extend, verify, bucket = JaxEngine.extend, JaxEngine.verify, JaxEngine.decode_bucket

        def dec(engine, n):
            self.generate.append(bucket(engine, n))
            return self.generate[-1]

        def ext(engine, state, rows, masks=None, **kw):
            self.extend.append(len(rows))
            return extend(engine, state, rows, masks, **kw)

        def ver(engine, state, rows, width=None, **kw):
            self.verify.append((engine.verify_bucket(len(rows)), width))
            return verify(engine, state, rows, width, **kw)

        monkeypatch.setattr(JaxEngine, "extend", ext)
        monkeypatch.setattr(JaxEngine, "verify", ver)
        monkeypatch.setattr(JaxEngine, "decode_bucket", dec)

    def clear(self) -> None:
        self.extend.clear()
        self.verify.clear()
        self.generate.clear()


LONG = [1] + [(37 * i) % 900 + 20 for i in range(149)]  # 150 tokens: 10 rows of 16
REPETITIVE = [[1, 450, 1134, 288, 34, 450, 1134, 288, 34, 450, 1134, 288], [1, 5, 6, 5, 6, 5, 6, 5]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, speculate=True)


def _wait_until(cond, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the background phase did not get there"
        time.sleep(0.02)


def _serve(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], CompileWatch]:
    """Each prompt alone (a long prompt has the engine to itself), under a compile watch."""
    with CompileWatch() as watch:
        out = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    return out, watch


def test_requests_are_served_before_the_background_phase_with_ready_calls_only(tiny_ckpt, hold, monkeypatch):
    events = collections.Counter()
    llm = LLM(tiny_ckpt, slots=4, max_len=256, max_prompt_len=200, speculate=4, prefix_cache=False,
              compile_cache=None, on_event=lambda kind, req, value: events.update({kind: value}))
    try:
        e = llm.engine
        llm.orchestrator.policy = AlwaysVerify()
        calls = Calls(monkeypatch)
        # Any number of rows where every op is row-invariant (the CPU kernels), else >= 64 positions.
        assert e.chunk_rows == ((1, 2, 4, 8) if e.row_invariant else (4, 8, 16, 32))
        assert e.verify_rows == (1, 2, 4) and e.decode_rows == ((1, 2, 4) if e.row_invariant else (4,))
        small = e.chunk_rows[0]
        assert e.ready_rows() == small and all(e.ready_widths(r) == () for r in e.verify_rows)
        # The step over every slot is ready; over one slot (where rows are invariant) it comes first
        # in the background, and until then one stream's steps compute every slot's row.
        assert e.is_ready(("generate", 4)) and e.is_ready(("generate", 1)) != e.row_invariant
        assert e.background_keys[0] == ("generate", 1) or not e.row_invariant
        pending = [k for k in e._warmup_calls() if not e.is_ready(k)]
        assert set(pending) <= set(e.background_keys)
        before_verify = sum(k[0] != "verify" for k in e.background_keys)  # the other calls come first
        prompts = [LONG] + REPETITIVE

        # Nothing but the SERVING-ready calls: a long prompt in calls of the smallest bucket, no verify.
        first, watch = _serve(llm, prompts)
        watch.assert_nothing_traced()
        assert calls.extend[0] == small and sum(calls.extend[:-(-10 // small)]) == 10 and max(calls.extend) == small
        assert calls.verify == [] and events["spec_drafted"] == 0
        assert all(len(t) == GREEDY.max_tokens for t in first)
        assert set(calls.generate) == {4}  # one stream's steps compute every slot's row until generate 1 is ready

        # The larger extend buckets ready, verify not yet: a long prompt takes calls of the largest,
        # still no verify.
        hold.allow(before_verify)
        _wait_until(lambda: e.is_ready(("extend", e.max_rows)))
        hold.wait_started(before_verify + 1)  # held at the first verify shape: it traces nothing now
        assert e.ready_rows() == e.max_rows > small and all(e.ready_widths(r) == () for r in e.verify_rows)
        calls.clear()
        second, watch = _serve(llm, prompts)
        watch.assert_nothing_traced()
        assert calls.extend[0] == min(10, e.max_rows) and sum(calls.extend[:-(-10 // e.max_rows)]) == 10
        assert calls.verify == [] and events["spec_drafted"] == 0
        assert second == first

        # Everything ready: speculation verifies, at the shapes warm-up ran, and still nothing compiles.
        hold.release()
        assert e.wait_ready(timeout=600)
        assert e.ready_widths(1) == (1, 5) and e.ready_widths(4) == (5,)
        calls.clear()
        third, watch = _serve(llm, prompts)
        watch.assert_nothing_traced()
        assert calls.verify and all(e.is_ready(("verify", r, w)) for r, w in calls.verify)
        assert events["spec_drafted"] > 0
        assert e.decode_bucket(1) == (1 if e.row_invariant else 4)  # one stream's plain step: one row now
        assert third == first  # verify keeps exactly the tokens plain decoding draws
    finally:
        llm.close(drain=False)


def test_engine_readiness_before_warmup_and_with_background_off(tiny_ckpt):
    from jserve import checkpoint

    cfg, params, _ = checkpoint.load(tiny_ckpt)
    eng = JaxEngine(cfg, params, slots=2, max_len=64, speculate=4)
    # Not warmed up: every call compiles on first use, as a plain jit does, so all count as usable.
    assert eng.ready_rows() == eng.max_rows and eng.ready_widths(1) == (1, 5)
    with CompileWatch() as watch:
        eng.warmup(background=False)
    assert all(t.name != WARMUP_THREAD for t in threading.enumerate())  # no background phase
    assert eng.ready_rows() == eng.max_rows and eng.ready_widths(2) == (5,) and eng.wait_ready(0)
    # Every extend bucket and verify shape was traced inside warm-up (not left to serving).
    assert watch.traced.count("_extend") >= len(eng.chunk_rows)
    assert watch.traced.count("_verify") >= sum(len(eng.widths_for(r)) for r in eng.verify_rows)


def test_closing_the_llm_while_the_background_phase_compiles_stops_it_without_waiting(tiny_ckpt, hold):
    llm = LLM(tiny_ckpt, slots=2, max_len=64, speculate=4, compile_cache=None)
    e = llm.engine
    thread = e._background
    before = dict(e._compiled)
    pending = list(e.background_keys)
    assert thread is not None and thread.is_alive() and len(pending) > 2
    hold.allow(1)
    hold.wait_started(2)  # the first background call is done (or past its stop check); held at the second
    closer = threading.Thread(target=llm.close, kwargs=dict(drain=False))
    closer.start()
    closer.join(60)
    assert not closer.is_alive() and thread.is_alive()  # close returned while the call is still held
    hold.release()  # the held call compiles, then the thread sees the stop and ends
    thread.join(300)
    assert not thread.is_alive()
    published = [k for k in pending if e._compiled.get(k) is not before.get(k)]
    assert published == pending[:1]  # stopped: the held call was never published


EXIT_SCRIPT = """
import atexit, logging, pathlib, sys, threading
from jserve import LLM, checkpoint
from jserve.engine import JaxEngine

logging.basicConfig(level=logging.INFO, force=True)
gate = threading.Event()
real = JaxEngine._compile
def held(engine, key, args, kwargs, **kw):
    if threading.current_thread().name == "jserve-warmup":
        gate.wait()
    return real(engine, key, args, kwargs, **kw)
JaxEngine._compile = held

ckpt = pathlib.Path(sys.argv[1])
llm = LLM(ckpt, slots=2, max_len=64, speculate=4, compile_cache=None)  # never closed
cfg, params, _ = checkpoint.load(ckpt)
eng = JaxEngine(cfg, params, slots=2, max_len=64, speculate=4)
eng.warmup()
assert llm.engine._background.is_alive() and eng._background.is_alive()
atexit.register(gate.set)  # runs first at exit: both threads go on into XLA while the interpreter exits
print("EXITING", flush=True)
"""


def test_interpreter_exit_during_the_background_phase_is_clean(tiny_ckpt):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(EXIT_SCRIPT), str(tiny_ckpt)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EXITING" in proc.stdout
    assert proc.stderr.count("background compilation stopped") == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Fatal" not in proc.stderr


def test_copy_is_compiled_quickly_before_serving_then_optimized_in_the_background(tiny_ckpt, monkeypatch):
    import jax
    import numpy as np

    from jserve import checkpoint

    record = []
    real = JaxEngine._compile

    def spy(engine, key, args, kwargs, quick=False):
        record.append((key, quick, threading.current_thread().name == WARMUP_THREAD))
        return real(engine, key, args, kwargs, quick=quick)

    monkeypatch.setattr(JaxEngine, "_compile", spy)
    cfg, params, _ = checkpoint.load(tiny_ckpt)
    eng = JaxEngine(cfg, params, slots=2, max_len=64)
    eng.warmup()
    quick = eng._compiled[("copy", 0)]
    assert eng.wait_ready(600)
    optimized = eng._compiled[("copy", 0)]
    # Quick (LLVM unoptimized) before serving, on the warm-up's own threads; then optimized in the
    # background, replacing it. Nothing else is compiled quickly.
    assert [r for r in record if r[0] == ("copy", 0)] == [(("copy", 0), True, False), (("copy", 0), False, True)]
    assert [r for r in record if r[1]] == [(("copy", 0), True, False)] and optimized is not quick
    state = eng.init_state()
    state, _ = eng.prefill(state, 0, LONG[:40], SamplingParams(temperature=0.0), 0)
    src = eng.pages.pages_of(0)[0]  # slot 0's page onto the pool's other one
    dst = 1 - src
    outs = [fn(state=jax.tree.map(lambda a: a.copy(), state), src=np.full((eng.max_pages,), src, np.int32),
               dst=np.full((eng.max_pages,), dst, np.int32), n=np.int32(1)) for fn in (quick, optimized)]
    leaves = [jax.tree.leaves(o.cache) for o in outs]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(*leaves))  # the same bits
    k0 = np.asarray(outs[1].cache.k[0])
    assert np.array_equal(k0[dst, :, :40], k0[src, :, :40]) and np.any(k0[src, :, :40] != 0)  # and a real copy
    eng.close()


def test_the_first_state_is_made_during_warmup_and_is_fresh(tiny_ckpt):
    import jax
    import numpy as np

    from jserve import checkpoint

    cfg, params, _ = checkpoint.load(tiny_ckpt)
    eng = JaxEngine(cfg, params, slots=2, max_len=64)
    eng.warmup(background=False)
    spare = eng._spare
    assert spare is not None
    with CompileWatch() as watch:
        first, second = eng.init_state(), eng.init_state()
    watch.assert_nothing_traced()
    assert first is spare and second is not first and eng._spare is None  # handed out once
    fresh = jax.tree.leaves(eng._zeros())
    for state in (first, second):  # untouched by warm-up's calls: what a new state is
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(state), fresh))


def test_freed_compiler_memory_is_handed_back_after_each_compile_phase(tiny_ckpt, monkeypatch):
    from jserve import checkpoint, warmup

    trims = []
    monkeypatch.setattr(warmup, "release_freed_memory", lambda: trims.append(1) or True)
    cfg, params, _ = checkpoint.load(tiny_ckpt)
    eng = JaxEngine(cfg, params, slots=2, max_len=64)
    eng.warmup(background=True)
    assert eng.wait_ready(300)
    # After the SERVING-ready calls compile and after their throwaway state is dropped, then once
    # per call the background phase compiled.
    assert len(trims) == 2 + len(eng.background_keys) and eng.background_keys


def test_no_throwaway_state_is_resident_while_the_background_phase_compiles(tiny_ckpt, hold):
    """Warm-up runs each call once on a throwaway state; that state exists only for the runs, so
    while a background call compiles the only decode state alive is the one handed out to serve."""
    import jax

    from jserve import checkpoint

    cfg, params, _ = checkpoint.load(tiny_ckpt)
    eng = JaxEngine(cfg, params, slots=2, max_len=64)
    seen = eng._state_shape.seen  # [S, V] bool: one per decode state

    def states() -> int:  # decode states alive (an earlier test's may be, too: counted before)
        gc.collect()
        return sum(a.shape == seen.shape and a.dtype == seen.dtype for a in jax.live_arrays())

    before = states()
    eng.warmup(background=True)
    assert len(eng.background_keys) >= 2
    try:
        assert states() - before == 1  # ``_spare``, for the first ``init_state``
        hold.wait_started(1)  # held before compiling the first background call
        assert states() - before == 1
        hold.allow(1)
        hold.wait_started(2)  # the first one compiled and run once; held before the second
        assert states() - before == 1 and eng.is_ready(eng.background_keys[0])
    finally:
        hold.release()
        eng.close()


LOAD_COUNTING_SCRIPT = """
import collections, sys
import jax
from jserve.llm import load_engine
from jserve.server import build_parser, compile_cache, engine_config

events = collections.Counter()
jax.monitoring.register_event_listener(lambda name, **kw: events.update([name]))
args = build_parser().parse_args(sys.argv[1:])
loaded = load_engine(args.checkpoint, engine_config(args), compile_cache=compile_cache(args))
assert loaded.engine.wait_ready(600)
print("HITS", events["/jax/compilation_cache/cache_hits"], "MISSES", events["/jax/compilation_cache/cache_misses"],
      "CALLS", len(loaded.engine.compile_seconds), flush=True)
"""


def test_precompile_fills_the_cache_so_the_next_start_compiles_nothing(tiny_ckpt, tmp_path):
    """``--precompile`` compiles every call (SERVING-ready and background) and exits without
    serving; a start with the same arguments then loads each from the cache: no cache miss."""
    args = ["--checkpoint", str(tiny_ckpt), "--slots", "2", "--max-len", "64", "--compile-cache", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "jserve.server", "--precompile", *args], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precompiled" in proc.stderr and "listening" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert any(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, "-c", LOAD_COUNTING_SCRIPT, *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = dict(zip(*[iter(proc.stdout.split())] * 2))
    assert int(counts["MISSES"]) == 0, proc.stdout
    assert int(counts["HITS"]) >= int(counts["CALLS"]) > 4, proc.stdout


def test_precompile_refuses_several_processes(capsys):
    from jserve.server import main

    with pytest.raises(SystemExit):
        main(["--precompile", "--num-processes", "2", "--process-id", "0"])
    assert "--precompile runs in one process" in capsys.readouterr().err
