"""The front ends' refusals exactly, over ``MockEngine`` (tests/frontends.py's ``start_mock``): a
field of the wrong type, a missing one, an unknown value, named the same way by the ``LLM``, the
offline script and HTTP, with the ``param`` (the field, or the item of it) and OpenAI's error
``code`` a real ``openai`` client sees. The answers themselves: tests/test_frontends_mock.py."""

from __future__ import annotations

import pytest

from jserve.errors import ErrorKind

from .frontends import serve_mock
from .waits import wait_until

fronts = pytest.fixture(scope="module", name="fronts")(serve_mock)


TYPE_ERRORS = [
    ("max_tokens", "ten", 'max_tokens must be an integer, got a string: "ten"'),
    ("max_tokens", 2.5, "max_tokens must be an integer, got a number: 2.5"),
    ("temperature", "hot", 'temperature must be a number, got a string: "hot"'),
    ("seed", [1], "seed must be an integer, got a list: [1]"),
    ("ignore_eos", "sure", 'ignore_eos must be a boolean, got a string: "sure"'),
    ("stop", 5, "stop must be a string or a list of strings, got an integer: 5"),
    ("stop", ["a", 2], "stop[1] must be a string, got an integer: 2"),
    # JSON booleans are not numbers, nor numeric strings numbers (as OpenAI's API refuses them)
    ("max_tokens", True, "max_tokens must be an integer, got a boolean: true"),
    ("max_tokens", "5", 'max_tokens must be an integer, got a string: "5"'),
    ("temperature", True, "temperature must be a number, got a boolean: true"),
    ("temperature", "0.5", 'temperature must be a number, got a string: "0.5"'),
    ("seed", False, "seed must be an integer, got a boolean: false"),
    ("ignore_eos", 1, "ignore_eos must be a boolean, got an integer: 1"),
]


@pytest.mark.parametrize("field, value, message", TYPE_ERRORS, ids=[f"{t[0]}-{t[1]!r}" for t in TYPE_ERRORS])
def test_a_field_of_the_wrong_type_is_named_with_the_type_it_takes_and_what_was_sent(fronts, field, value, message):
    """The same words from the LLM, the script and HTTP (OpenAI's error body naming the field);
    gRPC's fields are typed by the protocol, so its stub cannot send these."""
    fields = {field: value}
    assert fronts.llm_answer("hello", fields) == ("error", ErrorKind.INVALID, message)
    assert fronts.script_answer("hello", fields) == ("error", message)
    r = fronts.httpx.post("/v1/completions", json={"model": "mock", "prompt": "hello", **fields})
    assert r.status_code == 400 and r.json()["error"] == {  # param: the field, or the item of it, named first
        "message": message, "type": "invalid_request_error", "param": message.split(" ", 1)[0],
        "code": "invalid_type"}  # OpenAI's code for a value of the wrong type


@pytest.mark.parametrize("field, value, message", [
    ("n", True, "n must be an integer, got a boolean: true"),
    ("stream", 1, "stream must be a boolean, got an integer: 1"),
    ("logprobs", "true", 'logprobs must be a boolean, got a string: "true"'),
    ("top_logprobs", "2", 'top_logprobs must be an integer, got a string: "2"'),
    ("stream_options", {"include_usage": 1}, "stream_options.include_usage must be a boolean, got an integer: 1"),
    ("messages", [{"role": "user", "content": [5]}],
     "messages[0].content[0] must be an object (a content part), got an integer: 5"),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}],
     'messages[0].content[1] must be an object (a content part), got a string: "b"'),
    ("messages", [{"role": "user", "content": 5}], "messages[0].content must be a string or a list, got an integer: 5"),
])
def test_http_chat_fields_are_strictly_typed_naming_the_bad_item(fronts, field, value, message):
    body = {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, field: value}
    r = fronts.httpx.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"] == {
        "message": message, "type": "invalid_request_error", "param": message.split(" ", 1)[0],
        "code": "invalid_type"}


