"""Tool calling over gRPC against a real server process: forced calls always parse and validate (a
random model, the grammar enforcing them), streamed as typed deltas; ``auto`` gives text or valid
calls; a tool loop's history renders; logit_bias reaches the device; bad input is refused precisely."""

from __future__ import annotations

import json
import pathlib

import grpc
import jsonschema
import pytest

from jserve.client import Client
from jserve.tools import FORMATS, get_format, parse_reply
from jserve.v1 import jserve_pb2 as pb

from .tool_ckpt import shared_smollm2_server, shared_tool_server

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                                        "b": {"type": "integer", "minimum": -999, "maximum": 999}},
       "required": ["a", "b"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [{"type": "function", "function": {"name": n, "description": f"the {n} tool", "parameters": s}}
         for n, s in SCHEMAS.items()]
CHAT = [{"role": "user", "content": "What is the weather in Paris? And 2 + 3?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_ckpt):
    # The session's tiny tool server (the HTTP tests' too): the template's tool instructions alone are
    # ~190 tokens, and its 384 prompt positions leave room for them, the tools and a call.
    return shared_tool_server(tmp_path_factory, real_ckpt)


@pytest.fixture(scope="module")
def tool_ckpt(server):
    return pathlib.Path(server.proc.args[server.proc.args.index("--checkpoint") + 1])


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address) as c:
        yield c


def _stream(client, **kwargs):
    """The streamed responses and the calls they add up to (checking the deltas' shape)."""
    responses = list(client.stream(CHAT, **kwargs))
    calls: dict[int, list[str]] = {}
    for r in responses:
        for d in r.tool_calls:
            if d.index not in calls:
                assert d.id.startswith("call_") and d.name, "a call's first delta names it"
                assert d.index == len(calls), "calls are numbered in order"
                calls[d.index] = [d.id, d.name, ""]
            else:
                assert not d.id and not d.name, "only a call's first delta has its id and name"
            calls[d.index][2] += d.arguments
    return responses, [tuple(calls[i]) for i in sorted(calls)]


def _valid(calls, names=SCHEMAS) -> None:
    for _, name, arguments in calls:
        assert name in names
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("seed", range(3))  # the HTTP tests draw 3 choices x 2 more (test_http_tools)
def test_required_always_gives_a_call_that_parses_and_validates(client, seed):
    kwargs = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed,
                  max_tokens=150)
    responses, calls = _stream(client, **kwargs)
    assert responses[-1].finish_reason == pb.TOOL_CALLS
    assert len(calls) == 1 and "".join(r.text for r in responses).strip() == ""
    _valid(calls)
    folded = client.complete(CHAT, **kwargs)
    assert folded.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments) for c in folded.tool_calls] == calls  # same seed: the same ids too


@pytest.mark.parametrize("seed", range(2))
def test_a_named_function_is_the_one_called(client, seed):
    responses, calls = _stream(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                               parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=150)
    assert responses[-1].finish_reason == pb.TOOL_CALLS
    assert [name for _, name, _ in calls] == ["add"]
    _valid(calls)


def test_parallel_calls_each_validate(client):
    """Parallel calls (the default): every call the reply completes validates; only a reply cut by
    max_tokens may end inside one."""
    counts = []
    for seed in range(4):
        responses, calls = _stream(client, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed,
                                   max_tokens=200)
        done = responses[-1].finish_reason == pb.TOOL_CALLS
        assert done or responses[-1].finish_reason == pb.LENGTH
        _valid(calls if done else calls[:-1])
        counts.append(len(calls))
    assert max(counts) > 1, "the grammar never let the model make a second call"


@pytest.mark.parametrize("fmt", ["generic", "mistral"])
def test_a_requests_format_override_is_enforced_and_parsed(client, fmt):
    """The calls also come out when the request asks for another family's format than the
    checkpoint's (the grammar writes that format; the server parses it)."""
    assert fmt in FORMATS
    responses, calls = _stream(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                               tool_call_format=fmt, temperature=1.0, seed=3, max_tokens=150)
    assert calls and responses[-1].finish_reason == pb.TOOL_CALLS
    _valid(calls)


def test_auto_gives_text_or_valid_calls(client):
    kinds = set()
    for seed in range(8):
        responses, calls = _stream(client, tools=TOOLS, tool_choice="auto", temperature=1.0, seed=seed,
                                   max_tokens=60)
        last = responses[-1]
        if calls:
            kinds.add("calls")
            if last.finish_reason == pb.TOOL_CALLS:
                _valid(calls)
        else:
            kinds.add("text")
            assert "<tool_call>" not in "".join(r.text for r in responses)
    assert kinds


