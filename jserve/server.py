"""The jserve server: ``python -m jserve.server``.

The process around the front ends: the command line (built from ``jserve.serving_config``, the
defaults ``LLM`` and ``scripts/generate.py`` share), the gRPC service (``jserve.grpc_api``) and,
with ``--http-port``, the HTTP API (``jserve.http_api``), both thin adapters over the request layer
(``jserve.request``). It binds its port first and reports NOT_SERVING on the standard
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

from jserve.grpc_api import SERVICE, GenerationService
from jserve.llm import DEFAULT_COMPILE_CACHE, LLM
from jserve.metrics import ServingMetrics
from jserve.server_tools import ToolSetup
from jserve.serving_config import (
    PORT,
    EngineConfig,
    SchedulerConfig,
    ServerConfig,
    add_engine_flags,
    check_engine_args,
    int_in,
    seconds,
)
from jserve.tools import FORMATS
from jserve.v1 import jserve_pb2_grpc as pb_grpc
from jserve.warmup import WARMUP_THREAD

log = logging.getLogger("jserve.server")

__all__ = ["GenerationService", "build_parser", "engine_config", "main", "scheduler_config", "serve",
           "server_config"]
ENGINE, SCHEDULER, SERVER = EngineConfig(), SchedulerConfig(), ServerConfig()  # the defaults, one set
STOPPED_DURING_STARTUP = -1
GRPC_RECEIVE_LIMIT = 64 << 20


def build_parser() -> argparse.ArgumentParser:
    """The command line; every default is the one of ``jserve.serving_config`` (as ``LLM``'s)."""
    ap = argparse.ArgumentParser(prog="python -m jserve.server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=pathlib.Path, default=None,
                    help="jserve checkpoint directory (default: SmolLM2-135M-Instruct, converted on first start)")
    ap.add_argument("--host", default=SERVER.host, help=f"address to bind (default {SERVER.host}; [::] for all)")
    ap.add_argument("--port", type=PORT, default=SERVER.port,
                    help=f"gRPC port (default {SERVER.port}; 0 picks a free one)")
    ap.add_argument("--http-port", type=PORT, default=SERVER.http_port,
                    help="also serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                         "/v1/models, /health, /metrics) on this port (default: off; 0 picks a free one)")
    add_engine_flags(ap)
    ap.add_argument("--max-waiting", type=int_in(0), default=SCHEDULER.max_waiting,
                    help="waiting-queue bound; beyond it requests get RESOURCE_EXHAUSTED "
                         f"(default {SCHEDULER.max_waiting})")
    ap.add_argument("--max-logprobs", type=int_in(0), default=ENGINE.top_logprobs,
                    help=f"most top alternatives a request may ask for (default {ENGINE.top_logprobs})")
    ap.add_argument("--max-request-bytes", type=int_in(1, GRPC_RECEIVE_LIMIT), default=SERVER.max_request_bytes,
                    help=f"largest request accepted, in bytes (default {SERVER.max_request_bytes >> 20} MiB; at "
                         f"most {GRPC_RECEIVE_LIMIT >> 20} MiB, gRPC's own limit here); a larger one gets "
                         "INVALID_ARGUMENT")
    ap.add_argument("--max-undelivered", type=int_in(1), default=SCHEDULER.max_undelivered,
                    help="responses a client may leave unread before its request is ended with RESOURCE_EXHAUSTED "
                         "(HTTP streams: an error event, code slow_reader) and its slot freed "
                         f"(default {SCHEDULER.max_undelivered})")
    ap.add_argument("--prefill-budget", type=int_in(1), default=SCHEDULER.prefill_budget,
                    help="prompt tokens run between two decode steps while streams are live, in chunks of 16 "
                         f"(default {SCHEDULER.prefill_budget}): a long prompt is run a chunk at a time, so live "
                         "streams keep their pace; with no live stream each call takes up to 512")
    ap.add_argument("--kv-headroom", type=int_in(0), default=SCHEDULER.kv_headroom,
                    help="with a paged KV pool (--kv-memory): KV pages admission keeps free for each running "
                         "request to grow into, so growth rarely preempts; 0 admits whenever a prompt fits "
                         f"(default {SCHEDULER.kv_headroom})")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="compute every prompt in full (default: reuse the keys/values of a prompt prefix "
                         "already held by some slot, e.g. a shared system prompt or the earlier turns of a chat)")
    ap.add_argument("--speculate-default", choices=["on", "off"],
                    default="on" if SCHEDULER.speculate_default else "off",
                    help="whether requests that do not set 'speculate' use speculative decoding when it is on "
                         "(default on)")
    ap.add_argument("--tool-call-format", choices=sorted(FORMATS), default=SERVER.tool_call_format,
                    help="how the model writes tool calls, to enforce and parse them (default: detected from the "
                         "checkpoint's chat template and vocabulary; generic when none is recognised)")
    ap.add_argument("--metrics-port", type=PORT, default=SERVER.metrics_port,
                    help="serve Prometheus metrics on this port")
    ap.add_argument("--drain-timeout", type=seconds, default=SERVER.drain_timeout,
                    help="seconds in-flight requests may take to finish after SIGTERM "
                         f"(default {SERVER.drain_timeout:g})")
    ap.add_argument("--compile-cache", type=pathlib.Path, default=None,
                    help="persistent compilation cache directory (default ~/.cache/jserve/xla)")
    ap.add_argument("--precompile", action="store_true",
                    help="compile every call the server would make with these arguments into the compilation "
                         "cache, then exit without serving: the next start with the same arguments loads them "
                         "(seconds, and no compiler memory) instead of compiling (scripts/setup.sh does this "
                         "for the defaults)")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    scale = ap.add_argument_group("several devices and hosts")
    scale.add_argument("--mesh", default=ENGINE.mesh,
                       help="device mesh, e.g. tp=4 or dp=2,tp=4: tp shards heads, MLP width and vocabulary, "
                            "dp shards slots; uses the first dp*tp devices (default: one device; with several "
                            "processes, tp over all devices)")
    scale.add_argument("--indivisible", choices=["replicate", "error"], default=ENGINE.indivisible,
                       help="a dimension the mesh does not divide (e.g. 3 KV heads over tp=2): replicate it "
                            "(default, with a warning) or refuse to start")
    scale.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="jax.distributed coordinator (process 0's address); starts a multi-process run")
    scale.add_argument("--num-processes", type=int_in(1), default=None, help="processes in the multi-process run")
    scale.add_argument("--process-id", type=int_in(0), default=None, help="this process's index (0 serves gRPC)")
    scale.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() with JAX's own detection (TPU slices, SLURM, "
                            "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    return ap


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """What every process of a run loads identically."""
    return EngineConfig(slots=args.slots, max_len=args.max_len, max_prompt_len=args.max_prompt_len,
                        quantize=args.quantize, dtype=args.dtype, kv_dtype=args.kv_dtype,
                        top_logprobs=args.max_logprobs, mesh=args.mesh, indivisible=args.indivisible,
                        speculate=args.speculate, kv_memory=args.kv_memory)


