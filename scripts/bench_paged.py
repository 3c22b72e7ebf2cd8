"""Decode step time of two jserve trees at equal occupancy, as a ratio from one run.

Each tree (a directory holding a ``jserve`` package, e.g. this checkout and an export of an older
commit) runs in its own worker process: an engine of ``--slots`` x ``--max-len`` with every slot
holding a prompt of ``--context`` tokens, then timed decode steps over every slot. The workers
take turns, ``--rounds`` rounds of ``--steps`` steps each, so a shared machine's noise hits both
alike; the median step time of each is reported, and their ratio.

    python scripts/bench_paged.py --trees /tmp/base-paged . [--slots 8 --max-len 1024 --context 500]

``--serve A B``: instead, each tree serves the same ``--requests`` chats (prompts of 50-400 random
tokens, ``--max-tokens`` greedy tokens each, all submitted at once) through ``LLM`` built with the
engine settings ``A`` (first tree) and ``B`` (second), e.g. ``"slots=8,max_len=1024"`` and
``"slots=32,max_len=4096,kv_memory=188743680"``, after warm-up finished; reports the median wall
time of a batch, output tokens/s, their ratio, each process's peak RSS and preemptions a batch,
and whether the two trees' greedy outputs are equal.

``--tenants N``: instead, the first tree alone with ``--settings``: N tenants' distinct
``--system-len``-token system prompts, each asked twice (a new ``--question-len``-token question
each time) in a shuffled order, one request at a time; reports the median time to first token
the first and the second time, their ratio, the tokens taken from the cache, and whether 16
second-time outputs (tokens and logprobs) equal, bitwise, computing them with the cache off.

    python scripts/bench_paged.py --trees . --tenants 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time
import numpy as np
import jax.numpy as jnp
from jserve import checkpoint
from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint
from jserve.engine import JaxEngine
from jserve.sampling import SamplingParams
slots, max_len, context, steps = (int(x) for x in sys.argv[1:5])
cfg, params, _ = checkpoint.load(ensure_default_checkpoint(DEFAULT_CHECKPOINT), jnp.float32)
eng = JaxEngine(cfg, params, slots=slots, max_len=max_len, max_prompt_len=context, cache_dtype=jnp.bfloat16)
state = eng.init_state()
rng = np.random.default_rng(0)
for s in range(slots):
    state, _ = eng.prefill(state, s, rng.integers(100, 40000, context).tolist(), SamplingParams(temperature=0.0), s)
for _ in range(3):
    state, out = eng.generate(state)
    np.asarray(out)
print("ready", flush=True)
for line in sys.stdin:
    t0 = time.perf_counter()
    for _ in range(steps):
        state, out = eng.generate(state)
        np.asarray(out)
    print(json.dumps((time.perf_counter() - t0) / steps), flush=True)
"""


SERVE_WORKER = r"""
import hashlib, json, sys, time
import numpy as np
from jserve import LLM, SamplingParams
from jserve.llm import collect
settings = dict(kv.split("=") for kv in sys.argv[1].split(","))
settings = {k: (int(v) if v.isdigit() else v) for k, v in settings.items()}
n, max_tokens = int(sys.argv[2]), int(sys.argv[3])
llm = LLM(top_logprobs=0, speculate=0, **settings)
llm.engine.wait_ready()
rng = np.random.default_rng(0)
prompts = [rng.integers(100, 40000, int(k)).tolist() for k in rng.integers(50, 401, n)]
sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
print("ready", flush=True)
for line in sys.stdin:
    t0 = time.perf_counter()
    streams = [llm.submit(p, sp) for p in prompts]
    results = [collect(list(s)) for s in streams]
    dt = time.perf_counter() - t0
    digest = hashlib.sha256(json.dumps([r.token_ids for r in results]).encode()).hexdigest()[:16]
    assert all(r.completion_tokens == max_tokens for r in results), [r.error for r in results if r.error]
    print(json.dumps([dt, digest, hwm(), llm.orchestrator.preemptions]), flush=True)
llm.close()
"""


TENANTS_WORKER = r"""
import json, statistics, sys, time
import numpy as np
from jserve import LLM, SamplingParams
from jserve.llm import collect
settings = dict(kv.split("=") for kv in sys.argv[1].split(","))
settings = {k: (int(v) if v.isdigit() else v) for k, v in settings.items()}
tenants, system_len, question_len = (int(x) for x in sys.argv[2:5])
llm = LLM(top_logprobs=1, speculate=0, **settings)
llm.engine.wait_ready()
rng = np.random.default_rng(0)
systems = [rng.integers(100, 40000, system_len).tolist() for _ in range(tenants)]
order = rng.permutation(np.repeat(np.arange(tenants), 2)).tolist()
sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=1)
seen, rows = set(), []
for t in order:  # one request at a time: TTFT is the prompt's own prefill
    prompt = systems[t] + rng.integers(100, 40000, question_len).tolist()
    t0 = time.perf_counter()
    pieces, ttft = [], None
    for piece in llm.submit(prompt, sp):
        ttft = time.perf_counter() - t0 if ttft is None else ttft
        pieces.append(piece)
    r = collect(pieces)
    assert r.error is None, r.error
    rows.append({"second": t in seen, "ttft": ttft, "cached": r.cached_tokens, "prompt": prompt,
                 "out": [r.token_ids, np.asarray(r.logprobs, np.float32).tobytes().hex()]})
    seen.add(t)
# Cached == computed: the second-time prompts again with the prefix cache off (nothing is in flight).
llm.orchestrator.prefix_cache = False
second = [row for row in rows if row["second"]]
same = 0
for row in second[:16]:
    r = collect(list(llm.submit(row["prompt"], sp)))
    same += [r.token_ids, np.asarray(r.logprobs, np.float32).tobytes().hex()] == row["out"]
first_t = [row["ttft"] for row in rows if not row["second"]]
second_t = [row["ttft"] for row in second]
print(json.dumps({"first_ttft": statistics.median(first_t), "second_ttft": statistics.median(second_t),
                  "cached_second": statistics.median(row["cached"] for row in second),
                  "cached_first": statistics.median(row["cached"] for row in rows if not row["second"]),
                  "bitwise": f"{same}/{min(16, len(second))}", "pages": llm.orchestrator.pages.stats().__dict__
                  if llm.orchestrator.pages else None, "preemptions": llm.orchestrator.preemptions}), flush=True)
llm.close()
"""


