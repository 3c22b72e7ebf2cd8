"""What a sliding window saves a decode step: the same random model with and without a window.

A Mistral-shaped stack scaled down for a CPU (8 layers, dim 512, 8 query / 2 KV heads of 64,
random weights), 8 slots, a cache of ``--max-len`` positions. Times ``model.decode_step`` with
every slot at each of ``--positions``, with no window and with a window of ``--window``: without
one the step reads every block up to the position; with one, only the blocks inside the window.
Medians of 5 calls, milliseconds. Nothing here is a test.

    python scripts/bench_window.py [--window 256] [--max-len 8192] [--positions 256 1024 4096 8000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jserve import model
from jserve.config import tiny_config
from jserve.kv_cache import KVCache


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--positions", type=int, nargs="+", default=[256, 1024, 4096, 8000])
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.slots} slots x {args.max_len} positions")
    for window in (None, args.window):
        cfg = tiny_config(vocab_size=1024, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, ffn_dim=1024,
                          max_position_embeddings=args.max_len, sliding_window=window)
        params = model.init_params(cfg, jax.random.PRNGKey(0))
        cache = KVCache.zeros(cfg, args.slots, model.padded_cache_len(args.max_len), jnp.float32)
        step = jax.jit(model.decode_step, static_argnums=1, donate_argnums=(4,))
        tokens = jnp.zeros((args.slots,), jnp.int32)
        row = []
        for pos in args.positions:
            positions = jnp.full((args.slots,), pos, jnp.int32)
            n_blocks = jnp.int32(pos // model.attention_block(cache.max_len) + 1)
            _, cache = step(params, cfg, tokens, positions, cache, n_blocks)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                logits, cache = step(params, cfg, tokens, positions, cache, n_blocks)
                logits.block_until_ready()
                times.append(time.perf_counter() - t0)
            row.append(f"{pos}: {statistics.median(times) * 1e3:6.1f}")
        print(f"window {str(window):>5} | ms per step at position " + "  ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