@pytest.mark.parametrize("prompt, message", [
    (["hello", 5], "prompt[1] must be a string, got an integer: 5"),  # a list of strings
    ([4, 5, "x"], 'prompt[2] must be an integer, got a string: "x"'),  # token ids
    ([4, 5, 6.5], "prompt[2] must be an integer, got a number: 6.5"),
    ([[4, 5], [6, 7, True]], "prompt[1][2] must be an integer, got a boolean: true"),  # lists of token ids
    ([[4, 5], 6], "prompt[1] must be a list, got an integer: 6"),
    ([[4, [5]]], "prompt[0][1] must be an integer, got a list: [5]"),
    ([{"text": "hi"}], 'prompt[0] must be an integer, a string or a list, got an object: {"text": "hi"}'),
    (5, "prompt must be a string, a list of integers, a list of strings or a list of lists of integers, "
        "got an integer: 5"),  # the field itself
])
def test_http_completions_name_the_bad_item_of_the_prompt(fronts, prompt, message):
    r = fronts.httpx.post("/v1/completions", json={"model": "mock", "prompt": prompt, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": message, "type": "invalid_request_error", "param": message.split(" ", 1)[0],
        "code": "invalid_type"}


def test_an_integer_is_a_number_where_a_float_is_expected(fronts):
    """OpenAI takes ``temperature: 1``; so does every front end here (the request layer's rule)."""
    fields = {"temperature": 0, "top_p": 1, "max_tokens": 2}
    got = fronts.llm_answer([4, 5], fields)
    r = fronts.httpx.post("/v1/completions", json={"model": "mock", "prompt": [4, 5], **fields})
    assert r.status_code == 200, r.text
    assert got[0] == [6, 7] and r.json()["choices"][0]["finish_reason"] == "length"


def test_http_names_a_field_of_the_wrong_type_inside_the_body():
    from jserve.request import body_error

    # pydantic's errors for {"prompt": 5} (one per type the field takes) and for a message's content.
    union = [{"type": "string_type", "loc": ("body", "prompt", "str"), "input": 5}] + [
        {"type": "list_type", "loc": ("body", "prompt", t), "input": 5} for t in ("list[int]", "list[str]")]
    assert body_error(union) == ("prompt must be a string, a list of integers or a list of strings, got an "
                                 "integer: 5", "prompt", "invalid_type")
    nested = [{"type": "string_type", "loc": ("body", "messages", 0, "content", "str"), "input": 5},
              {"type": "list_type", "loc": ("body", "messages", 0, "content", "list[TextPart]"), "input": 5}]
    assert body_error(nested) == ("messages[0].content must be a string or a list, got an integer: 5",
                                  "messages[0].content", "invalid_type")
    assert body_error([{"type": "missing", "loc": ("body", "prompt"), "input": {}}]) == (
        "prompt is required", "prompt", "missing_required_parameter")


# OpenAI's error codes (its API's answers, as clients see them): "invalid_type" for a value of the
# wrong type, "missing_required_parameter" for a required field not given, "invalid_value" for a
# value that is none of the field's known ones; the status and type stay 400 invalid_request_error.
CODES = [
    ("/v1/completions", {"prompt": "hello", "max_tokens": "ten"}, "max_tokens", "invalid_type"),
    ("/v1/completions", {"prompt": "hello", "stop": 5}, "stop", "invalid_type"),
    ("/v1/completions", {"max_tokens": 2}, "prompt", "missing_required_parameter"),
    ("/v1/chat/completions", {"max_tokens": 2}, "messages", "missing_required_parameter"),
    # A message's field is named as the item it is (OpenAI's "messages[0].role"), as a content part is.
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role",
     "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role", "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": 5, "content": "hi"}]},
     "messages[1].role", "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "4"}]}, "messages[0].tool_call_id",
     "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].type", "invalid_value"),
    ("/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}]},
     "messages[0].content[1].text", "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "be brief"}, {"role": "user"}]},
     "messages[1].content", "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}},
     "response_format.type", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "sometimes"},
     "tool_choice", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "parallel_tool_calls": "yes"},
     "parallel_tool_calls", "invalid_type"),
]


