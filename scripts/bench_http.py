"""The HTTP API against gRPC, and constrained against free decoding, on one server in one run.

Starts ``python -m jserve.server --http-port 0`` as a user would (``--slots``, ``--max-len``,
other flags at their defaults) and, each round, sends the same ``--requests`` chat prompts
``--streams`` at a time, streaming, in these variants, one after another:

- ``grpc``: through ``jserve.client.Client``;
- ``http``: through ``POST /v1/chat/completions`` with ``stream: true`` (server-sent events, read
  with ``http.client``; the official ``openai`` client costs the same on the server);
- ``grpc-half-constrained``: as ``grpc``, but every other request must answer JSON valid against a
  schema (an object with a list of at least 20 strings: a long answer), the rest free text;
- ``http-half-tools``: as ``http``, but every other request offers ``tools`` (one function whose
  parameters are that schema) with ``tool_choice: required``, so its reply is a tool call the
  grammar over the tool schemas enforces (in the checkpoint's tool-call format); its ratio to
  ``http`` is the cost of constrained tool calls (issue 25's target: at most 15 %), the longer
  prompts (the tools rendered into the system turn) included;
- ``http-half-schema``: as ``http``, but every other request has ``response_format`` json_schema
  with that schema: structured output without tools (the prompts unchanged), so
  ``http-half-tools`` against it is what tools add (their prompt, their grammar, the call parser);
- ``http-half-tools-text``: as ``http-half-tools``, but the tools are not sent: every other request
  carries, as plain messages, the very text the server renders for them with the generic fallback
  (``jserve.tools.generic.rewrite_messages``: the schemas and the calling instructions in the system
  turn), decoded freely. For a checkpoint without a tool template (the default SmolLM2), its prompts
  are the tool requests' prompts token for token, so ``http-half-tools`` against it is the cost of
  the grammar and the call parser alone, and it against ``http`` the cost of the longer prompts.

All greedy, ``ignore_eos``, up to ``--max-tokens`` each (a constrained answer ends when its JSON
is complete). Reports each variant's median tokens/s over the rounds and the ratios to ``grpc`` and ``http``
(rounds interleave the variants, so each ratio compares the same minutes of a shared machine), and
each variant's work in counts, from the server's ``usage`` of its last round: prompt tokens,
prompt tokens taken from the prefix cache, completion tokens.

**The prefix cache is in the same state for every variant** (``--cache``), else the ratios compare
prefill work, not decoding: the variants' prompts differ (the tool requests' are longer) and a
variant would find in the cache whatever the one before it left there (run after
``http-half-tools``, ``http-half-tools-text`` found all of its long prompts cached; run after
``http``, ``http-half-tools`` found nearly a third of them not, and its round waited seconds on
prefill).

- ``--cache warm`` (the default): before each timed round, the same requests are sent untimed
  with ``max_tokens`` 1, so each timed round finds its own prompts cached (all but their last
  token), as an agent that resends the same tools and history finds them.
- ``--cache cold``: every request of a round starts with a system turn naming that round and
  variant, so no round finds any of its prompts cached (requests of the same round share their
  prefixes with each other, as at a server): prefill is in every variant's time.

**Issue 25's target** (constrained tool calls cost at most 15 % of throughput at 8 streams, half
of them with tools) is ``http-half-tools`` against ``http-half-tools-text``: the same prompts
(checked: the report says whether their prompt tokens match), the same number of completion
tokens, decoded with the tool grammar and the call parser or without them. The line after the
table gives that ratio; ``http-half-tools-text`` against ``http`` is what the longer prompts cost
(the tools' schemas and instructions in the system turn, which any way of offering tools pays).

    python scripts/bench_http.py [--streams 8] [--requests 16] [--max-tokens 128] [--rounds 3]
        [--cache warm|cold] [--checkpoint DIR]
        [--variants grpc,http,grpc-half-constrained,http-half-tools,http-half-schema]

Nothing here is a test.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import http.client
import json
import os
import pathlib
import platform
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_harness import start_server  # noqa: E402
from bench_peers import chats  # noqa: E402

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 20}},
          "required": ["items"]}
TOOLS = [{"type": "function", "function": {"name": "record_items", "description": "Record a list of items.",
                                           "parameters": SCHEMA}}]


@dataclasses.dataclass(frozen=True)
class Done:
    """One request's work, from the server's usage: prompt tokens, those of them taken from the
    prefix cache, completion tokens, tool calls made."""

    kind: str  # "plain", or the constrained half's kind: "constrained", "tools", "tools-text", "schema"
    prompt: int
    cached: int
    completion: int
    calls: int = 0


class Server:
    def __init__(self, args: argparse.Namespace):
        flags = ["--port", "0", "--http-port", "0", "--slots", str(args.slots), "--max-len", str(args.max_len)]
        if args.checkpoint is not None:
            flags += ["--checkpoint", str(args.checkpoint)]
        if args.kv_memory is not None:
            flags += ["--kv-memory", args.kv_memory]
        self.started = start_server(flags)
        grpc_addr, http_addr = self.started.grpc_address, self.started.http_address
        if grpc_addr is None or http_addr is None:
            self.started.stop()
            raise RuntimeError(f"could not find the server's addresses (grpc {grpc_addr}, http {http_addr})")
        from jserve.client import Client

        self.client = Client(grpc_addr)
        self.http_host, self.http_port = http_addr.rsplit(":", 1)
        conn = http.client.HTTPConnection(self.http_host, int(self.http_port), timeout=60)
        conn.request("GET", "/v1/models")
        self.model = json.loads(conn.getresponse().read())["data"][0]["id"]
        conn.close()
        self.mode = self.started.mode

    def grpc(self, messages, args, constrained: bool, prime: bool = False) -> Done:
        kw = dict(max_tokens=1 if prime else args.max_tokens, temperature=0.0, ignore_eos=True)
        if constrained:
            kw["json_schema"] = SCHEMA
        c = self.client.complete(messages, **kw)
        return Done("constrained" if constrained else "plain", c.prompt_tokens, c.cached_prompt_tokens,
                    c.completion_tokens)

    def http(self, messages, args, constrained: bool, prime: bool = False, kind: str = "tools") -> Done:
        """``constrained``: the request offers ``TOOLS`` and requires a call (``kind`` "tools"), carries
        their generic rendering as plain text ("tools-text"), or asks for JSON valid against
        ``SCHEMA`` ("schema"). ``prime``: one token only, to put the prompt in the prefix cache."""
        body = {"model": self.model, "messages": messages, "max_tokens": 1 if prime else args.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if constrained and kind == "tools":
            body.update(tools=TOOLS, tool_choice="required")
        elif constrained and kind == "tools-text":
            from jserve.tools.formats import get_format
            from jserve.tools.generic import rewrite_messages
            from jserve.tools.types import ToolChoice, parse_tools

            body["messages"] = rewrite_messages(list(messages), parse_tools(TOOLS), get_format("generic"),
                                                ToolChoice("required"))
        elif constrained:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "items", "schema": SCHEMA}}
        conn = http.client.HTTPConnection(self.http_host, int(self.http_port), timeout=600)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        usage, calls = None, 0
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"the stream ended with an error: {event['error']}")
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", ()):
                    calls += sum(1 for d in choice["delta"].get("tool_calls") or () if d.get("id"))
        conn.close()
        if usage is None:
            raise RuntimeError("the stream ended without its usage chunk")
        if constrained and kind == "tools" and not calls and not prime:
            raise RuntimeError("a request that required a tool call got none")
        return Done(kind if constrained else "plain", usage["prompt_tokens"],
                    usage["prompt_tokens_details"]["cached_tokens"], usage["completion_tokens"], calls)

    def close(self) -> None:
        self.client.close()
        self.started.stop()


def run_round(send, prompts, args, constrained_every: int, prime: bool = False) -> dict:
    """Every prompt through ``send``, ``--streams`` at a time; every ``constrained_every``-th one
    (from the first; 0: none) constrained. ``prime``: one token each, for the prefix cache."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
        done = list(pool.map(lambda i: send(prompts[i], args, bool(constrained_every and i % constrained_every == 0),
                                            prime), range(len(prompts))))
    wall = time.perf_counter() - t0
    tokens = sum(d.completion for d in done)
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "requests": [dataclasses.asdict(d) for d in done]}


