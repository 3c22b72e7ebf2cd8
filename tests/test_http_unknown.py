"""Fields OpenAI does not document, on ``/v1/chat/completions`` and ``/v1/completions`` over
``MockEngine``, as the real ``openai`` client sees them: an unknown top-level field, or a message
field its role does not take, is a 400 ``unknown_parameter`` naming it; a field OpenAI documents
(as the client's own TypedDicts type it) and jserve's documented extras stay accepted."""

from __future__ import annotations

import typing

import openai
import pytest

from .frontends import serve_mock
from .waits import wait_until


@pytest.fixture(scope="module")
def fronts():
    yield from serve_mock(max_len=256, max_prompt_len=192)


def _client(fronts) -> openai.OpenAI:
    return openai.OpenAI(base_url=fronts.http_url + "/v1", api_key="unused", max_retries=0)


def _refusal(fronts, path: str, body: dict) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        _client(fronts).post(path, body=body, cast_to=dict)
    assert e.value.status_code == 400
    return e.value.body


def _documented(*types) -> set[str]:
    """The fields the ``openai`` client's TypedDicts document, together (with their bases')."""
    return set().union(*(t.__required_keys__ | t.__optional_keys__ for t in types))


CHAT = {"model": "mock", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "mock", "max_tokens": 1, "prompt": "hi"}

# ---- top-level fields ---------------------------------------------------------------------------
TOP = [("/chat/completions", CHAT, {"foo": 1}, "foo", ["foo"]),
       ("/chat/completions", CHAT, {"zeta": 1, "alpha": None}, "alpha", ["alpha", "zeta"]),  # the first, sorted
       ("/completions", COMPLETION, {"foo": 1}, "foo", ["foo"]),
       ("/completions", COMPLETION, {"messages": []}, "messages", ["messages"]),  # chat's field, not this one's
       ("/completions", COMPLETION, {"tools": [], "foo": "x"}, "foo", ["foo", "tools"])]


@pytest.mark.parametrize("path, base, extra, param, listed", TOP, ids=[f"{p}:{m}" for p, _, _, m, _ in TOP])
def test_an_unknown_top_level_field_is_refused_by_name(fronts, path, base, extra, param, listed):
    body = _refusal(fronts, path, base | extra)
    assert (body["type"], body["param"], body["code"]) == ("invalid_request_error", param, "unknown_parameter")
    assert body["message"].startswith("unknown parameter"), body["message"]
    assert all(repr(f) in body["message"] for f in listed), body["message"]


def test_the_refusal_lists_every_unknown_field_and_what_the_role_takes(fronts):
    body = _refusal(fronts, "/chat/completions", CHAT | {"zeta": 1, "alpha": 2})
    assert body["message"] == "unknown parameters 'alpha', 'zeta' in a /v1/chat/completions request"
    tool = {"role": "tool", "content": "4", "tool_call_id": "c1", "name": "f", "foo": None}
    body = _refusal(fronts, "/chat/completions", CHAT | {"messages": [CHAT["messages"][0], tool]})
    assert (body["param"], body["message"]) == (  # pydantic refuses foo first, the role check name
        "messages[1].foo", "messages[1]: unknown parameter 'foo' on a tool message (it takes content, role, "
                           "tool_call_id)")
    body = _refusal(fronts, "/chat/completions", CHAT | {"stream_options": {"include_usage": True, "x": 1}})
    assert (body["param"], body["code"], body["message"]) == (
        "stream_options.x", "unknown_parameter", "stream_options: unknown parameter 'x'")


def test_an_unknown_field_is_named_before_another_error_of_the_body(fronts):
    body = _refusal(fronts, "/chat/completions", {"messages": CHAT["messages"], "foo": 1})  # no model either
    assert (body["param"], body["code"]) == ("foo", "unknown_parameter")


# ---- message fields -------------------------------------------------------------------------------
MESSAGES = [
    ({"role": "user", "content": "hi", "foo": 1}, "messages[1].foo"),
    ({"role": "user", "content": "hi", "zeta": 1, "alpha": 2}, "messages[1].alpha"),
    ({"role": "user", "content": "hi", "tool_call_id": "c1"}, "messages[1].tool_call_id"),  # a tool's field
    ({"role": "user", "content": "hi", "reasoning_content": "r"}, "messages[1].reasoning_content"),
    ({"role": "system", "content": "hi", "refusal": "no"}, "messages[1].refusal"),  # an assistant's field
    ({"role": "tool", "content": "4", "tool_call_id": "c1", "name": "f"}, "messages[1].name"),
    ({"role": "assistant", "content": "4", "tool_call_id": "c1"}, "messages[1].tool_call_id"),
]


@pytest.mark.parametrize("message, param", MESSAGES, ids=[p + ":" + m["role"] for m, p in MESSAGES])
def test_a_message_field_its_role_does_not_take_is_refused_by_name(fronts, message, param):
    body = _refusal(fronts, "/chat/completions", CHAT | {"messages": [CHAT["messages"][0], message]})
    assert (body["type"], body["param"], body["code"]) == ("invalid_request_error", param, "unknown_parameter")
    assert body["message"].startswith("messages[1]: unknown parameter"), body["message"]
    assert repr(param.rsplit(".", 1)[1]) in body["message"] and f"a {message['role']} message" in body["message"]


@pytest.mark.parametrize("field, value", [("audio", {"id": "audio_1"}),
                                          ("function_call", {"name": "f", "arguments": "{}"})])