@pytest.mark.parametrize("path, fields, param, code", CODES, ids=[f"{c[2]}-{c[3]}" for c in CODES])
def test_http_errors_carry_openais_code_for_wrong_types_missing_fields_and_unknown_values(fronts, path, fields,
                                                                                          param, code):
    openai = pytest.importorskip("openai")
    r = fronts.httpx.post(path, json={"model": "mock", **fields})
    err = r.json()["error"]
    assert (r.status_code, err["type"], err["param"], err["code"]) == (400, "invalid_request_error", param, code)
    # The real client's view: a BadRequestError whose code is OpenAI's.
    client = openai.OpenAI(base_url=fronts.http_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.post(path, body={"model": "mock", **fields}, cast_to=dict)
    assert (e.value.status_code, e.value.code, e.value.param, e.value.type) == (400, code, param,
                                                                                "invalid_request_error")


CHAT_REFUSALS = [
    ([], "messages"),
    ([{"role": "user", "content": "hi"}] * 1025, "messages"),
    ([{"role": "user", "content": "hi"}, 5], "messages[1]"),
    ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
    ([{"content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": "hi", "colour": "red"}], "messages[0].colour"),
    ([{"role": "user", "content": "hi", "tool_calls": []}], "messages[0].tool_calls"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}], "messages[0].tool_calls"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "4", "tool_call_id": 7}],
     "messages[1].tool_call_id"),
    ([{"role": "user", "content": "hi", "name": 5}], "messages[0].name"),
    # a field of another role, given (a tool's tool_call_id on a user turn, tool_calls on a tool's)
    ([{"role": "user", "content": "hi", "tool_call_id": "c1"}], "messages[0].tool_call_id"),
    ([{"role": "tool", "content": "4", "tool_call_id": "c1", "name": "f"}], "messages[0].name"),
    ([{"role": "system", "content": "be brief", "reasoning_content": "hm"}], "messages[0].reasoning_content"),
    ([{"role": "assistant", "content": "x", "audio": {"id": "a1"}}], "messages[0].audio"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}]}],
     "messages[0].content[1].type"),
    ([{"role": "assistant", "content": [{"type": "refusal", "refusal": 5}]}], "messages[0].content[0].refusal"),
]


@pytest.mark.parametrize("messages, param", CHAT_REFUSALS, ids=[c[1] + f"-{i}" for i, c in enumerate(CHAT_REFUSALS)])
def test_each_refused_chat_message_names_the_item_it_refuses(messages, param):
    """The request layer's chat checks name the message's field as OpenAI does (``param``), so every
    front end's refusal points at the item, not at ``messages`` as a whole."""
    from jserve.errors import InvalidRequestError
    from jserve.request import normalize_chat

    with pytest.raises(InvalidRequestError) as e:
        normalize_chat(messages)
    assert e.value.param == param, e.value.message


