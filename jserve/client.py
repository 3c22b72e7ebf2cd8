"""A small Python client for jserve's gRPC API (sync and asyncio), and a command line.

    python -m jserve.client "Once upon a time" --max-tokens 40
    python -m jserve.client --chat "What is the capital of France?" --temperature 0

Tools: ``client.complete(messages, tools=[{"type": "function", "function": {"name": ..., "parameters":
{...}}}], tool_choice="required")`` returns a ``Completion`` whose ``tool_calls`` hold the calls
(arguments as JSON text); ``tool_choice`` is "none", "auto", "required" or
``{"type": "function", "function": {"name": ...}}``. Messages may carry OpenAI's ``tool_calls``
(assistant), ``tool_call_id`` (tool) and ``name``.

Several addresses (``--address host1:port,host2:port``) are balanced round-robin by gRPC.
Imports neither JAX nor the engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from jserve.v1 import jserve_pb2 as pb
from jserve.v1 import jserve_pb2_grpc as pb_grpc

FINISH_NAMES = {pb.STOP: "stop", pb.LENGTH: "length", pb.CANCELLED: "cancelled", pb.DEADLINE: "deadline",
                pb.ERROR: "error", pb.TOOL_CALLS: "tool_calls"}
Prompt = str | Sequence[dict[str, Any]] | Sequence[int]


@dataclasses.dataclass
class ToolCall:
    """A call the model made; ``arguments`` is JSON text."""

    id: str
    name: str
    arguments: str


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # "UNAVAILABLE: ..." when the call failed (``complete_many``)
    cached_prompt_tokens: int = 0  # prompt tokens the server took from its prefix cache
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)  # with tools: the calls made


SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
# Several replicas: round-robin over those whose health service says SERVING (a replica warming
# up or draining gets no new work), and a request refused UNAVAILABLE before any response (a
# replica that just went away) is retried on another. A stream already under way is not retried:
# it fails, and only those in flight on the lost replica do.
REPLICAS_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": SERVICE},
    "methodConfig": [{
        "name": [{"service": SERVICE}],
        "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
})


def target_for(addresses: str | Sequence[str]) -> tuple[str, list[tuple[str, Any]]]:
    """gRPC target and channel options; several addresses get health-checked round-robin."""
    addrs = [a.strip() for a in (addresses.split(",") if isinstance(addresses, str) else addresses) if a.strip()]
    if not addrs:
        raise ValueError("no server address given")
    if len(addrs) == 1:
        return addrs[0], []
    return "ipv4:" + ",".join(addrs), [("grpc.service_config", REPLICAS_SERVICE_CONFIG),
                                       ("grpc.enable_retries", 1)]


def chat_message(m: dict[str, Any]) -> pb.ChatMessage:
    """The protocol's message from an OpenAI-style one (content None or absent: unset)."""
    out = pb.ChatMessage(role=m["role"], tool_call_id=m.get("tool_call_id") or "", name=m.get("name") or "")
    if m.get("content") is not None:
        out.content = m["content"]
    for c in m.get("tool_calls") or ():
        fn = c.get("function", c)
        args = fn.get("arguments", "{}")
        out.tool_calls.append(pb.ToolCall(id=c.get("id", ""), name=fn["name"],
                                          arguments=args if isinstance(args, str) else json.dumps(args)))
    return out


def _tool(t: dict[str, Any]) -> pb.Tool:
    fn = t.get("function", t)  # OpenAI's {"type": "function", "function": {...}} or the inner dict
    params = fn.get("parameters")
    return pb.Tool(name=fn["name"], description=fn.get("description", ""),
                   parameters="" if params is None else params if isinstance(params, str) else json.dumps(params))


def _set_tool_choice(req: pb.GenerateRequest, choice: str | dict[str, Any]) -> None:
    if isinstance(choice, str):
        req.tool_choice.mode = choice
    else:
        fn = choice.get("function", choice)  # OpenAI's {"type": "function", "function": {"name": ...}}
        req.tool_choice.function = fn if isinstance(fn, str) else fn["name"]


def build_request(prompt: Prompt, request_id: str = "", **sampling: Any) -> pb.GenerateRequest:
    """A ``GenerateRequest`` from text, chat messages or token ids plus sampling fields (``tools``:
    OpenAI's tool dicts; ``tool_choice``; ``logit_bias``: token id → bias)."""
    req = pb.GenerateRequest(request_id=request_id)
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt and all(isinstance(m, dict) for m in prompt):
        req.chat.messages.extend(chat_message(m) for m in prompt)
    else:
        req.token_ids.ids.extend(int(t) for t in prompt)
    for key, value in sampling.items():
        if value is None:
            continue
        if key in ("stop", "stop_token_ids"):
            getattr(req, key).extend([value] if isinstance(value, str) else value)
        elif key == "choice":  # structured output: one of these strings
            req.choice.choices.extend(value)
        elif key == "json_schema" and not isinstance(value, str):  # a schema given as a dict
            req.json_schema = json.dumps(value)
        elif key == "tools":
            req.tools.extend(_tool(t) for t in value)
        elif key == "tool_choice":
            _set_tool_choice(req, value)
        elif key == "logit_bias":
            req.logit_bias.update({int(k): float(v) for k, v in value.items()})
        else:
            setattr(req, key, value)
    return req


