"""Prompt-side latency: prefix caching, chunked prefill and batched prefill, against a baseline tree.

Four workloads on the real model, each run in a fresh process per (tree, setting) and round, the
rounds interleaved so that the machine's drift hits every variant alike:

- ``shared``: 16 requests sharing a 500-token system prompt, each with its own 20-token question,
  submitted together. ``cold``: the first such batch a fresh server sees; ``warm``: a second batch
  (other questions) after the first finished. Reported: median and worst time to first token.
- ``chat``: the second turn of a chat (a 300-token first turn, its 100-token answer, a 20-token
  question): time to first token of turn 2, with the prefix cache on and off.
- ``burst``: 16 short chat prompts (about 40 tokens with the chat template) arriving together:
  time until all 16 have a first token.
- ``stall``: 8 streams decoding when 4 prompts of 900 tokens arrive: the streams' median and worst
  gap between tokens from the arrival until the last of the 4 has its first token.

``--tree NAME=PATH`` (repeatable) names checkouts to compare, e.g. ``--tree main=. --tree
base=/tmp/base`` where /tmp/base is ``git worktree add /tmp/base <commit>``; features a tree lacks
(the prefix cache) are skipped for it. Prints a markdown table of medians over rounds and writes
``--json``.

    python scripts/bench_prefill.py --tree new=. --tree base=/tmp/base --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "smollm2-135m-instruct"


# ---- one measurement, in a child process whose jserve comes from the tree under test ----------------
def _child(spec: dict) -> dict:
    import threading

    import numpy as np

    from jserve import LLM, SamplingParams

    kw = dict(slots=16, max_len=1024, prefill_budget=spec["budget"])
    if spec.get("prefix_cache") is not None:
        kw["prefix_cache"] = spec["prefix_cache"]
    llm = LLM(spec["checkpoint"], **kw)
    rng = np.random.default_rng(spec["seed"])
    vocab = llm.config.vocab_size

    def ids(n: int) -> list[int]:
        return rng.integers(200, vocab - 1, n).tolist()

    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    # Run every prompt size once first (alone and in a burst), so that no measured request pays
    # for a compiled call's first run in this process.
    for n in (20, 40, 100, 300, 600, 1000):
        llm.generate([ids(n)], greedy)
    llm.generate([ids(40) for _ in range(16)], greedy)

    def ttfts(prompts, params=greedy) -> list[float]:
        """Submit all at once; seconds from submission to each one's first token (each stream read
        by its own thread, so no stream's time waits for another's reader)."""
        t0 = time.perf_counter()
        streams = [llm.submit(p, params) for p in prompts]
        out = [0.0] * len(streams)

        def read(i: int) -> None:
            it = iter(streams[i])
            next(it)
            out[i] = time.perf_counter() - t0
            for _ in it:
                pass

        readers = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        return out

    w = spec["workload"]
    res: dict = {}
    if w == "shared":
        system = ids(500)
        first = ttfts([system + ids(20) for _ in range(16)])
        second = ttfts([system + ids(20) for _ in range(16)])
        res = {"cold_median": statistics.median(first), "cold_max": max(first),
               "warm_median": statistics.median(second), "warm_max": max(second)}
    elif w == "chat":
        turn1 = ids(300)
        [r1] = llm.generate([turn1], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
        [t] = ttfts([turn1 + r1.token_ids + ids(20)])
        res = {"turn2_ttft": t}
    elif w == "burst":
        # Chat messages as users send them: the template's system prompt is the shared start.
        chats = [[{"role": "user", "content": f"Question {i}: name a colour of the rainbow."}] for i in range(16)]
        res = {"all_first": max(ttfts([llm.tokenize_input(c) for c in chats]))}
    elif w == "stall":
        params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        streams = [llm.submit(ids(50), params) for _ in range(8)]
        stamps: list[list[float]] = [[] for _ in streams]

        def read(i: int) -> None:
            for _ in streams[i]:
                stamps[i].append(time.perf_counter())

        readers = [threading.Thread(target=read, args=(i,)) for i in range(8)]
        for t in readers:
            t.start()
        while min(len(s) for s in stamps) < 20:  # all decoding
            time.sleep(0.01)
        t_arrive = time.perf_counter()
        long_first = ttfts([ids(900) for _ in range(4)], SamplingParams(temperature=0.0, max_tokens=1))
        t_done = t_arrive + max(long_first)
        for t in readers:
            t.join()
        gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > t_arrive and a < t_done]
        before = [b - a for s in stamps for a, b in zip(s, s[1:]) if b < t_arrive]
        res = {"gap_median": statistics.median(gaps), "gap_max": max(gaps),
               "gap_before_median": statistics.median(before), "long_ttft_max": max(long_first)}
    llm.close(drain=False)
    return res


# ---- the driver -------------------------------------------------------------------------------------
def _run(tree: pathlib.Path, spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, cwd=tree,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"child failed in {tree}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _has_prefix_cache(tree: pathlib.Path) -> bool:
    return "prefix_cache" in (tree / "jserve" / "llm.py").read_text()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tree", action="append", default=[], help="NAME=PATH of a checkout to measure (repeatable)")
    ap.add_argument("--workloads", default="shared,chat,burst,stall")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=None,
                    help="--prefill-budget for every tree (default: each tree's own)")
    ap.add_argument("--checkpoint", default=str(CHECKPOINT))
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    trees = dict(t.split("=", 1) for t in (args.tree or ["this=."]))
    variants = []  # (label, tree, spec)
    for w in args.workloads.split(","):
        for name, path in trees.items():
            tree = pathlib.Path(path).resolve()
            base = {"workload": w, "checkpoint": args.checkpoint, "budget": args.budget}
            if base["budget"] is None:
                base["budget"] = 64 if _has_prefix_cache(tree) else 512  # each tree's default
            if _has_prefix_cache(tree) and w in ("shared", "chat"):
                variants.append((f"{w} {name} cache on", tree, dict(base, prefix_cache=True)))
                variants.append((f"{w} {name} cache off", tree, dict(base, prefix_cache=False)))
            else:
                variants.append((f"{w} {name}", tree, base))
    results: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
    for r in range(args.rounds):
        for label, tree, spec in variants:
            results[label].append(_run(tree, dict(spec, seed=r)))
            print(f"round {r + 1}: {label}: {results[label][-1]}", file=sys.stderr, flush=True)
    print("| workload, tree, setting | metric | median over rounds (s) |")
    print("|---|---|---|")
    for label, rows in results.items():
        for key in rows[0]:
            print(f"| {label} | {key} | {statistics.median(r[key] for r in rows):.3f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
