"""One chat at a time through ``python -m jserve.server`` at its defaults, for source trees side by side.

Each tree's server is started as a user starts it (``python -m jserve.server --port P``, defaults:
8 slots x 1024, the default checkpoint, speculation off), with that tree first on ``PYTHONPATH``,
and waited for until its background compilation is done. Rounds alternate between the trees; a
round sends one streaming gRPC request (a chat question, ``--max-tokens`` tokens, ``ignore_eos``,
temperature 0.8, top-p 0.95, top-k 50, seeded) and records the time per token after the first
(wall, from the streamed messages' arrivals) and the server process's CPU seconds per token by
thread: Python's threads (the orchestrator's loop, the event loop serving gRPC, XLA's executor: all
named ``python``), XLA's compute pool (``tf_XLAEigen``) and the rest (gRPC's own threads). With
``--busy N`` a round also sends N chats at once (N > slots: they queue) and records tokens/s over
it. Nothing here is a test.

    python scripts/bench_one_stream.py --trees /work/main . [--rounds 3] [--max-tokens 128] [--busy 16]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_peers import chats  # noqa: E402

TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thread_cpu(pid: int) -> dict[tuple[str, str], float]:
    """CPU seconds (user + system) of each thread of ``pid``: {(tid, name): seconds}."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            s = pathlib.Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = s[s.index("(") + 1:s.rindex(")")]
        f = s[s.rindex(")") + 2:].split()
        out[(tid, name)] = (int(f[11]) + int(f[12])) / TCK
    return out


def group(name: str) -> str:
    if name.startswith("tf_XLAEigen"):
        return "xla-compute"
    return "python" if name == "python" else "other"


class Server:
    def __init__(self, tree: pathlib.Path, log: pathlib.Path):
        self.tree, self.port = tree, free_port()
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "jserve.server", "--port", str(self.port)], cwd=tree,
                                     env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        for line in self.proc.stdout:
            if "SERVING" in line:
                break
        else:
            raise RuntimeError(f"the server of {tree} exited before SERVING (see {log})")

    def wait_compiled(self, timeout: float = 900.0) -> None:
        deadline = time.monotonic() + timeout
        while "background compilation" not in self.log.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.tree}: background compilation not done in {timeout}s")
            time.sleep(1.0)
        from jserve.client import Client

        self.client = Client(f"127.0.0.1:{self.port}")

    def one(self, ids: list[int], args: argparse.Namespace, seed: int) -> tuple[list[float], int]:
        arrivals, tokens = [], 0
        kw = dict(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.8, top_p=0.95, top_k=50, seed=seed)
        for r in self.client.stream(ids, **kw):
            if r.token_ids:
                arrivals.append(time.perf_counter())
                tokens += len(r.token_ids)
        return arrivals, tokens

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", type=pathlib.Path, nargs="+", required=True, help="source trees (repository roots)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--busy", type=int, default=0, help="also N chats at once per round (0: none)")
    args = ap.parse_args(argv)
    from jserve import checkpoint
    from jserve.convert import DEFAULT_CHECKPOINT, ensure_default_checkpoint

    tok = checkpoint.load_tokenizer(ensure_default_checkpoint(DEFAULT_CHECKPOINT))
    prompts = [tok.encode_chat(c) for c in chats(max(args.busy, 8))]
    servers = []
    try:
        for i, tree in enumerate(args.trees):
            servers.append(Server(tree.resolve(), pathlib.Path(f"/tmp/bench_one_stream.{os.getpid()}.{i}.log")))
        for s in servers:
            s.wait_compiled()
            s.one(prompts[0], args, 0)  # untimed
        res = {s.tree: collections.defaultdict(list) for s in servers}
        for r in range(args.rounds):
            for s in servers:
                time.sleep(0.5)
                before = thread_cpu(s.proc.pid)
                arrivals, tokens = s.one(prompts[r % len(prompts)], args, 1000 + r)
                after = thread_cpu(s.proc.pid)
                gaps = tokens - 1
                ms = 1e3 * (arrivals[-1] - arrivals[0]) / gaps
                cpu = collections.Counter()
                for k, v in after.items():
                    cpu[group(k[1])] += v - before.get(k, 0.0)
                rec = res[s.tree]
                rec["ms_per_token"].append(ms)
                for g in ("python", "xla-compute", "other"):
                    rec[f"cpu_{g}"].append(1e3 * cpu[g] / gaps)
                line = f"round {r} {s.tree}: {ms:.2f} ms/token ({1e3 / ms:.1f} tok/s), CPU ms/token " + ", ".join(
                    f"{g} {1e3 * cpu[g] / gaps:.2f}" for g in ("python", "xla-compute", "other"))
                if args.busy:
                    t0 = time.perf_counter()
                    with concurrent.futures.ThreadPoolExecutor(args.busy) as pool:
                        outs = list(pool.map(lambda i, s=s: s.one(prompts[i], args, 2000 + i), range(args.busy)))
                    tps = sum(t for _, t in outs) / (time.perf_counter() - t0)
                    rec["busy_tokens_per_s"].append(tps)
                    line += f"; {args.busy} chats at once {tps:.1f} tok/s"
                print(line, file=sys.stderr, flush=True)
    finally:
        for s in servers:
            if hasattr(s, "client"):
                s.close()
            else:
                s.proc.terminate()
    print(f"{args.rounds} rounds interleaved, {args.max_tokens} tokens, t 0.8 top-p 0.95 top-k 50 (medians)")
    print("| tree | ms/token | tok/s | CPU ms/token: python threads | xla-compute | other |"
          + (f" {args.busy} chats tok/s |" if args.busy else ""))
    for tree, rec in res.items():
        med = {k: statistics.median(v) for k, v in rec.items()}
        print(f"| {tree} | {med['ms_per_token']:.2f} | {1e3 / med['ms_per_token']:.1f} | {med['cpu_python']:.2f} "
              f"| {med['cpu_xla-compute']:.2f} | {med['cpu_other']:.2f} |"
              + (f" {med['busy_tokens_per_s']:.1f} |" if args.busy else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