def tenants(args) -> int:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(args.trees[0])}
    out = subprocess.run([sys.executable, "-c", TENANTS_WORKER, args.settings, str(args.tenants),
                          str(args.system_len), str(args.question_len)], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stderr)
        return out.returncode
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.tenants} tenants x 2 asks, {args.system_len}-token system prompts + {args.question_len}-token "
          f"questions, [{args.settings}]: median TTFT first time {1000 * r['first_ttft']:.0f} ms "
          f"({r['cached_first']:.0f} tokens cached), second time {1000 * r['second_ttft']:.0f} ms "
          f"({r['cached_second']:.0f} cached); ratio {r['second_ttft'] / r['first_ttft']:.2f}; second-time outputs "
          f"equal to computing without the cache (tokens and logprobs, bitwise): {r['bitwise']}; "
          f"preemptions {r['preemptions']}; pool {r['pages']}")
    return 0


def alternate(trees: list[str], commands: list[list[str]], rounds: int) -> list[list]:
    """One worker per tree (``python -c`` each of ``commands``, the tree first on its path), started
    together; once all are ready, ``rounds`` rounds in which each worker in turn runs once (a line
    ``go`` in, its JSON line out), so both meet the machine's same moments. Each worker's answers."""
    workers = []
    for tree, command in zip(trees, commands):
        env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
        workers.append(subprocess.Popen([sys.executable, "-c", *command], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env))
    for p in workers:
        assert p.stdout.readline().strip() == "ready"
    answers: list[list] = [[] for _ in workers]
    for _ in range(rounds):
        for i, p in enumerate(workers):
            p.stdin.write("go\n")
            p.stdin.flush()
            answers[i].append(json.loads(p.stdout.readline()))
    for p in workers:
        p.stdin.close()
        p.wait()
    return answers


def serve(args) -> int:
    runs = alternate(args.trees, [[SERVE_WORKER, settings, str(args.requests), str(args.max_tokens)]
                                  for settings in args.serve], args.rounds)
    tokens = args.requests * args.max_tokens
    med = [statistics.median(r[0] for r in run) for run in runs]
    for tree, settings, run, m in zip(args.trees, args.serve, runs, med):
        print(f"{tree} [{settings}]: {m:.1f} s a batch, {tokens / m:.1f} output tokens/s, peak RSS "
              f"{max(r[2] for r in run):.0f} MiB, preemptions {run[-1][3] / len(run):.1f} a batch, "
              f"outputs {sorted({r[1] for r in run})}")
    print(f"throughput ratio (second / first): {med[0] / med[1]:.2f}; same greedy outputs: "
          f"{runs[0][0][1] == runs[1][0][1]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs="+", required=True, help="baseline tree, then the tree to compare")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--context", type=int, default=500, help="prompt tokens in every slot")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--serve", nargs=2, metavar=("A", "B"), help="engine settings per tree: serve chats instead")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--tenants", type=int,
                    help="instead: this many tenants' system prompts, each asked twice (shuffled, one at a time) "
                         "through the first tree; TTFT first vs second time")
    ap.add_argument("--settings", default="slots=8,max_len=1024,kv_memory=1061683200",
                    help="engine settings for --tenants (default: 360 pages of 128 bfloat16 positions for SmolLM2: 64 "
                         "tenants x 5 pages and 8 running requests x 5)")
    ap.add_argument("--system-len", type=int, default=500)
    ap.add_argument("--question-len", type=int, default=20)
    args = ap.parse_args(argv)
    if args.tenants:
        return tenants(args)
    if len(args.trees) != 2:
        ap.error("--trees takes two trees (one with --tenants)")
    if args.serve:
        return serve(args)
    command = [WORKER, str(args.slots), str(args.max_len), str(args.context), str(args.steps)]
    times = alternate(args.trees, [command, command], args.rounds)
    base, new = (statistics.median(t) for t in times)
    print(f"{args.slots} slots x {args.max_len}, {args.context} positions each, median of {args.rounds} rounds of "
          f"{args.steps} steps: {args.trees[0]} {1000 * base:.1f} ms, {args.trees[1]} {1000 * new:.1f} ms; "
          f"ratio {new / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
