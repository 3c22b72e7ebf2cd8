"""The HTTP API's request bodies (pydantic models: unknown fields are refused) and its errors
(``ApiError``: OpenAI's body ``{"error": {"message", "type", "param", "code"}}``, made from the
request layer's ``RequestError`` with ``jserve.request.ERRORS``)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jserve import request as rq
from jserve.errors import MISSING, InvalidRequestError, RequestError, range_code

if TYPE_CHECKING:
    from jserve.constraint import Constraint
    from jserve.orchestrator import StreamOutput
    from jserve.sampling import SamplingParams

# Refusals at the edge by status, counted in ``jserve_requests_rejected`` as gRPC counts its own
# (a full queue, 429, is counted by the orchestrator whichever front end it came through).
REJECTED = {edge.http: edge.rejected for edge in rq.ERRORS.values() if edge.rejected is not None}


# ---- request bodies ------------------------------------------------------------------------------
class _Body(BaseModel):
    """Strict, as the request layer's ``check_types``: a boolean is not a number, ``"5"`` is not an
    integer, and an integer is a number (OpenAI takes ``temperature: 1``)."""

    model_config = ConfigDict(extra="forbid", strict=True)


MESSAGE_FIELDS, MESSAGE_UNSUPPORTED = rq.MESSAGE_FIELDS, rq.MESSAGE_UNSUPPORTED  # the request layer's, per role


def unknown_parameter(at: str, what: str, names: list[str], takes: frozenset[str] | None = None) -> ApiError:
    """OpenAI's refusal of fields it does not document (``unknown_parameter``), naming the first
    (sorted) of ``names`` under ``at`` (``messages[1]``; "" for the body) and listing them all."""
    names = sorted(names)
    listed = ", ".join(repr(n) for n in names)
    message = f"unknown parameter{'s' if len(names) > 1 else ''} {listed}" + (f" {what}" if what else "")
    if takes is not None:
        message += f" (it takes {', '.join(sorted(takes))})"
    return ApiError(400, f"{at}: {message}" if at else message, param=f"{at}.{names[0]}" if at else names[0],
                    code="unknown_parameter")


class ChatMessage(_Body):
    """One of OpenAI's chat messages; checked in full by ``jserve.llm.normalize_chat``, its fields
    against its role by ``check_fields``."""

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None  # an earlier reply's refusal: accepted, not shown to the model
    audio: Any = None  # MESSAGE_UNSUPPORTED
    function_call: Any = None

    def raw(self) -> dict[str, Any]:
        out = self.model_dump(exclude_none=True, exclude={"refusal", "audio", "function_call"})
        out["content"] = self.content
        return out

    def check_fields(self, i: int) -> None:
        """Refuse a field (not null) that this message's role does not take, or cannot be read."""
        if self.role not in MESSAGE_FIELDS:  # an unknown role: the request layer names it
            return
        try:  # the request layer's rule, on the fields this body set
            rq.check_role_fields(i, self.role, {name: getattr(self, name) for name in self.model_fields_set})
        except RequestError as e:
            raise ApiError.of(e) from e


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
        from jserve.constraint import Constraint

        if self.type == "json_object":
            return Constraint("json_object")
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ApiError(400, "response_format json_schema needs its json_schema.schema", param="response_format",
                               code=MISSING)
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
    stop: Any = None  # a string or a list of strings, checked by the request layer (one message)
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    json_schema: dict[str, Any] | None = None  # llama.cpp's field: response_format json_schema with this schema
    # OpenAI's platform fields (billing, storage, tracing, routing): accepted, ignored (IGNORED_FIELDS)
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
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

    def params(self, max_tokens: int | None, logprobs: int | None, seed: int | None, constraint: Any = None,
               skip_special: bool = True) -> SamplingParams:
        """The request layer's ``SamplingParams`` of these fields (a field not given: its one default)."""
        return rq.sampling_params(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=seed, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            constraint=constraint if constraint is not None else self.constraint(), speculate=self.speculate,
            logit_bias=self.logit_bias, skip_special_tokens=skip_special)

    def constraint(self) -> Constraint | None:
        from jserve.constraint import Constraint

        json_schema = Constraint("json_schema", json.dumps(self.json_schema)) if self.json_schema is not None else None
        given = [c for c in (self.response_format.constraint() if self.response_format else None, json_schema,
                             Constraint("regex", self.guided_regex) if self.guided_regex is not None else None,
                             Constraint("choice", tuple(self.guided_choice)) if self.guided_choice is not None
                             else None) if c is not None]
        if len(given) > 1:
            raise ApiError(400, "give at most one of response_format (json), json_schema, guided_regex and "
                                "guided_choice",
                           param="response_format")
        return given[0] if given else None


# Fields that would change the output and that jserve does not implement: refused, naming the field.
UNSUPPORTED_FIELDS = {
    "audio": "audio output is not supported (this server writes text)",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "reasoning_effort is not supported",
    "verbosity": "verbosity is not supported",
    "functions": "the deprecated functions field is not supported; send tools",
    "function_call": "the deprecated function_call field is not supported; send tool_choice",
    "moderation": "moderation is not supported",
}
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
                  "prompt_cache_options", "prompt_cache_retention")  # the last two: chat only


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None  # ["text"] only
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    functions: Any = None
    function_call: Any = None
    moderation: Any = None
    prompt_cache_options: dict[str, Any] | None = None  # caching hints: the prefix cache, when on, is automatic
    prompt_cache_retention: str | None = None

    def check_supported(self) -> None:
        """Refuse the fields jserve does not implement, a message's fields its role does not take,
        and a max_tokens that disagrees with its alias."""
        for name, why in UNSUPPORTED_FIELDS.items():
            if getattr(self, name) is not None:
                raise ApiError(400, f"{name}: {why}", param=name, code="unsupported_parameter")
        for i, message in enumerate(self.messages):
            message.check_fields(i)
        if self.modalities is not None and self.modalities != ["text"]:
            raise ApiError(400, f"modalities: only [\"text\"] is supported, got {json.dumps(self.modalities)}",
                           param="modalities", code="unsupported_parameter")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ApiError(400, f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                                f"({self.max_completion_tokens}) disagree; give one of them",
                           param="max_completion_tokens")


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None  # only equal to n (each choice is sampled once, none is dropped)

    def check_supported(self) -> None:
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, f"best_of: only best_of equal to n ({self.n}) is supported, got {self.best_of} "
                                "(each choice is sampled once)", param="best_of", code="unsupported_parameter")


