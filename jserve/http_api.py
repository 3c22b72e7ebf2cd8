"""The OpenAI-compatible HTTP API, served by the gRPC server's process on the same engine.

``python -m jserve.server --http-port 8000`` adds, next to gRPC and on the same event loop:
``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming as server-sent events, or
not), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``. Requests are parsed and checked
by pydantic models (unknown fields are refused, not ignored); prompts and sampling parameters
then go through the same ``LLM.submit`` validation as gRPC, so both APIs refuse the same input
with the same message. Errors use OpenAI's body ``{"error": {"message", "type", "param",
"code"}}``: 400 bad input, 404 unknown model, 429 queue full, 503 warming up or shutting down,
504 deadline passed, 500 internal. A client that disconnects, streaming or not, has its requests
cancelled: their slots are free before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

# No JAX at import: what needs the engine's modules imports them once a model is loaded.
if TYPE_CHECKING:
    from jserve.metrics import ServingMetrics
    from jserve.orchestrator import Stream, StreamOutput
    from jserve.sampling import SamplingParams
    from jserve.structured import Constraint

log = logging.getLogger("jserve.http")

# Refusals at the edge by status, counted in ``jserve_requests_rejected`` as gRPC counts its own
# (a full queue, 429, is counted by the orchestrator whichever front end it came through).
REJECTED = {400: "invalid_argument", 404: "not_found", 503: "unavailable"}


# ---- request bodies ------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart]
    name: str | None = None  # accepted and ignored, as OpenAI's API allows it on any message

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = "answer"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> Constraint | None:
        from jserve.structured import Constraint

        if self.type == "json_object":
            return Constraint("json_object")
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ApiError(400, "response_format json_schema needs its json_schema.schema", param="response_format")
            return Constraint("json_schema", json.dumps(self.json_schema.schema_))
        return None


class _Sampling(_Body):
    """Fields both endpoints share, OpenAI's and jserve's own extras (``top_k``, ``min_p``,
    ``repetition_penalty``, ``ignore_eos``, ``speculate``, ``timeout`` in seconds)."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None  # ignored
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    speculate: bool | None = None  # speculative decoding for this request (None: the server's default)
    stop_token_ids: list[int] | None = None
    timeout: float | None = Field(None, gt=0)
    response_format: ResponseFormat | None = None
    guided_regex: str | None = None  # jserve/vLLM extras: the answer matches this regex ...
    guided_choice: list[str] | None = None  # ... or is exactly one of these strings

    def constraint(self) -> Constraint | None:
        from jserve.structured import Constraint

        given = [c for c in (self.response_format.constraint() if self.response_format else None,
                             Constraint("regex", self.guided_regex) if self.guided_regex is not None else None,
                             Constraint("choice", tuple(self.guided_choice)) if self.guided_choice is not None
                             else None) if c is not None]
        if len(given) > 1:
            raise ApiError(400, "give at most one of response_format (json), guided_regex and guided_choice",
                           param="response_format")
        return given[0] if given else None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class ApiError(Exception):
    """An error response. ``refusal``: the request was refused before it ran (counted in the
    rejected-requests metric by ``REJECTED``), not ended after it started."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, refusal: bool = True):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.refusal = refusal

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _finish_error(piece: StreamOutput, rid: str, max_undelivered: int) -> ApiError | None:
    """The error a request's final piece stands for, if it did not end normally."""
    from jserve.orchestrator import DEADLINE, ERROR, SHUTDOWN, SLOW_READER

    r = piece.finish_reason
    if r == DEADLINE:
        return ApiError(504, f"request {rid}: the deadline passed after {piece.completion_tokens} tokens",
                        "timeout", code="deadline_exceeded", refusal=False)
    if r == SHUTDOWN:
        return ApiError(503, f"the server shut down before request {rid} finished; retry it", "server_error",
                        code="shutting_down", refusal=False)
    if r == SLOW_READER:
        return ApiError(429, f"request {rid} ended after {piece.completion_tokens} tokens: the client left more "
                             f"than {max_undelivered} pieces unread (--max-undelivered)", "server_error",
                        code="slow_reader", refusal=False)
    if r == ERROR:
        return ApiError(500, f"request {rid} failed: {piece.error}", "server_error", code="internal_error",
                        refusal=False)
    return None


