"""Tool calling over HTTP: a chat request's messages and tool fields → a plan (``jserve.tools``),
and each choice's output → content and tool calls, whole or as OpenAI's ``tool_calls`` deltas.

``plan_chat`` runs off the event loop (tokenizing, the chat template, compiling tool schemas);
``ToolReplies`` follows one request's choices as their pieces come.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jserve.llm import LLM
    from jserve.orchestrator import StreamOutput
    from jserve.tools import Delta, ToolPlan

TOOL_CALL_FORMATS = ("auto", "hermes", "llama3", "mistral", "generic")


def plan_chat(llm: LLM, messages: list[dict[str, Any]], tools: Any, tool_choice: Any, parallel: Any,
              vocab: dict[str, int], format_name: str | None) -> tuple[ToolPlan, list[int]]:
    """The request's tool plan and its prompt's token ids (``InvalidRequestError`` if refused)."""
    from jserve.errors import InvalidRequestError
    from jserve.llm import normalize_chat
    from jserve.tools import plan_tools

    tok = llm.tokenizer
    if tok is None:
        raise InvalidRequestError("this checkpoint has no tokenizer; send token ids to /v1/completions")
    messages = normalize_chat(messages)
    template = tok.chat_template.text(tools or None) if tok.chat_template is not None else None
    plan = plan_tools(messages, tools, tool_choice, parallel, chat_template=template, vocab=vocab,
                      special_ids=tok.special_ids, format_name=None if format_name in (None, "auto") else format_name)
    return plan, llm.encode_chat(plan.messages, tools=plan.template_tools)


class ToolReplies:
    """The choices of one chat request with tools, each choice's text through its own
    ``ToolStreamParser``. (When the markers are special tokens the request runs with
    ``SamplingParams.skip_special_tokens`` off, so its text, stop strings and all, holds them.)"""

    def __init__(self, plan: ToolPlan, choices: int, seed: int | None):
        self.plan = plan
        # Choice i draws its call ids from seed + i (as its tokens): the same ids streamed or not.
        self.parsers = [plan.parser(random.Random(seed + i) if seed is not None else random.Random())
                        for i in range(choices)]
        self.calls = [0] * choices

    def feed(self, index: int, piece: StreamOutput) -> list[Delta]:
        """The deltas of one piece (content strings and ``ToolCallDelta``s); the last piece also
        flushes what the parser held back."""
        from jserve.tools import ToolCallDelta

        parser = self.parsers[index]
        text = piece.text
        if parser is None:
            return [text] if text else []
        out = parser.feed(text) if text else []
        if piece.finish_reason is not None:
            out += parser.finish()
        self.calls[index] += sum(1 for d in out if isinstance(d, ToolCallDelta) and d.id is not None)
        return out

    def finish_reason(self, index: int, reason: str | None) -> str | None:
        """OpenAI's finish reason: ``tool_calls`` when the choice made calls and stopped normally."""
        return "tool_calls" if reason == "stop" and self.calls[index] else reason

    def message(self, index: int, pieces: list[StreamOutput]) -> dict[str, Any]:
        """The whole choice's assistant message (``tool_calls`` only when there are some)."""
        from jserve.tools import collect

        deltas: list[Delta] = []
        for p in pieces:
            deltas += self.feed(index, p)
        reply = collect(deltas)
        msg: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            msg["tool_calls"] = [c.openai() for c in reply.tool_calls]
        elif msg["content"] is None:
            msg["content"] = ""
        return msg
