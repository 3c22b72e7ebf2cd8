"""Edge refusals of the OpenAI-compatible API over ``MockEngine`` (tests/frontends.py's
``serve_mock``), as the real ``openai`` client sees them where it can send the body: logit_bias
past its bounds, and the Responses API's input items with fields OpenAI does not document."""

from __future__ import annotations

import openai
import pytest

from .frontends import serve_mock
from .waits import wait_until


@pytest.fixture(scope="module")
def fronts():
    # room for a chat's history in the mock's template, and more alternatives than the completions take
    yield from serve_mock(max_len=256, max_prompt_len=192, top_logprobs=8)


def _client(fronts) -> openai.OpenAI:
    return openai.OpenAI(base_url=fronts.http_url + "/v1", api_key="unused", max_retries=0)


def _rejected(fronts) -> float:
    return fronts.metrics.registry.get_sample_value("jserve_requests_rejected_total",
                                                    {"reason": "invalid_argument"}) or 0.0


# logit_bias past its bounds: OpenAI's "object_above_max_properties" for an object with more
# entries than it takes (300), "invalid_value" for a key that is not a token id and for a bias
# that is not a finite number; 400 invalid_request_error naming the field (or its entry).
LOGIT_BIAS = [
    ({str(i): 1 for i in range(301)}, "logit_bias", "object_above_max_properties",
     "logit_bias may have at most 300 entries, got 301"),
    ({"abc": 1}, "logit_bias", "invalid_value", "logit_bias keys must be token ids (integers), got 'abc'"),
    ({"3": 1, "1.5": 1}, "logit_bias", "invalid_value", "logit_bias keys must be token ids (integers), got '1.5'"),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("bias, param, code, message", LOGIT_BIAS, ids=["too_many", "word_key", "decimal_key"])
def test_logit_bias_refusals_carry_a_precise_code(fronts, path, bias, param, code, message):
    body = {"model": "mock", "max_tokens": 1, "logit_bias": bias}
    body |= {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(openai.BadRequestError) as e:
        _client(fronts).post(path.removeprefix("/v1"), body=body, cast_to=dict)
    assert (e.value.status_code, e.value.type, e.value.param, e.value.code, e.value.body["message"]) == (
        400, "invalid_request_error", param, code, message)


@pytest.mark.parametrize("value", ["1e400", "-1e400", "NaN", "Infinity", "-Infinity"])
def test_a_bias_that_is_not_a_finite_number_is_an_invalid_value_of_its_entry(fronts, value):
    """JSON's 1e400 parses as infinity (Python's parser also takes NaN and Infinity): refused,
    naming the entry as a bias past [-100, 100] is named. The ``openai`` client cannot send these
    (it refuses non-finite numbers), so the body goes raw."""
    raw = '{"model": "mock", "prompt": "hi", "max_tokens": 1, "logit_bias": {"3": 1, "5": ' + value + "}}"
    r = fronts.httpx.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    got = float(value)
    assert r.status_code == 400 and r.json()["error"] == {
        "message": f"logit_bias values must be finite numbers, got {got!r} for token id 5",
        "type": "invalid_request_error", "param": "logit_bias.5", "code": "invalid_value"}


def test_logit_bias_refusals_leave_other_requests_undisturbed(fronts):
    """Each refusal is counted once as a rejected request, nothing of it runs, and a request beside
    it (streaming, started before) and after it gets the same answer as alone."""
    client = _client(fronts)
    kw = dict(model="mock", prompt=[4, 5], max_tokens=6, temperature=0)
    alone = client.completions.create(**kw)
    before = _rejected(fronts)
    stream = client.completions.create(stream=True, **kw)
    refused = [{str(i): 1 for i in range(301)}, {"abc": 1}]
    for bias in refused:
        with pytest.raises(openai.BadRequestError):
            client.completions.create(logit_bias=bias, **kw)
    raw = '{"model": "mock", "prompt": [4, 5], "max_tokens": 6, "logit_bias": {"5": NaN}}'
    assert fronts.httpx.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}
                             ).status_code == 400
    assert "".join(c.choices[0].text for c in stream) == alone.choices[0].text
    after = client.completions.create(logit_bias={"3": 1.5}, **kw)
    assert after.choices[0].text == alone.choices[0].text and after.choices[0].finish_reason == "length"
    assert _rejected(fronts) - before == len(refused) + 1
    wait_until(lambda: fronts.llm.orchestrator.num_running == 0, "nothing left running")


# ---- the Responses API's input items ---------------------------------------------------------------
ITEM_REFUSALS = [
    ({"role": "user", "content": "hi", "foo": 1}, "input[1].foo"),
    ({"type": "message", "role": "user", "content": "hi", "metadata": {}}, "input[1].metadata"),
    ({"role": "user", "content": "hi", "zeta": 1, "alpha": 2}, "input[1].alpha"),  # the first, sorted
    ({"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}", "result": "4"}, "input[1].result"),
    ({"type": "function_call_output", "call_id": "c1", "output": "4", "error": "x"}, "input[1].error"),
    ({"role": "user", "content": [{"type": "input_text", "text": "a", "lang": "en"}]}, "input[1].content[0].lang"),
]


