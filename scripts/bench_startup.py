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
so the two compare in one run. ``--env NAME=VALUE,NAME=VALUE`` adds a variant started with those
environment variables (e.g. ``JSERVE_COMPILE_THREADS=1``), also cold then warm.

``--breakdown`` also prints where each jserve start's seconds went, from the timestamps of the
server's own log lines (its stderr, read after it stops) measured from the moment it was spawned:
imports (to "started"), gRPC bind ("listening"), the JAX backend and the rest of the imports up to
reading the checkpoint, the checkpoint (weights, device params, tokenizer: "checkpoint read"), the
engine's build ("engine:"), compiling (or loading from the persistent cache) the calls SERVING
needs and running each once ("SERVING-ready calls"), what follows until "SERVING" (the orchestrator,
the health status), and the first request. Each call's trace + lower + compile seconds follow.

    python scripts/bench_startup.py [--llama-server PATH] [--shapes 8x1024,16x4096] [--layers once]
                                    [--env NAME=VALUE,...] [--breakdown] [--json out.json]

Nothing here is a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_harness import start_server  # noqa: E402
from bench_servers import JserveServer, LlamaServer, free_port  # noqa: E402

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\S+) (\w+) (.*)$")


class LoggedJserve(JserveServer):
    """``bench_servers.JserveServer`` with the server's log (stderr) kept in a file, and the
    wall-clock time it was spawned, for ``breakdown``."""

    def __init__(self, args: argparse.Namespace, max_prompt: int, extra: tuple[str, ...] = (),
                 tree: pathlib.Path | None = None):
        self.port = free_port()
        flags = ["--port", str(self.port), "--slots", str(args.slots), "--max-len", str(args.max_len),
                 "--max-prompt-len", str(max_prompt), "--max-logprobs", "0", "--log-level", "INFO",
                 "--checkpoint", str(args.checkpoint), *extra]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="jserve-startup-", suffix=".log")
        self.spawned = time.time()
        try:  # the shared harness, with the log kept in a file (``log_lines``)
            self.started = start_server(flags, stderr=self.log, cwd=tree,
                                        env=None if tree is None else {"PYTHONPATH": str(tree)})
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {pathlib.Path(self.log.name).read_text()[-3000:]}") from None
        self.proc = self.started.proc
        from jserve.client import Client

        self.client = Client(f"127.0.0.1:{self.port}")

    def log_lines(self) -> list[tuple[float, str, str]]:
        """(seconds after spawning, logger, message) of each timestamped line."""
        out = []
        for line in pathlib.Path(self.log.name).read_text().splitlines():
            m = STAMP.match(line)
            if m:
                t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out.append((t - self.spawned, m.group(2), m.group(4)))
        return out


# (name, what marks its end: a regex on the message) in start-up order; a phase runs from the
# previous mark to its own.
MARKS = (("import", r"^started: imports done"), ("bind", r"^listening on"),
         ("checkpoint", r"^checkpoint read in"), ("engine", r"^engine: "),
         ("compile", r"^SERVING-ready calls compiled in"), ("warm-up", r"^warm-up: ready"),
         ("to SERVING", r"^SERVING "))


def breakdown(lines: list[tuple[float, str, str]], up: float, first: float) -> dict:
    """Seconds per start-up phase (``MARKS``; "checkpoint" split off at the checkpoint's own
    reading time, the rest before it "jax init"), the details the log gives, the first token."""
    at = {}
    for name, pattern in MARKS:
        hit = next((t for t, _, msg in lines if re.search(pattern, msg)), None)
        if hit is not None:
            at[name] = hit
    msgs = {name: next((msg for _, _, msg in lines if re.search(pattern, msg)), "") for name, pattern in MARKS}
    out, prev = {}, 0.0
    for name, _ in MARKS:
        if name not in at:
            continue
        if name == "checkpoint":
            m = re.search(r"read in ([\d.]+) s: weights ([\d.]+) s, device params ([\d.]+) s, tokenizer ([\d.]+)",
                          msgs[name])
            if m:
                read = float(m.group(1))
                out["jax init"] = at[name] - read - prev
                out["checkpoint"] = read
                out["checkpoint detail"] = f"weights {m.group(2)}, params {m.group(3)}, tokenizer {m.group(4)}"
                prev = at[name]
                continue
        out[name] = at[name] - prev
        prev = at[name]
    m = re.search(r"compiled in ([\d.]+) s \((\d+) calls on (\d+) threads; run once in ([\d.]+) s\)",
                  msgs["compile"])
    if m:
        out["compile detail"] = f"{m.group(2)} calls on {m.group(3)} threads; run once {m.group(4)} s"
    calls = next((msg for _, _, msg in lines if msg.startswith("SERVING-ready calls, seconds")), "")
    out["calls"] = calls.split(": ", 1)[-1]
    out["until up"] = up - prev
    out["first token"] = first - up
    return out


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
    res = {"up_s": up, "first_token_s": timing.arrivals[0] - t0, "load": load()}
    if isinstance(server, LoggedJserve):
        res["breakdown"] = breakdown(server.log_lines(), up, res["first_token_s"])
        server.log.close()
    return res


