"""OpenAI's Responses API, ``POST /v1/responses``, on the chat path: the request becomes a chat
completion request (input items → messages, ``instructions`` → a system turn first, flat function
tools → chat tools, ``text.format`` → ``response_format``), runs as one choice, and its output is
written as a response object (``message`` items with ``output_text`` parts, ``function_call``
items) or as the Responses streaming events.

The server keeps no state: ``previous_response_id`` and ``background`` are refused, ``store`` is
accepted and ignored (nothing is stored)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from pydantic import Field, PrivateAttr

from jserve import request as rq
from jserve.errors import INVALID_TYPE, MISSING
from jserve.http_schemas import ApiError, ChatCompletionRequest, _Body, finish_error

if TYPE_CHECKING:
    from jserve.http_tools import ToolReplies
    from jserve.orchestrator import Stream, StreamOutput


class ResponsesRequest(_Body):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    timeout: float | None = Field(None, gt=0)
    # platform fields: accepted, ignored (stateless: nothing is stored)
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    truncation: str | None = None  # "disabled" (the default) only
    include: list[str] | None = None  # [] only
    # refused: state, and what jserve does not implement
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    prompt: Any = None
    # the chat's messages' origins: each message's input item (its index), or "instructions"
    _origins: list[int | str] = PrivateAttr(default_factory=list)

    def check_supported(self) -> None:
        stateful = "this server keeps no state (every request carries its whole input)"
        refused = {"previous_response_id": f"previous_response_id is not supported: {stateful}",
                   "conversation": f"conversation is not supported: {stateful}",
                   "prompt": "stored prompts are not supported", "max_tool_calls": "max_tool_calls is not supported",
                   "top_logprobs": "top_logprobs is not supported on /v1/responses (use /v1/chat/completions)"}
        for name, why in refused.items():
            if getattr(self, name) is not None:
                raise ApiError(400, why, param=name, code="unsupported_parameter")
        if self.background:
            raise ApiError(400, f"background responses are not supported: {stateful}", param="background",
                           code="unsupported_parameter")
        if self.reasoning and any(v is not None for v in self.reasoning.values()):
            raise ApiError(400, "reasoning is not supported", param="reasoning", code="unsupported_parameter")
        if self.truncation not in (None, "disabled"):
            raise ApiError(400, "truncation: only \"disabled\" is supported (a prompt too long is refused)",
                           param="truncation", code="unsupported_parameter")
        if self.include:
            raise ApiError(400, f"include: {self.include} is not supported", param="include",
                           code="unsupported_parameter")

    def chat_request(self) -> ChatCompletionRequest:
        """The same request as a chat completion."""
        self.check_supported()
        messages: list[dict[str, Any]] = []
        self._origins = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
            self._origins.append("instructions")
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        for i, item in enumerate(items):
            messages_from_item(messages, i, item)
            self._origins += [i] * (len(messages) - len(self._origins))
        if not messages:
            raise ApiError(400, "input is empty", param="input")
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_output_tokens,
                                "temperature": self.temperature, "top_p": self.top_p, "stream": self.stream,
                                "timeout": self.timeout, "parallel_tool_calls": self.parallel_tool_calls}
        if self.tools is not None:
            body["tools"] = [chat_tool(i, t) for i, t in enumerate(self.tools)]
        if isinstance(self.tool_choice, dict):
            if self.tool_choice.get("type") != "function" or not isinstance(self.tool_choice.get("name"), str):
                raise ApiError(400, "tool_choice must be \"none\", \"auto\", \"required\" or "
                                    "{\"type\": \"function\", \"name\": ...}", param="tool_choice")
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice["name"]}}
        else:
            body["tool_choice"] = self.tool_choice
        fmt = (self.text or {}).get("format")
        if fmt is not None:
            body["response_format"] = response_format(fmt)
        try:
            return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
        except ValueError as e:
            raise ApiError(400, f"input: {e}", param="input") from e


    def input_item(self, param: str | None, message: str) -> tuple[str | None, str]:
        """A refusal of the chat made of the input (``messages[2].tool_call_id``, ``message 2: ...``)
        named as the input item it came from (``input[1].call_id``, ``input[1]: ...``)."""
        if param is None or not param.startswith("messages"):
            return param, message
        k, _, rest = param[len("messages["):].partition("]")
        origin = self._origins[int(k)] if k.isdigit() and int(k) < len(self._origins) else None
        if origin is None:
            return "input", message
        if message.startswith(f"message {k}: "):
            message = message[len(f"message {k}: "):]
        if origin == "instructions":
            return "instructions", f"instructions: {message}"
        if isinstance(self.input, str):
            return "input", f"input: {message}"
        field = rest.lstrip(".")
        field = _ITEM_FIELDS.get(field, field)
        return f"input[{origin}]" + (f".{field}" if field else ""), f"input[{origin}]: {message}"


# A chat message's field → the Responses input item's field it was made of.
_ITEM_FIELDS = {"tool_call_id": "call_id", "tool_calls": "", "reasoning_content": ""}


# The fields OpenAI documents on each input item (and text part) this server takes, as the
# ``openai`` client types them (``EasyInputMessageParam``, ``ResponseInputItemParam``'s ``Message``
# and ``FunctionCallOutput``, ``ResponseOutputMessageParam``, ``ResponseFunctionToolCallParam``,
# ``ResponseInputTextParam``, ``ResponseOutputTextParam``): any other field is refused, named as
# OpenAI names it (``input[0].foo``, code ``unknown_parameter``). Documented fields that change
# nothing here are accepted and ignored:
# - ``id``, ``status``: an earlier response's item sent back as history (``input += r.output``);
#   the server keeps no state, so neither refers to anything it holds.
# - ``phase``: OpenAI's label of an assistant message as commentary or final answer, for its own
#   models; a chat template has no place for it, the message's text is the same either way.
# - ``caller``, ``namespace``, and a call output's ``name``: where a call came from, its tool's
#   namespace and name; this server's tools are flat functions, a call is named by its ``name``
#   and its output is matched to it by ``call_id``.
# - a text part's ``annotations`` and ``logprobs`` (an earlier answer's citations and
#   log-probabilities) and ``prompt_cache_breakpoint`` (a caching hint: the prefix cache, when
#   on, is automatic); the part's ``text`` is what the model reads.
ITEM_FIELDS = {
    "message": frozenset({"type", "role", "content", "id", "status", "phase"}),
    "function_call": frozenset({"type", "call_id", "name", "arguments", "id", "status", "caller", "namespace"}),
    "function_call_output": frozenset({"type", "call_id", "output", "id", "status", "caller", "name", "namespace"}),
}
PART_FIELDS = {
    "input_text": frozenset({"type", "text", "prompt_cache_breakpoint"}),
    "output_text": frozenset({"type", "text", "annotations", "logprobs"}),
    "text": frozenset({"type", "text"}),  # chat's text part, taken here too
}


def _check_fields(at: str, what: str, given: dict[str, Any], known: frozenset[str]) -> None:
    """Refuse the fields of ``given`` (the item or part at ``at``, ``input[1]``) OpenAI does not
    document on it, naming the first (sorted) as OpenAI names an unknown parameter."""
    unknown = sorted(set(given) - known)
    if unknown:
        listed = ", ".join(repr(f) for f in unknown)
        raise ApiError(400, f"{at}: unknown parameter{'s' if len(unknown) > 1 else ''} {listed} on a {what} "
                            f"(it takes {', '.join(sorted(known))})",
                       param=f"{at}.{unknown[0]}", code="unknown_parameter")


def _text_of(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"input[{i}].content must be a string or a list of parts", param=f"input[{i}].content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_FIELDS or not isinstance(part.get("text"), str):
            raise ApiError(400, f"input[{i}]: content parts of type {kind!r} are not supported (text only)",
                           param=f"input[{i}].content[{j}].type" if kind not in PART_FIELDS
                           else f"input[{i}].content[{j}].text")
        _check_fields(f"input[{i}].content[{j}]", f"{kind} part", part, PART_FIELDS[kind])
        texts.append(part["text"])
    return "".join(texts)


def messages_from_item(messages: list[dict[str, Any]], i: int, item: Any) -> None:
    """Append input item ``i`` (a message, a ``function_call`` or a ``function_call_output``)."""
    kind = item.get("type", "message") if isinstance(item, dict) else None
    if kind in ITEM_FIELDS:
        _check_fields(f"input[{i}]", f"{kind} item", item, ITEM_FIELDS[kind])
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise ApiError(400, f"input[{i}].role must be user, assistant, system or developer",
                           param=f"input[{i}].role")
        messages.append({"role": role, "content": _text_of(i, item.get("content"))})
    elif kind == "function_call":
        _check_strings(i, item, ("call_id", "name"), ("arguments",))
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
        if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
            messages[-1]["tool_calls"].append(call)
        elif messages and messages[-1]["role"] == "assistant" and messages[-1].get("content"):
            messages[-1]["tool_calls"] = [call]
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        _check_strings(i, item, ("call_id",), ())
        output = item.get("output")
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": output if isinstance(output, str) else json.dumps(output)})
    else:
        raise ApiError(400, f"input[{i}] has type {kind!r}; this server takes message, function_call and "
                            "function_call_output items",
                       param=f"input[{i}].type" if isinstance(item, dict) else f"input[{i}]")


def _check_strings(i: int, item: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    """Refuse input item ``i`` whose ``required`` fields are not strings (or whose ``optional``
    ones, given, are not), naming the item's field as OpenAI does (``input[1].call_id``)."""
    for name in required + optional:
        value = item.get(name)
        if value is None and name in optional:
            continue
        if not isinstance(value, str):
            kind = item.get("type")
            raise ApiError(400, f"input[{i}]: a {kind} item needs a string {name!r}"
                                + ("" if value is None else f", got {rq.kind_of(value)}"),
                           param=f"input[{i}].{name}", code=MISSING if value is None else INVALID_TYPE)