def cold_prompts(prompts: list[list[dict]], round_: int, variant: int) -> list[list[dict]]:
    """``prompts`` each led by a system turn naming the round and the variant (by number, in six
    digits: the same length in tokens for every variant): a prefix no other round's prompts have
    (``--cache cold``)."""
    return [[{"role": "system", "content": f"You are a helpful assistant (run {round_:03d}{variant:03d})."}, *m]
            for m in prompts]


def work(requests: list[dict]) -> dict:
    """A round's work in counts: per kind of request, how many, and their prompt, cached prompt
    and completion tokens."""
    out: dict[str, dict] = {}
    for r in requests:
        k = out.setdefault(r["kind"], {"requests": 0, "prompt": 0, "cached": 0, "completion": 0, "calls": 0})
        k["requests"] += 1
        for f in ("prompt", "cached", "completion", "calls"):
            k[f] += r[f]
    return out


def tool_cost_line(med: dict, works: dict, per_round: list[float] = ()) -> str | None:
    """The issue-25 line: ``http-half-tools`` against ``http-half-tools-text`` (the ratio of their
    medians, and each round's ratio: the two ran minutes apart), with whether the two did the same
    work (the same prompt tokens, the same completion tokens)."""
    if "http-half-tools" not in med or "http-half-tools-text" not in med:
        return None
    ratio = med["http-half-tools"] / med["http-half-tools-text"]
    rounds = f" (rounds: {', '.join(f'{r:.2f}' for r in per_round)})" if per_round else ""
    a, b = works["http-half-tools"], works["http-half-tools-text"]
    same_prompts = a.get("tools", {}).get("prompt") == b.get("tools-text", {}).get("prompt")
    same_tokens = sum(k["completion"] for k in a.values()) == sum(k["completion"] for k in b.values())
    return (f"constrained tool calls (issue 25: cost at most 15 %): http-half-tools / http-half-tools-text = "
            f"{ratio:.2f}{rounds} (cost {100 * (1 - ratio):.0f} %); the tool requests' prompts "
            f"{'match' if same_prompts else 'DIFFER'} ({a.get('tools', {}).get('prompt')} vs "
            f"{b.get('tools-text', {}).get('prompt')} prompt tokens), completion tokens "
            f"{'match' if same_tokens else 'DIFFER'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--kv-memory", default=None,
                    help="the server's KV page pool (e.g. 512MiB; default: the server's, slots x max-len); "
                         "--cache warm compares variants fairly only while the pool holds every variant's prompts")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="grpc,http,grpc-half-constrained,http-half-tools,http-half-schema",
                    help="comma-separated, from the default's")
    ap.add_argument("--cache", choices=("warm", "cold"), default="warm",
                    help="warm: each timed round finds its prompts in the prefix cache (an untimed 1-token "
                         "pass first); cold: no round finds any (see above)")
    ap.add_argument("--checkpoint", type=pathlib.Path, default=None, help="the server's (default: its default)")
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    chosen = args.variants.split(",")
    prompts = chats(args.requests)
    server = Server(args)
    known = {"grpc": (server.grpc, 0), "http": (server.http, 0), "grpc-half-constrained": (server.grpc, 2),
             "http-half-tools": (server.http, 2),
             "http-half-schema": (functools.partial(server.http, kind="schema"), 2),
             "http-half-tools-text": (functools.partial(server.http, kind="tools-text"), 2)}
    if unknown := set(chosen) - set(known):
        raise SystemExit(f"unknown variants: {sorted(unknown)}")
    variants = {v: known[v] for v in chosen}
    results: dict[str, list[dict]] = {v: [] for v in variants}
    try:
        for send, every in variants.values():  # untimed: first-request effects (grammar compiler) out of the way
            run_round(send, prompts[: args.streams], args, every)
        for r in range(args.rounds):
            for i, (v, (send, every)) in enumerate(variants.items()):
                batch = cold_prompts(prompts, r, i) if args.cache == "cold" else prompts
                if args.cache == "warm":
                    run_round(send, batch, args, every, prime=True)
                time.sleep(0.5)
                res = run_round(send, batch, args, every)
                results[v].append(res)
                print(f"round {r} {v}: {res['tokens']} tokens, {res['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    finally:
        server.close()
    med = {v: statistics.median(x["tokens_per_s"] for x in results[v]) for v in variants}
    works = {v: work(results[v][-1]["requests"]) for v in variants}
    print(f"{platform.machine()}, {os.cpu_count()} cores; {args.requests} chat requests, {args.streams} at a time, "
          f"greedy, up to {args.max_tokens} tokens; {args.rounds} rounds (medians); prefix cache {args.cache}; "
          f"{server.mode}")
    bases = [b for b in ("grpc", "http", "http-half-schema", "http-half-tools-text") if b in med]
    print("| variant | tokens/s | prompt tokens | of them cached | completion tokens | "
          + " | ".join(f"vs {b}" for b in bases) + " |")
    print("| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in bases) + " |")
    for v in variants:
        w = works[v].values()
        counts = " | ".join(str(sum(k[f] for k in w)) for f in ("prompt", "cached", "completion"))
        print(f"| {v} | {med[v]:.1f} | {counts} | " + " | ".join(f"{med[v] / med[b]:.2f}" for b in bases) + " |")
    print("(token counts: one round's, from the server's usage)")
    per_round = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in
                 zip(results.get("http-half-tools", ()), results.get("http-half-tools-text", ()))]
    if (line := tool_cost_line(med, works, per_round)) is not None:
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                         "work": works, "tokens_per_s": med},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