def unknown_fields(errors: list[dict[str, Any]], body: Any, endpoint: str) -> ApiError | None:
    """The refusal of the fields a body's model does not know (pydantic's ``extra_forbidden``),
    before any other of its errors: those under the first one's parent, listed; a message's named
    with its role's fields."""
    extra = [tuple(x for x in e.get("loc", ()) if x != "body") for e in errors if e.get("type") == "extra_forbidden"]
    extra = [loc for loc in extra if loc]
    if not extra:
        return None
    parent = extra[0][:-1]
    names = [str(loc[-1]) for loc in extra if loc[:-1] == parent]
    at = rq.field_path(parent)
    if not parent:
        return unknown_parameter("", f"in a {endpoint} request", names)
    if len(parent) == 2 and parent[0] == "messages" and isinstance(parent[1], int):
        messages = body.get("messages") if isinstance(body, dict) else None
        role = messages[parent[1]].get("role") if isinstance(messages, list) and isinstance(
            messages[parent[1]], dict) else None
        if isinstance(role, str) and role in MESSAGE_FIELDS:
            return unknown_parameter(at, f"on a {role} message", names, MESSAGE_FIELDS[role])
        return unknown_parameter(at, "on a message", names)
    return unknown_parameter(at, "", names)


# OpenAI's bounds on its numbers (its API reference), where they are tighter than the request
# layer's: the HTTP API refuses past them as OpenAI does ("temperature ... between 0 and 2",
# chat's "top_logprobs ... between 0 and 20", and the legacy completions' "The maximum value for
# logprobs is 5", as the ``openai`` client's ``CompletionCreateParams`` documents it); gRPC and
# ``LLM`` keep the request layer's (any finite temperature >= 0, logprobs up to --max-logprobs).
# The others (top_p, the penalties, logit_bias values) already have OpenAI's bounds in the request
# layer.
OPENAI_MAX_TEMPERATURE = 2.0
OPENAI_MAX_LOGPROBS = 20  # chat's top_logprobs
OPENAI_MAX_COMPLETION_LOGPROBS = 5  # the completions' logprobs


def check_openai_bounds(params: SamplingParams, sent_as: dict[str, str] | None = None,
                        max_logprobs: int = OPENAI_MAX_LOGPROBS) -> None:
    """Refuse a number past OpenAI's bound (``OPENAI_MAX_*``) that the request layer takes;
    ``sent_as``: a field's name as the client sent it (``logprobs`` → ``top_logprobs``);
    ``max_logprobs``: the endpoint's bound on the alternatives per token."""
    names = sent_as or {}
    try:
        if params.temperature > OPENAI_MAX_TEMPERATURE:
            raise InvalidRequestError(f"temperature must be in [0, 2] (0 = greedy), got {params.temperature}",
                                      range_code(False, False), "temperature")
        if params.logprobs is not None and params.logprobs > max_logprobs:
            name = names.get("logprobs", "logprobs")
            raise InvalidRequestError(f"{name} must be in [0, {max_logprobs}], got {params.logprobs}",
                                      range_code(True, False), name)
    except RequestError as e:
        raise ApiError.of(e) from e


class ApiError(Exception):
    """An error response. ``refusal``: the request was refused before it ran (counted in the
    rejected-requests metric by ``REJECTED``), not ended after it started."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, refusal: bool = True):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.refusal = refusal

    @classmethod
    def of(cls, e: RequestError, param: str | None = None, refusal: bool = True) -> ApiError:
        """``e`` as OpenAI's error (``jserve.request.ERRORS``); ``param``: the field it names, by
        default ``e.param``, else the first word of its message when that is a request field."""
        edge = rq.ERRORS[e.kind]
        return cls(edge.http, e.message, edge.openai_type, param=param or e.param or param_of(e.message),
                   code=e.code or edge.openai_code, refusal=refusal)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


_FIELDS = frozenset(ChatCompletionRequest.model_fields) | frozenset(CompletionRequest.model_fields)


def param_of(message: str) -> str | None:
    """The request field an error message names first (``"temperature must be ..."``, ``"message 3: ..."``)."""
    if message.startswith("stop["):  # an item of stop: "stop[1] must be a string, ..."
        return message.split(" ", 1)[0]
    for prefix, name in (("stop token", "stop_token_ids"), ("stop", "stop"), ("tool_choice", "tool_choice"),
                         ("parallel_tool_calls", "parallel_tool_calls"), ("tools", "tools"), ("message", "messages")):
        if message.startswith(prefix):
            return name
    word = message.split(" ", 1)[0].rstrip(":,")
    return word if word in _FIELDS else None


def finish_error(piece: StreamOutput, rid: str, max_undelivered: int) -> ApiError | None:
    """The error a request's final piece stands for, if it did not end normally."""
    err = rq.finish_error(piece.finish_reason, rid, piece.completion_tokens, piece.error, max_undelivered)
    return None if err is None else ApiError.of(err, refusal=False)