def chat_tool(i: int, tool: Any) -> dict[str, Any]:
    """A Responses function tool (flat: ``name``, ``parameters`` beside ``type``) as a chat tool."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise ApiError(400, f"tools[{i}] has type {kind!r}; this server runs function tools only", param="tools")
    fn = {k: v for k, v in tool.items() if k in ("name", "description", "parameters", "strict") and v is not None}
    return {"type": "function", "function": fn}


def response_format(fmt: Any) -> dict[str, Any]:
    """``text.format`` as chat's ``response_format``."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    raise ApiError(400, f"text.format has type {kind!r}; expected text, json_object or json_schema",
                   param="text.format")


class ResponseWriter:
    """The output items of one response, built as its pieces come; ``events`` for streaming."""

    def __init__(self, rid: str, body: ResponsesRequest, chat: ChatCompletionRequest, model: str,
                 tools: ToolReplies | None):
        self.rid, self.body, self.chat, self.model, self.tools = rid, body, chat, model, tools
        self.created = int(time.time())
        self.items: list[dict[str, Any]] = []  # output items, in order
        self.seq = 0
        self.usage: dict[str, Any] | None = None
        self.status = "in_progress"
        self.incomplete: dict[str, Any] | None = None

    def response(self) -> dict[str, Any]:
        return {"id": self.rid, "object": "response", "created_at": self.created, "status": self.status,
                "model": self.model, "output": self.items, "instructions": self.body.instructions,
                "max_output_tokens": self.body.max_output_tokens, "temperature": self.body.temperature,
                "top_p": self.body.top_p, "parallel_tool_calls": self.body.parallel_tool_calls is not False,
                "tool_choice": self.body.tool_choice or "auto", "tools": self.body.tools or [],
                "text": self.body.text or {"format": {"type": "text"}}, "metadata": self.body.metadata or {},
                "error": None, "incomplete_details": self.incomplete, "previous_response_id": None,
                "store": False, "truncation": "disabled", "usage": self.usage}

    def _event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    def _message(self) -> dict[str, Any]:
        return {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "status": "in_progress",
                "content": []}

    def feed(self, piece: StreamOutput) -> list[str]:
        """Events for one piece (and the items updated as they go)."""
        from jserve.tools import ToolCallDelta

        out: list[str] = []
        deltas = self.tools.feed(0, piece) if self.tools is not None else ([piece.text] if piece.text else [])
        for d in deltas:
            last = self.items[-1] if self.items else None
            if isinstance(d, str):
                if not d:
                    continue
                if last is None or last["type"] != "message":
                    last = self._message()
                    self.items.append(last)
                    out.append(self._event("response.output_item.added", output_index=len(self.items) - 1,
                                           item=dict(last, content=[])))
                    last["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                    out.append(self._event("response.content_part.added", item_id=last["id"],
                                           output_index=len(self.items) - 1, content_index=0,
                                           part={"type": "output_text", "text": "", "annotations": []}))
                last["content"][0]["text"] += d
                out.append(self._event("response.output_text.delta", item_id=last["id"],
                                       output_index=len(self.items) - 1, content_index=0, delta=d, logprobs=[]))
            elif isinstance(d, ToolCallDelta):
                if d.id is not None:
                    out += self._close_last()
                    item = {"id": "fc_" + uuid.uuid4().hex, "type": "function_call", "status": "in_progress",
                            "call_id": d.id, "name": d.name, "arguments": ""}
                    self.items.append(item)
                    out.append(self._event("response.output_item.added", output_index=len(self.items) - 1,
                                           item=dict(item)))
                    last = item
                if d.arguments:
                    last["arguments"] += d.arguments
                    out.append(self._event("response.function_call_arguments.delta", item_id=last["id"],
                                           output_index=len(self.items) - 1, delta=d.arguments))
        return out

    def _close_last(self) -> list[str]:
        if not self.items or self.items[-1]["status"] != "in_progress":
            return []
        item, index = self.items[-1], len(self.items) - 1
        item["status"] = "completed" if self.status != "incomplete" else "incomplete"
        out = []
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                   content_index=0, text=part["text"], logprobs=[]))
            out.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=part))
        else:
            out.append(self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                   name=item["name"], arguments=item["arguments"]))
        out.append(self._event("response.output_item.done", output_index=index, item=item))
        return out

    def finish(self, last: StreamOutput, usage: dict[str, Any]) -> list[str]:
        """The closing events once the last piece is in."""
        if last.finish_reason == "length":
            self.status, self.incomplete = "incomplete", {"reason": "max_output_tokens"}
        out = self._close_last()
        if self.status != "incomplete":
            self.status = "completed"
        self.usage = {"input_tokens": usage["prompt_tokens"],
                      "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
                      "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": usage["total_tokens"]}
        kind = "response.completed" if self.status == "completed" else "response.incomplete"
        return out + [self._event(kind, response=self.response())]


