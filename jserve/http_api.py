"""The OpenAI-compatible HTTP API, served by the gRPC server's process on the same engine.

``python -m jserve.server --http-port 8000`` adds, next to gRPC and on the same event loop:
``POST /v1/chat/completions`` (with tools: ``jserve.http_tools``), ``POST /v1/completions``
(streaming as server-sent events, or not), ``POST /v1/responses`` (``jserve.http_responses``),
``GET /v1/models``, ``GET /health`` and ``GET /metrics``, and the smaller routes of
``jserve.http_extra`` (``/tokenize``, ``/detokenize``, ``/v1/models/{id}``, OpenAI-shaped 404/405).
Requests are parsed and checked by pydantic models (unknown fields are refused, not ignored; the
platform-only fields OpenAI's SDKs send are accepted and ignored, ``http_schemas``); prompts and
sampling parameters then go through the request layer (``jserve.request``) as gRPC's and the
offline script's do: the same defaults (``max_tokens`` not given: the rest of the context), and
the same input refused with the same message. Errors use OpenAI's body ``{"error": {"message",
"type", "param", "code"}}``, by ``jserve.request.ERRORS``: 400 bad input, 404 unknown model, 429
queue full or slow reader, 503 warming up or shutting down, 504 deadline passed, 500 internal.
A client that disconnects, streaming or not, has its requests cancelled: their slots are free
before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from jserve import request as rq
from jserve.errors import ErrorKind, RequestError
from jserve.http_extra import add_routes
from jserve.http_output import ChoicesMixin, _EventStream
from jserve.http_responses import ResponsesRequest
from jserve.http_responses import respond as respond_responses
from jserve.http_schemas import (
    OPENAI_MAX_COMPLETION_LOGPROBS,
    OPENAI_MAX_LOGPROBS,
    REJECTED,
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseFormat,
    _Sampling,
    check_openai_bounds,
    finish_error,
    unknown_fields,
)
from jserve.http_tools import ToolReplies, plan_chat

# No JAX at import: what needs the engine's modules imports them once a model is loaded.
if TYPE_CHECKING:
    from jserve.metrics import ServingMetrics
    from jserve.orchestrator import Stream
    from jserve.tools import ToolPlan

log = logging.getLogger("jserve.http")
__all__ = ["REJECTED", "ApiError", "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "HttpFrontEnd",
           "ResponseFormat", "bind", "make_server"]


class HttpFrontEnd(ChoicesMixin):
    """Builds the app; ``llm`` is set once the model is warm (until then: 503). ``metrics``: the
    serving process's (``/metrics`` serves them; refusals here are counted in them)."""

    def __init__(self, metrics: ServingMetrics | None = None):
        self.llm: Any | None = None
        self.draining = False
        self.metrics = metrics
        self.max_request_bytes = 4 << 20
        self.tool_call_format: str | None = None  # --tool-call-format; None: detected from the checkpoint
        self._vocab: dict[str, int] | None = None  # token → id, read once
        self.app = self._build()

    # ---- helpers ---------------------------------------------------------------------------------
    def _ready(self):
        if self.llm is None:
            raise ApiError.of(RequestError(ErrorKind.WARMING_UP, "the server is warming up; retry shortly"))
        if self.draining:
            raise ApiError.of(RequestError(ErrorKind.SHUTTING_DOWN, "the server is shutting down"))
        return self.llm

    @property
    def model_id(self) -> str:
        return self.llm.checkpoint.name if self.llm is not None else "jserve"

    def _check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ApiError.of(RequestError(ErrorKind.NOT_FOUND, f"the model {name!r} does not exist; this server "
                                                                f"serves {self.model_id!r}"), param="model")

    async def _off_loop(self, work: Any, *args: Any) -> Any:
        """``work(*args)`` in the loop's executor (tokenizer, templates, schemas); its refusal as an ``ApiError``."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, work, *args)
        except RequestError as e:
            raise ApiError.of(e) from e

    def _check(self, body: _Sampling, max_tokens: int | None, logprobs: int | None,
               sent_as: dict[str, str] | None = None, max_logprobs: int = OPENAI_MAX_LOGPROBS) -> None:
        """The sampling fields, checked by the request layer before any prompt is tokenized;
        ``sent_as``: the request layer's name of a field → the one the client sent it by
        (``max_tokens`` → ``max_completion_tokens``), which the error names instead;
        ``max_logprobs``: OpenAI's bound on the endpoint's alternatives per token."""
        try:
            params = rq.check_params(body.params(max_tokens, logprobs, body.seed), self.llm.limits)
        except RequestError as e:
            err = ApiError.of(e)
            name = (sent_as or {}).get(err.param or "")
            if name is not None:
                field = err.param
                err.param = name
                if err.message.startswith(f"{field} "):
                    err.message = name + err.message[len(field):]
            raise err from e
        check_openai_bounds(params, sent_as, max_logprobs)

    async def _start(self, prompts: list[list[int]], body: _Sampling, max_tokens: int | None,
                     logprobs: int | None, constraint: Any = None,
                     skip_special: bool = True, batch: bool = False,
                     field: str = "prompt") -> list[tuple[list[int], Stream]]:
        """Submit every (prompt, choice): ``n`` choices of one prompt differ by seed when one is given.
        ``batch``: the prompts are a completions batch, a refusal names its item (``_batch_item``);
        ``field``: the body's field the prompt came from (``prompt``, ``messages``, ``input``)."""
        started: list[tuple[list[int], Stream]] = []
        try:
            for i, ids in enumerate(prompts):
                for j in range(body.n):
                    seed = None if body.seed is None else body.seed + j
                    params = body.params(max_tokens, logprobs, seed, constraint, skip_special)
                    try:
                        stream = await self.llm.submit_async(ids, params, timeout=body.timeout)
                    except RequestError as e:
                        raise _batch_item(ApiError.of(e), i if batch else None, field) from e
                    started.append((ids, stream))
        except BaseException:
            for _, s in started:
                s.cancel()
            raise
        return started

    # ---- tools ------------------------------------------------------------------------------------
    async def _plan(self, messages: list[dict[str, Any]], tools: Any, tool_choice: Any,
                    parallel: Any) -> tuple[ToolPlan, list[int]]:
        """The chat's tool plan and prompt ids, worked out off the event loop."""
        llm = self.llm
        if self._vocab is None:
            self._vocab = llm.tokenizer.tok.get_vocab() if llm.tokenizer is not None else {}
        return await self._off_loop(functools.partial(plan_chat, llm, messages, tools, tool_choice, parallel,
                                                      self._vocab, self.tool_call_format))

    def _tool_constraint(self, plan: ToolPlan, body: _Sampling) -> Any:
        """The tool grammar, refused beside another constraint on the same reply."""
        if plan.constraint is None:
            return None
        if body.constraint() is not None:
            raise ApiError(400, f"tool_choice {plan.choice.mode!r} constrains the reply to tool calls; it cannot "
                                "also follow response_format, json_schema, guided_regex or guided_choice (send "
                                "tool_choice \"none\", or no tools, with those)", param="tool_choice")
        return plan.constraint

    @staticmethod
    def _skip_special(plan: ToolPlan) -> bool:
        """Whether the reply is detokenized without special tokens: not when a call's marker is one
        (Qwen's ``<tool_call>``), which the parser must see."""
        return not (plan.keep_special_tokens and plan.tools)

    def _replies(self, plan: ToolPlan, body: _Sampling, choices: int) -> ToolReplies | None:
        if plan.parser() is None or not plan.tools:  # no tools offered: the reply is plain content
            return None
        return ToolReplies(plan, choices, body.seed)

    # ---- the app ----------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI(title="jserve", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(ApiError)
        async def api_error(_request: Request, e: ApiError):
            if e.refusal and e.status in REJECTED:
                self._rejected(REJECTED[e.status])
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(RequestValidationError)
        async def invalid_body(request: Request, e: RequestValidationError):
            self._rejected("invalid_argument")
            unknown = unknown_fields(list(e.errors()), e.body, request.url.path)  # named first, as OpenAI does
            if unknown is not None:
                return JSONResponse(unknown.body(), status_code=400)
            message, field, code = rq.body_error(e.errors())  # which field, the type it takes, what was sent
            return JSONResponse(ApiError(400, message, param=field, code=code).body(), status_code=400)

        @app.middleware("http")
        async def size_limit(request: Request, call_next):
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
                self._rejected("invalid_argument")
                return JSONResponse(ApiError(400, f"the request has {length} bytes; this server accepts at most "
                                                  f"{self.max_request_bytes} (--max-request-bytes)").body(),
                                    status_code=400)
            return await call_next(request)

        @app.get("/health")
        async def health():
            if self.llm is None or self.draining:
                return JSONResponse({"status": "warming_up" if self.llm is None else "shutting_down"},
                                    status_code=503)
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models():
            llm = self._ready()
            return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0,
                                                "owned_by": "jserve", "max_model_len": llm.engine.max_len}]}

        @app.get("/metrics")
        async def metrics():
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            if self.metrics is None:
                raise ApiError(404, "metrics are not enabled", code="not_found", refusal=False)
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatCompletionRequest, request: Request):
            self._ready()
            self._check_model(body.model)
            if body.top_logprobs is not None and not body.logprobs:
                raise ApiError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
            body.check_supported()
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            sent_as = {"logprobs": "top_logprobs"}  # a chat's logprobs is a boolean: the count is top_logprobs
            if body.max_completion_tokens is not None:
                sent_as["max_tokens"] = "max_completion_tokens"
            self._check(body, max_tokens, logprobs, sent_as)
            plan, ids = await self._plan([m.raw() for m in body.messages], body.tools, body.tool_choice,
                                         body.parallel_tool_calls)
            constraint = self._tool_constraint(plan, body)
            started = await self._start([ids], body, max_tokens, logprobs, constraint, self._skip_special(plan),
                                        field="messages")
            tools = self._replies(plan, body, len(started))
            return await self._respond(request, body, started, chat=True, tools=tools)

        @app.post("/v1/responses")
        async def responses(body: ResponsesRequest, request: Request):
            self._ready()
            self._check_model(body.model)
            chat = body.chat_request()
            self._check(chat, chat.max_tokens, None, {"max_tokens": "max_output_tokens"})
            try:
                plan, ids = await self._plan([m.raw() for m in chat.messages], chat.tools, chat.tool_choice,
                                             chat.parallel_tool_calls)
            except ApiError as e:  # the chat made of the input: named as the input's item it came from
                e.param, e.message = body.input_item(e.param, e.message)
                raise
            constraint = self._tool_constraint(plan, chat)
            started = await self._start([ids], chat, chat.max_tokens, None, constraint, self._skip_special(plan),
                                        field="input")
            return await respond_responses(self, request, body, chat, started, self._replies(plan, chat, 1))

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request):
            self._ready()
            self._check_model(body.model)
            body.check_supported()
            p = body.prompt
            # One prompt (text or token ids; [] is an empty one) or a batch of them.
            batch = not (isinstance(p, str) or all(isinstance(t, int) for t in p))
            prompts_in: list[Any] = list(p) if batch else [p]
            self._check(body, body.max_tokens, body.logprobs, max_logprobs=OPENAI_MAX_COMPLETION_LOGPROBS)
            prompts = []
            for i, x in enumerate(prompts_in):
                try:
                    prompts.append(await self._off_loop(self.llm.tokenize_input, x))
                except ApiError as e:
                    raise _batch_item(e, i if batch else None) from e
            started = await self._start(prompts, body, body.max_tokens, body.logprobs, batch=batch)
            return await self._respond(request, body, started, chat=False)

        async def respond(request: Request, body: _Sampling, started: list[tuple[list[int], Stream]], chat: bool,
                          tools: ToolReplies | None = None):
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            created = int(time.time())
            if body.stream:
                return _EventStream(self._sse(rid, created, body, started, chat, tools), [s for _, s in started])
            async def on_disconnect() -> None:
                # The body has been read: the next ASGI message is the client going away.
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                for _, s in started:
                    s.cancel()

            watcher = asyncio.create_task(on_disconnect())
            try:
                results = await asyncio.gather(*(self._collect(s) for _, s in started))
            finally:
                watcher.cancel()
                for _, s in started:
                    s.cancel()  # no-op when finished; frees the slots if this handler is cancelled
            max_undelivered = self.llm.orchestrator.max_undelivered
            for pieces in results:
                err = finish_error(pieces[-1], rid, max_undelivered)
                if err is not None:
                    raise err
            choices = [self._choice(i, pieces, chat, tools) for i, pieces in enumerate(results)]
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": self.model_id, "choices": choices, "usage": self._usage(started, results)}

        self._respond = respond
        add_routes(self, app)
        return app

    def _rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.reject(reason)


def _batch_item(e: ApiError, i: int | None, field: str = "prompt") -> ApiError:
    """A refusal of a completions prompt named as the item of the batch it is (``prompt[1]``, its
    message prefixed with it), or as ``field`` when it is the only one (``i`` None: ``prompt``, or
    ``messages`` / ``input`` for a chat's)."""
    if e.status != 400:  # a full queue, a deadline: not the prompt's fault
        return e
    if i is None:
        e.param = e.param or field
    elif e.param is None or e.param == "prompt" or e.param.startswith("prompt["):  # prompt[3]: its item
        e.param = f"prompt[{i}]" + (e.param or "prompt")[len("prompt"):]
        e.message = f"prompt[{i}]: {e.message}"
    return e


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (no SO_REUSEPORT: a port in use is refused, not shared); ``OSError`` if taken."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def make_server(app: Any, sock: socket.socket):
    """A uvicorn server for ``app`` on ``sock`` that runs in the caller's event loop and leaves
    signal handling to the caller (the gRPC server's drain logic)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # the jserve server handles SIGTERM/SIGINT itself
            yield

        def install_signal_handlers(self) -> None:  # older uvicorn releases
            pass

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5)
    return Server(config)