def test_an_assistant_field_that_would_change_the_chat_is_refused_as_unsupported(fronts, field, value):
    """Documented for the assistant, but jserve cannot read it: refused, never dropped silently."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, field: value},
                {"role": "user", "content": "and?"}]
    body = _refusal(fronts, "/chat/completions", CHAT | {"messages": messages})
    assert (body["param"], body["code"]) == (f"messages[1].{field}", "unsupported_parameter"), body


def test_refusals_are_counted_and_leave_nothing_running(fronts):
    def rejected() -> float:
        return fronts.metrics.registry.get_sample_value("jserve_requests_rejected_total",
                                                        {"reason": "invalid_argument"}) or 0.0

    before = rejected()
    _refusal(fronts, "/chat/completions", CHAT | {"foo": 1})
    _refusal(fronts, "/chat/completions", CHAT | {"messages": [{"role": "user", "content": "hi", "name": 1,
                                                                "tool_call_id": "c"}]})
    assert rejected() - before == 2
    wait_until(lambda: fronts.llm.orchestrator.num_running == 0, "nothing left running")


# ---- what stays accepted ------------------------------------------------------------------------
def test_documented_fields_jserve_does_not_use_are_accepted(fronts):
    """As the ``openai`` client sends them: platform fields, a message's documented fields of its
    role (an assistant's refusal and name, a system's name), the completions' best_of equal to n;
    the answer is the same as without them."""
    client = _client(fronts)
    plain = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "yes"}, {"role": "user", "content": "more"}]
    full = [{"role": "developer", "content": "s", "name": "d"}, {"role": "user", "content": "hi", "name": "u"},
            {"role": "assistant", "content": "yes", "refusal": None, "name": "a", "reasoning_content": "r"},
            {"role": "user", "content": "more"}]
    kw = dict(model="mock", max_tokens=3, temperature=0)
    alone = client.chat.completions.create(messages=plain, **kw)
    given = client.chat.completions.create(messages=full, prompt_cache_retention="24h", user="u", store=False,
                                           extra_body={"prompt_cache_options": {"mode": "implicit"}}, **kw)
    assert given.choices[0].message.content == alone.choices[0].message.content
    one = client.completions.create(prompt="hi", **kw)
    best = client.completions.create(prompt="hi", best_of=2, n=2, **kw)
    assert [c.text for c in best.choices] == [one.choices[0].text] * 2
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(prompt="hi", best_of=3, **kw)
    assert (e.value.param, e.value.code) == ("best_of", "unsupported_parameter")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(messages=plain, moderation={"policy": {}}, **kw)
    assert (e.value.param, e.value.code) == ("moderation", "unsupported_parameter")


def test_the_extras_jserve_documents_are_accepted(fronts):
    client = _client(fronts)
    extras = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True, "stop_token_ids": [7],
              "speculate": False, "timeout": 30}  # guided_*: tests/test_http.py (the mock has no grammar tokenizer)
    kw = dict(model="mock", max_tokens=2, temperature=0, extra_body=extras)
    assert client.completions.create(prompt="hi", **kw).choices
    assert client.chat.completions.create(messages=CHAT["messages"], **kw).choices


# ---- the accepted sets against the client's types -------------------------------------------------
# jserve's own fields on both endpoints (README's extras, llama.cpp's json_schema), and on completions
# the platform fields that README documents there as on chat.
EXTRAS = {"top_k", "min_p", "repetition_penalty", "ignore_eos", "speculate", "stop_token_ids", "timeout",
          "json_schema", "guided_regex", "guided_choice", "response_format"}
PLATFORM = {"metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}


def test_the_accepted_top_level_fields_are_openais_and_the_documented_extras():
    """A newer client's new field fails here until it is taken (or refused as unsupported)."""
    from openai.types import completion_create_params as completion
    from openai.types.chat import completion_create_params as chat

    from jserve.http_schemas import ChatCompletionRequest, CompletionRequest

    assert set(ChatCompletionRequest.model_fields) == _documented(chat.CompletionCreateParamsStreaming) | EXTRAS
    assert set(CompletionRequest.model_fields) == (_documented(completion.CompletionCreateParamsStreaming)
                                                   | EXTRAS | PLATFORM)


def test_the_fields_of_each_role_are_openais_and_reasoning_content():
    from openai.types.chat import (
        ChatCompletionAssistantMessageParam,
        ChatCompletionDeveloperMessageParam,
        ChatCompletionMessageParam,
        ChatCompletionSystemMessageParam,
        ChatCompletionToolMessageParam,
        ChatCompletionUserMessageParam,
    )

    from jserve.http_schemas import MESSAGE_FIELDS, ChatMessage

    assert MESSAGE_FIELDS == {
        "system": _documented(ChatCompletionSystemMessageParam),
        "developer": _documented(ChatCompletionDeveloperMessageParam),
        "user": _documented(ChatCompletionUserMessageParam),
        "assistant": _documented(ChatCompletionAssistantMessageParam) | {"reasoning_content"},
        "tool": _documented(ChatCompletionToolMessageParam),
    }
    # every role the client types but the deprecated "function" (refused by the request layer)
    roles = {typing.get_args(typing.get_type_hints(t)["role"])[0] for t in typing.get_args(ChatCompletionMessageParam)}
    assert roles == {
        *MESSAGE_FIELDS, "function"}
    assert set(ChatMessage.model_fields) == set().union(*MESSAGE_FIELDS.values())


def test_structured_output_the_tokenizer_cannot_take_is_a_400_with_the_reason(fronts):
    """The mock's tokenizer is one llguidance cannot read: a constrained request is refused with the
    reason (it was a 500), and the server goes on serving."""
    body = _refusal(fronts, "/chat/completions", {**CHAT, "guided_choice": ["yes", "no"]})
    assert (body["type"], body["code"]) == ("invalid_request_error", "unsupported_parameter")
    assert "not available with this model's tokenizer" in body["message"], body["message"]
    reply = _client(fronts).chat.completions.create(model="mock", max_tokens=1,
                                                    messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].finish_reason in ("length", "stop")
