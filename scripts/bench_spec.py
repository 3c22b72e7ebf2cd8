"""Speculative decoding: tokens/s with and without it, and against llama.cpp's server, in one run.

One jserve server is started as a user would (``python -m jserve.server --slots S --max-len T``,
speculative decoding on by default, ``--speculate K``), and optionally ``llama-server -np S -c
S*T`` on the GGUF that jserve's default checkpoint was converted from. Each round sends every
prompt of a workload, ``--streams`` at a time, to each variant in turn:

- ``spec``: jserve, the request asks for speculative decoding (``speculate: true``);
- ``plain``: the same server, the request opts out (``speculate: false``): the baseline;
- ``llama-server``: the same prompt token ids (chat template rendered by jserve's tokenizer),
  same sampling, its prompt cache off per request.

Workloads: ``grounded`` (answers that quote their input: repeat a paragraph fixing its typos,
summarize quoting key sentences, edit a piece of code and return it whole, continue a list) and
``chat`` (open-ended questions, from ``bench_peers``). Requests end at EOS or ``--max-tokens``;
greedy by default (both jserve variants give identical tokens then), ``--temperature`` for
sampled runs. Reports each variant's median tokens/s over the rounds, the ratios, and the
acceptance rate (drafted tokens kept, from the server's Prometheus counters).

    python scripts/bench_spec.py [--workloads grounded,chat] [--streams 1] [--slots 8]
        [--llama-server PATH] [--rounds 3] [--max-tokens 256] [--json out.json]

``--streams 16 --slots 16`` measures throughput with every slot busy. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_peers import chats  # noqa: E402
from bench_servers import JserveServer, LlamaServer, Timing, free_port  # noqa: E402

PARAGRAPHS = [
    "The libary opened in 1902 with a colection of four hundred books donated by the town's first "
    "doctor. For decades it occupied two rooms above the post office, and the librarian walked the "
    "books back and forth to the school every friday. In 1958 the town built the present building on "
    "Mill Street, whose reading room still has the original oak tables.",
    "Bees comunicate the location of flowers through a dance. A worker that has found a good source "
    "returns to the hive and walks a figure eight; the angle of the straight run tells the others the "
    "direction relative to the sun, and its length tells them the distance. Scientists decoded this "
    "dance in the 1940s, and it remains one of the best studied forms of animal comunication.",
    "To make the bread, mix the flour, water, salt and yeast until no dry flour remains. Let the dough "
    "rest for thirty minutes, then fold it four times at half-hour intervals. Shape it into a round "
    "loaf, let it rise until it has nearly doubled, and bake it in a very hot oven for fourty minutes, "
    "untill the crust is deep brown.",
]

CODE = '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''


def grounded() -> list[list[dict[str, str]]]:
    out = []
    for p in PARAGRAPHS:
        out.append([{"role": "user", "content": f"Repeat this paragraph, fixing its spelling mistakes:\n\n{p}"}])
        out.append([{"role": "user", "content": f"Summarize this text, quoting its key sentences:\n\n{p}"}])
    out.append([{"role": "user", "content": "Rename the function moving_average to rolling_mean in this code "
                                            f"and return the whole code:\n\n{CODE}"}])
    out.append([{"role": "user", "content": "Add type hints to this function and return the whole code:\n\n"
                                            f"{CODE}"}])
    return out


WORKLOADS = {"grounded": grounded, "chat": lambda: chats(8)}


class Jserve(JserveServer):
    def __init__(self, args: argparse.Namespace):
        self.metrics_port = free_port()
        super().__init__(args, args.max_len - 1,
                         extra=("--speculate", str(args.speculate), "--metrics-port", str(self.metrics_port)))
        self.mode += f" --speculate {args.speculate}"

    def counters(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics").read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("jserve_spec_") and "_total " in line:
                name, value = line.split()
                out[name] = float(value)
        return out

    def request(self, ids: list[int], args: argparse.Namespace, seed: int, speculate: bool) -> Timing:
        t = Timing(time.perf_counter())
        kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, speculate=speculate)
        if args.temperature > 0:
            kw.update(top_p=args.top_p, seed=seed)
        for r in self.client.stream(ids, **kw):
            t.got(len(r.token_ids))
        return t


def run_round(send, prompts: list[list[int]], streams: int) -> dict:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        timings = list(pool.map(lambda i: send(prompts[i], i), range(len(prompts))))
    wall = time.perf_counter() - t0
    tokens = sum(t.tokens for t in timings)
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="grounded,chat", help=f"comma-separated, of {sorted(WORKLOADS)}")
    ap.add_argument("--streams", type=int, default=1, help="requests in flight at a time (default 1)")
    ap.add_argument("--slots", type=int, default=8, help="both servers (default 8, jserve's default)")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--speculate", type=int, default=4, help="jserve --speculate K (default 4)")
    ap.add_argument("--quantize", default="none",
                    choices=["none", "int8", "int8-dynamic", "q8_0", "q4_0", "q4_1", "float"])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1, help="send each workload's prompts this many times a round")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--llama-server", default=None, help="path to a llama-server binary (omit to skip it)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama-server threads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)

    from jserve import checkpoint
    from jserve.convert import DEFAULT_CHECKPOINT, DEFAULT_GGUF_NAME, DEFAULT_PACKAGE, ensure_default_checkpoint

    ckpt = ensure_default_checkpoint(DEFAULT_CHECKPOINT)
    tok = checkpoint.load_tokenizer(ckpt)
    workloads = {w: [tok.encode_chat(c) for c in WORKLOADS[w]()] * args.repeat for w in args.workloads.split(",")}
    longest = max(len(p) for ps in workloads.values() for p in ps)
    if longest + args.max_tokens > args.max_len:
        ap.error(f"prompts of up to {longest} tokens + {args.max_tokens} exceed --max-len {args.max_len}")
    js = Jserve(args)
    variants = {"spec": lambda ids, i: js.request(ids, args, i, True),
                "plain": lambda ids, i: js.request(ids, args, i, False)}
    modes = {"jserve": js.mode}
    llama = None
    if args.llama_server:
        gguf = ckpt.parent / ".downloads" / DEFAULT_PACKAGE / DEFAULT_GGUF_NAME
        # Like jserve's requests: end at EOS or max_tokens; sampled requests use top-p only.
        llama_args = argparse.Namespace(**vars(args), ignore_eos=False, top_k=0)
        llama = LlamaServer(llama_args, gguf)
        variants["llama-server"] = lambda ids, i: llama.request(ids, llama_args, i)
        modes["llama-server"] = llama.mode
    results: dict[str, dict[str, list[dict]]] = {w: {v: [] for v in variants} for w in workloads}
    try:
        for send in variants.values():  # untimed: first-request effects out of the way
            run_round(send, next(iter(workloads.values()))[: args.streams], args.streams)
        for r in range(args.rounds):
            for w, prompts in workloads.items():
                for v, send in variants.items():
                    time.sleep(0.5)
                    before = js.counters() if v == "spec" else {}
                    res = run_round(send, prompts, args.streams)
                    if v == "spec":
                        after = js.counters()
                        drafted = after["jserve_spec_drafted_tokens_total"] - before["jserve_spec_drafted_tokens_total"]
                        kept = after["jserve_spec_accepted_tokens_total"] - before["jserve_spec_accepted_tokens_total"]
                        res.update(drafted=drafted, kept=kept)
                    results[w][v].append(res)
                    print(f"round {r} {w} {v}: {res['tokens']} tokens, {res['tokens_per_s']:.1f} tok/s"
                          + (f", {res['kept']:.0f}/{res['drafted']:.0f} drafted kept" if v == "spec" else ""),
                          file=sys.stderr)
    finally:
        js.close()
        if llama is not None:
            llama.close()

    sampling = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, top-p {args.top_p}"
    print(f"{platform.machine()}, {os.cpu_count()} cores; {args.streams} stream(s) at a time, {sampling}, "
          f"up to {args.max_tokens} tokens, {args.slots} slots x {args.max_len}; {args.rounds} rounds interleaved "
          "(medians)")
    for name, mode in modes.items():
        print(f"  {name}: {mode}")
    cols = list(variants)
    print("| workload | " + " | ".join(f"{v} tok/s" for v in cols) + " | spec / plain |"
          + (" spec / llama-server |" if llama else "") + " drafted tokens kept |")
    print("| --- |" + " ---: |" * (len(cols) + 2 + (1 if llama else 0)))
    for w in workloads:
        med = {v: statistics.median(x["tokens_per_s"] for x in results[w][v]) for v in cols}
        kept = sum(x["kept"] for x in results[w]["spec"])
        drafted = sum(x["drafted"] for x in results[w]["spec"])
        row = [w] + [f"{med[v]:.1f}" for v in cols] + [f"{med['spec'] / med['plain']:.2f}"]
        if llama:
            row.append(f"{med['spec'] / med['llama-server']:.2f}")
        row.append(f"{kept / drafted:.0%} of {drafted / args.rounds:.0f}/round" if drafted else "none drafted")
        print("| " + " | ".join(row) + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "modes": modes,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
