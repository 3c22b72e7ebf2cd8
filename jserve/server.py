"""The gRPC front end: ``python -m jserve.server``.

Thin on purpose: it validates and converts requests, hands them to the ``LLM`` (orchestrator)
and streams the pieces back. It binds its port first and reports NOT_SERVING on the standard
health service until the model is loaded and the calls every request needs are compiled (the
rest compile in the background, each used once ready), then SERVING; on SIGTERM
or SIGINT it reports NOT_SERVING, refuses new work, lets in-flight streams finish (bounded by
``--drain-timeout``) and exits 0.

Several devices: ``--mesh tp=4`` (or ``dp=2,tp=4``) shards the model over them. Several hosts:
start the same command on every host with ``--coordinator HOST:PORT --num-processes N
--process-id I`` (or JAX's environment variables, or ``--distributed`` on a TPU slice);
process 0 serves gRPC and the others follow its steps.

``--http-port PORT`` also serves the OpenAI-compatible HTTP API (``jserve.http_api``) from the
same process, event loop and engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jserve.llm import DEFAULT_COMPILE_CACHE, LLM
from jserve.metrics import ServingMetrics
from jserve.orchestrator import (
    CANCELLED,
    DEADLINE,
    ERROR,
    LENGTH,
    SHUTDOWN,
    SLOW_READER,
    STOP,
    QueueFullError,
    ShuttingDownError,
)
from jserve.sampling import InvalidRequestError, SamplingParams
from jserve.server_tools import ReplyParts, ToolSetup, chat_messages, prepare, wants_tools
from jserve.structured import Constraint
from jserve.tools import FORMATS
from jserve.v1 import jserve_pb2 as pb
from jserve.v1 import jserve_pb2_grpc as pb_grpc

log = logging.getLogger("jserve.server")

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
FINISH = {STOP: pb.STOP, LENGTH: pb.LENGTH, CANCELLED: pb.CANCELLED, DEADLINE: pb.DEADLINE, ERROR: pb.ERROR}
# ``STOP`` after the model called tools is reported as ``TOOL_CALLS``.
DEFAULT_MAX_TOKENS = 128
STOPPED_DURING_STARTUP = -1
GRPC_RECEIVE_LIMIT = 64 << 20


def request_to_input(req: pb.GenerateRequest) -> Any:
    """The prompt of a request, as the LLM API takes it; ``InvalidRequestError`` if absent or empty."""
    kind = req.WhichOneof("input")
    if kind is None:
        raise InvalidRequestError("no input: set one of text, chat or token_ids")
    if kind == "text":
        if not req.text:
            raise InvalidRequestError("the prompt text is empty")
        return req.text
    if kind == "chat":
        if not req.chat.messages:
            raise InvalidRequestError("the chat has no messages")
        return chat_messages(req.chat)
    if not req.token_ids.ids:
        raise InvalidRequestError("token_ids is empty")
    return list(req.token_ids.ids)


def request_to_params(req: pb.GenerateRequest) -> SamplingParams:
    def opt(name: str, default: Any) -> Any:
        return getattr(req, name) if req.HasField(name) else default

    return SamplingParams(
        max_tokens=opt("max_tokens", DEFAULT_MAX_TOKENS), temperature=opt("temperature", 1.0),
        top_k=opt("top_k", 0), top_p=opt("top_p", 1.0), min_p=opt("min_p", 0.0), seed=opt("seed", None),
        repetition_penalty=opt("repetition_penalty", 1.0), presence_penalty=opt("presence_penalty", 0.0),
        frequency_penalty=opt("frequency_penalty", 0.0), stop=tuple(req.stop),
        stop_token_ids=tuple(req.stop_token_ids), ignore_eos=req.ignore_eos, logprobs=req.logprobs or None,
        constraint=request_to_constraint(req), speculate=opt("speculate", None),
        logit_bias=tuple(sorted(req.logit_bias.items())),
    )


def request_to_constraint(req: pb.GenerateRequest) -> Constraint | None:
    kind = req.WhichOneof("constraint")
    if kind is None or (kind == "json_object" and not req.json_object):
        return None
    if kind == "choice":
        return Constraint("choice", tuple(req.choice.choices))
    if kind == "json_object":
        return Constraint("json_object")
    return Constraint(kind, getattr(req, kind))


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, metrics: ServingMetrics):
        self.max_request_bytes = 4 << 20
        self.llm: LLM | None = None
        self.tools: ToolSetup | None = None  # set with llm
        self.metrics = metrics
        self.draining = False

    def _check_size(self, request: Any) -> None:
        size = request.ByteSize()
        if size > self.max_request_bytes:
            raise InvalidRequestError(f"the request has {size} bytes; this server accepts at most "
                                      f"{self.max_request_bytes} (--max-request-bytes)")

    def _ready(self) -> LLM:
        if self.llm is None:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the server is warming up; retry shortly")
        if self.draining:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        return self.llm

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            llm = self._ready()
            self._check_size(request)
            prompt, params = request_to_input(request), request_to_params(request)
            plan = None
            if wants_tools(request):  # templates, schemas and the tokenizer: off the event loop
                prompt, params, plan = await asyncio.get_running_loop().run_in_executor(
                    None, prepare, llm, self.tools, request, params)
            # Off the event loop; a client gone meanwhile has its request cancelled once queued.
            stream = await llm.submit_async(prompt, params, request_id=request.request_id or None,
                                            timeout=context.time_remaining())
        except _Abort as e:
            self.metrics.reject("unavailable")
            await context.abort(e.code, e.message)
        except InvalidRequestError as e:
            self.metrics.reject("invalid_argument")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFullError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ShuttingDownError as e:
            self.metrics.reject("unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        rid = stream.request.request_id
        parts = ReplyParts(plan, params.seed)
        try:
            async for piece in stream:
                if piece.finish_reason == DEADLINE:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"deadline exceeded after {piece.completion_tokens} tokens")
                if piece.finish_reason == SLOW_READER:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"request {rid} ended after {piece.completion_tokens} tokens: the client "
                                        f"left more than {llm.orchestrator.max_undelivered} responses unread "
                                        "(--max-undelivered)")
                if piece.finish_reason == SHUTDOWN:
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        f"the server shut down before request {rid} finished "
                                        f"({piece.completion_tokens} tokens sent); retry it")
                if piece.finish_reason == ERROR:
                    await context.abort(grpc.StatusCode.INTERNAL, f"request {rid} failed: {piece.error}")
                text, calls = parts.split(piece.text, piece.finish_reason is not None)
                resp = pb.GenerateResponse(text=text, token_ids=piece.token_ids, request_id=rid, tool_calls=calls)
                if params.logprobs or piece.top_logprobs:
                    for i, (t, lp) in enumerate(zip(piece.token_ids, piece.logprobs)):
                        top = piece.top_logprobs[i] if i < len(piece.top_logprobs) else []
                        resp.logprobs.append(pb.TokenLogprob(
                            token_id=t, logprob=lp, top=[pb.TopLogprob(token_id=a, logprob=b) for a, b in top]))
                if piece.finish_reason is not None:
                    resp.finish_reason = pb.TOOL_CALLS if parts.called and piece.finish_reason == STOP else \
                        FINISH[piece.finish_reason]
                    resp.usage.prompt_tokens = piece.prompt_tokens
                    resp.usage.completion_tokens = piece.completion_tokens
                    resp.usage.cached_prompt_tokens = piece.cached_tokens
                yield resp
        finally:
            stream.cancel()  # no-op when finished; frees the slot when the client went away

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        if self.llm is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is warming up; retry shortly")
        llm = self.llm
        eng, orch = llm.engine, llm.orchestrator
        eos = llm.tokenizer.eos_token_ids if llm.tokenizer else llm.config.eos_token_ids
        return pb.ModelInfo(
            model_name=llm.checkpoint.name, checkpoint=str(llm.checkpoint), vocab_size=llm.config.vocab_size,
            max_len=eng.max_len, max_prompt_len=eng.max_prompt_len, slots=eng.slots,
            slots_in_use=orch.slots_in_use, waiting=orch.num_waiting, max_waiting=orch.max_waiting,
            max_logprobs=eng.top_logprobs, eos_token_ids=list(eos), dtype=llm.dtype,
            quantization=llm.quantize or "none",
            has_chat_template=bool(llm.tokenizer and llm.tokenizer.has_chat_template),
            prefix_cache=llm.orchestrator.prefix_cache, speculate=orch.spec_tokens,
            speculate_default=orch.speculate, architecture=llm.config.arch,
            tool_call_format=self.tools.default_format if self.tools else "",
        )

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            llm = self._ready()
            self._check_size(request)
            kind = request.WhichOneof("input")
            loop = asyncio.get_running_loop()
            if kind == "text":
                ids = await loop.run_in_executor(None, llm.tokenize_input, request.text) if request.text else []
            elif kind == "chat":
                chat = chat_messages(request.chat)
                ids = await loop.run_in_executor(None, llm.encode_chat, chat)
            else:
                raise InvalidRequestError("no input: set text or chat")
        except _Abort as e:
            await context.abort(e.code, e.message)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.TokenizeResponse(ids=ids)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jserve.server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=pathlib.Path, default=None,
                    help="jserve checkpoint directory (default: SmolLM2-135M-Instruct, converted on first start)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; [::] for all)")
    ap.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 picks a free one)")
    ap.add_argument("--http-port", type=int, default=None,
                    help="also serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                         "/v1/models, /health, /metrics) on this port (default: off; 0 picks a free one)")
    ap.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    ap.add_argument("--max-len", type=int, default=1024, help="positions per slot: prompt + output (default 1024)")
    ap.add_argument("--max-prompt-len", type=int, default=None, help="longest prompt accepted (default max-len - 1)")
    ap.add_argument("--max-waiting", type=int, default=256,
                    help="waiting-queue bound; beyond it requests get RESOURCE_EXHAUSTED (default 256)")
    ap.add_argument("--max-logprobs", type=int, default=5, help="most top alternatives a request may ask for")
    ap.add_argument("--max-request-bytes", type=int, default=4 << 20,
                    help=f"largest request accepted, in bytes (default 4 MiB; at most {GRPC_RECEIVE_LIMIT >> 20} MiB, "
                         "gRPC's own limit here); a larger one gets INVALID_ARGUMENT")
    ap.add_argument("--max-undelivered", type=int, default=1024,
                    help="responses a client may leave unread before its request is ended with RESOURCE_EXHAUSTED "
                         "(HTTP streams: an error event, code slow_reader) and its slot freed (default 1024)")
    ap.add_argument("--prefill-budget", type=int, default=64,
                    help="prompt tokens run between two decode steps while streams are live, in chunks of 16 "
                         "(default 64): a long prompt is run a chunk at a time, so live streams keep their pace; "
                         "with no live stream each call takes up to 512")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="compute every prompt in full (default: reuse the keys/values of a prompt prefix "
                         "already held by some slot, e.g. a shared system prompt or the earlier turns of a chat)")
    ap.add_argument("--speculate", type=int, default=4, metavar="K",
                    help="speculative decoding: a decode step may check up to K tokens drafted by prompt lookup "
                         "(the request's own earlier text) per slot, and keeps those the model agrees with, so "
                         "the output is unchanged; used only while measured to pay (default 4; 0 = off, which "
                         "also saves compiling the checking step)")
    ap.add_argument("--speculate-default", choices=["on", "off"], default="on",
                    help="whether requests that do not set 'speculate' use speculative decoding (default on)")
    ap.add_argument("--quantize", choices=["int8", "int8-dynamic", "q8_0", "q4_0", "q4_1", "float"], default=None,
                    help="weights' format, applied at load (default: as the checkpoint stores them; a GGUF's "
                         "Q8_0/Q4_0/Q4_1 blocks stay blocks): int8 = per-channel weight-only (GPU/TPU fast "
                         "path), int8-dynamic = int8 weights and per-row int8 activations, q8_0/q4_0/q4_1 = "
                         "GGUF block formats, float = every weight dequantized to --dtype (to compare quality)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights and KV cache (float32 default, fastest on CPU; bfloat16 for GPU/TPU)")
    ap.add_argument("--tool-call-format", choices=sorted(FORMATS), default=None,
                    help="how the model writes tool calls, to enforce and parse them (default: detected from the "
                         "checkpoint's chat template and vocabulary; generic when none is recognised)")
    ap.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    ap.add_argument("--drain-timeout", type=float, default=30.0,
                    help="seconds in-flight requests may take to finish after SIGTERM (default 30)")
    ap.add_argument("--compile-cache", type=pathlib.Path, default=None,
                    help="persistent compilation cache directory (default ~/.cache/jserve/xla)")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    scale = ap.add_argument_group("several devices and hosts")
    scale.add_argument("--mesh", default=None,
                       help="device mesh, e.g. tp=4 or dp=2,tp=4: tp shards heads, MLP width and vocabulary, "
                            "dp shards slots; uses the first dp*tp devices (default: one device; with several "
                            "processes, tp over all devices)")
    scale.add_argument("--indivisible", choices=["replicate", "error"], default="replicate",
                       help="a dimension the mesh does not divide (e.g. 3 KV heads over tp=2): replicate it "
                            "(default, with a warning) or refuse to start")
    scale.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="jax.distributed coordinator (process 0's address); starts a multi-process run")
    scale.add_argument("--num-processes", type=int, default=None, help="processes in the multi-process run")
    scale.add_argument("--process-id", type=int, default=None, help="this process's index (0 serves gRPC)")
    scale.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() with JAX's own detection (TPU slices, SLURM, "
                            "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    return ap


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """What every process of a run loads identically."""
    kwargs = dict(slots=args.slots, max_len=args.max_len, max_prompt_len=args.max_prompt_len,
                  quantize=args.quantize, dtype=args.dtype, top_logprobs=args.max_logprobs,
                  mesh=args.mesh, indivisible=args.indivisible,
                  # The server owns its process: JAX's persistent compilation cache (process-wide) on.
                  compile_cache=args.compile_cache if args.compile_cache is not None else DEFAULT_COMPILE_CACHE)
    return kwargs


async def serve(args: argparse.Namespace) -> int:
    metrics = ServingMetrics()
    service = GenerationService(metrics)
    health_servicer = health.aio.HealthServicer()
    # No SO_REUSEPORT: a second server on a port already in use must fail, not share the port.
    # gRPC's own receive limit is set well above ours: a request between the two gets a precise
    # INVALID_ARGUMENT from us (never retried), not gRPC's RESOURCE_EXHAUSTED (which clients retry).
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                      ("grpc.max_receive_message_length", GRPC_RECEIVE_LIMIT)])
    service.max_request_bytes = args.max_request_bytes
    pb_grpc.add_GenerationServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(f"{args.host}:{args.port}")
    except RuntimeError:
        port = 0
    if port == 0:
        log.error("could not bind %s:%d (is another server using the port?)", args.host, args.port)
        print(f"jserve: could not bind {args.host}:{args.port} (is another server using the port?)",
              file=sys.stderr, flush=True)
        return 1
    http = http_server = http_task = None
    if args.http_port is not None:
        from jserve import http_api

        try:
            sock = http_api.bind(args.host, args.http_port)
        except OSError as e:
            await server.stop(0)
            print(f"jserve: could not bind HTTP {args.host}:{args.http_port}: {e}", file=sys.stderr, flush=True)
            return 1
        http = http_api.HttpFrontEnd(metrics)
        http.max_request_bytes = args.max_request_bytes
        if args.tool_call_format:
            http.tool_call_format = args.tool_call_format
        http_server = http_api.make_server(http.app, sock)
        http_task = asyncio.ensure_future(http_server.serve(sockets=[sock]))
        http_port = sock.getsockname()[1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def stop_http() -> None:
        if http_server is not None:
            http_server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(http_task, 10)

    def on_signal() -> None:
        if stop.is_set():  # a second signal: do not wait for the drain
            log.warning("second signal: exiting now")
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info("listening on %s:%d (NOT_SERVING until warm-up is done)", args.host, port)
    if http is not None:
        log.info("HTTP API on %s:%d", args.host, http_port)
        print(f"jserve http listening on {args.host}:{http_port}", flush=True)
    print(f"jserve listening on {args.host}:{port}", flush=True)

    t0 = time.perf_counter()
    dead: list[str] = []

    def on_fatal(message: str) -> None:  # the orchestrator's thread: hand over to the event loop
        dead.append(message)
        loop.call_soon_threadsafe(stop.set)

    kwargs = dict(engine_kwargs(args), max_waiting=args.max_waiting, prefill_budget=args.prefill_budget,
                  prefix_cache=not args.no_prefix_cache, speculate=args.speculate,
                  speculate_default=args.speculate_default == "on",
                  on_event=metrics.on_event, on_fatal=on_fatal, max_undelivered=args.max_undelivered)
    # Loading and compiling run in a daemon thread, not the default executor: a signal during
    # start-up must not wait for the compilation to finish.
    load = loop.create_future()

    def hand_over(settle: Any, value: Any) -> None:
        if not load.done():
            settle(value)

    def load_model() -> None:
        try:
            llm = LLM(args.checkpoint, **kwargs)
        except BaseException as e:  # handed to the event loop, which logs it and exits 1
            loop.call_soon_threadsafe(hand_over, load.set_exception, e)
        else:
            loop.call_soon_threadsafe(hand_over, load.set_result, llm)

    threading.Thread(target=load_model, name="jserve-load", daemon=True).start()
    done, _ = await asyncio.wait({load, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if load not in done:
        await stop_http()
        await server.stop(0)
        if dead:
            log.critical("exiting: %s", dead[0])
            return 1
        log.info("stopped during start-up")
        return STOPPED_DURING_STARTUP
    try:
        llm = load.result()
    except Exception:
        log.exception("could not load the model")
        await stop_http()
        await server.stop(0)
        return 1
    o = llm.orchestrator
    metrics.bind(llm.engine.slots, lambda: o.num_waiting, lambda: o.num_running, lambda: o.slots_in_use)
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port, addr=args.host if args.host not in ("[::]", "0.0.0.0") else "")
        log.info("metrics on port %d", args.metrics_port)
    service.tools = ToolSetup.of(llm, args.tool_call_format)
    service.llm = llm
    if http is not None:
        http.llm = llm
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("SERVING %s after %.1fs (warm-up %.1fs)", llm.checkpoint, time.perf_counter() - t0, llm.warmup_seconds)
    print("jserve SERVING", flush=True)

    await stop.wait()
    if dead:  # nothing can be served: say so, and exit non-zero so a supervisor restarts the server
        service.draining = True
        if http is not None:
            http.draining = True
        for name in ("", SERVICE):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.critical("exiting: %s", dead[0])
        await asyncio.gather(server.stop(grace=2.0), stop_http())
        return 1
    log.info("signal received: draining (up to %.0fs)", args.drain_timeout)
    service.draining = True
    if http is not None:
        http.draining = True
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    drained = await loop.run_in_executor(None, llm.close, True, args.drain_timeout)
    await asyncio.gather(server.stop(grace=5.0), stop_http())
    log.info("stopped (%s)", "all requests finished" if drained else "drain timed out; the rest ended UNAVAILABLE")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.mesh is not None:
        from jserve.sharding import ShardingError, parse_mesh

        try:
            parse_mesh(args.mesh)
        except ShardingError as e:
            ap.error(str(e))
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if args.coordinator or args.num_processes or args.process_id is not None or args.distributed:
        from jserve import multihost

        multihost.initialize(args.coordinator, args.num_processes, args.process_id)
        import jax

        if jax.process_index() != 0:
            from jserve.llm import load_engine

            multihost.follow(load_engine(args.checkpoint, **engine_kwargs(args)).engine)
            return 0
    code = asyncio.run(serve(args))
    if code == STOPPED_DURING_STARTUP:
        # The load thread may be deep in XLA compilation; leave without waiting for it.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)
    return code


if __name__ == "__main__":
    sys.exit(main())
