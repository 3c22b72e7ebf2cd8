"""Start-up: seconds from starting a server process to the first token of one chat request.

For each server shape (``--shapes``, default the server's defaults, 8 slots x 1024, and 16 x
4096): ``python -m jserve.server`` started cold (an empty ``--compile-cache`` directory) and then
warm (started again on the same directory, now filled), and, with ``--llama-server PATH``,
llama.cpp's server on the GGUF the default checkpoint was converted from, with as many slots and
positions per slot. A server counts as up when it says so (jserve prints "jserve SERVING" right
after its health service turns SERVING; llama-server answers ``/health`` with 200, polled); one
chat request (the same token ids for both) is sent at once, and the clock stops at its first
token. Servers are started with ``bench_servers``' helpers, one at a time; the machine's load
average is printed beside the table (other work on the machine moves these numbers).

With ``--layers once,unrolled`` each shape is started with each way of tracing the layers (one
traced function per layer spec, the default, or ``JSERVE_UNROLLED_LAYERS=1``), cold then warm each,
so the two compare in one run.

    python scripts/bench_startup.py [--llama-server PATH] [--shapes 8x1024,16x4096] [--layers once]
                                    [--json out.json]

Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_servers import JserveServer, LlamaServer  # noqa: E402

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def first_token(start: type, args: argparse.Namespace, ids: list[int], *init: object) -> dict:
    """Start a server (``start(args, *init)`` returns once it is up), send ``ids``, stop it."""
    t0 = time.perf_counter()
    server = start(args, *init)
    up = time.perf_counter() - t0
    try:
        timing = server.request(ids, args, seed=0)
    finally:
        server.close()
    if not timing.arrivals:
        raise RuntimeError(f"{start.__name__} answered no token")
    return {"up_s": up, "first_token_s": timing.arrivals[0] - t0, "load": load()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", default=None, help="path to a llama-server binary (optional)")
    ap.add_argument("--gguf", type=pathlib.Path, default=None, help="GGUF file (default: the default model's)")
    ap.add_argument("--shapes", default="8x1024,16x4096", help="SLOTSxMAX_LEN, comma-separated")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama-server threads")
    ap.add_argument("--layers", default="once", help="once, unrolled or both (comma-separated): how the server "
                    "traces its layers (JSERVE_UNROLLED_LAYERS)")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    # What bench_servers' helpers read: one short greedy answer, jserve at its default flags.
    args.quantize, args.max_tokens, args.temperature = "none", 4, 0.0

    from jserve import checkpoint
    from jserve.convert import DEFAULT_CHECKPOINT, DEFAULT_GGUF_NAME, DEFAULT_PACKAGE, ensure_default_checkpoint

    ckpt = ensure_default_checkpoint(DEFAULT_CHECKPOINT)
    gguf = args.gguf or ckpt.parent / ".downloads" / DEFAULT_PACKAGE / DEFAULT_GGUF_NAME
    ids = checkpoint.load_tokenizer(ckpt).encode_chat(CHAT)
    rows = []
    for shape in args.shapes.split(","):
        args.slots, args.max_len = (int(x) for x in shape.split("x"))
        for layers in args.layers.split(","):
            os.environ["JSERVE_UNROLLED_LAYERS"] = {"once": "0", "unrolled": "1"}[layers]  # the servers inherit it
            with tempfile.TemporaryDirectory(prefix="jserve-xla-") as cache:
                # --max-prompt-len and --max-logprobs as the server's defaults (the helper sets its own).
                extra = ("--max-logprobs", "5", "--compile-cache", cache)
                for kind in ("cold", "warm"):
                    res = first_token(JserveServer, args, ids, args.max_len - 1, extra)
                    server = "jserve" if layers == "once" else f"jserve, layers {layers}"
                    rows.append({"shape": shape, "server": server, "caches": kind, **res})
                    print(f"{shape} {server} {kind}: up {res['up_s']:.1f} s, first token {res['first_token_s']:.1f} "
                          f"s (load {res['load']})", file=sys.stderr)
        if args.llama_server:
            res = first_token(LlamaServer, args, ids, gguf)
            rows.append({"shape": shape, "server": "llama-server", "caches": "-", **res})
            print(f"{shape} llama-server: up {res['up_s']:.1f} s, first token {res['first_token_s']:.1f} s",
                  file=sys.stderr)

    print(f"{platform.machine()}, {os.cpu_count()} cores; one chat request ({len(ids)} prompt tokens) sent as soon "
          f"as each server is up; load averages (1, 5, 15 min) when it answered")
    print("| slots x positions | server | caches | up (s) | first token (s) | load |")
    print("| --- | --- | --- | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['shape']} | {r['server']} | {r['caches']} | {r['up_s']:.1f} | {r['first_token_s']:.1f} "
              f"| {r['load']} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