def test_the_request_layer_checks_each_role_s_fields_with_openai_s_codes():
    """The chat checks every front end shares (gRPC, ``LLM``, HTTP) take per role the fields OpenAI
    documents on it: another role's field is ``unknown_parameter`` (named, with what the role
    takes), one sent as null passes (clients serialize every field of a message class), and a
    documented field that cannot be honoured is ``unsupported_parameter``."""
    from jserve.errors import InvalidRequestError
    from jserve.request import normalize_chat

    with pytest.raises(InvalidRequestError) as e:
        normalize_chat([{"role": "user", "content": "hi", "tool_call_id": "c1"}])
    assert (e.value.code, e.value.param) == ("unknown_parameter", "messages[0].tool_call_id")
    assert "on a user message (it takes content, name, role)" in e.value.message
    with pytest.raises(InvalidRequestError) as e:
        normalize_chat([{"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}])
    assert (e.value.code, e.value.param) == ("unsupported_parameter", "messages[0].function_call")
    ok = normalize_chat([{"role": "user", "content": "hi", "tool_call_id": None, "tool_calls": None},
                         {"role": "assistant", "content": "no", "refusal": "I cannot", "name": "bot"},
                         {"role": "developer", "content": "x", "name": None}])
    assert ok == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no", "name": "bot"},
                  {"role": "system", "content": "x"}]


def test_grpc_refuses_another_role_s_field_by_name(fronts):
    """A gRPC chat message takes the fields its role does, as HTTP's: a tool_call_id on a user
    message is INVALID_ARGUMENT naming it, not dropped."""
    import grpc

    from jserve.v1 import jserve_pb2 as pb

    chat = pb.Messages(messages=[pb.ChatMessage(role="user", content="hi", tool_call_id="call_1")])
    with pytest.raises(grpc.RpcError) as e:
        list(fronts.client.stub.Generate(pb.GenerateRequest(chat=chat, max_tokens=1), timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[0]" in e.value.details() and "tool_call_id" in e.value.details(), e.value.details()


@pytest.mark.parametrize("item, param", [
    ({"role": "wizard", "content": "hi"}, "input[1].role"),
    ({"role": "user", "content": 5}, "input[1].content"),
    ({"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_image"}]},
     "input[1].content[1].type"),
    ({"type": "reasoning"}, "input[1].type"),
    (5, "input[1]"),
    # an item's own fields, named as OpenAI names them ("input[95].call_id"), not as the chat's "messages[2]"
    ({"type": "function_call_output", "output": "4"}, "input[1].call_id"),
    ({"type": "function_call_output", "call_id": 5, "output": "4"}, "input[1].call_id"),
    ({"type": "function_call", "call_id": "c1", "arguments": "{}"}, "input[1].name"),
    ({"type": "function_call", "call_id": "c1", "name": 5}, "input[1].name"),
    ({"type": "function_call", "call_id": "c1", "name": "f", "arguments": 5}, "input[1].arguments"),
])
def test_the_responses_api_names_the_input_item_it_refuses(fronts, item, param):
    body = {"model": "mock", "input": [{"role": "user", "content": "hi"}, item], "max_output_tokens": 1}
    r = fronts.httpx.post("/v1/responses", json=body)
    assert (r.status_code, r.json()["error"]["param"]) == (400, param), r.text
    assert r.json()["error"]["message"].startswith(param.split(".")[0]), r.text


def test_a_refusal_of_the_chat_made_of_the_input_names_the_input_item_it_came_from():
    """The chat checks run on the messages made of the input (instructions first, a function_call
    folded into the assistant message before it): their ``messages[k]`` is mapped back."""
    from jserve.http_responses import ResponsesRequest

    body = ResponsesRequest(model="m", instructions="be brief", input=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "let me see"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "4"}])
    body.chat_request()  # messages: system, user, assistant (+ the call), tool
    assert body.input_item("messages[3].tool_call_id", "message 3: bad id") == ("input[3].call_id",
                                                                                 "input[3]: bad id")
    assert body.input_item("messages[1].name", "message 1: name must be a string") == (
        "input[0].name", "input[0]: name must be a string")
    assert body.input_item("messages[2].tool_calls", "message 2: x") == ("input[1]", "input[1]: x")
    assert body.input_item("messages[0].content", "message 0: y") == ("instructions", "instructions: y")
    assert body.input_item("tool_choice", "z") == ("tool_choice", "z")
    text = ResponsesRequest(model="m", input="hi")
    text.chat_request()
    assert text.input_item("messages[0].content", "message 0: w") == ("input", "input: w")


@pytest.mark.parametrize("path, fields, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 40}], "max_tokens": 1}, "messages"),
    ("/v1/responses", {"input": "a" * 40, "max_output_tokens": 1}, "input"),
    ("/v1/completions", {"prompt": "a" * 40, "max_tokens": 1}, "prompt"),
])
def test_a_prompt_past_the_context_names_the_field_it_came_from(fronts, path, fields, param):
    r = fronts.httpx.post(path, json={"model": "mock", **fields})
    err = r.json()["error"]
    assert (r.status_code, err["param"], err["code"]) == (400, param, "context_length_exceeded"), err


# A number outside its field's range: OpenAI's codes name the field's kind (an integer or a
# "decimal", whatever the JSON number sent) and the bound passed, as its API answers
# ``temperature: 200`` with "decimal_above_max_value"; the message stays the request layer's.
RANGES = [
    ({"max_tokens": 0}, "max_tokens", "integer_below_min_value"),
    ({"n": 0}, "n", "integer_below_min_value"),
    ({"n": 17}, "n", "integer_above_max_value"),
    ({"top_k": -1}, "top_k", "integer_below_min_value"),
    ({"seed": -1}, "seed", "integer_below_min_value"),
    ({"seed": 2**64}, "seed", "integer_above_max_value"),
    ({"logprobs": 4}, "logprobs", "integer_above_max_value"),
    ({"temperature": -1}, "temperature", "decimal_below_min_value"),
    ({"top_p": 2}, "top_p", "decimal_above_max_value"),
    ({"top_p": -0.1}, "top_p", "decimal_below_min_value"),
    ({"min_p": 1.5}, "min_p", "decimal_above_max_value"),
    ({"repetition_penalty": 0}, "repetition_penalty", "decimal_below_min_value"),
    ({"presence_penalty": -2.5}, "presence_penalty", "decimal_below_min_value"),
    ({"frequency_penalty": 3}, "frequency_penalty", "decimal_above_max_value"),
    ({"timeout": 0}, "timeout", "decimal_below_min_value"),
    ({"logit_bias": {"3": 101}}, "logit_bias.3", "decimal_above_max_value"),
]


