"""The gRPC front end's service: a thin adapter between ``jserve.v1``'s messages and the ``LLM``.

It maps a ``GenerateRequest`` message's fields onto the request layer's (``jserve.request``: one
validation, one set of defaults and messages for every front end), streams the pieces back, and
maps outcomes to statuses with ``jserve.request``'s tables (``ERRORS``: error kind → status code,
``FINISHES``: finish reason → the proto's ``FinishReason``). Tools: ``jserve.server_tools``.
The process around it (command line, health, drain) is ``jserve.server``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from jserve.constraint import Constraint
from jserve.errors import ErrorKind, InvalidRequestError, RequestError
from jserve.metrics import ServingMetrics
from jserve.request import ERRORS, FINISHES, FinishReason, finish_error, sampling_params
from jserve.server_tools import ReplyParts, ToolSetup, chat_messages, prepare, wants_tools
from jserve.v1 import jserve_pb2 as pb
from jserve.v1 import jserve_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
FINISH = {reason: pb.FinishReason.Value(f.grpc) for reason, f in FINISHES.items() if f.grpc is not None}
OPTIONAL = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "repetition_penalty",
            "presence_penalty", "frequency_penalty", "speculate")


def request_to_input(req: pb.GenerateRequest) -> Any:
    """The prompt of a request, as the LLM API takes it (its checks are the request layer's)."""
    kind = req.WhichOneof("input")
    if kind is None:
        raise InvalidRequestError("no input: set one of text, chat or token_ids")
    if kind == "text":
        return req.text
    if kind == "chat":
        return chat_messages(req.chat)
    return list(req.token_ids.ids)


def request_to_params(req: pb.GenerateRequest):
    """The request's ``SamplingParams``: an unset optional field takes the request layer's default."""
    return sampling_params(
        **{name: getattr(req, name) if req.HasField(name) else None for name in OPTIONAL},
        stop=list(req.stop), stop_token_ids=list(req.stop_token_ids), ignore_eos=req.ignore_eos,
        logprobs=req.logprobs or None, constraint=request_to_constraint(req),
        logit_bias=sorted(req.logit_bias.items()))


def request_to_constraint(req: pb.GenerateRequest) -> Constraint | None:
    kind = req.WhichOneof("constraint")
    if kind is None or (kind == "json_object" and not req.json_object):
        return None
    if kind == "choice":
        return Constraint("choice", tuple(req.choice.choices))
    if kind == "json_object":
        return Constraint("json_object")
    return Constraint(kind, getattr(req, kind))


def status(kind: ErrorKind) -> grpc.StatusCode:
    return grpc.StatusCode[ERRORS[kind].grpc]


class GenerationService(pb_grpc.GenerationServicer):
    """``llm`` is set once the model is warm (until then: UNAVAILABLE); ``draining`` on SIGTERM."""

    def __init__(self, metrics: ServingMetrics):
        self.max_request_bytes = 4 << 20
        self.llm: Any = None
        self.tools: ToolSetup | None = None  # set with llm
        self.metrics = metrics
        self.draining = False

    def _check_size(self, request: Any) -> None:
        size = request.ByteSize()
        if size > self.max_request_bytes:
            raise InvalidRequestError(f"the request has {size} bytes; this server accepts at most "
                                      f"{self.max_request_bytes} (--max-request-bytes)")

    def _ready(self):
        if self.llm is None:
            raise RequestError(ErrorKind.WARMING_UP, "the server is warming up; retry shortly")
        if self.draining:
            raise RequestError(ErrorKind.SHUTTING_DOWN, "the server is shutting down")
        return self.llm

    async def _refuse(self, context: grpc.aio.ServicerContext, e: RequestError) -> None:
        label = ERRORS[e.kind].rejected
        if label is not None:
            self.metrics.reject(label)
        await context.abort(status(e.kind), e.message)

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
        except RequestError as e:
            await self._refuse(context, e)
        rid = stream.request.request_id
        parts = ReplyParts(plan, params.seed)
        try:
            async for piece in stream:
                err = finish_error(piece.finish_reason, rid, piece.completion_tokens, piece.error,
                                   llm.orchestrator.max_undelivered)
                if err is not None:
                    await context.abort(status(err.kind), err.message)
                text, calls = parts.split(piece.text, piece.finish_reason is not None)
                resp = pb.GenerateResponse(text=text, token_ids=piece.token_ids, request_id=rid, tool_calls=calls)
                if params.logprobs or piece.top_logprobs:
                    for i, (t, lp) in enumerate(zip(piece.token_ids, piece.logprobs)):
                        top = piece.top_logprobs[i] if i < len(piece.top_logprobs) else []
                        resp.logprobs.append(pb.TokenLogprob(
                            token_id=t, logprob=lp, top=[pb.TopLogprob(token_id=a, logprob=b) for a, b in top]))
                if piece.finish_reason is not None:
                    reason = FinishReason(piece.finish_reason)
                    resp.finish_reason = pb.TOOL_CALLS if parts.called and reason == FinishReason.STOP else \
                        FINISH[reason]
                    resp.usage.prompt_tokens = piece.prompt_tokens
                    resp.usage.completion_tokens = piece.completion_tokens
                    resp.usage.cached_prompt_tokens = piece.cached_tokens
                yield resp
        finally:
            stream.cancel()  # no-op when finished; frees the slot when the client went away

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        if self.llm is None:
            await context.abort(status(ErrorKind.WARMING_UP), "the server is warming up; retry shortly")
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
                ids = await loop.run_in_executor(None, llm.encode_chat, chat_messages(request.chat))
            else:
                raise InvalidRequestError("no input: set text or chat")
        except RequestError as e:
            await context.abort(status(e.kind), e.message)
        return pb.TokenizeResponse(ids=ids)