async def stream_events(front: Any, writer: ResponseWriter, started: list[tuple[list[int], Stream]]
                        ) -> AsyncIterator[str]:
    """The Responses API's server-sent events for one running request."""
    rid = writer.rid
    (ids, stream), = started
    pieces: list[StreamOutput] = []
    try:
        yield writer._event("response.created", response=writer.response())
        yield writer._event("response.in_progress", response=writer.response())
        async for piece in stream:
            pieces.append(piece)
            err = finish_error(piece, rid, front.llm.orchestrator.max_undelivered)
            if err is not None:
                writer.status = "failed"
                failed = dict(writer.response(), error={"code": err.code or "server_error", "message": err.message})
                yield writer._event("response.failed", response=failed)
                return
            for event in writer.feed(piece):
                yield event
            if piece.finish_reason is not None:
                for event in writer.finish(piece, front._usage(started, [pieces])):
                    yield event
    finally:
        stream.cancel()


async def respond(front: Any, request: Request, body: ResponsesRequest, chat: ChatCompletionRequest,
                  started: list[tuple[list[int], Stream]], tools: ToolReplies | None) -> Any:
    """The response object (not streamed), or the event stream. A client that goes away has its
    request cancelled either way."""
    from jserve.http_output import _EventStream

    writer = ResponseWriter("resp_" + uuid.uuid4().hex, body, chat, front.model_id, tools)
    if body.stream:
        return _EventStream(stream_events(front, writer, started), [s for _, s in started])
    (ids, stream), = started

    async def on_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        stream.cancel()

    watcher = asyncio.create_task(on_disconnect())
    try:
        pieces = await front._collect(stream)
    finally:
        watcher.cancel()
        stream.cancel()
    err = finish_error(pieces[-1], writer.rid, front.llm.orchestrator.max_undelivered)
    if err is not None:
        raise err
    for piece in pieces:
        writer.feed(piece)
    writer.finish(pieces[-1], front._usage(started, [pieces]))
    return writer.response()
