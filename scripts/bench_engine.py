"""Engine benchmark on the real model: decode per slot count and context, sampling, prefill, bandwidth.

- decode: tokens/s and step time with every slot busy, at each ``--slots`` and ``--max-len``
  value, each slot holding ``--context`` tokens (the step's cost should follow the context,
  not ``--max-len``); every configuration is built first, then timed in ``--rounds``
  interleaved rounds;
- sampling: with ``--sampling``, the same step with every slot greedy, then with every slot
  sampled at temperature 0.8 / top-p 0.95 / top-k 50 and penalties on half of them, then plain
  temperature 1.0 (the server's default), rounds interleaved;
- prefill: prompt tokens/s for one prompt filling each ``extend`` call size (rows x chunk);
- model bandwidth utilization (MBU): bytes the decode step must read (weights + the KV cache
  it attends over) / step time / memory bandwidth, the bandwidth measured by this script in
  the same run (the best of several XLA reductions over a 512 MiB array).

    python scripts/bench_engine.py [--slots 1 2 4 8 16 32] [--max-len 256 1024 4096] [--context 128]
                                   [--quantize int8-dynamic] [--sampling] [--attention xla pallas_gpu]

Weights, activations and the KV cache take ``--dtype`` (default: float32 on CPU, bfloat16 on a GPU
or TPU, as the server's default). ``--attention`` names the decode attention of each configuration
(default: the platform's, ``attention_kernels.engine_kernel``); several are timed in the same
interleaved rounds, and "vs first" compares each row with the first.

Prints a table and writes JSON with ``--json``. Timings are medians; nothing here is a test.
"""

from __future__ import annotations

