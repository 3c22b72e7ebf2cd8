"""What abusive requests cost a running stream: its worst gap between tokens, in decode steps.

Starts ``python -m jserve.server`` at its defaults (the default model, ``--slots 8 --max-len
1024``). Each round streams one sampled request of ``--max-tokens`` tokens alone (the
baseline), then the same request again while, from its 20th token on, abusive requests arrive
at the same time:

- a 3 MB text prompt, over gRPC Generate and over Tokenize (refused: too long);
- a 1 MB ``request_id``, and a chat of 5,000 messages (refused);
- a request at the limits, which is served: 16 stop strings of 1,000 characters that never
  match, a 256-character ``request_id``, top logprobs at the server's maximum, a prompt of
  ~840 tokens (prefilled in ``--prefill-budget`` chunks between the stream's steps).

A third run has the stream joined, at the same token, by an ordinary request with the same
prompt and ``max_tokens`` as the one at the limits but none of its extremes: its prefill costs
the stream what any new request's does (bounded by ``--prefill-budget`` per turn, not by one
decode step). The abuse's own cost is the difference between the two.

It prints the stream's median gap (one decode step) and its worst gap in the three runs, and
``(worst with abuse - worst beside the ordinary request) / median alone``: how many decode
steps the abusive extremes added to the stream's worst gap. Nothing here is a test.

    python scripts/bench_abuse.py [--rounds 3] [--max-tokens 160] [--extra "--slots 16"]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shlex
import statistics
import sys
import time

import grpc

from jserve.client import Client

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_harness import start_server  # noqa: E402

ABUSE_AFTER = 20


def gaps(client: Client, args: argparse.Namespace, seed: int, on_token=None) -> list[float]:
    times = []
    for r in client.stream("Tell me a long story about a lighthouse keeper.", max_tokens=args.max_tokens,
                           ignore_eos=True, temperature=0.8, top_p=0.95, seed=seed, timeout=600):
        if r.token_ids:
            times.append(time.perf_counter())
            if on_token is not None and len(times) == ABUSE_AFTER:
                on_token()
    return [b - a for a, b in zip(times, times[1:])]


PROMPT_AT_LIMITS = "the cat sat on the mat. " * 120


def ordinary(client: Client) -> list[concurrent.futures.Future]:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    futures = [pool.submit(lambda: client.complete(PROMPT_AT_LIMITS, max_tokens=64, ignore_eos=True,
                                                   temperature=0.8, seed=1, timeout=600))]
    pool.shutdown(wait=False)
    return futures


def abuse(client: Client) -> list[concurrent.futures.Future]:
    huge = "hello world " * 250_000  # 3 MB: under the request size limit, over the prompt limit
    at_limits = dict(max_tokens=64, ignore_eos=True, temperature=0.8, seed=1, logprobs=5,
                     stop=[f"{i:02d}" * 500 for i in range(16)])
    calls = [
        lambda: client.complete(huge, max_tokens=4, timeout=120),
        lambda: client.tokenize(huge),
        lambda: client.complete("hi", request_id="x" * (1 << 20), max_tokens=4, timeout=120),
        lambda: client.complete([{"role": "user", "content": "hi"}] * 5000, max_tokens=4, timeout=120),
        lambda: client.complete(PROMPT_AT_LIMITS, request_id="r" * 256, timeout=600, **at_limits),
    ]
    pool = concurrent.futures.ThreadPoolExecutor(len(calls))
    futures = [pool.submit(c) for c in calls]
    pool.shutdown(wait=False)
    return futures


def outcome(f: concurrent.futures.Future) -> str:
    try:
        r = f.result()
        if isinstance(r, list):
            return f"served: {len(r)} ids"
        return f"served: {r.completion_tokens} tokens, {r.finish_reason}"
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()[:70]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--extra", default="", help="more server flags, e.g. '--slots 16'")
    args = ap.parse_args(argv)

    server = start_server(["--port", "0", *shlex.split(args.extra)])
    rows = []
    try:
        with Client(server.grpc_address) as client:
            client.complete("warm up", max_tokens=8)
            for i in range(args.rounds):
                alone = gaps(client, args, seed=i)
                plain: list = []
                beside = gaps(client, args, seed=i, on_token=lambda plain=plain: plain.extend(ordinary(client)))
                concurrent.futures.wait(plain)
                futures: list = []
                loaded = gaps(client, args, seed=i, on_token=lambda futures=futures: futures.extend(abuse(client)))
                concurrent.futures.wait(futures)
                med = statistics.median(alone)
                added = (max(loaded) - max(beside)) / med
                rows.append((med, max(alone), max(beside), max(loaded), added))
                print(f"round {i}: step {med * 1e3:.1f} ms; worst gap alone {max(alone) * 1e3:.1f} ms, "
                      f"beside an ordinary request {max(beside) * 1e3:.1f} ms, with abuse {max(loaded) * 1e3:.1f} ms: "
                      f"abuse added {added:+.2f} steps", flush=True)
                if i == 0:
                    for f in futures:
                        print("   ", outcome(f))
    finally:
        server.stop()
    print(f"server: {server.mode}")
    print(f"median over {args.rounds} rounds: step {statistics.median(r[0] for r in rows) * 1e3:.1f} ms, "
          f"worst alone {statistics.median(r[1] for r in rows) * 1e3:.1f} ms, "
          f"beside an ordinary request {statistics.median(r[2] for r in rows) * 1e3:.1f} ms, "
          f"worst with abuse {statistics.median(r[3] for r in rows) * 1e3:.1f} ms, "
          f"added {statistics.median(r[4] for r in rows):.2f} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
