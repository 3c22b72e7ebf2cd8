"""Tool calling over gRPC: the protocol's messages ↔ ``jserve.tools``' plain values.

The gRPC front end stays thin: ``chat_messages`` turns a request's chat into OpenAI-style message
dicts, ``prepare`` (run off the event loop) plans a tool request with ``plan_tools`` and renders
it, and ``ReplyParts`` splits each streamed piece of text into content and ``ToolCallDelta``
messages. Imports no JAX.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from jserve.sampling import InvalidRequestError, SamplingParams
from jserve.tools import ToolCallDelta, ToolPlan, ToolStreamParser, detect_format, get_format, plan_tools
from jserve.v1 import jserve_pb2 as pb

if TYPE_CHECKING:
    from jserve.llm import LLM


def chat_messages(chat: pb.Messages) -> list[dict[str, Any]]:
    """OpenAI-style messages from the protocol's: content None only where it was unset on an
    assistant turn with tool calls (unset elsewhere reads as "", as before the field was optional)."""
    out = []
    for m in chat.messages:
        bare = m.role == "assistant" and m.tool_calls and not m.HasField("content")
        msg: dict[str, Any] = {"role": m.role, "content": None if bare else m.content}
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out


def _tools(req: pb.GenerateRequest) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(req.tools):
        fn: dict[str, Any] = {"name": t.name}
        if t.description:
            fn["description"] = t.description
        if t.parameters:
            try:
                fn["parameters"] = json.loads(t.parameters)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"tools[{i}].parameters is not valid JSON: {e}") from None
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(req: pb.GenerateRequest) -> Any:
    if not req.HasField("tool_choice"):
        return None
    kind = req.tool_choice.WhichOneof("choice")
    if kind == "function":
        return {"type": "function", "function": {"name": req.tool_choice.function}}
    if kind is None:
        raise InvalidRequestError("tool_choice is set but empty: set mode or function")
    return req.tool_choice.mode


def wants_tools(req: pb.GenerateRequest) -> bool:
    """Whether the request uses tool calling (tools, or a tool_choice, given)."""
    return bool(req.tools) or req.HasField("tool_choice")


@dataclasses.dataclass
class ToolSetup:
    """What every tool request of a server reads: the vocabulary and special ids (computed once),
    the server's format override (``--tool-call-format``) and the format it serves by default."""

    vocab: Mapping[str, int]
    special_ids: frozenset[int]
    format_name: str | None
    default_format: str

    @classmethod
    def of(cls, llm: LLM, format_name: str | None) -> ToolSetup:
        tok = llm.tokenizer
        if tok is None:
            return cls({}, frozenset(), format_name, format_name or "generic")
        vocab = tok.tok.get_vocab()
        template = tok.chat_template.text(None) if tok.chat_template is not None else None
        default = get_format(format_name).name if format_name else detect_format(template, vocab).name
        return cls(vocab, frozenset(tok.special_ids), format_name, default)


def prepare(llm: LLM, setup: ToolSetup, req: pb.GenerateRequest,
            params: SamplingParams) -> tuple[list[int], SamplingParams, ToolPlan]:
    """A tool request's prompt ids, its parameters (the tools' constraint, special tokens kept
    where a marker is one) and plan. Blocking (templates, tokenizer, schemas): run off the loop."""
    if req.WhichOneof("input") != "chat":
        raise InvalidRequestError("tools and tool_choice need chat input (chat messages)")
    tok = llm.tokenizer
    if tok is None or tok.chat_template is None:
        raise InvalidRequestError("this model has no chat template, so it cannot be given tools")
    tools = _tools(req)
    plan = plan_tools(chat_messages(req.chat), tools, _tool_choice(req),
                      req.parallel_tool_calls if req.HasField("parallel_tool_calls") else None,
                      chat_template=tok.chat_template.text(tools or None), vocab=setup.vocab,
                      special_ids=setup.special_ids, format_name=req.tool_call_format or setup.format_name)
    if plan.constraint is not None and params.constraint is not None:
        raise InvalidRequestError("a request with tools (tool_choice not \"none\") cannot also set json_schema, "
                                  "json_object, regex or choice: the tool calls are constrained already")
    ids = llm.encode_chat(plan.messages, tools=plan.template_tools)
    params = dataclasses.replace(params, constraint=plan.constraint or params.constraint,
                                 skip_special_tokens=not plan.keep_special_tokens)
    return ids, params, plan


class ReplyParts:
    """One reply's text pieces → (content, ``ToolCallDelta`` messages); ``called`` once a call began.
    Without a parser (no tools, or tool_choice "none") the text is all content."""

    def __init__(self, plan: ToolPlan | None, seed: int | None):
        self.parser: ToolStreamParser | None = plan.parser(random.Random(seed)) if plan is not None else None
        self.called = False

    def split(self, text: str, final: bool) -> tuple[str, list[pb.ToolCallDelta]]:
        if self.parser is None:
            return text, []
        deltas = self.parser.feed(text) if text else []
        if final:
            deltas += self.parser.finish()
        content, calls = [], []
        for d in deltas:
            if isinstance(d, ToolCallDelta):
                self.called = True
                calls.append(pb.ToolCallDelta(index=d.index, id=d.id or "", name=d.name or "",
                                              arguments=d.arguments))
            else:
                content.append(d)
        return "".join(content), calls
