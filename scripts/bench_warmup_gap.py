"""Decode-step gaps while warm-up's background phase compiles, against after it.

An ``LLM`` at the server's defaults (8 slots x 1024, speculation 4 compiled) streams one greedy
request after another, plain decode steps only (``speculate=False``: the same call throughout),
from the moment it is built, while the background thread compiles the larger prompt-chunk calls
and the verify shapes (tracing holds Python's GIL; XLA's compiler takes CPU), then for as many
requests after it is done. Prints the gaps between a stream's tokens: median and worst, during
and after. Other work on the machine moves these numbers; compare within one run.

    python scripts/bench_warmup_gap.py [--tokens 200] [--after 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=200, help="tokens per request")
    ap.add_argument("--after", type=int, default=2, help="requests once the background phase is done")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--speculate", type=int, default=4)
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval for the whole run (Python's default: 0.005 s)")
    args = ap.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("jserve.engine").setLevel(logging.INFO)  # when serving starts and the background ends

    from jserve import LLM, SamplingParams

    llm = LLM(slots=args.slots, max_len=args.max_len, speculate=args.speculate, top_logprobs=5)
    engine = llm.engine
    sp = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True, speculate=False)
    chat = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    gaps: dict[str, list[float]] = {"during": [], "after": []}
    after = 0
    t_start = time.perf_counter()
    try:
        while after < args.after:
            busy = not engine.wait_ready(0)
            last = None
            for _ in llm.submit(chat, sp):
                now = time.perf_counter()
                if last is not None:
                    gaps["during" if busy and not engine.wait_ready(0) else "after"].append(now - last)
                last = now
            after += not busy
            print(f"request done at {time.perf_counter() - t_start:.1f} s (background {'running' if busy else 'done'})",
                  file=sys.stderr)
    finally:
        llm.close(drain=False)
    print(f"{args.slots} slots x {args.max_len}, speculate {args.speculate}, switch interval "
          f"{sys.getswitchinterval() * 1000:.1f} ms; one stream of {args.tokens} tokens at "
          f"a time; load averages {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, g in gaps.items():
        if g:
            print(f"{name} the background phase: {len(g)} gaps, median {1000 * statistics.median(g):.1f} ms, "
                  f"p99 {1000 * sorted(g)[int(0.99 * (len(g) - 1))]:.1f} ms, worst {1000 * max(g):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
