"""The front ends exactly, over ``MockEngine``: gRPC, HTTP, ``LLM`` and ``scripts/generate.py`` in
one process, with nothing compiled.

The mock continues a sequence with its last token plus one (mod 32) and the letters tokenizer
(tests/mock_engine.py) makes token t the character ``LETTERS[t]`` (29..31 special: ``<s> <unk>
</s>``, ``</s>`` the end of sequence), so every answer below is written out by hand: "hello" is
``[7, 4, 11, 11, 14]`` and goes on ``p q r s t ...``; "x" goes on ``y z ␠ . \\n <s> <unk> </s>``.
Finish reasons, stop strings, max_tokens, logprobs, n > 1, refusals, streaming order, usage,
cancellation, deadlines and overload are asserted exactly here (fields of the wrong type, their
``param`` and OpenAI's error codes: tests/test_frontends_errors.py); tests/test_frontends.py checks
the same adapters over a real model.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import pytest

from jserve.client import AsyncClient
from jserve.errors import ErrorKind
from jserve.request import ERRORS, FinishReason, sampling_params
from jserve.v1 import jserve_pb2 as pb

from .frontends import MOCK_SHAPE, Frontends, serve_mock
from .frontends import start_mock as _start
from .mock_engine import LETTERS, LOGPROB_VALUE, alternatives, continuation, letters_ids, letters_text
from .waits import wait_until

V, SLOTS, MAX_LEN, MAX_PROMPT, TOP = (MOCK_SHAPE[k] for k in ("vocab_size", "slots", "max_len", "max_prompt_len",
                                                              "top_logprobs"))
HELLO = letters_ids("hello")
GREEDY = dict(temperature=0.0)


fronts = pytest.fixture(scope="module", name="fronts")(serve_mock)


def _metric(f: Frontends, name: str) -> float:
    text = f.metrics.exposition()[0].decode()
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")), 0.0)


def _free(f: Frontends) -> int:
    wait_until(lambda: f.llm.orchestrator.slots_in_use == 0, "every slot free")
    return f.llm.orchestrator.slots_in_use


# ---- the same answer from every front end, worked out by hand -----------------------------------
ANSWERS = [
    # name, prompt, fields, token ids, text, finish reason
    ("length", "hello", dict(max_tokens=5), [15, 16, 17, 18, 19], "pqrst", FinishReason.LENGTH),
    ("eos", "x", {}, [24, 25, 26, 27, 28, 29, 30, 31], "yz .\n", FinishReason.STOP),
    ("ignore_eos", "x", dict(max_tokens=10, ignore_eos=True), [24, 25, 26, 27, 28, 29, 30, 31, 0, 1], "yz .\nab",
     FinishReason.LENGTH),
    ("stop_id", [3], dict(stop_token_ids=[6]), [4, 5, 6], "ef", FinishReason.STOP),
    # The stop string is cut with what follows it; the token that completed it is the last one.
    ("stop_string", "a", dict(max_tokens=20, stop=["zzz", "ef"]), [1, 2, 3, 4, 5], "bcd", FinishReason.STOP),
    ("stop_string_first_of_two", "a", dict(max_tokens=20, stop=["ij", "de"]), [1, 2, 3, 4], "bc", FinishReason.STOP),
    ("stop_across_a_space", "w", dict(max_tokens=20, stop=["z ."]), [23, 24, 25, 26, 27], "xy", FinishReason.STOP),
    # Without max_tokens: the rest of the context (MAX_LEN - 3 prompt tokens).
    ("rest_of_context", [0, 1, 2], dict(ignore_eos=True), continuation([0, 1, 2], MAX_LEN - 3, V),
     None, FinishReason.LENGTH),
    ("chat", [{"role": "user", "content": "hi"}], {}, [27, 28, 29, 30, 31], ".\n", FinishReason.STOP),
]


@pytest.mark.parametrize("name, prompt, fields, ids, text, reason", ANSWERS, ids=[a[0] for a in ANSWERS])
def test_every_front_end_gives_the_answer_worked_out_by_hand(fronts, name, prompt, fields, ids, text, reason):
    from jserve.request import FINISHES

    assert ids == continuation(letters_ids(prompt) if isinstance(prompt, str) else
                               (prompt if not isinstance(prompt[0], dict) else [26]), len(ids), V)
    text = letters_text([t for t in ids if t != 31]) if text is None else text
    fields = dict(GREEDY, **fields)
    n = len(ids)
    assert fronts.llm_answer(prompt, fields) == (ids, text, reason, n)
    assert fronts.script_answer(prompt, fields) == (ids, text, reason, n)
    assert fronts.grpc_answer(prompt, fields) == (ids, reason, n)
    assert fronts.http_answer(prompt, fields) == (text, FINISHES[reason].openai, n)


MESSAGES = [
    ("empty_prompt", "", {}, "the prompt is empty"),
    ("max_tokens_past_the_context", HELLO, dict(max_tokens=MAX_LEN),
     f"prompt (5 tokens) + max_tokens ({MAX_LEN}) exceeds the context of {MAX_LEN} tokens; "
     f"lower max_tokens to at most {MAX_LEN - 5}"),
    ("token_outside_vocabulary", [1, 2, V], {}, f"token id {V} at index 2 is outside the vocabulary [0, {V})"),
    ("negative_token", [1, -1], {}, f"token id -1 at index 1 is outside the vocabulary [0, {V})"),
    ("prompt_too_long", [1] * (MAX_PROMPT + 1), {},
     f"the prompt has {MAX_PROMPT + 1} tokens; this server accepts at most {MAX_PROMPT}"),
    ("too_many_logprobs", "hello", dict(logprobs=TOP + 1),
     f"logprobs must be in [0, {TOP}] on this server, got {TOP + 1}"),
    ("top_p_above_one", "hello", dict(top_p=1.5), "top_p must be in [0, 1] (0 = the most likely token only), got 1.5"),
    ("max_tokens_zero", "hello", dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0"),
    # Refused before tokenizing: 5 bytes at most per token of the letters tokenizer (its "<unk>").
    ("text_past_the_prompt_bytes", "hello " * 40, {},
     f"the prompt has 240 bytes; this server accepts prompts of at most {MAX_PROMPT} tokens, which is at most "
     f"{5 * MAX_PROMPT} bytes of text (5 bytes per token at most)"),
    ("long_request_id", "hello", dict(request_id="r" * 300), "request_id may have at most 256 characters, got 300"),
    ("too_many_messages", [{"role": "user", "content": ""}] * 1025, {},
     "a chat may have at most 1024 messages, got 1025"),
]


@pytest.mark.parametrize("name, prompt, fields, message", MESSAGES, ids=[m[0] for m in MESSAGES])
def test_every_front_end_refuses_with_the_same_message(fronts, name, prompt, fields, message):
    edge = ERRORS[ErrorKind.INVALID]
    if "request_id" not in fields:  # (no request id in the LLM's parameters, the script's or HTTP's body)
        assert fronts.llm_answer(prompt, fields) == ("error", ErrorKind.INVALID, message)
        if "logprobs" not in fields:  # (the script's lines have no logprobs field)
            assert fronts.script_answer(prompt, fields) == ("error", message)
        assert fronts.http_answer(prompt, fields) == ("error", edge.http, message, edge.openai_type)
    assert fronts.grpc_answer(prompt, fields) == ("error", grpc.StatusCode[edge.grpc], message)
    assert fronts.llm_answer("still fine", dict(max_tokens=2))[0] == continuation(letters_ids("still fine"), 2, V)


def test_grpc_refuses_a_request_without_input_and_one_past_the_byte_limit(fronts):
    with pytest.raises(grpc.RpcError) as e:
        list(fronts.client.stub.Generate(pb.GenerateRequest(max_tokens=3)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "no input: set one of text, chat or token_ids"
    with pytest.raises(grpc.RpcError) as e:
        list(fronts.client.stream("x" * (5 << 20), max_tokens=2))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "this server accepts at most 4194304 (--max-request-bytes)" in e.value.details()


# ---- logprobs, n > 1, usage, streaming order ------------------------------------------------------
def test_logprobs_have_the_shape_each_protocol_gives(fronts):
    ids = [15, 16, 17]
    responses = list(fronts.client.stream("hello", max_tokens=3, logprobs=2, **GREEDY))
    got = [(lp.token_id, lp.logprob, [(a.token_id, a.logprob) for a in lp.top]) for r in responses for lp in r.logprobs]
    assert got == [(t, LOGPROB_VALUE, alternatives(t, 2, V)) for t in ids]

    body = fronts.httpx.post("/v1/completions", json={"model": "mock", "prompt": "hello", "max_tokens": 3,
                                                      "logprobs": 2, **GREEDY}).json()
    lp = body["choices"][0]["logprobs"]
    assert lp == {"tokens": ["p", "q", "r"], "token_logprobs": [LOGPROB_VALUE] * 3,
                  "top_logprobs": [{LETTERS[a]: b for a, b in alternatives(t, 2, V)} for t in ids],
                  "text_offset": [0, 1, 2]}

    body = fronts.httpx.post("/v1/chat/completions", json={
        "model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True,
        "top_logprobs": 2, **GREEDY}).json()

    def entry(t, lp):  # (a special token's text is empty)
        return {"token": letters_text([t]), "logprob": lp, "bytes": list(letters_text([t]).encode())}

    assert body["choices"][0]["logprobs"] == {"content": [
        dict(entry(t, LOGPROB_VALUE), top_logprobs=[entry(a, b) for a, b in alternatives(t, 2, V)]) for t in (27, 28)]}
    [r] = fronts.llm.generate(["hello"], sampling_params(max_tokens=3, logprobs=0))
    assert r.logprobs == [LOGPROB_VALUE] * 3


def test_n_choices_and_their_usage_over_http(fronts):
    body = fronts.httpx.post("/v1/completions", json={"model": "mock", "prompt": ["hello", "a"], "n": 2,
                                                      "max_tokens": 4, "seed": 5, **GREEDY}).json()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "pqrs", "length"), (1, "pqrs", "length"), (2, "bcde", "length"), (3, "bcde", "length")]
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (6, 16, 22)


def _events(fronts, path: str, body: dict) -> list:
    with fronts.httpx.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_streams_come_one_token_a_piece_in_order_with_the_finish_last(fronts):
    # gRPC: one response a token; the finish reason and usage on the last only.
    rs = list(fronts.client.stream("a", max_tokens=20, stop=["ef"], **GREEDY))
    assert [list(r.token_ids) for r in rs] == [[1], [2], [3], [4], [5], []][:len(rs)]
    assert "".join(r.text for r in rs) == "bcd"
    assert [r.finish_reason for r in rs[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * (len(rs) - 1)
    assert rs[-1].finish_reason == pb.STOP and rs[-1].usage.completion_tokens == 5 and rs[-1].usage.prompt_tokens == 1
    # HTTP: text pieces in order, the finish reason on the last choice chunk, then usage, then [DONE].
    events = _events(fronts, "/v1/completions", {"model": "mock", "prompt": "a", "max_tokens": 20, "stop": ["ef"],
                                                 "stream": True, "stream_options": {"include_usage": True},
                                                 **GREEDY})
    *chunks, usage = events
    assert "".join(c["choices"][0]["text"] for c in chunks) == "bcd"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5 and usage["usage"]["prompt_tokens"] == 1
    events = _events(fronts, "/v1/chat/completions", {"model": "mock", "messages": [{"role": "user", "content": "hi"}],
                                                      "stream": True, **GREEDY})
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == ".\n"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


# ---- many requests, cancellation, deadlines, overload, failure -----------------------------------
def test_many_concurrent_streams_on_two_slots_each_get_their_own_tokens(fronts):
    prompts = [[i, (i * 7) % V] for i in range(12)]
    lengths = [3 + i % 5 for i in range(12)]

    async def run():
        async with AsyncClient(fronts.grpc_address) as ac:
            async def one(p, n):
                return [r async for r in ac.stream(p, max_tokens=n, ignore_eos=True, **GREEDY)]
            return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths)))

    for p, n, pieces in zip(prompts, lengths, asyncio.run(run())):
        assert [t for r in pieces for t in r.token_ids] == continuation(p, n, V)
        assert sum(1 for r in pieces if r.finish_reason) == 1 and pieces[-1].finish_reason == pb.LENGTH
    assert _free(fronts) == 0


def test_a_cancelled_stream_frees_its_slot_and_counts_once(fronts):
    reason = 'jserve_requests_finished_total{reason="cancelled"}'
    before, engine = _metric(fronts, reason), fronts.llm.engine
    # Its third decode step waits (the loop hands out a step's tokens after dispatching the next
    # one: the prompt's token and the first step's are out), so it cannot finish before the cancel.
    engine.before_step[engine.steps + 3] = engine.steps_open.clear
    try:
        call = fronts.client.stream([1, 2, 3], max_tokens=40, **GREEDY)
        assert [list(next(call).token_ids) for _ in range(2)] == [[4], [5]]
        call.cancel()
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.CANCELLED
        running = fronts.llm.orchestrator._running
        wait_until(lambda: any(run.req.cancelled for run in running.values()), "the server cancelled it")
    finally:
        engine.steps_open.set()
    assert _free(fronts) == 0
    wait_until(lambda: _metric(fronts, reason) > before, "the cancel counted")
    assert _metric(fronts, reason) == before + 1


def test_a_deadline_gives_deadline_exceeded_over_grpc_and_http_and_frees_the_slot(fronts):
    reason = 'jserve_requests_finished_total{reason="deadline"}'
    before, engine = _metric(fronts, reason), fronts.llm.engine
    http: list = []
    engine.steps_open.clear()  # running and held in a step when its time runs out
    try:
        held = engine.held
        with pytest.raises(grpc.RpcError) as e:
            list(fronts.client.stream([1, 2, 3], max_tokens=40, timeout=0.5, **GREEDY))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and engine.held > held
        t = threading.Thread(target=lambda: http.append(fronts.httpx.post("/v1/completions", json={
            "model": "mock", "prompt": [1, 2, 3], "max_tokens": 40, "timeout": 0.5, **GREEDY})))
        t.start()
        wait_until(lambda: fronts.llm.orchestrator.num_waiting == 1, "the HTTP request queued")
        time.sleep(0.6)  # its deadline passes while it waits for the slot
    finally:
        engine.steps_open.set()
    t.join(30)
    edge = ERRORS[ErrorKind.DEADLINE]
    assert http[0].status_code == edge.http and http[0].json()["error"]["type"] == edge.openai_type
    assert http[0].json()["error"]["message"].endswith("the deadline passed after 0 tokens")
    wait_until(lambda: _metric(fronts, reason) >= before + 2, "both deadlines counted")
    assert _metric(fronts, reason) == before + 2
    assert _free(fronts) == 0


def test_overload_is_refused_while_admitted_work_completes():
    f = _start(max_waiting=3)
    try:
        engine, n = f.llm.engine, SLOTS + 3 + 4
        engine.steps_open.clear()  # nothing finishes and makes room before every request is placed
        refused: list = []

        async def run():
            async with AsyncClient(f.grpc_address) as ac:
                async def one(i):
                    try:
                        return await ac.complete([i], max_tokens=4, **GREEDY)
                    except grpc.aio.AioRpcError as e:
                        refused.append(e)
                        return e
                return await asyncio.gather(*(one(i) for i in range(n)))

        done: list = []
        t = threading.Thread(target=lambda: done.extend(asyncio.run(run())))
        t.start()
        o = f.llm.orchestrator
        wait_until(lambda: len(refused) + o.num_waiting + o.slots_in_use == n, "every request placed or refused")
        r = f.httpx.post("/v1/completions", json={"model": "mock", "prompt": [9], "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["type"] == ERRORS[ErrorKind.QUEUE_FULL].openai_type
        engine.steps_open.set()
        t.join(30)
        ok = [d for d in done if not isinstance(d, grpc.aio.AioRpcError)]
        assert refused and len(ok) >= 3 and len(ok) + len(refused) == n  # (at least the waiting queue's room)
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and e.details() == "waiting queue is full (3 "
                   "requests); retry later" for e in refused)
        for i, d in enumerate(done):  # (in request order)
            if not isinstance(d, grpc.aio.AioRpcError):
                assert (d.token_ids, d.finish_reason, d.completion_tokens) == (continuation([i], 4, V), "length", 4)
    finally:
        f.llm.engine.steps_open.set()
        f.close()
        f.llm.close(drain=False)


def test_an_engine_fault_ends_the_request_with_one_message_everywhere():
    f = _start()
    try:
        engine = f.llm.engine

        def fail_next_step():
            engine.fail["generate"] = engine._counts.get("generate", 0) + 1

        fail_next_step()
        grpc_got = f.grpc_answer([4, 5], dict(max_tokens=6, **GREEDY))
        fail_next_step()
        http_got = f.http_answer([4, 5], dict(max_tokens=6, **GREEDY))
        fail_next_step()
        [r] = f.llm.generate([[4, 5]], sampling_params(max_tokens=6, **GREEDY))
        assert r.finish_reason == FinishReason.ERROR and r.error == "internal error: injected generate fault"
        edge = ERRORS[ErrorKind.INTERNAL]
        assert grpc_got[:2] == ("error", grpc.StatusCode[edge.grpc])
        assert http_got[1] == edge.http and http_got[3] == edge.openai_type
        for m in (grpc_got[2], http_got[2]):
            assert m.startswith("request ") and m.endswith(f" failed: {r.error}")
        assert f.llm_answer([4, 5], dict(max_tokens=2, **GREEDY))[0] == [6, 7]  # and it serves on
    finally:
        f.close()
        f.llm.close(drain=False)


def _kinds():
    from .test_detokenize import byte_level_bpe, gemma_style, llama2_style, unigram_byte_fallback

    return [byte_level_bpe, llama2_style, gemma_style, unigram_byte_fallback]


@pytest.mark.parametrize("build", _kinds(), ids=lambda b: b.__name__)
def test_streamed_text_is_the_tokenizers_own_decode_with_stop_strings_cut(build):
    """Byte-level BPE, Metaspace + byte-fallback BPE (Llama 2's and Gemma's arrangements) and a
    Unigram: the text streamed over HTTP and gRPC, piece by piece, joins to ``Tokenizer.decode``
    of the tokens (``tokenizers``' own decoder is the reference), and a stop string cuts it there."""
    from .test_detokenize import _text_tokenizer

    tok = _text_tokenizer(build())
    f = _start(tokenizer=tok, vocab_size=tok.vocab_size)
    try:
        start, n = tok.vocab_size - 45, 40  # (past the byte tokens: mostly whole characters)
        ids = continuation([start], n, tok.vocab_size)
        text = tok.tok.decode(ids, skip_special_tokens=True)
        assert len(text) >= 20
        events = _events(f, "/v1/completions", {"model": "mock", "prompt": [start], "max_tokens": n,
                                                "stream": True, **GREEDY})
        assert "".join(e["choices"][0]["text"] for e in events) == text and len(events) > 1
        rs = list(f.client.stream([start], max_tokens=n, **GREEDY))
        assert "".join(r.text for r in rs) == text and [t for r in rs for t in r.token_ids] == ids
        stop = next(text[a:a + 3] for a in range(len(text) // 2, len(text)) if "\ufffd" not in text[a:a + 3])
        events = _events(f, "/v1/completions", {"model": "mock", "prompt": [start], "max_tokens": n, "stop": [stop],
                                                "stream": True, **GREEDY})
        assert "".join(e["choices"][0]["text"] for e in events) == text[:text.find(stop)]
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
        rs = list(f.client.stream([start], max_tokens=n, stop=[stop], **GREEDY))
        assert "".join(r.text for r in rs) == text[:text.find(stop)] and rs[-1].finish_reason == pb.STOP
    finally:
        f.close()
        f.llm.close(drain=False)
