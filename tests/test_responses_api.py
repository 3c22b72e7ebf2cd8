"""``POST /v1/responses`` through the official client's ``client.responses.create`` (streamed and not),
and the smaller endpoints (``/tokenize``, ``/detokenize``, ``GET /v1/models/{id}``, 404/405 bodies),
against the shared tiny tool-capable server; token ids checked against HF ``tokenizers``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import jsonschema
import openai
import pytest
from tokenizers import Tokenizer

from .tool_ckpt import shared_tool_server

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The forecast.", "parameters": WEATHER}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_ckpt):
    return shared_tool_server(tmp_path_factory, real_ckpt)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"http://{server.http_address}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf(server):
    ckpt = server.proc.args[server.proc.args.index("--checkpoint") + 1]
    return Tokenizer.from_file(f"{ckpt}/tokenizer.json")


def _call(server, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{server.http_address}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_tokenize_and_detokenize_in_llama_cpp_shapes(server, hf):
    text = "Hello <tool_call> wörld 🤗"
    status, body = _call(server, "POST", "/tokenize", {"content": text})
    assert status == 200 and body == {"tokens": hf.encode(text, add_special_tokens=False).ids}
    status, pieces = _call(server, "POST", "/tokenize", {"content": text, "with_pieces": True})
    assert [p["id"] for p in pieces["tokens"]] == body["tokens"]
    for p in pieces["tokens"]:  # a piece is its text, or its bytes when they are not UTF-8 by themselves
        if isinstance(p["piece"], str):
            assert p["piece"] == hf.decode([p["id"]], skip_special_tokens=False)
    assert any(isinstance(p["piece"], list) for p in pieces["tokens"])  # the emoji's byte tokens
    assert b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode()
                    for p in pieces["tokens"]).decode() == hf.decode(body["tokens"], skip_special_tokens=False)
    status, back = _call(server, "POST", "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back == {"content": hf.decode(body["tokens"], skip_special_tokens=False)}
    status, err = _call(server, "POST", "/detokenize", {"tokens": [hf.get_vocab_size() + 5]})
    assert status == 400 and err["error"]["param"] == "tokens"


def test_models_by_id_and_openai_shaped_404_and_405(server, oai):
    assert oai.models.retrieve("tiny-tools").id == "tiny-tools"
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("gpt-5")
    assert e.value.body["code"] == "model_not_found"
    status, body = _call(server, "GET", "/v1/nothing/here")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "not_found" and "/v1/nothing/here" in body["error"]["message"]
    status, body = _call(server, "DELETE", "/v1/chat/completions")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


def test_text_input_and_instructions(oai):
    r = oai.responses.create(model="tiny-tools", input="Hello there", instructions="Be brief.",
                             max_output_tokens=8, temperature=0)
    chat = oai.chat.completions.create(model="tiny-tools", max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    assert r.object == "response" and r.output[0].type == "message"
    assert r.output[0].content[0].type == "output_text"
    assert r.output_text == chat.choices[0].message.content  # the same request as a chat completion
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    items = oai.responses.create(model="tiny-tools", max_output_tokens=8, temperature=0, input=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello there"}]}])
    assert items.output_text == r.output_text


def test_forced_function_calls_streamed_and_not(oai):
    kw = dict(model="tiny-tools", input="Weather in Oslo?", tools=TOOLS, max_output_tokens=120, temperature=0,
              tool_choice={"type": "function", "name": "get_weather"})
    r = oai.responses.create(**kw)
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    events = list(oai.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed" and [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas == done[0].arguments == calls[0].arguments  # greedy: the same call
    final = events[-1].response.output
    assert [(o.name, o.arguments) for o in final] == [(calls[0].name, calls[0].arguments)]


def test_streamed_text_events_and_json_schema_format(oai):
    events = list(oai.responses.create(model="tiny-tools", input="Hi", max_output_tokens=6, temperature=0,
                                       stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = [e for e in events if e.type == "response.output_text.done"]
    assert done and done[0].text == text == events[-1].response.output_text
    assert events[-1].type in ("response.completed", "response.incomplete")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    r = oai.responses.create(model="tiny-tools", input="A number", max_output_tokens=30,
                             text={"format": {"type": "json_schema", "name": "num", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)


def test_call_history_items_and_refusals(oai):
    history = [{"role": "user", "content": "Weather?"},
               {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                "arguments": json.dumps({"city": "Oslo", "days": 2})},
               {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
    r = oai.responses.create(model="tiny-tools", input=history, tools=TOOLS, tool_choice="none", max_output_tokens=4)
    assert all(o.type == "message" for o in r.output)
    for kw, param in [({"previous_response_id": "resp_1"}, "previous_response_id"),
                      ({"tools": [{"type": "web_search"}]}, "tools"), ({"background": True}, "background")]:
        with pytest.raises(openai.BadRequestError) as e:
            oai.responses.create(model="tiny-tools", input="Hi", max_output_tokens=4, **kw)
        assert e.value.body["param"] == param
    assert oai.responses.create(model="tiny-tools", input="Hi", max_output_tokens=2, store=True,
                                metadata={"k": "v"}, user="u").status in ("completed", "incomplete")
