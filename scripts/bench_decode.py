"""Decode throughput per weight mode and slot count, as ratios to float32 in the same run.

Every slot holds a request (a short prompt, then decoding); a round times ``--steps`` decode
steps of every (mode, slots) engine in turn, so background noise on a shared machine hits all
of them alike; the median step time over ``--rounds`` rounds is reported.

    python scripts/bench_decode.py [--slots 1 8 32] [--modes float32 int8 int8-dynamic]

Prints a markdown table (tokens/s and ratio to float32 at the same slot count) and JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import platform
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_harness import settle, time_decode  # noqa: E402

# mode → (dtype, --quantize); "stored" serves the checkpoint as it is (the default GGUF's Q4_1/Q8_0 blocks).
ALL_MODES = {"float32": ("float32", "float"), "bfloat16": ("bfloat16", "float"), "int8": ("float32", "int8"),
             "int8-dynamic": ("float32", "int8-dynamic"), "stored": ("float32", None), "q8_0": ("float32", "q8_0"),
             "q4_0": ("float32", "q4_0"), "q4_1": ("float32", "q4_1")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=pathlib.Path, default=None)
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--modes", nargs="+", default=["float32", "bfloat16", "int8", "int8-dynamic"],
                    choices=list(ALL_MODES))
    ap.add_argument("--max-len", type=int, default=256, help="positions per slot (attention span)")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timing")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import jax
    import jax.numpy as jnp

    from jserve import checkpoint
    from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint
    from jserve.engine import JaxEngine
    from jserve.sampling import SamplingParams

    ckpt = args.checkpoint or ensure_default_checkpoint(DEFAULT_CHECKPOINT)
    cfg, weights = checkpoint.load_weights(ckpt)
    greedy = SamplingParams(temperature=0.0)
    runs = {}
    for mode in args.modes:
        dtype, quant = ALL_MODES[mode]
        params = checkpoint.to_params(cfg, weights, getattr(jnp, dtype), quant)
        for slots in args.slots:
            eng = JaxEngine(cfg, params, slots=slots, max_len=args.max_len, max_prompt_len=16,
                            cache_dtype=getattr(jnp, dtype))
            state = eng.init_state()
            for s in range(slots):
                state, _ = eng.prefill(state, s, [1, 9690, 198, 2683 + s], greedy, s)
            runs[(mode, slots)] = (eng, settle(eng, state))
            print(f"ready: {mode} x {slots} slots", file=sys.stderr)

    rows = []
    for (mode, slots), step in time_decode(runs, args.rounds, args.steps).items():
        rows.append({"mode": mode, "slots": slots, "step_ms": 1000 * step, "tokens_per_s": slots / step})
    base = {r["slots"]: r["tokens_per_s"] for r in rows if r["mode"] == "float32"}
    for r in rows:
        r["vs_float32"] = r["tokens_per_s"] / base[r["slots"]] if r["slots"] in base else None
    print(f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
          f"{len(jax.devices())} {jax.devices()[0].platform} device(s), max_len {args.max_len}")
    print("| mode | slots | step (ms) | tokens/s | vs float32 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in sorted(rows, key=lambda r: (r["slots"], args.modes.index(r["mode"]))):
        ratio = f"{r['vs_float32']:.2f}" if r["vs_float32"] is not None else "-"
        print(f"| {r['mode']} | {r['slots']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.1f} | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