def scheduler_config(args: argparse.Namespace) -> SchedulerConfig:
    return SchedulerConfig(max_waiting=args.max_waiting, prefill_budget=args.prefill_budget,
                           prefix_cache=not args.no_prefix_cache, speculate_default=args.speculate_default == "on",
                           max_undelivered=args.max_undelivered, kv_headroom=args.kv_headroom)


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(host=args.host, port=args.port, http_port=args.http_port, metrics_port=args.metrics_port,
                        max_request_bytes=args.max_request_bytes, drain_timeout=args.drain_timeout,
                        tool_call_format=args.tool_call_format)


def compile_cache(args: argparse.Namespace) -> pathlib.Path:
    # The server owns its process: JAX's persistent compilation cache (process-wide) on.
    return args.compile_cache if args.compile_cache is not None else DEFAULT_COMPILE_CACHE


async def serve(args: argparse.Namespace) -> int:
    cfg = server_config(args)
    metrics = ServingMetrics()
    service = GenerationService(metrics)
    health_servicer = health.aio.HealthServicer()
    # No SO_REUSEPORT: a second server on a port already in use must fail, not share the port.
    # gRPC's own receive limit is set well above ours: a request between the two gets a precise
    # INVALID_ARGUMENT from us (never retried), not gRPC's RESOURCE_EXHAUSTED (which clients retry).
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                      ("grpc.max_receive_message_length", GRPC_RECEIVE_LIMIT)])
    service.max_request_bytes = cfg.max_request_bytes
    pb_grpc.add_GenerationServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    except RuntimeError:
        port = 0
    if port == 0:
        log.error("could not bind %s:%d (is another server using the port?)", cfg.host, cfg.port)
        print(f"jserve: could not bind {cfg.host}:{cfg.port} (is another server using the port?)",
              file=sys.stderr, flush=True)
        return 1
    http = http_server = http_task = None
    if cfg.http_port is not None:
        from jserve import http_api

        try:
            sock = http_api.bind(cfg.host, cfg.http_port)
        except OSError as e:
            await server.stop(0)
            print(f"jserve: could not bind HTTP {cfg.host}:{cfg.http_port}: {e}", file=sys.stderr, flush=True)
            return 1
        http = http_api.HttpFrontEnd(metrics)
        http.max_request_bytes = cfg.max_request_bytes
        if cfg.tool_call_format:
            http.tool_call_format = cfg.tool_call_format
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
    log.info("listening on %s:%d (NOT_SERVING until warm-up is done)", cfg.host, port)
    if http is not None:
        log.info("HTTP API on %s:%d", cfg.host, http_port)
        print(f"jserve http listening on {cfg.host}:{http_port}", flush=True)
    print(f"jserve listening on {cfg.host}:{port}", flush=True)

    t0 = time.perf_counter()
    dead: list[str] = []

    def on_fatal(message: str) -> None:  # the orchestrator's thread: hand over to the event loop
        dead.append(message)
        loop.call_soon_threadsafe(stop.set)

    # Loading and compiling run in a daemon thread, not the default executor: a signal during
    # start-up must not wait for the compilation to finish.
    load = loop.create_future()

    def hand_over(settle: Any, value: Any) -> None:
        if not load.done():
            settle(value)

    def load_model() -> None:
        try:
            llm = LLM(args.checkpoint, engine=engine_config(args), scheduler=scheduler_config(args),
                      compile_cache=compile_cache(args), on_event=metrics.on_event, on_fatal=on_fatal)
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
    if o.pages is not None:
        metrics.bind_pages(o.pages.stats)
    if cfg.metrics_port is not None:
        metrics.serve(cfg.metrics_port, addr=cfg.host if cfg.host not in ("[::]", "0.0.0.0") else "")
        log.info("metrics on port %d", cfg.metrics_port)
    service.tools = ToolSetup.of(llm, cfg.tool_call_format)
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
    log.info("signal received: draining (up to %.0fs)", cfg.drain_timeout)
    service.draining = True
    if http is not None:
        http.draining = True
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    drained = await loop.run_in_executor(None, llm.close, True, cfg.drain_timeout)
    await asyncio.gather(server.stop(grace=5.0), stop_http())
    log.info("stopped (%s)", "all requests finished" if drained else "drain timed out; the rest ended UNAVAILABLE")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_engine_args(ap, args)
    if args.mesh is not None:
        from jserve.sharding import ShardingError, parse_mesh

        try:
            parse_mesh(args.mesh)
        except ShardingError as e:
            ap.error(str(e))
    if args.num_processes is not None and args.process_id is not None and args.process_id >= args.num_processes:
        ap.error(f"--process-id ({args.process_id}) must be below --num-processes ({args.num_processes})")
    if args.precompile and (args.coordinator or args.num_processes or args.process_id is not None
                            or args.distributed):
        ap.error("--precompile runs in one process: start it without --coordinator, --num-processes, "
                 "--process-id and --distributed")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    log.info("started: imports done")  # the first of the start-up's timestamps (scripts/bench_startup.py)
    if args.coordinator or args.num_processes or args.process_id is not None or args.distributed:
        from jserve import multihost

        multihost.initialize(args.coordinator, args.num_processes, args.process_id)
        import jax

        if jax.process_index() != 0:
            from jserve.llm import load_engine

            loaded = load_engine(args.checkpoint, engine_config(args), compile_cache=compile_cache(args))
            multihost.follow(loaded.engine)
            return 0
    if args.precompile:
        return precompile(args)
    code = asyncio.run(serve(args))
    if code == STOPPED_DURING_STARTUP or _compiling_in_background():
        # The load thread, or warm-up's background phase (stopped, but inside the call it was
        # compiling), may be deep in XLA compilation; leave without waiting for it (interpreter
        # exit would: see ``Warmup._stop_and_wait``).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if code == STOPPED_DURING_STARTUP else code)
    return code


def precompile(args: argparse.Namespace) -> int:
    """``--precompile``: load the model, compile every call shape the engine serves (the SERVING-ready
    ones, then the background phase's) into the persistent cache, and return without serving."""
    from jserve.llm import load_engine

    t0 = time.perf_counter()
    loaded = load_engine(args.checkpoint, engine_config(args), compile_cache=compile_cache(args))
    engine = loaded.engine
    log.info("precompile: waiting for the %d background calls", len(engine.background_keys))
    engine.wait_ready()
    log.info("precompiled %d calls into %s in %.1f s", len(engine.compile_seconds), compile_cache(args),
             time.perf_counter() - t0)
    return 0


def _compiling_in_background() -> bool:
    return any(t.name == WARMUP_THREAD and t.is_alive() for t in threading.enumerate())


if __name__ == "__main__":
    sys.exit(main())