@pytest.mark.parametrize("item, param", ITEM_REFUSALS, ids=[p for _, p in ITEM_REFUSALS])
def test_an_input_item_with_a_field_openai_does_not_document_is_refused_by_name(fronts, item, param):
    with pytest.raises(openai.BadRequestError) as e:
        _client(fronts).responses.create(model="mock", input=[{"role": "user", "content": "hi"}, item],
                                         max_output_tokens=1)
    body = e.value.body
    assert (e.value.status_code, body["type"], body["param"], body["code"]) == (
        400, "invalid_request_error", param, "unknown_parameter"), body
    assert body["message"].startswith(param.rsplit(".", 1)[0] + ": unknown parameter"), body["message"]
    assert repr(param.rsplit(".", 1)[1]) in body["message"]


def _documented(*types) -> set[str]:
    """The fields the ``openai`` client's TypedDicts document, together."""
    return set().union(*(t.__annotations__ for t in types))


def test_every_field_the_openai_client_documents_on_an_item_is_taken():
    """The client library's own types are the reference: each field it documents on the items and
    text parts this server runs is accepted (and any other refused, above)."""
    from openai.types.responses import (
        EasyInputMessageParam,
        ResponseFunctionToolCallParam,
        ResponseInputTextParam,
        ResponseOutputMessageParam,
        ResponseOutputTextParam,
    )
    from openai.types.responses.response_input_item_param import FunctionCallOutput, Message

    from jserve.http_responses import ITEM_FIELDS, PART_FIELDS

    assert ITEM_FIELDS["message"] == _documented(EasyInputMessageParam, Message, ResponseOutputMessageParam)
    assert ITEM_FIELDS["function_call"] == _documented(ResponseFunctionToolCallParam)
    assert ITEM_FIELDS["function_call_output"] == _documented(FunctionCallOutput)
    assert PART_FIELDS["input_text"] == _documented(ResponseInputTextParam)
    assert PART_FIELDS["output_text"] == _documented(ResponseOutputTextParam)


def test_items_with_every_documented_field_and_an_earlier_output_sent_back_are_served(fronts):
    """What real clients send: an earlier response's output items as history (``input += r.output``)
    and items carrying every documented field, each read as the same chat as without them."""
    from jserve.http_responses import ResponsesRequest

    client = _client(fronts)
    first = client.responses.create(model="mock", input="a", max_output_tokens=2, temperature=0)
    assert first.output and first.output_text
    history = [{"role": "user", "content": "a"}, *first.output, {"role": "user", "content": "b"}]
    again = client.responses.create(model="mock", input=history, max_output_tokens=2, temperature=0)
    plain = client.responses.create(model="mock", max_output_tokens=2, temperature=0, input=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "b"}])
    assert again.output_text == plain.output_text and again.usage.input_tokens == plain.usage.input_tokens
    full = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi",
                                                         "prompt_cache_breakpoint": {"mode": "explicit"}}],
         "status": "completed"},
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "phase": "final_answer",
         "content": [{"type": "output_text", "text": "let me see", "annotations": [], "logprobs": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f", "arguments": "{}",
         "status": "completed", "namespace": "ns", "caller": {"type": "direct"}},
        {"type": "function_call_output", "id": "fco_1", "call_id": "c1", "output": "4", "status": "completed",
         "name": "f", "namespace": "ns", "caller": {"type": "direct"}},
    ]
    bare = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "let me see"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "4"}]
    assert (ResponsesRequest(model="m", input=full).chat_request().messages
            == ResponsesRequest(model="m", input=bare).chat_request().messages)


# ---- completions' logprobs ----------------------------------------------------------------------
def test_completions_logprobs_past_openais_five_are_refused_where_the_server_allows_more(fronts):
    """The legacy completions' ``logprobs`` is at most 5 (OpenAI's API reference, as the ``openai``
    client documents it), while chat's ``top_logprobs`` goes to 20: on a server that allows 8, a
    completion asking for 6 is refused naming the field, one asking for 5 gets 5 per token, and a
    chat asking for 6 gets 6."""
    client = _client(fronts)
    assert fronts.llm.limits.max_logprobs == 8
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="mock", prompt=[4, 5], max_tokens=2, logprobs=6)
    assert (e.value.status_code, e.value.body) == (400, {
        "message": "logprobs must be in [0, 5], got 6", "type": "invalid_request_error", "param": "logprobs",
        "code": "integer_above_max_value"})
    five = client.completions.create(model="mock", prompt=[4, 5], max_tokens=2, logprobs=5, temperature=0)
    assert [len(top) for top in five.choices[0].logprobs.top_logprobs] == [5, 5]
    chat = client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "a"}], max_tokens=2,
                                          logprobs=True, top_logprobs=6, temperature=0)
    assert [len(t.top_logprobs) for t in chat.choices[0].logprobs.content] == [6, 6]
