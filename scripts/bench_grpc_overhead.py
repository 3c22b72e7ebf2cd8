"""What the gRPC front end costs: the same workload offline (``jserve.LLM``) and through a server.

The workload: ``--requests`` prompts of ``--prompt-len`` random token ids (seeded), ``--max-tokens``
greedy tokens each past EOS. Offline, all of them go to ``LLM.generate`` (continuous batching
over ``--slots`` slots); served, a ``python -m jserve.server`` with the same flags started by this
script gets them from ``--concurrency`` client streams at a time (default: as many as slots).
Rounds alternate offline and served; the table shows each round's output tokens/s, the medians
and their ratio (served / offline). Both produce the same tokens, which is checked.

    python scripts/bench_grpc_overhead.py [--slots 8] [--requests 32] [--max-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_harness import Started, start_server  # noqa: E402


def serve(args: argparse.Namespace) -> Started:
    flags = ["--port", "0", "--log-level", "WARNING", "--slots", str(args.slots), "--max-len", str(args.max_len),
             "--max-prompt-len", str(args.prompt_len), "--max-logprobs", "0"]
    if args.checkpoint:
        flags += ["--checkpoint", str(args.checkpoint)]
    if args.quantize:
        flags += ["--quantize", args.quantize]
    return start_server(flags)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=pathlib.Path, default=None)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=None, help="client streams in flight (default: --slots)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=None, help="default: prompt-len + max-tokens")
    ap.add_argument("--quantize", default=None, choices=["int8", "int8-dynamic", "q8_0", "q4_0", "q4_1", "float"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    args.max_len = args.max_len or args.prompt_len + args.max_tokens
    concurrency = args.concurrency or args.slots
    logging.basicConfig(level=logging.WARNING)

    import numpy as np

    from jserve import LLM, SamplingParams
    from jserve.client import Client

    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(100, 40000, args.prompt_len).tolist() for _ in range(args.requests)]
    sampling = dict(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    total = args.requests * args.max_tokens

    llm = LLM(args.checkpoint, slots=args.slots, max_len=args.max_len, max_prompt_len=args.prompt_len,
              quantize=args.quantize)
    llm.generate(prompts[: args.slots], SamplingParams(**sampling))  # warm
    server = serve(args)
    rounds: dict[str, list[float]] = {"offline": [], "grpc": []}
    outputs: dict[str, list[list[int]]] = {}
    try:
        with Client(server.grpc_address) as client:
            client.complete_many(prompts[: args.slots], concurrency=concurrency, **sampling)  # warm
            for r in range(args.rounds):
                t0 = time.perf_counter()
                res = llm.generate(prompts, SamplingParams(**sampling))
                rounds["offline"].append(total / (time.perf_counter() - t0))
                outputs["offline"] = [x.token_ids for x in res]
                t0 = time.perf_counter()
                got = client.complete_many(prompts, concurrency=concurrency, **sampling)
                rounds["grpc"].append(total / (time.perf_counter() - t0))
                outputs["grpc"] = [x.token_ids for x in got]
                print(f"round {r + 1}: offline {rounds['offline'][-1]:.1f} tok/s, gRPC {rounds['grpc'][-1]:.1f} tok/s",
                      file=sys.stderr)
    finally:
        server.stop()
        llm.close(drain=False)
    same = outputs["offline"] == outputs["grpc"]
    med = {k: statistics.median(v) for k, v in rounds.items()}
    print(f"{args.requests} requests x {args.max_tokens} tokens (prompt {args.prompt_len}), {args.slots} slots, "
          f"{concurrency} client streams, weights {args.quantize or 'float32'}; same tokens: {same}")
    print("| path | output tokens/s (median) | rounds |")
    print("| --- | ---: | --- |")
    for k in ("offline", "grpc"):
        print(f"| {k} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in rounds[k])} |")
    print(f"gRPC / offline: {med['grpc'] / med['offline']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds,
                                         "median": med, "ratio": med["grpc"] / med["offline"], "same_tokens": same},
                                        indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
