"""Serving benchmark: load a running jserve gRPC server and measure latency and throughput.

Load is either fixed concurrency (``--concurrency N``: N requests always in flight) or Poisson
arrivals (``--rate R`` requests/s, exponential gaps from the seeded RNG; with ``--concurrency``
too, at most N are in flight and later arrivals wait). Prompts are random token ids from the
middle of the vocabulary (away from special tokens) with seeded lengths, or built-in chat
prompts with ``--chat``. Every request is greedy (temperature 0) with ``max_tokens`` set to the
sampled output length and ``ignore_eos`` on, so it produces exactly that many tokens.

Per request: TTFT (time to the first streamed token), TPOT ((e2e - ttft) / (output tokens - 1)),
ITL (gap between consecutive streamed messages; a message carrying k tokens counts as k gaps of
gap/k) and end-to-end latency. A failed request is counted by gRPC status code; the run goes on.
Reported: requests/s, output and input tokens/s, mean/median/p90/p99 of each latency in ms, and
goodput: completed requests/s that met every SLO given (--slo-ttft-ms, --slo-tpot-ms, --slo-e2e-ms).

    python scripts/bench_serving.py --address 127.0.0.1:50051 --num-requests 200 --concurrency 16
    python scripts/bench_serving.py --rate 4 --prompt-len 256 --output-len 128 --output-dist exponential \\
        --slo-ttft-ms 500 --slo-tpot-ms 100 --json out.json --per-request

Exit codes: 0 when every request completed, 1 when some failed, 2 when the server is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import pathlib
import sys
import time

import grpc
import numpy as np

from jserve.client import FINISH_NAMES, AsyncClient
from jserve.v1 import jserve_pb2 as pb

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Explain in simple terms how a refrigerator keeps food cold.",
    "Write a short poem about the sea at night.",
    "List three tips for learning a new programming language.",
    "Summarize the plot of a story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main differences between a virus and a bacterium?",
    "Give me a recipe for a quick vegetarian dinner.",
    "Why is the sky blue? Answer in two sentences.",
]


def sample_lengths(rng: np.random.Generator, mean: int, dist: str, spread: float, n: int, hi: int) -> list[int]:
    """``n`` lengths around ``mean``: fixed, uniform within +-spread*mean, or exponential; clipped to [1, hi]."""
    if dist == "fixed":
        out = np.full(n, mean)
    elif dist == "uniform":
        lo, up = round(mean * (1 - spread)), round(mean * (1 + spread))
        out = rng.integers(lo, up + 1, n)
    else:
        out = np.rint(rng.exponential(mean, n))
    return [int(x) for x in np.clip(out, 1, max(1, hi))]


async def build_workload(args: argparse.Namespace, client: AsyncClient, info: pb.ModelInfo,
                         n: int, rng: np.random.Generator) -> list[dict]:
    """``n`` requests: prompt (token ids or chat), its length in tokens, and max_tokens."""
    if args.chat:
        lengths = {}
        for text in CHAT_PROMPTS:
            msgs = pb.Messages(messages=[pb.ChatMessage(role="user", content=text)])
            lengths[text] = len((await client.stub.Tokenize(pb.TokenizeRequest(chat=msgs), timeout=10)).ids)
        fits = [t for t in CHAT_PROMPTS if lengths[t] <= min(info.max_prompt_len, info.max_len - 1)]
        if not fits:
            raise ValueError(f"no built-in chat prompt fits the server's max_prompt_len {info.max_prompt_len}")
        picks = rng.integers(0, len(fits), n)
        prompts = [[{"role": "user", "content": fits[i]}] for i in picks]
        prompt_lens = [lengths[fits[i]] for i in picks]
    else:
        prompt_lens = sample_lengths(rng, args.prompt_len, args.prompt_dist, args.spread, n,
                                     min(info.max_prompt_len, info.max_len - 1))
        margin = min(100, info.vocab_size // 4)
        eos = set(info.eos_token_ids)
        prompts = [[t + 1 if t in eos else t for t in rng.integers(margin, info.vocab_size - margin, k).tolist()]
                   for k in prompt_lens]
    outs = sample_lengths(rng, args.output_len, args.output_dist, args.spread, n, args.output_len * 10)
    return [{"prompt": p, "prompt_len": k, "max_tokens": max(1, min(o, info.max_len - k))}
            for p, k, o in zip(prompts, prompt_lens, outs)]


async def one_request(client: AsyncClient, index: int, item: dict, args: argparse.Namespace, t0: float) -> dict:
    rec = {"index": index, "prompt_tokens": item["prompt_len"], "max_tokens": item["max_tokens"],
           "output_tokens": 0, "ttft_ms": None, "tpot_ms": None, "e2e_ms": None, "itl_ms": [],
           "finish_reason": None, "error": None}
    start = time.perf_counter()
    rec["start_s"] = start - t0
    last_tok, ntok, last = None, 0, None
    try:
        async for r in client.stream(item["prompt"], timeout=args.timeout, request_id=f"bench-{index}",
                                     max_tokens=item["max_tokens"], temperature=0.0, ignore_eos=args.ignore_eos):
            now = time.perf_counter()
            k = len(r.token_ids)
            if k:
                if last_tok is None:
                    rec["ttft_ms"] = 1000 * (now - start)
                else:
                    rec["itl_ms"].extend([1000 * (now - last_tok) / k] * k)
                last_tok, ntok = now, ntok + k
            last = r
    except grpc.aio.AioRpcError as e:
        rec["error"] = e.code().name
        rec["error_detail"] = e.details()
        return rec
    except Exception as e:  # a bad request must never end the run
        rec["error"] = "CLIENT_" + type(e).__name__
        rec["error_detail"] = str(e)
        return rec
    end = time.perf_counter()
    rec["e2e_ms"] = 1000 * (end - start)
    if last is not None and last.finish_reason:
        rec["finish_reason"] = FINISH_NAMES.get(last.finish_reason, "unknown")
        rec["output_tokens"] = last.usage.completion_tokens or ntok
        rec["prompt_tokens"] = last.usage.prompt_tokens or rec["prompt_tokens"]
    else:
        rec["output_tokens"] = ntok
    if rec["output_tokens"] > 1 and rec["ttft_ms"] is not None:
        rec["tpot_ms"] = (rec["e2e_ms"] - rec["ttft_ms"]) / (rec["output_tokens"] - 1)
    return rec


async def run_load(client: AsyncClient, workload: list[dict], args: argparse.Namespace) -> tuple[list[dict], float]:
    """Send the workload; returns the records (in workload order) and the wall time in seconds."""
    t0 = time.perf_counter()
    if args.rate is None:
        records: list[dict] = [None] * len(workload)  # type: ignore[list-item]
        todo = iter(range(len(workload)))

        async def worker() -> None:
            for i in todo:
                records[i] = await one_request(client, i, workload[i], args, t0)

        await asyncio.gather(*(worker() for _ in range(min(args.concurrency, len(workload)))))
    else:
        gaps = np.random.default_rng(args.seed + 1).exponential(1.0 / args.rate, len(workload))
        arrivals = np.cumsum(gaps) - gaps[0]  # the first request goes at once
        cap = asyncio.Semaphore(args.concurrency) if args.concurrency else None

        async def arrive(i: int) -> dict:
            await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
            if cap is None:
                return await one_request(client, i, workload[i], args, t0)
            async with cap:
                return await one_request(client, i, workload[i], args, t0)

        records = list(await asyncio.gather(*(arrive(i) for i in range(len(workload)))))
    return records, time.perf_counter() - t0


def stats(values: list[float]) -> dict | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "median": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "count": int(a.size)}


def meets_slo(rec: dict, args: argparse.Namespace) -> bool:
    """True when a completed request met every SLO given; a one-token request has no TPOT to miss."""
    for limit, value, optional in ((args.slo_ttft_ms, rec["ttft_ms"], False), (args.slo_tpot_ms, rec["tpot_ms"], True),
                                   (args.slo_e2e_ms, rec["e2e_ms"], False)):
        if limit is not None and (value > limit if value is not None else not optional):
            return False
    return True


def summarize(records: list[dict], duration: float, args: argparse.Namespace) -> dict:
    ok = [r for r in records if r["error"] is None]
    out_tok = sum(r["output_tokens"] for r in ok)
    in_tok = sum(r["prompt_tokens"] for r in ok)
    s = {"duration_s": duration, "requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
         "errors": dict(collections.Counter(r["error"] for r in records if r["error"] is not None)),
         "output_tokens": out_tok, "input_tokens": in_tok,
         "exact_output_len": sum(r["output_tokens"] == r["max_tokens"] for r in ok),
         "request_throughput": len(ok) / duration, "output_tokens_per_s": out_tok / duration,
         "input_tokens_per_s": in_tok / duration,
         "ttft_ms": stats([r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]),
         "tpot_ms": stats([r["tpot_ms"] for r in ok if r["tpot_ms"] is not None]),
         "itl_ms": stats([x for r in ok for x in r["itl_ms"]]),
         "e2e_ms": stats([r["e2e_ms"] for r in ok])}
    if any(x is not None for x in (args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)):
        good = sum(meets_slo(r, args) for r in ok)
        s["goodput"] = {"slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
                        "slo_e2e_ms": args.slo_e2e_ms, "good_requests": good,
                        "requests_per_s": good / duration, "fraction": good / len(records) if records else 0.0}
    return s


def print_table(s: dict, mode: str) -> None:
    print(f"load: {mode}; {s['completed']}/{s['requests']} completed in {s['duration_s']:.2f} s"
          + (f"; errors {s['errors']}" if s["errors"] else ""))
    print(f"throughput: {s['request_throughput']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tokens/s, "
          f"{s['input_tokens_per_s']:.1f} input tokens/s ({s['exact_output_len']}/{s['completed']} requests "
          f"produced exactly max_tokens)")
    print("| metric (ms) | mean | median | p90 | p99 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        st = s[key]
        cells = " | ".join(f"{st[q]:.1f}" for q in ("mean", "median", "p90", "p99")) if st else "- | - | - | -"
        print(f"| {name} | {cells} |")
    if "goodput" in s:
        g = s["goodput"]
        slos = ", ".join(f"{k[4:-3].upper()} <= {g[k]:g} ms" for k in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2e_ms")
                         if g[k] is not None)
        print(f"goodput ({slos}): {g['requests_per_s']:.2f} req/s, {100 * g['fraction']:.1f}% of requests")


async def _run(args: argparse.Namespace) -> int:
    client = AsyncClient(args.address)
    try:
        try:
            info = await client.model_info(timeout=args.connect_timeout)
        except grpc.aio.AioRpcError as e:
            print(f"error: cannot reach a jserve server at {args.address}: {e.code().name}: {e.details()}",
                  file=sys.stderr)
            return 2
        rng = np.random.default_rng(args.seed)
        try:
            warm = await build_workload(args, client, info, args.warmup, np.random.default_rng(args.seed + 2))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for i, item in enumerate(warm):
            rec = await one_request(client, -1 - i, item, args, time.perf_counter())
            if rec["error"]:
                print(f"warning: warm-up request failed: {rec['error']}: {rec.get('error_detail')}", file=sys.stderr)
        workload = await build_workload(args, client, info, args.num_requests, rng)
        records, duration = await run_load(client, workload, args)
    finally:
        await client.close()
    summary = summarize(records, duration, args)
    mode = (f"Poisson {args.rate:g} req/s" + (f", at most {args.concurrency} in flight" if args.concurrency else "")
            if args.rate is not None else f"concurrency {args.concurrency}")
    print(f"server: {info.model_name or info.checkpoint} ({info.slots} slots, max_len {info.max_len})")
    print_table(summary, mode)
    for code, count in summary["errors"].items():
        detail = next(r.get("error_detail", "") for r in records if r["error"] == code)
        print(f"error {code} x{count}: {detail}", file=sys.stderr)
    if args.json:
        config = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
        out = {"config": config, "server": {"model_name": info.model_name, "slots": info.slots,
                                            "max_len": info.max_len, "vocab_size": info.vocab_size},
               "summary": summary}
        if args.per_request:
            out["requests"] = records
        args.json.write_text(json.dumps(out, indent=1))
    return 0 if summary["failed"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default="127.0.0.1:50051", help="server address(es), comma-separated (round-robin)")
    ap.add_argument("--num-requests", type=int, default=100, help="requests to time (default 100)")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="requests kept in flight (default 1); with --rate, the most in flight at once")
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals at this many requests/s")
    ap.add_argument("--prompt-len", type=int, default=128, help="mean prompt length in tokens (default 128)")
    ap.add_argument("--output-len", type=int, default=128, help="mean output length in tokens (default 128)")
    dists = ["fixed", "uniform", "exponential"]
    ap.add_argument("--prompt-dist", choices=dists, default="fixed", help="prompt length distribution")
    ap.add_argument("--output-dist", choices=dists, default="fixed", help="output length distribution")
    ap.add_argument("--spread", type=float, default=0.5,
                    help="half-width of the uniform distributions, as a fraction of the mean (default 0.5)")
    ap.add_argument("--chat", action="store_true",
                    help="send built-in chat prompts instead of random token ids (--prompt-len is then unused)")
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="ask the server to go past EOS so each request makes exactly max_tokens (default on)")
    ap.add_argument("--seed", type=int, default=0, help="seed of lengths, prompts and arrival times (default 0)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed requests sent one by one first (default 1)")
    ap.add_argument("--timeout", type=float, default=None, help="deadline of each request in seconds")
    ap.add_argument("--connect-timeout", type=float, default=10.0,
                    help="seconds to wait for the server's model info before giving up (default 10)")
    ap.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput SLO: time to first token")
    ap.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput SLO: time per output token")
    ap.add_argument("--slo-e2e-ms", type=float, default=None, help="goodput SLO: end-to-end latency")
    ap.add_argument("--json", type=pathlib.Path, default=None, help="write config and summary as JSON here")
    ap.add_argument("--per-request", action="store_true", help="include every request's record in the JSON")
    args = ap.parse_args(argv)
    if args.rate is None and args.concurrency is None:
        args.concurrency = 1
    if args.num_requests < 1 or (args.concurrency is not None and args.concurrency < 1):
        ap.error("--num-requests and --concurrency must be >= 1")
    if args.rate is not None and args.rate <= 0:
        ap.error("--rate must be > 0")
    if args.prompt_len < 1 or args.output_len < 1 or not 0 <= args.spread <= 1 or args.warmup < 0:
        ap.error("--prompt-len and --output-len must be >= 1, --spread in [0, 1], --warmup >= 0")
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