import argparse
import itertools
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
    ap.add_argument("--max-len", type=int, nargs="+", default=[256])
    ap.add_argument("--max-prompt-len", type=int, default=128)
    ap.add_argument("--context", type=int, default=4,
                    help="tokens in each slot's cache when the timed steps start (a prompt of this length)")
    ap.add_argument("--sampling", action="store_true", help="also time sampled steps against greedy ones")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill table")
    ap.add_argument("--quantize", default=None, choices=["int8", "int8-dynamic", "q8_0", "q4_0", "q4_1", "float"])
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all configurations, interleaved")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="weights, activations and KV cache (default: float32 on CPU, bfloat16 on a GPU or TPU)")
    ap.add_argument("--attention", nargs="+", default=[None], choices=["xla", "pallas_gpu", "pallas_tpu_paged"],
                    help="decode attention of each configuration (default: the platform's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jserve import checkpoint, model
    from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint
    from jserve.engine import JaxEngine
    from jserve.kv_cache import cache_bytes
    from jserve.quant import weight_bytes
    from jserve.sampling import SamplingParams
    from jserve.serving_config import default_dtype

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
    dtype = getattr(jnp, args.dtype or default_dtype())
    cfg, params, _ = checkpoint.load(ckpt, dtype, args.quantize)
    wbytes = weight_bytes(params)
    greedy = SamplingParams(temperature=0.0)
    prompt = [1, 9690, 198] + [2683 + (i % 500) for i in range(max(args.context - 3, 1))]
    block = model.attention_block(max(args.max_len))

    def fill(eng, params_of_slot):
        state = eng.init_state()
        for s in range(eng.slots):
            p = params_of_slot(s)
            state, _ = eng.prefill(state, s, prompt[:-1] + [prompt[-1] + s], p, s)
        return state

    def timed_steps(eng, state, n):
        times = []
        for i in range(n + 2):
            t0 = time.perf_counter()
            state, out = eng.generate(state)
            np.asarray(out)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        return state, times

    decode, prefill, sampling = [], [], []
    configs = []  # every (attention, max_len, slots) engine is built first, then timed in interleaved rounds
    for attention, max_len, slots in itertools.product(args.attention, args.max_len, args.slots):
        eng = JaxEngine(cfg, params, slots=slots, max_len=max_len, max_prompt_len=min(args.max_prompt_len,
                                                                                      max_len - 1),
                        cache_dtype=dtype, attention=attention)
        eng.warmup()
        configs.append([eng, fill(eng, lambda s: greedy), []])
        if (slots == args.slots[0] and max_len == args.max_len[0] and attention == args.attention[0]
                and not args.no_prefill):
            for rows in eng.chunk_rows:  # one prompt filling a call of each row bucket
                b = rows * eng.chunk
                pt = []
                for _ in range(3):
                    st = eng.init_state()
                    t0 = time.perf_counter()
                    st, first = eng.prefill(st, 0, list(range(100, 100 + b)), greedy, 0)
                    pt.append(time.perf_counter() - t0)
                prefill.append({"bucket": b, "ms": 1000 * min(pt), "tokens_per_s": b / min(pt)})
    for _ in range(args.rounds):
        for c in configs:
            c[1], t = timed_steps(c[0], c[1], args.steps)
            c[2] += t
    for eng, _, step_times in configs:
        step = statistics.median(step_times)
        grown = len(prompt) + args.rounds * (args.steps + 2)
        live = -(-grown // block) * block  # positions attention reads at the end
        read = wbytes + cache_bytes(cfg, eng.slots, min(live, eng.max_len), dtype)
        decode.append({"attention": eng.attention, "slots": eng.slots, "max_len": eng.max_len,
                       "context": len(prompt), "step_ms": 1000 * step,
                       "tokens_per_s": eng.slots / step, "bytes_per_step": read, "mbu": read / step / bandwidth})
    del configs

    if args.sampling:
        slots, max_len = args.slots[-1], args.max_len[0]
        eng = JaxEngine(cfg, params, slots=slots, max_len=max_len, max_prompt_len=min(args.max_prompt_len,
                                                                                      max_len - 1),
                        cache_dtype=dtype, attention=args.attention[0])
        eng.warmup()
        filtered = SamplingParams(temperature=0.8, top_p=0.95, top_k=50)
        penalized = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, repetition_penalty=1.1,
                                   presence_penalty=0.5, frequency_penalty=0.5)
        modes = {"greedy": lambda s: greedy,
                 "t0.8 top-p 0.95 top-k 50, penalties on half": lambda s: penalized if s % 2 else filtered,
                 "t1.0 (server default)": lambda s: SamplingParams(temperature=1.0)}
        times = {m: [] for m in modes}
        for _ in range(args.rounds):  # rounds interleaved: the machine is shared and noisy
            for m, of_slot in modes.items():
                state, t = timed_steps(eng, fill(eng, of_slot), args.steps)
                times[m] += t
                del state
        base = statistics.median(times["greedy"])
        for m, t in times.items():
            step = statistics.median(t)
            sampling.append({"mode": m, "slots": slots, "max_len": max_len, "step_ms": 1000 * step,
                             "tokens_per_s": slots / step, "vs_greedy": base / step})
        del eng

    name = jnp.dtype(dtype).name
    print(f"jax {jax.__version__}, {platform.machine()}, {jax.devices()[0].platform}; weights "
          f"{args.quantize or name} {wbytes / 2**20:.1f} MiB, KV {name}; measured bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; context {len(prompt)} tokens per slot")
    print("| attention | slots | max_len | step (ms) | tokens/s | vs first | bytes read/step (MiB) | MBU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = decode[0]["tokens_per_s"]
    for d in decode:
        print(f"| {d['attention']} | {d['slots']} | {d['max_len']} | {d['step_ms']:.1f} | {d['tokens_per_s']:.1f} "
              f"| {d['tokens_per_s'] / base:.2f} | {d['bytes_per_step'] / 2**20:.0f} | {100 * d['mbu']:.0f}% |")
    if prefill:
        print("| prompt tokens (one call) | ms | prompt tokens/s |")
        print("| ---: | ---: | ---: |")
        for p in prefill:
            print(f"| {p['bucket']} | {p['ms']:.1f} | {p['tokens_per_s']:.0f} |")
    if sampling:
        print("| sampling (every slot) | slots | max_len | step (ms) | tokens/s | vs greedy |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in sampling:
            print(f"| {r['mode']} | {r['slots']} | {r['max_len']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.1f} "
                  f"| {r['vs_greedy']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"bandwidth_bytes_per_s": bandwidth, "decode": decode, "prefill": prefill,
                                         "sampling": sampling},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
