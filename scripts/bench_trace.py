"""Layers traced once per spec (``model._layer_once``, the default) against every layer traced
unrolled (``JSERVE_UNROLLED_LAYERS=1``): seconds to trace, lower and compile each engine call, and
the steady decode step, on the default checkpoint (server defaults: weights as they come).

Each mode runs in its own process (no in-memory or persistent cache shared between them), the
modes alternating for ``--rounds``; the table gives medians and the ratio once / unrolled. With
``--step``, only ``model.decode_step`` (every slot) compiled both ways in one process and timed in
interleaved rounds, with its logits compared bitwise: the step's ratio on a shared machine.

    python scripts/bench_trace.py [--slots 8] [--max-len 1024] [--speculate 0] [--rounds 2] [--steps 20]
                                  [--step]
                                  [--json runs.json]

Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

MODES = {"once": "0", "unrolled": "1"}


def child(args: argparse.Namespace) -> dict:
    """One mode, in this process: every warm-up call traced, lowered and compiled, then decode steps."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jserve import checkpoint
    from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint
    from jserve.engine import JaxEngine
    from jserve.sampling import SamplingParams

    cfg, params, _ = checkpoint.load(ensure_default_checkpoint(DEFAULT_CHECKPOINT), jnp.float32, None)
    eng = JaxEngine(cfg, params, slots=args.slots, max_len=args.max_len, speculate=args.speculate)
    jitted = {"begin": eng._begin, "copy": eng._copy, "extend": eng._extend, "generate": eng._generate,
              "verify": eng._verify, "release": eng._release}
    calls = {}
    for key, (a, kw) in eng._warmup_calls().items():
        if key[0] not in ("extend", "generate", "verify"):
            continue
        t0 = time.perf_counter()
        traced = jitted[key[0]].trace(*a, state=eng._state_shape, **kw)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        lowered.compile()
        t3 = time.perf_counter()
        calls[" ".join(map(str, key))] = {"trace": t1 - t0, "lower": t2 - t1, "compile": t3 - t2}
    eng.warmup(background=False)
    greedy = SamplingParams(temperature=0.0)
    state = eng.init_state()
    for s in range(eng.slots):
        state, _ = eng.prefill(state, s, [1, 9690, 198, 2683 + s] * 8, greedy, s)
    times = []
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        state, out = eng.generate(state)
        np.asarray(out)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"calls": calls, "step": statistics.median(times), "jax": jax.__version__}


def step_only(args: argparse.Namespace) -> None:
    """``decode_step`` once per spec and unrolled, in this process, timed in alternating rounds."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jserve import checkpoint, model
    from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint
    from jserve.kv_cache import KVCache

    cfg, params, _ = checkpoint.load(ensure_default_checkpoint(DEFAULT_CHECKPOINT), jnp.float32, None)
    params = model.for_cpu_kernels(params)
    inputs = dict(tokens=jnp.arange(args.slots, dtype=jnp.int32) + 100,
                  positions=jnp.full((args.slots,), 40, jnp.int32), n_blocks=jnp.int32(1))
    runs = {}
    for mode, flag in MODES.items():
        os.environ["JSERVE_UNROLLED_LAYERS"] = flag  # read when traced: a fresh function per mode
        step = jax.jit(functools.partial(model.decode_step, cfg=cfg), donate_argnames=("cache",))
        cache = KVCache.zeros(cfg, args.slots, args.max_len, jnp.float32)
        runs[mode] = {"fn": step.lower(params, cache=cache, **inputs).compile(), "cache": cache, "times": []}
    for _ in range(args.rounds * 6):
        for run in runs.values():
            for _ in range(6):
                t0 = time.perf_counter()
                logits, run["cache"] = run["fn"](params, cache=run["cache"], **inputs)
                run["logits"] = np.asarray(logits)
                run["times"].append(time.perf_counter() - t0)
    med = {m: statistics.median(r["times"]) for m, r in runs.items()}
    print(f"decode_step, {args.slots} slots x {args.max_len}: once {med['once'] * 1000:.1f} ms, unrolled "
          f"{med['unrolled'] * 1000:.1f} ms, ratio {med['once'] / med['unrolled']:.3f}; logits bitwise equal: "
          f"{np.array_equal(runs['once']['logits'], runs['unrolled']['logits'])}; load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--speculate", type=int, default=0, help="verify's shapes too (0: none, the server's default)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per mode, alternating")
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps (every slot live)")
    ap.add_argument("--json", type=pathlib.Path, default=None, help="every process's figures")
    ap.add_argument("--step", action="store_true", help="only the decode step, both ways in one process")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:
        step_only(args)
        return 0
    if args.child:
        print(json.dumps(child(args)))
        return 0
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode, flag in MODES.items():
            env = {**os.environ, "JSERVE_UNROLLED_LAYERS": flag, "JAX_ENABLE_COMPILATION_CACHE": "false"}
            out = subprocess.run([sys.executable, __file__, "--child", *(argv or sys.argv[1:])], env=env,
                                 check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            if args.json:  # kept as they come: a long run stopped early keeps what it measured
                args.json.write_text(json.dumps(runs, indent=1))
            print(f"{mode}: step {runs[mode][-1]['step'] * 1000:.1f} ms (load {os.getloadavg()[0]:.2f})",
                  file=sys.stderr)

    def med(mode: str, call: str, part: str) -> float:
        return statistics.median(r["calls"][call][part] for r in runs[mode])

    names = list(runs["once"][0]["calls"])
    print(f"{args.slots} slots x {args.max_len}, speculate {args.speculate}; medians of {args.rounds} processes per "
          f"mode; jax {runs['once'][0]['jax']}; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| call | trace once (s) | unrolled (s) | lower once | unrolled | compile once | unrolled | "
          "total once / unrolled |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    total = {m: 0.0 for m in MODES}
    for name in names:
        row = {m: [med(m, name, p) for p in ("trace", "lower", "compile")] for m in MODES}
        for m in MODES:
            total[m] += sum(row[m])
        o, u = row["once"], row["unrolled"]
        print(f"| {name} | {o[0]:.2f} | {u[0]:.2f} | {o[1]:.2f} | {u[1]:.2f} | {o[2]:.2f} | {u[2]:.2f} | "
              f"{sum(o) / sum(u):.2f} |")
    print(f"| all | | | | | | | {total['once'] / total['unrolled']:.2f} ({total['once']:.1f} s / "
          f"{total['unrolled']:.1f} s) |")
    step = {m: statistics.median(r["step"] for r in runs[m]) for m in MODES}
    print(f"decode step, every slot: once {step['once'] * 1000:.1f} ms, unrolled {step['unrolled'] * 1000:.1f} ms, "
          f"ratio {step['once'] / step['unrolled']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