class HttpFrontEnd:
    """Builds the app; ``llm`` is set once the model is warm (until then: 503). ``metrics``: the
    serving process's (``/metrics`` serves them; refusals here are counted in them)."""

    def __init__(self, metrics: ServingMetrics | None = None):
        self.llm: Any | None = None
        self.draining = False
        self.metrics = metrics
        self.max_request_bytes = 4 << 20
        self.app = self._build()

    # ---- helpers ---------------------------------------------------------------------------------
    def _ready(self):
        if self.llm is None:
            raise ApiError(503, "the server is warming up; retry shortly", "server_error", code="warming_up")
        if self.draining:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        return self.llm

    @property
    def model_id(self) -> str:
        return self.llm.checkpoint.name if self.llm is not None else "jserve"

    def _check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")

    def _params(self, body: _Sampling, max_tokens: int | None, prompt_len: int, logprobs: int | None,
                seed: int | None) -> SamplingParams:
        from jserve.sampling import SamplingParams

        llm = self.llm
        if max_tokens is None:  # OpenAI's default: the rest of the context
            max_tokens = max(1, llm.engine.max_len - prompt_len)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())

        def given(value: Any, default: Any) -> Any:
            return default if value is None else value

        return SamplingParams(
            max_tokens=max_tokens, temperature=given(body.temperature, 1.0), top_p=given(body.top_p, 1.0),
            top_k=given(body.top_k, 0), min_p=given(body.min_p, 0.0), seed=seed,
            repetition_penalty=given(body.repetition_penalty, 1.0),
            presence_penalty=given(body.presence_penalty, 0.0), frequency_penalty=given(body.frequency_penalty, 0.0),
            stop=stop, stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos, logprobs=logprobs,
            constraint=body.constraint(), speculate=body.speculate)

    async def _submit(self, ids: list[int], params: SamplingParams, timeout: float | None) -> Stream:
        from jserve.orchestrator import QueueFullError, ShuttingDownError
        from jserve.sampling import InvalidRequestError

        try:
            return await self.llm.submit_async(ids, params, timeout=timeout)
        except InvalidRequestError as e:
            raise ApiError(400, str(e)) from e
        except QueueFullError as e:
            raise ApiError(429, str(e), "server_error", code="queue_full") from e
        except ShuttingDownError as e:
            raise ApiError(503, str(e), "server_error", code="shutting_down") from e

    async def _tokenize(self, prompt: Any) -> list[int]:
        from jserve.sampling import InvalidRequestError

        try:
            return await asyncio.get_running_loop().run_in_executor(None, self.llm.tokenize_input, prompt)
        except InvalidRequestError as e:
            raise ApiError(400, str(e)) from e

    async def _start(self, prompts: list[list[int]], body: _Sampling, max_tokens: int | None,
                     logprobs: int | None) -> list[tuple[list[int], Stream]]:
        """Submit every (prompt, choice): ``n`` choices of one prompt differ by seed when one is given."""
        started: list[tuple[list[int], Stream]] = []
        try:
            for ids in prompts:
                for j in range(body.n):
                    seed = None if body.seed is None else body.seed + j
                    params = self._params(body, max_tokens, len(ids), logprobs, seed)
                    started.append((ids, await self._submit(ids, params, body.timeout)))
        except BaseException:
            for _, s in started:
                s.cancel()
            raise
        return started

    def _token_text(self, token: int) -> str:
        tok = self.llm.tokenizer
        return tok.token_bytes(token).decode("utf-8", "replace") if tok is not None else str(token)

    # ---- the app ----------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI(title="jserve", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(ApiError)
        async def api_error(_request: Request, e: ApiError):
            if e.refusal and e.status in REJECTED:
                self._rejected(REJECTED[e.status])
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(RequestValidationError)
        async def invalid_body(_request: Request, e: RequestValidationError):
            errors = e.errors()
            first = errors[0] if errors else {}
            loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
            message = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body')}: {err.get('msg')}"
                                for err in errors[:5])
            self._rejected("invalid_argument")
            return JSONResponse(ApiError(400, message or "invalid request body", param=loc or None).body(),
                                status_code=400)

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
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            ids = await self._tokenize(messages)
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            started = await self._start([ids], body, max_tokens, logprobs)
            return await self._respond(request, body, started, chat=True)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request):
            self._ready()
            self._check_model(body.model)
            if body.echo:
                raise ApiError(400, "echo is not supported", param="echo")
            if body.suffix:
                raise ApiError(400, "suffix is not supported", param="suffix")
            p = body.prompt
            if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
                prompts_in: list[Any] = [p]
            else:
                prompts_in = list(p)
            if not prompts_in:
                raise ApiError(400, "the prompt is empty", param="prompt")
            prompts = [await self._tokenize(x) for x in prompts_in]
            started = await self._start(prompts, body, body.max_tokens, body.logprobs)
            return await self._respond(request, body, started, chat=False)

        async def respond(request: Request, body: _Sampling, started: list[tuple[list[int], Stream]], chat: bool):
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            created = int(time.time())
            if body.stream:
                return _EventStream(self._sse(rid, created, body, started, chat), [s for _, s in started])
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
                err = _finish_error(pieces[-1], rid, max_undelivered)
                if err is not None:
                    raise err
            choices = [self._choice(i, pieces, chat) for i, pieces in enumerate(results)]
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": self.model_id, "choices": choices, "usage": self._usage(started, results)}

        self._respond = respond
        return app

    def _rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.reject(reason)

    async def _collect(self, stream: Stream) -> list[StreamOutput]:
        return [p async for p in stream]

    def _usage(self, started, results) -> dict[str, Any]:
        seen: set[int] = set()
        prompt = cached = 0
        for (ids, _), pieces in zip(started, results):
            if id(ids) not in seen:  # n choices of one prompt count its tokens once, as OpenAI does
                seen.add(id(ids))
                prompt += len(ids)
                cached += max((p.cached_tokens for p in pieces), default=0)
        completion = sum(pieces[-1].completion_tokens for pieces in results if pieces)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _logprobs(self, pieces: list[StreamOutput], chat: bool, offset: int = 0) -> dict[str, Any] | None:
        tokens = [t for p in pieces for t in p.token_ids]
        lps = [lp for p in pieces for lp in p.logprobs]
        if not lps:
            return None
        tops = [t for p in pieces for t in p.top_logprobs] or [[] for _ in tokens]
        if len(tops) < len(tokens):
            tops += [[] for _ in range(len(tokens) - len(tops))]
        if chat:
            def entry(token: int, lp: float) -> dict[str, Any]:
                text = self._token_text(token)
                return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

            return {"content": [dict(entry(t, lp), top_logprobs=[entry(a, b) for a, b in top])
                                for t, lp, top in zip(tokens, lps, tops)]}
        texts = [self._token_text(t) for t in tokens]
        offsets, at = [], offset
        for text in texts:
            offsets.append(at)
            at += len(text)
        return {"tokens": texts, "token_logprobs": lps,
                "top_logprobs": [{self._token_text(a): b for a, b in top} for top in tops],
                "text_offset": offsets}

    def _choice(self, index: int, pieces: list[StreamOutput], chat: bool) -> dict[str, Any]:
        text = "".join(p.text for p in pieces)
        reason = pieces[-1].finish_reason  # jserve's "stop" and "length" are OpenAI's names too
        out: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": self._logprobs(pieces, chat)}
        if chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["text"] = text
        return out

    async def _sse(self, rid: str, created: int, body: _Sampling, started: list[tuple[list[int], Stream]],
                   chat: bool) -> AsyncIterator[str]:
        """Server-sent events: each choice's pieces as they come (choices interleaved), then the
        usage chunk when asked, then ``[DONE]``. An error ends the stream with an error event."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        # Bounded: while the client takes no events, the pumps take no pieces, which then count as
        # undelivered on their streams, so ``--max-undelivered`` ends them as it does over gRPC.
        queue: asyncio.Queue = asyncio.Queue(maxsize=len(started))

        async def pump(index: int, stream: Stream) -> None:
            async for piece in stream:
                await queue.put((index, piece))

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
            data = {"id": rid, "object": kind, "created": created, "model": self.model_id, "choices": choices}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        tasks = [asyncio.ensure_future(pump(i, s)) for i, (_, s) in enumerate(started)]
        results: list[list[StreamOutput]] = [[] for _ in started]
        offsets = [0] * len(started)
        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(started))])
            open_streams = len(started)
            max_undelivered = self.llm.orchestrator.max_undelivered
            while open_streams:
                index, piece = await queue.get()
                results[index].append(piece)
                if piece.finish_reason is not None:
                    open_streams -= 1
                err = _finish_error(piece, rid, max_undelivered)
                if err is not None:
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                if not piece.text and not piece.token_ids and piece.finish_reason is None:
                    continue
                reason = piece.finish_reason
                choice: dict[str, Any] = {"index": index, "finish_reason": reason,
                                          "logprobs": self._logprobs([piece], chat, offsets[index])}
                offsets[index] += len(piece.text)
                if chat:
                    choice["delta"] = {"content": piece.text} if piece.text or reason is None else {}
                else:
                    choice["text"] = piece.text
                yield chunk([choice])
            if body.stream_options is not None and body.stream_options.include_usage:
                yield chunk([], self._usage(started, results))
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            for _, s in started:
                s.cancel()  # a client that went away frees its slots before the next step


class _EventStream(StreamingResponse):
    """Server-sent events whose requests are cancelled however the response ends, also when the
    client went away before the first event (then the event generator never starts, and its own
    clean-up never runs)."""

    def __init__(self, events: AsyncIterator[str], streams: list[Stream]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.streams = streams

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for s in self.streams:
                s.cancel()  # no-op when finished


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
