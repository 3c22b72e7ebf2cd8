"""The HTTP API's request bodies (pydantic models: unknown fields are refused) and its errors
(``ApiError``: OpenAI's body ``{"error": {"message", "type", "param", "code"}}``)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from jserve.orchestrator import StreamOutput
    from jserve.structured import Constraint

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


def finish_error(piece: StreamOutput, rid: str, max_undelivered: int) -> ApiError | None:
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