def print_breakdown(rows: list[dict]) -> None:
    phases = [name for name in ("import", "bind", "jax init", "checkpoint", "engine", "compile", "warm-up",
                                "to SERVING", "until up", "first token") if any(name in r.get("breakdown", {})
                                                                               for r in rows)]
    print("\nWhere each jserve start's seconds went (from the server's log timestamps; \"compile\": the "
          "SERVING-ready calls, compiled or loaded from the cache, and each run once)")
    print("| slots x positions | server | caches | " + " | ".join(phases) + " |")
    print("| --- | --- | --- | " + " | ".join("---:" for _ in phases) + " |")
    for r in rows:
        b = r.get("breakdown")
        if b:
            cells = " | ".join(f"{b[p]:.1f}" if p in b else "-" for p in phases)
            print(f"| {r['shape']} | {r['server']} | {r['caches']} | {cells} |")
    for r in rows:
        b = r.get("breakdown")
        if b:
            print(f"- {r['shape']} {r['server']} {r['caches']}: checkpoint {b.get('checkpoint detail', '?')}; "
                  f"compile {b.get('compile detail', '?')}; trace + lower + compile each: {b.get('calls', '?')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", default=None, help="path to a llama-server binary (optional)")
    ap.add_argument("--gguf", type=pathlib.Path, default=None, help="GGUF file (default: the default model's)")
    ap.add_argument("--shapes", default="8x1024,16x4096", help="SLOTSxMAX_LEN, comma-separated")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama-server threads")
    ap.add_argument("--layers", default="once", help="once, unrolled or both (comma-separated): how the server "
                    "traces its layers (JSERVE_UNROLLED_LAYERS)")
    ap.add_argument("--env", action="append", default=[],
                    help="NAME=VALUE,NAME=VALUE: also start each shape with these environment variables "
                    "(repeatable: one variant each)")
    ap.add_argument("--tree", action="append", default=[], type=pathlib.Path,
                    help="also start each shape from this source tree's jserve (e.g. an exported baseline "
                    "commit: git archive COMMIT | tar -x -C DIR); implies --breakdown")
    ap.add_argument("--breakdown", action="store_true", help="print where each jserve start's seconds went")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    # What bench_servers' helpers read: one short greedy answer, jserve at its default flags.
    args.quantize, args.max_tokens, args.temperature = "none", 4, 0.0

    from jserve import checkpoint
    from jserve.convert import DEFAULT_CHECKPOINT, DEFAULT_GGUF_NAME, DEFAULT_PACKAGE, ensure_default_checkpoint

    ckpt = ensure_default_checkpoint(DEFAULT_CHECKPOINT)
    args.checkpoint = ckpt
    args.breakdown = args.breakdown or bool(args.tree)
    gguf = args.gguf or ckpt.parent / ".downloads" / DEFAULT_PACKAGE / DEFAULT_GGUF_NAME
    ids = checkpoint.load_tokenizer(ckpt).encode_chat(CHAT)
    rows = []
    for shape in args.shapes.split(","):
        args.slots, args.max_len = (int(x) for x in shape.split("x"))
        variants = ([(layers, "", None) for layers in args.layers.split(",")]
                    + [("once", env, None) for env in args.env] + [("once", "", t.resolve()) for t in args.tree])
        base_env = dict(os.environ)
        for layers, env, tree in variants:
            os.environ.clear()
            os.environ.update(base_env)
            os.environ["JSERVE_UNROLLED_LAYERS"] = {"once": "0", "unrolled": "1"}[layers]  # the servers inherit it
            for pair in filter(None, env.split(",")):
                name, _, value = pair.partition("=")
                os.environ[name] = value
            start = LoggedJserve if args.breakdown else JserveServer
            with tempfile.TemporaryDirectory(prefix="jserve-xla-") as cache:
                # --max-prompt-len and --max-logprobs as the server's defaults (the helper sets its own).
                extra = ("--max-logprobs", "5", "--compile-cache", cache)
                for kind in ("cold", "warm"):
                    init = (args.max_len - 1, extra) if tree is None else (args.max_len - 1, extra, tree)
                    res = first_token(start, args, ids, *init)
                    server = "jserve" if layers == "once" else f"jserve, layers {layers}"
                    server += f", {env}" if env else ""
                    server += f", tree {tree.name}" if tree else ""
                    rows.append({"shape": shape, "server": server, "caches": kind, **res})
                    print(f"{shape} {server} {kind}: up {res['up_s']:.1f} s, first token {res['first_token_s']:.1f} "
                          f"s (load {res['load']})", file=sys.stderr)
        os.environ.clear()
        os.environ.update(base_env)
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
    if args.breakdown:
        print_breakdown(rows)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