@pytest.mark.parametrize("fields, param, code", RANGES, ids=[f"{p}-{c}" for _, p, c in RANGES])
def test_http_range_errors_carry_openais_code_for_the_bound_passed(fronts, fields, param, code):
    r = fronts.httpx.post("/v1/completions", json={"model": "mock", "prompt": "hello", "max_tokens": 1, **fields})
    err = r.json()["error"]
    assert (r.status_code, err["type"], err["param"], err["code"]) == (400, "invalid_request_error", param, code), err


@pytest.mark.parametrize("prompt, param, message, code", [
    (["hello", ""], "prompt[1]", "prompt[1]: the prompt is empty", None),
    ([[4, 5], [], [6]], "prompt[1]", "prompt[1]: the prompt is empty", None),
    ([[4, 5], [6, 99]], "prompt[1][1]", "prompt[1]: token id 99 at index 1 is outside the vocabulary [0, 32)",
     "invalid_value"),
    (["hello", "a" * 40], "prompt[1]", "prompt[1]: the prompt has 40 tokens; this server accepts at most 32",
     "context_length_exceeded"),
    ("", "prompt", "the prompt is empty", None),
    ([], "prompt", "the prompt is empty", None),
    ([4, 99], "prompt[1]", "token id 99 at index 1 is outside the vocabulary [0, 32)", "invalid_value"),
])
def test_http_completions_name_the_prompt_of_a_batch_they_refuse(fronts, prompt, param, message, code):
    r = fronts.httpx.post("/v1/completions", json={"model": "mock", "prompt": prompt, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": message, "type": "invalid_request_error", "param": param, "code": code}
    wait_until(lambda: fronts.llm.orchestrator.num_running == 0, "nothing of the batch left running")


CHAT = [{"role": "user", "content": "hi"}]
ALIASES = [  # the field the client sent, not the request layer's name for it
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 50}, "top_logprobs",
     "top_logprobs must be in [0, 3] on this server, got 50"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens",
     "max_completion_tokens must be an integer >= 1, got 0"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a"] * 17}, "stop", "at most 16 stop strings are accepted, got 17"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, "stop", "stop strings must be non-empty strings"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": list(range(65))}, "stop_token_ids",
     "at most 64 stop_token_ids are accepted, got 65"),
]


@pytest.mark.parametrize("path, fields, param, message", ALIASES, ids=[a[2] for a in ALIASES])
def test_http_errors_name_the_field_as_the_client_sent_it(fronts, path, fields, param, message):
    r = fronts.httpx.post(path, json={"model": "mock", **fields})
    err = r.json()["error"]
    assert (r.status_code, err["param"], err["message"]) == (400, param, message)


def test_only_a_refused_prompt_is_named_as_an_item_of_the_batch():
    """A batch's full queue (429) or deadline is not the prompt's fault: no ``param``, its message as is."""
    from jserve.http_api import ApiError, _batch_item

    full = _batch_item(ApiError(429, "waiting queue is full", "server_error", code="queue_full"), 2)
    assert (full.param, full.message) == (None, "waiting queue is full")
    assert _batch_item(ApiError(429, "waiting queue is full", "server_error", code="queue_full"), None).param is None
    bad = _batch_item(ApiError(400, "the prompt is empty"), 2)
    assert (bad.param, bad.message) == ("prompt[2]", "prompt[2]: the prompt is empty")


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hello", "max_tokens": 10_000}),
    ("/v1/completions", {"prompt": [4] * 40, "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 10_000}),
])
def test_http_a_prompt_past_the_context_carries_openais_code(fronts, path, body):
    r = fronts.httpx.post(path, json={"model": "mock", **body})
    err = r.json()["error"]
    assert (r.status_code, err["type"], err["code"]) == (400, "invalid_request_error", "context_length_exceeded"), err


