"""jserve's server against llama.cpp's own server (``llama-server``), same prompts, rounds interleaved.

Both servers are started here as a user would start them, with the same number of slots and
positions per slot: ``python -m jserve.server --slots S --max-len T`` (plus ``--quantize``;
default none: the checkpoint as stored, the default one as its own GGUF blocks) and
``llama-server -m GGUF -np S -c S*T -t THREADS -fa on``, on the GGUF that jserve's default
checkpoint was converted from. Each round sends the same ``--requests`` prompts (chat questions
rendered by jserve's tokenizer: identical token ids for both) to each server in turn, ``--slots``
requests in flight at a time, each asking for exactly ``--max-tokens`` tokens (``ignore_eos``),
streaming, and records tokens/s over the round, time to first token and inter-token latency;
each server's peak resident memory (VmHWM, over the whole run) is read as it is closed.
llama.cpp's prompt cache is turned off per request (``cache_prompt: false``), so a repeated
prompt costs both servers the same prefill.

    python scripts/bench_servers.py --llama-server PATH [--slots 8] [--max-len 1024] [--requests 1]
        [--max-tokens 128] [--temperature 0.8 --top-p 0.95 --top-k 50] [--rounds 3] [--json out.json]

The defaults are a user's first run: the server at its defaults (8 slots x 1024), one chat at a
time, sampled at temperature 0.8; then ``--requests 16`` (a busy server), ``--slots 16 --requests
32`` and ``--temperature 0`` for the settings that flatter.

``PATH`` is a ``llama-server`` binary: build it from the llama.cpp sources vendored in the
llama-cpp-python sdist (``pip download --no-binary :all: --no-deps llama-cpp-python``, unpack,
``cmake -B build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF`` in ``vendor/llama.cpp`` plus the CPU's
instruction sets, e.g. ``-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON``, and AMX off where the CPU
traps it; ``cmake --build build --target llama-server``). Nothing here is a test.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_harness import start_server  # noqa: E402
from bench_peers import chats  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident set (``VmHWM``) in MiB, or None where /proc does not say."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Timing:
    """Arrival times of one request's tokens."""

    def __init__(self, sent: float):
        self.sent, self.arrivals, self.tokens = sent, [], 0

    def got(self, n: int) -> None:
        if n:
            self.arrivals.append(time.perf_counter())
            self.tokens += n


class JserveServer:
    name = "jserve"

    def __init__(self, args: argparse.Namespace, max_prompt: int, extra: tuple[str, ...] = ()):
        self.port = free_port()
        flags = ["--port", str(self.port), "--slots", str(args.slots), "--max-len", str(args.max_len),
                 "--max-prompt-len", str(max_prompt), "--max-logprobs", "0", *extra]
        if args.quantize != "none":
            flags += ["--quantize", args.quantize]
        self.started = start_server(flags)  # the shared harness: drains the output, fails if it exits first
        self.proc = self.started.proc
        from jserve.client import Client

        self.client = Client(f"127.0.0.1:{self.port}")
        self.mode = f"python -m jserve.server --slots {args.slots} --max-len {args.max_len} --quantize {args.quantize}"

    def request(self, ids: list[int], args: argparse.Namespace, seed: int) -> Timing:
        t = Timing(time.perf_counter())
        kw = dict(max_tokens=args.max_tokens, ignore_eos=True, temperature=args.temperature)
        if args.temperature > 0:
            kw.update(top_p=args.top_p, top_k=args.top_k, seed=seed)
        for r in self.client.stream(ids, **kw):
            t.got(len(r.token_ids))
        return t

    def close(self) -> None:
        self.peak_rss = peak_rss_mib(self.proc.pid)
        self.client.close()
        self.started.stop()


class LlamaServer:
    name = "llama-server"

    def __init__(self, args: argparse.Namespace, gguf: pathlib.Path):
        self.port = free_port()
        cmd = [args.llama_server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
               "-np", str(args.slots), "-c", str(args.slots * args.max_len), "-t", str(args.threads),
               "-tb", str(args.threads), "-fa", "on", "--no-webui"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: {' '.join(cmd)}")
            time.sleep(0.5)
        else:
            raise RuntimeError("llama-server did not become healthy")
        self.mode = " ".join(["llama-server", "-m", gguf.name] + cmd[7:])

    def request(self, ids: list[int], args: argparse.Namespace, seed: int) -> Timing:
        # ``ignore_eos`` unless the caller's args say otherwise (bench_spec lets answers end at EOS).
        body = {"prompt": ids, "n_predict": args.max_tokens, "ignore_eos": getattr(args, "ignore_eos", True),
                "stream": True,
                "cache_prompt": False, "temperature": args.temperature, "seed": seed}
        if args.temperature > 0:
            body.update(top_p=args.top_p, top_k=args.top_k, min_p=0.0)
        else:
            body.update(top_k=1)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t = Timing(time.perf_counter())
        conn.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"llama-server answered {resp.status}: {resp.read()[:200]!r}")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("stop"):
                n = event.get("tokens_predicted", t.tokens)
                t.got(max(0, n - t.tokens))
                break
            t.got(1)
        conn.close()
        return t

    def close(self) -> None:
        self.peak_rss = peak_rss_mib(self.proc.pid)
        self.proc.terminate()
        self.proc.wait(60)


