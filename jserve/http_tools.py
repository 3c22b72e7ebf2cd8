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
    from jserve.llm import normalize_chat
    from jserve.sampling import InvalidRequestError
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
    """The choices of one chat request with tools: each choice's text (detokenized again with
    special tokens kept when the plan says so) through its own ``ToolStreamParser``.

    ``stop_ids``: the tokens that end a request (EOS, ``stop_token_ids``), left out of the text."""

    def __init__(self, plan: ToolPlan, llm: LLM, choices: int, seed: int | None, stop_ids: frozenset[int],
                 stop: tuple[str, ...] = ()):
        self.plan = plan
        # Choice i draws its call ids from seed + i (as its tokens): the same ids streamed or not.
        self.parsers = [plan.parser(random.Random(seed + i) if seed is not None else random.Random())
                        for i in range(choices)]
        keep = plan.keep_special_tokens and llm.tokenizer is not None
        self.detoks = [llm.tokenizer.detokenizer(skip_special=False) if keep else None for _ in range(choices)]
        self.stop_ids = stop_ids
        self.calls = [0] * choices
        # With the markers kept, this text differs from the request's own: its stop strings are
        # matched here again, so the text ends where a stop string starts, as the request's does.
        from jserve.stops import StopMatcher

        self.stops = [StopMatcher(stop) if keep and stop else None for _ in range(choices)]
        self.texts = [""] * choices
        self.emitted = [0] * choices
        self.stopped = [False] * choices

    @property
    def active(self) -> bool:
        return self.parsers[0] is not None

    def text(self, index: int, piece: StreamOutput) -> str:
        """The text this piece adds to choice ``index`` as the parser must see it."""
        detok = self.detoks[index]
        if detok is None:
            return piece.text
        ids = piece.token_ids
        if piece.finish_reason == "stop" and ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        out = "".join(detok.add(t) for t in ids)
        if piece.finish_reason is not None:
            out += detok.flush()
        stops = self.stops[index]
        if stops is None:
            return out
        if self.stopped[index]:
            return ""
        start = len(self.texts[index])
        self.texts[index] += out
        hit = stops.feed(self.texts[index][start:])
        end = len(self.texts[index]) if piece.finish_reason is not None else len(self.texts[index]) - stops.held_back
        if hit is not None:
            end, self.stopped[index] = hit, True
        new, self.emitted[index] = self.texts[index][self.emitted[index]:end], max(self.emitted[index], end)
        return new

    def feed(self, index: int, piece: StreamOutput) -> list[Delta]:
        """The deltas of one piece (content strings and ``ToolCallDelta``s); the last piece also
        flushes what the parser held back."""
        from jserve.tools import ToolCallDelta

        parser = self.parsers[index]
        text = self.text(index, piece)
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
