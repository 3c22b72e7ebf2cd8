"""Where jserve's peak resident memory comes from: the server's RSS over time, by phase.

Two views, both at the server's defaults unless told otherwise:

``--server`` (default): ``python -m jserve.server`` started as a user would (plus ``--log-level
INFO``), its ``VmRSS``/``VmHWM`` sampled every ``--interval`` seconds from ``/proc/PID/status``
from the start to a few streamed requests after SERVING (and the end of the background
compilation). Each log line is stamped with the RSS at that moment, so the rise between two
lines is that phase's; the peak and where it was reached are printed last.

``--phases``: the same start-up in this process, one step at a time (imports, checkpoint load
and engine build, one decode state, then each executable warm-up makes, compiled or loaded from
JAX's cache and run once, followed by ``malloc_trim``), with the RSS rise of each step, a table
of the parts, and the bytes counted exactly (weights, KV cache, per-slot state). Beside RSS,
the C heap's bytes in use (glibc's ``mallinfo2``) tell live memory from freed memory malloc keeps.
``--fresh`` compiles every executable instead of loading it from JAX's cache.

What a compiled call holds (measured with this view, SmolLM2 Q4_1, 8 x 1024): XLA:CPU keeps each
executable's optimized HLO module and buffer assignment; one loaded from JAX's cache also keeps a
proto copy of both (XLA's CPU loader keeps it for ``get_compiled_memory_stats``). With the 30
layers inlined one after another (``JSERVE_LOOP_LAYERS=0``) that is ~23,000 instructions and
~79 MiB of heap per ``extend``/``generate`` call loaded from the cache (~43 compiled fresh); as one
loop over layers (``model.loops_layers``, the CPU default) ~4,300 instructions and 4-24 MiB.
Freed only with the executable (``jax.clear_caches()`` plus dropping every reference).

    python scripts/bench_memory.py [--slots 8] [--max-len 1024] [--kv-dtype float32] [--requests 4]
        [--phases [--fresh]] [--extra "--quantize q8_0"]

Nothing here is a test: figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_servers import free_port  # noqa: E402

PROMPTS = ["Write a short poem about the sea.", "What is the capital of France? Explain its history briefly.",
           "List three uses of a paperclip.", "Describe how a bicycle works."]


def status_mib(pid: int) -> tuple[float, float]:
    """``(VmRSS, VmHWM)`` of ``pid`` in MiB (0 where /proc does not say)."""
    rss = hwm = 0.0
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss, hwm


class Sampler(threading.Thread):
    """``(seconds, VmRSS, VmHWM)`` of ``pid`` every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval, self.t0 = pid, interval, time.perf_counter()
        self.samples: list[tuple[float, float, float]] = []
        self.halt = threading.Event()

    def now(self) -> tuple[float, float, float]:
        return (time.perf_counter() - self.t0, *status_mib(self.pid))

    def run(self) -> None:
        while not self.halt.is_set():
            self.samples.append(self.now())
            self.halt.wait(self.interval)


def requests(port: int, n: int, max_tokens: int) -> None:
    from jserve.client import Client

    with Client(f"127.0.0.1:{port}") as client, concurrent.futures.ThreadPoolExecutor(n) as pool:
        def one(i: int) -> int:
            msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            return sum(len(r.token_ids) for r in client.stream(msgs, max_tokens=max_tokens, ignore_eos=True))

        list(pool.map(one, range(n)))


def server_view(args: argparse.Namespace) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "jserve.server", "--port", str(port), "--slots", str(args.slots),
           "--max-len", str(args.max_len), "--log-level", "INFO", *shlex.split(args.extra)]
    if args.kv_dtype:
        cmd += ["--kv-dtype", args.kv_dtype]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(proc.pid, args.interval)
    sampler.start()
    lines: list[tuple[float, float, float, str]] = []
    served = threading.Event()
    compiled = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            t, rss, hwm = sampler.now()
            lines.append((t, rss, hwm, line.rstrip()))
            if "jserve SERVING" in line:
                served.set()
            if "background compilation" in line:
                compiled.set()
        served.set()  # the server exited (``proc.poll()`` says whether before SERVING)
        compiled.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not served.wait(900):
            raise RuntimeError("no SERVING within 900 s")
        reader.join(0.5)
        if proc.poll() is not None:
            tail = "\n".join(text for *_, text in lines[-20:])
            raise SystemExit(f"the server exited ({proc.returncode}) before SERVING:\n{tail}")
        t, rss, hwm = sampler.now()
        lines.append((t, rss, hwm, "-- bench: SERVING seen; sending requests"))
        requests(port, args.requests, args.max_tokens)
        t, rss, hwm = sampler.now()
        lines.append((t, rss, hwm, f"-- bench: {args.requests} requests x {args.max_tokens} tokens done"))
        compiled.wait(600)
        requests(port, args.requests, args.max_tokens)
        t, rss, hwm = sampler.now()
        lines.append((t, rss, hwm, "-- bench: second batch after the background compilation done"))
        time.sleep(2 * args.interval)
        _, _, peak = sampler.now()
    finally:
        sampler.halt.set()
        proc.terminate()
        proc.wait(60)
    print(f"{'s':>7} {'VmRSS':>8} {'VmHWM':>8}  log line (MiB)")
    for t, rss, hwm, text in lines:
        text = re.sub(r"^\S+ \S+ ", "", text)[:140]
        print(f"{t:7.1f} {rss:8.0f} {hwm:8.0f}  {text}")
    top = max(sampler.samples, key=lambda s: s[1])
    print(f"peak RSS (VmHWM) {peak:.0f} MiB; highest sampled VmRSS {top[1]:.0f} MiB at {top[0]:.1f} s")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use_mib(libc: ctypes.CDLL) -> float:
    """Bytes the C heap has handed out and not got back (glibc's ``mallinfo2``: allocated chunks
    plus mmapped ones), in MiB; 0 where there is no ``mallinfo2``. Beside RSS it tells memory in
    use from freed memory the allocator keeps."""
    fn = getattr(libc, "mallinfo2", None)
    if fn is None:
        return 0.0
    fn.restype = _MallInfo2
    info = fn()
    return (info.uordblks + info.hblkhd) / 2**20


