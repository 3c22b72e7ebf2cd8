"""Tool calling and the fields clients send, over HTTP with the official ``openai`` client, against a
real server on a tiny random model with a Qwen-style template (its ``<tool_call>`` markers special
tokens) and, for the generic fallback, the default SmolLM2. A random model writes garbage: every
forced call parsing and validating (``jsonschema``) is the grammar's doing."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from tokenizers import Tokenizer

from .tool_ckpt import QWEN_STYLE_TEMPLATE, shared_smollm2_server, shared_tool_server

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
ORDER = {"type": "object", "properties": {"item": {"type": "string", "maxLength": 8},
                                          "rush": {"type": "boolean"}},
         "required": ["item", "rush"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "place_order", "description": "Order.", "parameters": ORDER}}]
SCHEMAS = {"get_weather": WEATHER, "place_order": ORDER}
ASK = [{"role": "user", "content": "What is the weather in Oslo for 3 days?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_ckpt):
    return shared_tool_server(tmp_path_factory, real_ckpt)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"http://{server.http_address}/v1", api_key="unused", max_retries=0, timeout=120)


def _valid(name: str, arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def _streamed(chunks) -> dict[int, dict]:
    """Choices rebuilt from chunks: content, calls [(id, name, arguments)], finish reason."""
    out: dict[int, dict] = {}
    for chunk in chunks:
        for c in chunk.choices:
            ch = out.setdefault(c.index, {"content": "", "calls": {}, "finish": None})
            ch["content"] += c.delta.content or ""
            for d in c.delta.tool_calls or ():
                if d.id is not None:
                    ch["calls"][d.index] = [d.id, d.function.name, ""]
                ch["calls"][d.index][2] += d.function.arguments or ""
            ch["finish"] = c.finish_reason or ch["finish"]
    return out


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "place_order"}}])
def test_forced_calls_parse_and_validate_streamed_or_not_with_n_choices(oai, choice):
    kw = dict(model="tiny-tools", messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
              max_tokens=120, temperature=1.0, seed=11, n=3)
    whole = oai.chat.completions.create(**kw)
    streamed = _streamed(oai.chat.completions.create(stream=True, **kw))
    assert [c.index for c in whole.choices] == [0, 1, 2]
    for c in whole.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert len(c.message.tool_calls) == 1  # parallel_tool_calls false: one call
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        if isinstance(choice, dict):
            assert call.function.name == "place_order"
        _valid(call.function.name, call.function.arguments)
        s = streamed[c.index]  # the same seed: the same reply, call ids included
        assert s["finish"] == "tool_calls" and s["content"] == ""
        assert list(s["calls"].values()) == [[call.id, call.function.name, call.function.arguments]]


def test_required_with_parallel_calls_validates_every_call(oai):
    r = oai.chat.completions.create(model="tiny-tools", messages=ASK, tools=TOOLS, tool_choice="required",
                                    max_tokens=200, seed=5, n=2)
    for c in r.choices:
        assert c.message.tool_calls, c
        complete = c.message.tool_calls if c.finish_reason == "tool_calls" else c.message.tool_calls[:-1]
        assert c.finish_reason in ("tool_calls", "length")
        for call in complete:
            _valid(call.function.name, call.function.arguments)
        assert len({call.id for call in c.message.tool_calls}) == len(c.message.tool_calls)


def test_auto_gives_text_or_valid_calls_and_none_gives_text(oai):
    r = oai.chat.completions.create(model="tiny-tools", messages=ASK, tools=TOOLS, tool_choice="auto",
                                    max_tokens=40, seed=3, n=4)
    for c in r.choices:
        assert "<tool_call>" not in (c.message.content or "")
        for call in c.message.tool_calls or ():
            if c.finish_reason == "tool_calls":
                _valid(call.function.name, call.function.arguments)
    r = oai.chat.completions.create(model="tiny-tools", messages=ASK, tools=TOOLS, tool_choice="none",
                                    max_tokens=20, seed=3)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_calls_carry_every_tokens_logprobs(oai):
    kw = dict(model="tiny-tools", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {
        "name": "get_weather"}}, max_tokens=60, seed=4, logprobs=True)
    whole = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(stream=True, **kw))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    expected = whole.choices[0].logprobs.content
    assert len(expected) == whole.usage.completion_tokens
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in expected]


def test_stop_strings_cut_the_reply_whose_markers_are_kept(oai):
    """With ``<tool_call>`` a special token the reply is detokenized with it kept; a stop
    string still ends that text where it starts, streamed or not."""
    kw = dict(model="tiny-tools", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=60, seed=2, n=2,
              stop=["a"])  # "a" comes early in any call: '{"name": "get_weather", "arguments"'
    whole = oai.chat.completions.create(**kw)
    streamed = _streamed(oai.chat.completions.create(stream=True, **kw))
    for c in whole.choices:
        assert c.finish_reason == "stop"  # cut inside the call's name: no call survives
        assert "a" not in (c.message.content or "") and not c.message.tool_calls
        assert streamed[c.index]["content"] == (c.message.content or "") and not streamed[c.index]["calls"]


def test_history_with_calls_and_results_renders_as_transformers_does(server, oai):
    """The prompt jserve renders (its token count) equals transformers' ``apply_chat_template`` of the
    same messages and tools with the same template (arguments as objects, as transformers wants)."""
    from transformers import PreTrainedTokenizerFast

    ckpt = server.proc.args[server.proc.args.index("--checkpoint") + 1]
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(f"{ckpt}/tokenizer.json"))
    args = {"city": "Oslo", "days": 3}
    history = [{"role": "developer", "content": "Be brief."}, *ASK,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(args)}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
               {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "Lima?"}]}]
    r = oai.chat.completions.create(model="tiny-tools", messages=history, tools=TOOLS, max_tokens=1)
    ref_messages = [dict(history[0], role="system"), *ASK,
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
                    history[3], {"role": "user", "content": "And Lima?"}]
    ids = hf.apply_chat_template(ref_messages, tools=TOOLS, chat_template=QWEN_STYLE_TEMPLATE, tokenize=True,
                                 add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert r.usage.prompt_tokens == len(ids)


def _status(oai, **kw) -> tuple[int, str | None, str]:
    try:
        oai.chat.completions.create(model="tiny-tools", max_tokens=2, **kw)
        return 200, None, ""
    except openai.APIStatusError as e:
        return e.status_code, e.body.get("param"), e.body.get("message", "")


def test_platform_fields_are_ignored_and_unimplemented_output_fields_refused_by_name(oai):
    assert _status(oai, messages=ASK, user="u1", metadata={"k": "v"}, store=False, service_tier="auto",
                   prompt_cache_key="x", safety_identifier="s", stop="x", modalities=["text"])[0] == 200
    for field, value in [("prediction", {"type": "content", "content": "x"}), ("reasoning_effort", "low"),
                         ("audio", {"voice": "alloy", "format": "wav"}),
                         ("functions", [{"name": "f", "parameters": {}}])]:
        status, param, message = _status(oai, messages=ASK, extra_body={field: value})
        assert (status, param) == (400, field) and field in message
    status, param, _ = _status(oai, messages=ASK, extra_body={"max_tokens": 3, "max_completion_tokens": 4})
    assert (status, param) == (400, "max_completion_tokens")
    status, param, message = _status(oai, messages=ASK, tools=TOOLS, tool_choice="required",
                                     response_format={"type": "json_object"})
    assert (status, param) == (400, "tool_choice") and "response_format" in message
    status, param, message = _status(oai, messages=ASK, tools=TOOLS, tool_choice={
        "type": "function", "function": {"name": "nope"}})
    assert (status, param) == (400, "tool_choice") and "nope" in message
    assert _status(oai, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
                   )[0] == 400


def test_logit_bias_and_the_json_schema_field(server, oai):
    ckpt = server.proc.args[server.proc.args.index("--checkpoint") + 1]
    tok = Tokenizer.from_file(f"{ckpt}/tokenizer.json")
    target = tok.token_to_id("Paris")
    r = oai.chat.completions.create(model="tiny-tools", messages=ASK, max_tokens=4, temperature=0,
                                    logit_bias={str(target): 100})
    assert r.choices[0].message.content == tok.decode([target] * 4)
    for bias, param in [({"49154": 1}, "logit_bias"), ({str(target): 101}, "logit_bias"),
                        ({str(i): 1 for i in range(301)}, "logit_bias"), ({"abc": 1}, "logit_bias")]:
        status, _, message = _status(oai, messages=ASK, logit_bias=bias)
        assert status == 400 and param in message, message
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    r = oai.chat.completions.create(model="tiny-tools", messages=ASK, max_tokens=30, extra_body={"json_schema": schema})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


@pytest.fixture(scope="module")
def smollm(real_ckpt):
    s = shared_smollm2_server(real_ckpt)
    return openai.OpenAI(base_url=f"http://{s.http_address}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.parametrize("stream", [False, True])
def test_the_default_model_calls_tools_through_the_generic_fallback(smollm, stream):
    model = smollm.models.list().data[0].id
    choice = "required" if not stream else {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=60, temperature=0,
              parallel_tool_calls=False)
    if stream:
        got = _streamed(smollm.chat.completions.create(stream=True, **kw))[0]
        calls, finish = [(n, a) for _, n, a in got["calls"].values()], got["finish"]
    else:
        c = smollm.chat.completions.create(**kw).choices[0]
        calls, finish = [(t.function.name, t.function.arguments) for t in c.message.tool_calls], c.finish_reason
    assert finish == "tool_calls" and len(calls) == 1
    _valid(*calls[0])
    if stream:
        assert calls[0][0] == "get_weather"
