"""Decode step time per KV cache type (``--kv-dtype``), as ratios to the first type in the same run.

Every slot holds a ``--context``-token prompt (pieces of the public-domain text), then decodes; a
round times ``--steps`` decode steps of every KV type's engine in turn, so background noise on a
shared machine hits all of them alike; the median over ``--rounds`` rounds is reported, with the
pool's bytes per token (all layers, keys and values, an int8 cache's scales included).

    python scripts/bench_kv_dtype.py [--kv-dtypes bfloat16 int8 float32] [--slots 8] [--context 900]

Prints a markdown table and, with ``--json``, writes the rows.
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

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    from jserve.serving_config import KV_DTYPES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=pathlib.Path, default=None)
    ap.add_argument("--kv-dtypes", nargs="+", default=["bfloat16", "int8", "float32"], choices=KV_DTYPES)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--context", type=int, default=900, help="prompt tokens in every slot")
    ap.add_argument("--max-len", type=int, default=1024, help="positions per slot")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per timing")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    if not 1 <= args.context < args.max_len - args.steps * args.rounds - 2:
        ap.error(f"--context {args.context} leaves no room to decode in --max-len {args.max_len}")
    logging.basicConfig(level=logging.WARNING)

    import jax
    import jax.numpy as jnp

    from jserve import checkpoint
    from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint
    from jserve.engine import JaxEngine
    from jserve.kv_pages import kv_bytes_per_position
    from jserve.sampling import SamplingParams

    ckpt = args.checkpoint or ensure_default_checkpoint(DEFAULT_CHECKPOINT)
    cfg, params, tokenizer = checkpoint.load(ckpt)
    ids = tokenizer.encode((ROOT / "tests/data/public_domain_english.txt").read_text())
    greedy = SamplingParams(temperature=0.0)
    runs = {}
    for kv in args.kv_dtypes:
        eng = JaxEngine(cfg.for_context(args.max_len), params, slots=args.slots, max_len=args.max_len,
                        max_prompt_len=args.context, cache_dtype=getattr(jnp, kv))
        state = eng.init_state()
        for s in range(args.slots):
            start = (s * 97) % max(1, len(ids) - args.context)
            state, _ = eng.prefill(state, s, ids[start:start + args.context], greedy, s)
        runs[kv] = (eng, settle(eng, state))
        print(f"ready: {kv}", file=sys.stderr)

    rows = []
    for kv, step in time_decode(runs, args.rounds, args.steps).items():
        rows.append({"kv_dtype": kv, "step_ms": 1000 * step,
                     "bytes_per_token": kv_bytes_per_position(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, kv)})
    first = rows[0]
    print(f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
          f"{len(jax.devices())} {jax.devices()[0].platform} device(s), {args.slots} slots x {args.context} "
          f"positions")
    print(f"| KV cache | bytes/token | step (ms) | step vs {first['kv_dtype']} |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        r["step_vs_first"] = r["step_ms"] / first["step_ms"]
        print(f"| {r['kv_dtype']} | {r['bytes_per_token']} | {r['step_ms']:.1f} | {r['step_vs_first']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