def phases_view(args: argparse.Namespace) -> None:
    """The server's start-up steps in this process, RSS after each, and the parts counted exactly."""
    pid = os.getpid()
    libc = ctypes.CDLL("libc.so.6")
    last = [status_mib(pid)[0], heap_in_use_mib(libc)]
    t0 = time.perf_counter()
    parts: dict[str, float] = {}

    def mark(what: str, part: str | None = None) -> float:
        rss, hwm = status_mib(pid)
        rise = rss - last[0]
        heap = heap_in_use_mib(libc)
        print(f"{time.perf_counter() - t0:7.1f}s  RSS {rss:6.0f}  {rise:+6.0f}  HWM {hwm:6.0f}  heap in use "
              f"{heap:6.0f} {heap - last[1]:+6.0f}  {what}", flush=True)
        last[0], last[1] = rss, heap
        if part is not None:
            parts[part] = parts.get(part, 0.0) + rise
        return rise

    mark("python", "python + numpy")
    import jax
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()
    mark("import jax, CPU client up", "JAX/XLA runtime")
    from jserve import llm as llm_mod
    from jserve.kv_cache import cache_bytes
    from jserve.serving_config import EngineConfig

    mark("import jserve.llm (orchestrator, tokenizer, ...)", "jserve + libraries")
    heavy = sorted(m for m in ("torch", "transformers", "tensorstore", "orbax", "tokenizers", "grpc")
                   if m in sys.modules)
    print(f"          heavy modules loaded so far: {heavy}")
    engine_cfg = EngineConfig(slots=args.slots, max_len=args.max_len)
    if args.kv_dtype:
        engine_cfg = dataclasses.replace(engine_cfg, kv_dtype=args.kv_dtype)
    cache = None if args.fresh else llm_mod.DEFAULT_COMPILE_CACHE
    loaded = llm_mod.load_engine(None, engine_cfg, compile_cache=cache, warmup=False)
    libc.malloc_trim(0)
    mark("checkpoint load + engine build, malloc_trim", "checkpoint (weights, tokenizer, orbax)")
    eng = loaded.engine
    weights = sum(x.nbytes for x in jax.tree.leaves(eng.params))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(eng._state_shape))
    kv = cache_bytes(eng.cfg, eng.slots, eng.cache_len, eng.cache_dtype)
    init = eng._init.lower().compile()
    state = init()
    jax.block_until_ready(state)
    mark("one decode state", "decode state (x1)")
    calls = eng._warmup_calls()
    per_call = {}
    for key, call in calls.items():
        fn = eng._compile(key, *call)
        state = eng._run_once(fn, *call, state)
        jax.block_until_ready(state)
        libc.malloc_trim(0)
        per_call[key] = mark(f"{' '.join(map(str, key))}: compiled (or loaded from JAX's cache), run once, trimmed",
                             "executables (after malloc_trim)")
    print(f"\n{args.slots} slots x {args.max_len}, KV {jnp.dtype(eng.cache_dtype).name}: counted exactly: weights "
          f"{weights / 2**20:.1f} MiB, decode state {state_bytes / 2**20:.1f} MiB (KV cache {kv / 2**20:.1f}, per-slot "
          f"vocab state and the rest {(state_bytes - kv) / 2**20:.1f}); {len(per_call)} executables")
    print("| part | MiB (RSS rise) |\n| --- | ---: |")
    for part, mib in parts.items():
        print(f"| {part} | {mib:.0f} |")
    print(f"| total | {status_mib(pid)[0]:.0f} |")
    print("the server's warm-up runs only its SERVING-ready calls once, on a throwaway decode state dropped before "
          "the background phase compiles the rest")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--kv-dtype", default=None, help="the KV cache's type (default: the server's default)")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--extra", default="", help="more server flags, one string")
    ap.add_argument("--phases", action="store_true", help="in-process phases instead of the server")
    ap.add_argument("--fresh", action="store_true", help="--phases: compile every call (no JAX cache)")
    args = ap.parse_args(argv)
    (phases_view if args.phases else server_view)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