def run_round(server, prompts: list[list[int]], args: argparse.Namespace, seed0: int) -> dict:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.slots) as pool:
        timings = list(pool.map(lambda i: server.request(prompts[i], args, seed0 + i), range(len(prompts))))
    wall = time.perf_counter() - t0
    tokens = sum(t.tokens for t in timings)
    ttft = [t.arrivals[0] - t.sent for t in timings if t.arrivals]
    itl = [b - a for t in timings for a, b in zip(t.arrivals, t.arrivals[1:])]
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "ttft_ms": 1000 * statistics.median(ttft), "itl_ms": 1000 * statistics.median(itl)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", required=True, help="path to a llama-server binary")
    ap.add_argument("--gguf", type=pathlib.Path, default=None, help="GGUF file (default: the default model's)")
    ap.add_argument("--slots", type=int, default=8, help="slots of both servers (default 8: jserve's default)")
    ap.add_argument("--max-len", type=int, default=1024, help="positions per slot, both servers")
    ap.add_argument("--requests", type=int, default=1, help="requests a round (default 1: one stream)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--quantize", default="none",
                    choices=["none", "int8", "int8-dynamic", "q8_0", "q4_0", "q4_1", "float"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama-server threads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)

    from jserve import checkpoint
    from jserve.convert import DEFAULT_CHECKPOINT, DEFAULT_GGUF_NAME, DEFAULT_PACKAGE, ensure_default_checkpoint

    ckpt = ensure_default_checkpoint(DEFAULT_CHECKPOINT)
    gguf = args.gguf or ckpt.parent / ".downloads" / DEFAULT_PACKAGE / DEFAULT_GGUF_NAME
    tok = checkpoint.load_tokenizer(ckpt)
    prompts = [tok.encode_chat(c) for c in chats(args.requests)]
    max_prompt = max(map(len, prompts))
    if max_prompt + args.max_tokens > args.max_len:
        ap.error(f"prompts of up to {max_prompt} tokens + {args.max_tokens} exceed --max-len {args.max_len}")
    servers = [JserveServer(args, max_prompt), LlamaServer(args, gguf)]
    results: dict[str, list[dict]] = {s.name: [] for s in servers}
    try:
        for s in servers:  # one untimed round each: first-request effects out of the way
            run_round(s, prompts[: args.slots], args, 0)
        for r in range(args.rounds):
            for s in servers:
                time.sleep(1.0)
                res = run_round(s, prompts, args, 1000 * r)
                results[s.name].append(res)
                print(f"round {r} {s.name}: {res['tokens_per_s']:.1f} tok/s, TTFT {res['ttft_ms']:.0f} ms, "
                      f"ITL {res['itl_ms']:.1f} ms", file=sys.stderr)
    finally:
        modes = {s.name: s.mode for s in servers}
        for s in servers:
            s.close()
        rss = {s.name: getattr(s, "peak_rss", None) for s in servers}

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    sampling = "greedy" if args.temperature == 0 else f"t {args.temperature}, top-p {args.top_p}, top-k {args.top_k}"
    print(f"{platform.machine()}, {os.cpu_count()} cores; {args.requests} requests x {args.max_tokens} tokens, "
          f"{sampling}, {args.slots} slots x {args.max_len} positions, {args.rounds} rounds interleaved (medians)")
    for name, mode in modes.items():
        print(f"  {name}: {mode}")
    print("| server | tokens/s | TTFT median (ms) | ITL median (ms) | peak RSS (MiB) | vs llama-server |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    base = med("llama-server", "tokens_per_s")
    for name in results:
        peak = "?" if rss[name] is None else f"{rss[name]:.0f}"
        print(f"| {name} | {med(name, 'tokens_per_s'):.1f} | {med(name, 'ttft_ms'):.0f} | {med(name, 'itl_ms'):.1f} "
              f"| {peak} | {med(name, 'tokens_per_s') / base:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "modes": modes,
                                         "peak_rss_mib": rss, "rounds": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
