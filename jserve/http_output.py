"""The HTTP API's responses: choices, logprobs and usage of finished requests, and server-sent
events of streaming ones (``ChoicesMixin``, part of ``HttpFrontEnd``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi.responses import StreamingResponse

from jserve.http_schemas import _Sampling, finish_error
from jserve.request import FINISHES, FinishReason

if TYPE_CHECKING:
    from jserve.http_tools import ToolReplies
    from jserve.orchestrator import Stream, StreamOutput


def openai_finish(reason: str | None) -> str | None:
    """OpenAI's ``finish_reason`` of a piece's (``jserve.request.FINISHES``; None while it runs)."""
    return None if reason is None else FINISHES[FinishReason(reason)].openai


class ChoicesMixin:
    """Turns finished or streaming requests into OpenAI's response bodies and chunks."""

    llm: Any
    model_id: str

    def _token_text(self, token: int) -> str:
        tok = self.llm.tokenizer
        return tok.token_bytes(token).decode("utf-8", "replace") if tok is not None else str(token)

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

    def _choice(self, index: int, pieces: list[StreamOutput], chat: bool,
                tools: ToolReplies | None = None) -> dict[str, Any]:
        text = "".join(p.text for p in pieces)
        reason = openai_finish(pieces[-1].finish_reason)
        out: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": self._logprobs(pieces, chat)}
        if chat and tools is not None:
            out["message"] = tools.message(index, pieces)
            out["finish_reason"] = tools.finish_reason(index, reason)
        elif chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["text"] = text
        return out

    async def _sse(self, rid: str, created: int, body: _Sampling, started: list[tuple[list[int], Stream]],
                   chat: bool, tools: ToolReplies | None = None) -> AsyncIterator[str]:
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
        held: list[list[StreamOutput]] = [[] for _ in started]  # with tools: pieces not yet in a chunk
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
                err = finish_error(piece, rid, max_undelivered)
                if err is not None:
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                if not piece.text and not piece.token_ids and piece.finish_reason is None:
                    continue
                reason = openai_finish(piece.finish_reason)
                choice: dict[str, Any] = {"index": index, "finish_reason": reason,
                                          "logprobs": self._logprobs([piece], chat, offsets[index])}
                offsets[index] += len(piece.text)
                if tools is not None:
                    # Pieces the parser holds back (a marker may be starting) give no chunk yet: their
                    # logprobs go with the next chunk of the choice.
                    held[index].append(piece)
                    for delta in self._tool_deltas(tools, index, piece):
                        lps = self._logprobs(held[index], chat) if held[index] else None
                        held[index] = []
                        yield chunk([{"index": index, "delta": delta, "logprobs": lps, "finish_reason": None}])
                    if reason is None:
                        continue
                    choice["logprobs"] = self._logprobs(held[index], chat) if held[index] else None
                    choice["finish_reason"] = tools.finish_reason(index, reason)
                    choice["delta"] = {}
                elif chat:
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

    @staticmethod
    def _tool_deltas(tools: ToolReplies, index: int, piece: StreamOutput) -> list[dict[str, Any]]:
        """A piece of a choice with tools as chunk deltas: content runs joined, each call delta alone."""
        out: list[dict[str, Any]] = []
        for d in tools.feed(index, piece):
            if isinstance(d, str):
                if out and "content" in out[-1]:
                    out[-1]["content"] += d
                elif d:
                    out.append({"content": d})
            else:
                out.append({"tool_calls": [d.openai()]})
        return out


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