# OpenAI's own bounds, tighter than the request layer's where they differ: its API refuses
# ``temperature: 2.5`` ("between 0 and 2", decimal_above_max_value) and ``top_logprobs: 21``
# ("between 0 and 20"); gRPC and ``LLM`` keep the request layer's (any finite temperature >= 0).
OPENAI_BOUNDS = [
    ("/v1/completions", {"prompt": "hi", "temperature": 2.5}, "temperature",
     "temperature must be in [0, 2] (0 = greedy), got 2.5", "decimal_above_max_value"),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": 3}, "temperature",
     "temperature must be in [0, 2] (0 = greedy), got 3.0", "decimal_above_max_value"),
    ("/v1/responses", {"input": "hi", "temperature": 2.01}, "temperature",
     "temperature must be in [0, 2] (0 = greedy), got 2.01", "decimal_above_max_value"),
]


@pytest.mark.parametrize("path, fields, param, message, code", OPENAI_BOUNDS, ids=[b[0] for b in OPENAI_BOUNDS])
def test_http_refuses_a_temperature_past_openais_bound(fronts, path, fields, param, message, code):
    r = fronts.httpx.post(path, json={"model": "mock", "max_tokens" if path != "/v1/responses" else
                                      "max_output_tokens": 1, **fields})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": message, "type": "invalid_request_error", "param": param, "code": code}


def test_http_takes_openais_bounds_themselves_and_llm_any_finite_temperature(fronts):
    for path, fields in (("/v1/completions", {"prompt": [4], "temperature": 2, "top_p": 1, "presence_penalty": -2,
                                              "frequency_penalty": 2, "logit_bias": {"3": -100, "4": 100}}),
                         ("/v1/chat/completions", {"messages": CHAT, "temperature": 2.0})):
        r = fronts.httpx.post(path, json={"model": "mock", "max_tokens": 1, **fields})
        assert r.status_code == 200, r.text
    got = fronts.llm_answer([4, 5], {"temperature": 7.5, "max_tokens": 2})  # the gRPC / LLM range: >= 0
    assert got[0] != "error" and len(got[0]) == 2, got


def test_http_logprobs_past_openais_twenty_are_refused_where_the_server_allows_more():
    """OpenAI's top_logprobs is "between 0 and 20"; a server started with --max-logprobs 50 still
    refuses 21 over HTTP, naming the field as it was sent."""
    from jserve.http_schemas import ApiError, check_openai_bounds
    from jserve.sampling import SamplingParams

    check_openai_bounds(SamplingParams(logprobs=20, temperature=2.0))
    with pytest.raises(ApiError) as e:
        check_openai_bounds(SamplingParams(logprobs=21), {"logprobs": "top_logprobs"})
    assert (e.value.message, e.value.param, e.value.code) == (
        "top_logprobs must be in [0, 20], got 21", "top_logprobs", "integer_above_max_value")


# A list longer than the field takes: OpenAI's "array_above_max_length" (its answer to five stop
# strings, param "stop"); a string too long: "string_above_max_length" naming the item; a token
# id outside the vocabulary: "invalid_value" naming the item (``prompt[1]``, ``logit_bias.99``, as
# a field inside an object is named: ``stream_options.include_usage``).
ITEMS = [
    ("/v1/completions", {"prompt": "hi", "stop": ["a"] * 17}, "stop", "array_above_max_length"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b" * 1001]}, "stop[1]", "string_above_max_length"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": list(range(65))}, "stop_token_ids",
     "array_above_max_length"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [3, 99]}, "stop_token_ids[1]", "invalid_value"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"3": 1, "99": 1}}, "logit_bias.99", "invalid_value"),
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {"32": -1}}, "logit_bias.32", "invalid_value"),
    ("/v1/chat/completions", {"messages": CHAT * 1025}, "messages", "array_above_max_length"),
    ("/v1/completions", {"prompt": [4, 5, 32]}, "prompt[2]", "invalid_value"),
    ("/v1/completions", {"prompt": [[4], [4, 5, 6, -1]]}, "prompt[1][3]", "invalid_value"),
]


@pytest.mark.parametrize("path, fields, param, code", ITEMS, ids=[f"{i[2]}-{i[3]}" for i in ITEMS])
def test_http_long_lists_and_ids_outside_the_vocabulary_carry_openais_code_and_name_the_item(fronts, path, fields,
                                                                                             param, code):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=fronts.http_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:  # as the real client sees it
        client.post(path, body={"model": "mock", "max_tokens": 1, **fields}, cast_to=dict)
    assert (e.value.status_code, e.value.type, e.value.param, e.value.code) == (400, "invalid_request_error", param,
                                                                                code), e.value.message
