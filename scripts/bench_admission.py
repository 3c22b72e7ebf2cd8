"""Time between tokens of a running stream while new requests arrive (prefill stalls).

One long greedy stream runs; after it has produced some tokens, ``--arrivals`` requests with
long prompts arrive at once. The orchestrator admits newcomers between decode steps within a
prompt-token budget per step (``prefill_budget``); this measures the running stream's
inter-token latency before and during the arrivals, for several budgets in one run.

    python scripts/bench_admission.py [--budgets 128 512 100000] [--prompt-len 400]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import threading
import time


def _arrive(llm, stamps: list[float], n: int, prompt_len: int) -> None:
    """After the running stream's 20th token, submit ``n`` long-prompt requests at once."""
    from jserve import SamplingParams

    while len(stamps) < 20:
        time.sleep(0.001)
    for i in range(n):
        ids = [(17 + 31 * i + 7 * j) % 40000 + 100 for j in range(prompt_len)]
        llm.submit(ids, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), block=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 512, 100000])
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--arrivals", type=int, default=7)
    ap.add_argument("--prompt-len", type=int, default=400)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from jserve import LLM, SamplingParams

    rows = []
    for budget in args.budgets:
        llm = LLM(None, slots=args.slots, max_len=args.max_len, max_prompt_len=args.prompt_len,
                  prefill_budget=budget)
        long_sp = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
        stamps: list[float] = []
        stream = llm.submit("Write a long story about a lighthouse keeper.", long_sp)
        t = threading.Thread(target=_arrive, args=(llm, stamps, args.arrivals, args.prompt_len))
        t.start()
        for piece in stream:
            if piece.token_ids:
                stamps.append(time.perf_counter())
        t.join()
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        before, during = gaps[5:19], gaps[19:19 + 20]
        row = {"prefill_budget": budget, "itl_before_median_ms": 1000 * statistics.median(before),
               "itl_during_median_ms": 1000 * statistics.median(during), "itl_during_max_ms": 1000 * max(during)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        llm.close(drain=True, timeout=300)

    print(f"| prefill budget (tokens/step) | ITL before (median ms) | ITL during arrivals (median ms) | "
          f"ITL during (max ms) |  [{args.arrivals} arrivals x {args.prompt_len}-token prompts, {args.slots} slots]")
    print("| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['prefill_budget']} | {r['itl_before_median_ms']:.1f} | {r['itl_during_median_ms']:.1f} "
              f"| {r['itl_during_max_ms']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