def test_greedy_auto_text_equals_the_host_parse_of_the_tokens(client, server):
    """With tool_choice "none" the reply is all content: the same text the plain request gives."""
    plain = client.complete(CHAT, temperature=0.0, max_tokens=20)
    none = client.complete(CHAT, tools=TOOLS, tool_choice="none", temperature=0.0, max_tokens=20)
    assert none.tool_calls == [] and none.finish_reason in ("stop", "length")
    assert parse_reply(none.text, get_format("hermes")).tool_calls == ()
    assert plain.completion_tokens > 0


def test_a_tool_loop_history_is_rendered(client, tool_ckpt):
    history = CHAT + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    ids = client.tokenize(chat=history)
    text = _decode(tool_ckpt, ids)
    assert '"name": "add"' in text and "<tool_response>\n5\n</tool_response>" in text
    done = client.complete(history, tools=TOOLS, tool_choice="auto", temperature=0.0, max_tokens=8)
    assert done.prompt_tokens > len(ids) - 1  # the tools are in the system turn as well


def _decode(ckpt, ids):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(ckpt / "tokenizer.json")).decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_greedy_tool_calls_are_the_same_over_http_and_grpc(client, server, choice):
    """The same plan, grammar and parser behind both front ends: greedy gives the same calls."""
    import urllib.request

    with urllib.request.urlopen(f"http://{server.http_address}/v1/models", timeout=30) as r:
        model = json.loads(r.read())["data"][0]["id"]
    body = {"model": model, "messages": CHAT, "tools": TOOLS, "tool_choice": choice, "temperature": 0.0,
            "max_tokens": 150, "parallel_tool_calls": False}
    req = urllib.request.Request(f"http://{server.http_address}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        http = json.loads(r.read())["choices"][0]
    grpc_got = client.complete(CHAT, tools=TOOLS, tool_choice=choice, temperature=0.0, max_tokens=150,
                               parallel_tool_calls=False)
    assert http["finish_reason"] == grpc_got.finish_reason == "tool_calls"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in http["message"]["tool_calls"]] == \
        [(c.name, c.arguments) for c in grpc_got.tool_calls]


def test_logit_bias_over_grpc_forces_a_token(client):
    got = client.complete("Hello", temperature=0.0, max_tokens=5, ignore_eos=True, logit_bias={4242: 100.0})
    assert got.token_ids == [4242] * 5


@pytest.mark.parametrize("prompt, kwargs, message", [
    ("plain text", dict(tools=TOOLS), "tools and tool_choice need chat input"),
    (CHAT, dict(tools=TOOLS, tool_choice={"function": "nope"}), "names the function 'nope', which is not in tools"),
    (CHAT, dict(tools=[{"name": "f", "parameters": "{not json"}]), "tools[0].parameters is not valid JSON"),
    (CHAT, dict(tools=TOOLS, tool_choice="required", json_schema={"type": "object"}), "cannot also set json_schema"),
    (CHAT, dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice must be"),
    (CHAT, dict(tool_choice="required"), "needs at least one tool"),
    (CHAT, dict(tools=TOOLS, tool_call_format="xml"), "unknown tool-call format 'xml'"),
    ("Hi", dict(logit_bias={10**7: 1.0}), "logit_bias token id 10000000 is outside the vocabulary"),
    ("Hi", dict(logit_bias={5: 200.0}), "logit_bias values must be in [-100, 100], got 200.0 for token id 5"),
])
def test_bad_tool_requests_get_invalid_argument(client, prompt, kwargs, message):
    with pytest.raises(grpc.RpcError) as e:
        client.complete(prompt, max_tokens=4, **kwargs)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()


def test_model_info_names_the_detected_format(client):
    assert client.model_info().tool_call_format == "hermes"


@pytest.fixture(scope="module")
def smollm2_server(real_ckpt):
    return shared_smollm2_server(real_ckpt)


def test_default_smollm2_gets_the_generic_fallback_and_valid_calls(smollm2_server):
    with Client(smollm2_server.address) as c:
        assert c.model_info().tool_call_format == "generic"
        got = c.complete(CHAT, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0.0,
                         max_tokens=200)
    assert got.finish_reason == "tool_calls" and len(got.tool_calls) == 1, got
    _valid([(t.id, t.name, t.arguments) for t in got.tool_calls])
