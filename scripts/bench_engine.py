"""Engine benchmark on the real model: decode per slot count, prefill per bucket, bandwidth use.

- decode: tokens/s and step time with every slot busy, at each ``--slots`` value;
- prefill: prompt tokens/s for each length bucket (one prompt filling its bucket);
- model bandwidth utilization (MBU): bytes the decode step must read (weights + the KV cache
  it attends over) / step time / memory bandwidth, the bandwidth measured by this script in
  the same run (the best of several XLA reductions over a 512 MiB array).

    python scripts/bench_engine.py [--slots 1 2 4 8 16 32] [--max-len 256] [--quantize int8-dynamic]

Prints a table and writes JSON with ``--json``. Timings are medians; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import platform
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=pathlib.Path, default=None)
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--max-prompt-len", type=int, default=128)
    ap.add_argument("--quantize", default=None, choices=["int8", "int8-dynamic"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jserve import checkpoint
    from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint
    from jserve.engine import JaxEngine
    from jserve.kv_cache import cache_bytes
    from jserve.quant import weight_bytes
    from jserve.sampling import SamplingParams

    big = jnp.ones((128, 1024, 1024), jnp.float32)  # 512 MiB
    reduce = jax.jit(jnp.sum)
    reduce(big).block_until_ready()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        reduce(big).block_until_ready()
        times.append(time.perf_counter() - t0)
    bandwidth = big.nbytes / min(times)
    del big

    ckpt = args.checkpoint or ensure_default_checkpoint(DEFAULT_CHECKPOINT)
    cfg, params, _ = checkpoint.load(ckpt, jnp.float32, args.quantize)
    wbytes = weight_bytes(params)
    greedy = SamplingParams(temperature=0.0)
    decode = []
    for slots in args.slots:
        eng = JaxEngine(cfg, params, slots=slots, max_len=args.max_len, max_prompt_len=args.max_prompt_len)
        eng.warmup()
        state = eng.init_state()
        for s in range(slots):
            state = eng.insert(eng.prefill([1, 9690, 198, 2683 + s], greedy, s), state, s)
        step_times = []
        for i in range(args.steps + 2):
            t0 = time.perf_counter()
            state, out = eng.generate(state)
            np.asarray(out)
            if i >= 2:
                step_times.append(time.perf_counter() - t0)
        step = statistics.median(step_times)
        read = wbytes + cache_bytes(cfg, slots, args.max_len, jnp.float32)
        decode.append({"slots": slots, "step_ms": 1000 * step, "tokens_per_s": slots / step,
                       "bytes_per_step": read, "mbu": read / step / bandwidth})
        print(f"decode {slots} slots: {1000 * step:.1f} ms/step", file=sys.stderr)
        if slots == args.slots[0]:
            prefill = []
            for b in eng.buckets:
                pt = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    np.asarray(eng.prefill(list(range(100, 100 + b)), greedy, 0).result)
                    pt.append(time.perf_counter() - t0)
                prefill.append({"bucket": b, "ms": 1000 * min(pt), "tokens_per_s": b / min(pt)})
        del eng, state

    print(f"jax {jax.__version__}, {platform.machine()}, {jax.devices()[0].platform}; weights "
          f"{args.quantize or 'float32'} {wbytes / 2**20:.1f} MiB; measured bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"max_len {args.max_len}")
    print("| slots | step (ms) | tokens/s | vs 1 slot | bytes read/step (MiB) | MBU |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    base = decode[0]["tokens_per_s"]
    for d in decode:
        print(f"| {d['slots']} | {d['step_ms']:.1f} | {d['tokens_per_s']:.1f} | {d['tokens_per_s'] / base:.2f} "
              f"| {d['bytes_per_step'] / 2**20:.0f} | {100 * d['mbu']:.0f}% |")
    print("| prefill bucket | ms | prompt tokens/s |")
    print("| ---: | ---: | ---: |")
    for p in prefill:
        print(f"| {p['bucket']} | {p['ms']:.1f} | {p['tokens_per_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"bandwidth_bytes_per_s": bandwidth, "decode": decode, "prefill": prefill},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
