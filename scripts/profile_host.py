"""Where one stream's time goes on the host, through the Python ``LLM`` (no HTTP, no gRPC).

``LLM()`` at the defaults (8 slots x 1024, the default checkpoint, speculation off), waited for
until its background compilation is done; then ``--rounds`` requests one at a time, each a chat
question for ``--max-tokens`` tokens (``ignore_eos``, temperature 0.8, top-p 0.95, top-k 50,
seeded). Per round: wall ms per token after the first, and CPU ms per token by thread: the
orchestrator's loop (dispatching steps, reading their results, handing tokens to the stream), the
asyncio consumer, XLA's compute pool (``tf_XLAEigen``) and the other Python-named threads (XLA's
executor). ``--profile`` also prints a cProfile of the orchestrator thread over the rounds (its
top functions by own time: a step's dispatch is ``stages.py(__call__)``, its wait and copy to the
host ``numpy.asarray``). Nothing here is a test.

    python scripts/profile_host.py [--rounds 3] [--max-tokens 128] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import os
import pstats
import sys
import time

TCK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of each of this process's threads: {tid: (name, seconds)}."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            s = open(f"/proc/self/task/{tid}/stat").read()
        except OSError:
            continue
        f = s[s.rindex(")") + 2:].split()
        out[int(tid)] = (s[s.index("(") + 1:s.rindex(")")], (int(f[11]) + int(f[12])) / TCK)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--profile", action="store_true", help="cProfile the orchestrator thread")
    args = ap.parse_args(argv)
    from jserve.llm import LLM
    from jserve.sampling import SamplingParams

    llm = LLM()
    llm.engine.wait_ready()
    orch = llm.orchestrator
    prof, on = cProfile.Profile(), [False]
    if args.profile:  # switched on and off by the loop itself, on its own thread
        waiting, wait = orch._waiting, orch._waiting.wait_for_work

        def wait_for_work(pred):
            prof.enable() if on[0] else prof.disable()
            return wait(pred)
        waiting.wait_for_work = wait_for_work
    ids = llm.encode_chat([{"role": "user", "content": "Write a short poem about the sea at night."}])

    async def one(seed: int) -> list[float]:
        p = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, top_k=50, ignore_eos=True,
                           seed=seed)
        return [time.perf_counter() async for _ in llm.stream(ids, p)]

    asyncio.run(one(0))  # untimed
    for r in range(args.rounds):
        time.sleep(0.5)
        on[0] = True
        before = thread_cpu()
        arrivals = asyncio.run(one(1 + r))
        after = thread_cpu()
        on[0] = False
        n = len(arrivals) - 1
        cpu = collections.Counter()
        for tid, (name, sec) in after.items():
            who = ("orchestrator" if tid == orch._thread.native_id else "consumer" if tid == os.getpid()
                   else "xla-compute" if name.startswith("tf_XLAEigen") else "other")
            cpu[who] += sec - before.get(tid, (name, 0.0))[1]
        print(f"round {r}: {1e3 * (arrivals[-1] - arrivals[0]) / n:.2f} ms/token; CPU ms/token "
              + ", ".join(f"{k} {1e3 * cpu[k] / n:.2f}" for k in ("orchestrator", "consumer", "xla-compute", "other")))
    asyncio.run(one(0))  # the loop passes wait_for_work once more: the profiler is off
    llm.close()
    if args.profile:
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