def _fold(responses: Iterator[pb.GenerateResponse] | list[pb.GenerateResponse]) -> Completion:
    text, ids, last = [], [], None
    calls: dict[int, ToolCall] = {}
    for r in responses:
        text.append(r.text)
        ids.extend(r.token_ids)
        for d in r.tool_calls:
            call = calls.setdefault(d.index, ToolCall(d.id, d.name, ""))
            call.arguments += d.arguments
        last = r
    return Completion("".join(text), ids, FINISH_NAMES.get(last.finish_reason, "unknown") if last else "unknown",
                      last.usage.prompt_tokens if last else 0, last.usage.completion_tokens if last else 0,
                      cached_prompt_tokens=last.usage.cached_prompt_tokens if last else 0,
                      tool_calls=[calls[i] for i in sorted(calls)])


class Client:
    """Blocking client. ``stream`` yields responses as they arrive; ``complete`` folds them."""

    def __init__(self, address: str | Sequence[str] = "127.0.0.1:50051"):
        target, options = target_for(address)
        self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.GenerationStub(self.channel)

    def stream(self, prompt: Prompt, timeout: float | None = None, request_id: str = "",
               **sampling: Any) -> Iterator[pb.GenerateResponse]:
        return self.stub.Generate(build_request(prompt, request_id, **sampling), timeout=timeout)

    def complete(self, prompt: Prompt, timeout: float | None = None, **sampling: Any) -> Completion:
        return _fold(self.stream(prompt, timeout=timeout, **sampling))

    def complete_many(self, prompts: Sequence[Prompt], concurrency: int = 8, timeout: float | None = None,
                      **sampling: Any) -> list[Completion]:
        """Every prompt, ``concurrency`` at a time, in order. A failed call does not stop the
        others: its ``Completion`` has ``finish_reason == "error"`` and ``error`` says why (for
        example ``UNAVAILABLE`` for requests in flight on a replica that went away)."""
        def one(prompt: Prompt) -> Completion:
            got: list[pb.GenerateResponse] = []
            try:
                for r in self.stream(prompt, timeout=timeout, **sampling):
                    got.append(r)
                return _fold(got)
            except grpc.RpcError as e:
                partial = _fold(got)
                return dataclasses.replace(partial, finish_reason="error", error=f"{e.code().name}: {e.details()}")

        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            return list(pool.map(one, prompts))

    def model_info(self, timeout: float | None = 10.0) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)

    def tokenize(self, text: str | None = None, chat: Sequence[dict[str, Any]] | None = None) -> list[int]:
        req = pb.TokenizeRequest()
        if chat is not None:
            req.chat.messages.extend(chat_message(m) for m in chat)
        else:
            req.text = text or ""
        return list(self.stub.Tokenize(req).ids)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client over ``grpc.aio``."""

    def __init__(self, address: str | Sequence[str] = "127.0.0.1:50051"):
        target, options = target_for(address)
        self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = pb_grpc.GenerationStub(self.channel)

    def stream(self, prompt: Prompt, timeout: float | None = None, request_id: str = "",
               **sampling: Any) -> AsyncIterator[pb.GenerateResponse]:
        return self.stub.Generate(build_request(prompt, request_id, **sampling), timeout=timeout)

    async def complete(self, prompt: Prompt, timeout: float | None = None, **sampling: Any) -> Completion:
        return _fold([r async for r in self.stream(prompt, timeout=timeout, **sampling)])

    async def model_info(self, timeout: float | None = 10.0) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jserve.client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", help="the prompt text (a user message with --chat)")
    ap.add_argument("--address", default="127.0.0.1:50051", help="server address(es), comma-separated")
    ap.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    ap.add_argument("--system", default=None, help="system message (with --chat)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens to generate (server default 128)")
    ap.add_argument("--temperature", type=float, default=None, help="0 = greedy (server default 1.0)")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--min-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--repetition-penalty", type=float, default=None)
    ap.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    ap.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    args = ap.parse_args(argv)
    prompt: Prompt = args.prompt
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    min_p=args.min_p, seed=args.seed, repetition_penalty=args.repetition_penalty, stop=args.stop)
    with Client(args.address) as client:
        try:
            last = None
            for r in client.stream(prompt, timeout=args.timeout, **sampling):
                sys.stdout.write(r.text)
                sys.stdout.flush()
                last = r
            sys.stdout.write("\n")
            if last is not None:
                print(f"[{FINISH_NAMES.get(last.finish_reason, '?')}; prompt {last.usage.prompt_tokens} tokens, "
                      f"completion {last.usage.completion_tokens} tokens]", file=sys.stderr)
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
