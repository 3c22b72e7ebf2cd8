"""Tool calling's transport-free core: validation, the families' formats parsed whole and streamed
(any chunking gives the same calls and content, markup never leaks), the generic fallback's
messages and the plan a request follows (the grammars: tests/test_tool_grammars.py)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from jserve import InvalidRequestError
from jserve.tools import (
    FORMATS,
    ToolCallDelta,
    ToolChoice,
    ToolStreamParser,
    collect,
    detect_format,
    get_format,
    messages_for_template,
    parse_reply,
    parse_tool_choice,
    parse_tools,
    plan_tools,
    rewrite_messages,
    tool_constraint,
)

from .tool_cases import NOARGS, O_ARGS, TOOLS_JSON, W_ARGS, load_tokenizer_cached


@pytest.fixture(scope="module")
def tools():
    return parse_tools(TOOLS_JSON)


# Validation ---------------------------------------------------------------------------------------------

def test_tools_parse_into_typed_tools_that_give_back_the_openai_json(tools):
    assert [t.name for t in tools] == ["get_weather", "place_order", "ping"]
    assert [t.openai() for t in tools] == TOOLS_JSON
    bare = parse_tools([{"type": "function", "function": {"name": "now"}}])[0]
    assert bare.schema == {"type": "object", "properties": {}} and bare.description == ""
    assert parse_tools(None) == ()


def _fn(name="f", **extra):
    return {"type": "function", "function": {"name": name, **extra}}


@pytest.mark.parametrize("value, message", [
    ({"type": "function"}, "tools must be a list"),
    ([{"type": "retrieval"}], "tools[0] must be an object with \"type\": \"function\""),
    ([{"type": "function", "function": "f"}], "tools[0].function must be an object"),
    ([_fn("has space")], "tools[0].function.name must be 1-64 letters"),
    ([_fn("x" * 65)], "tools[0].function.name must be 1-64 letters"),
    ([_fn("a"), _fn("b"), _fn("a")], "tools: the name 'a' is given twice"),
    ([_fn(parameters=[1])], "tools: the parameters of 'f' must be a JSON schema object, not list"),
    ([_fn(parameters={"type": "array"})], "tools: the parameters of 'f' must be an object schema"),
    ([_fn(parameters={"type": "object", "properties": {"a": {"type": "banana"}}})],
     "tools: the parameters of 'f' is not a usable JSON schema"),
    ([_fn(description=3)], "tools[0].function.description must be a string"),
    ([_fn(returns={})], "tools[0].function has unknown fields: returns"),
])
def test_bad_tools_are_refused_with_a_message_naming_the_field(value, message):
    with pytest.raises(InvalidRequestError) as e:
        parse_tools(value)
    assert message in str(e.value)


def test_each_distinct_tool_schema_is_compiled_once_while_kept(monkeypatch):
    """Validating a schema compiles it with llguidance (counted here at llguidance's own entry
    point); an agent resending the same tools (keys in any order) compiles nothing more, a bad
    schema stays refused, and only the last ``CACHED`` distinct schemas are kept."""
    import llguidance

    from jserve.tools import types

    real = llguidance.LLMatcher
    compiled: list[str] = []

    def grammar_from_json_schema(schema, *args, **kwargs):
        compiled.append(json.dumps(schema, sort_keys=True))
        return real.grammar_from_json_schema(schema, *args, **kwargs)

    monkeypatch.setattr(llguidance, "LLMatcher", SimpleNamespace(grammar_from_json_schema=grammar_from_json_schema,
                                                                 validate_grammar=real.validate_grammar))
    monkeypatch.setattr(types, "_schema_error", types._SchemaVerdicts())
    parse_tools(TOOLS_JSON)
    assert len(compiled) == 3
    for _ in range(3):  # the next turns: the same tools, one with its keys reordered
        reordered = parse_tools(TOOLS_JSON[:2] + [_fn("ping", parameters=dict(reversed(NOARGS.items())))])
        assert [t.schema for t in parse_tools(TOOLS_JSON)] == [t.schema for t in reordered]
    assert len(compiled) == 3
    bad = [_fn(parameters={"type": "object", "properties": {"a": {"type": "banana"}}})]
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match="not a usable JSON schema"):
            parse_tools(bad)
    assert len(compiled) == 4
    cached = types._SchemaVerdicts.CACHED
    for i in range(cached):  # as many new schemas as are kept: the first ones are dropped
        parse_tools([_fn(parameters={"type": "object", "properties": {f"p{i}": {"type": "integer"}}})])
    assert len(compiled) == 4 + cached
    parse_tools(TOOLS_JSON)
    assert len(compiled) == 4 + cached + 3 and types._schema_error.compiles == len(compiled)


def test_tool_choice_defaults_and_named_functions_are_checked_against_the_tools(tools):
    assert parse_tool_choice(None, tools) == ToolChoice("auto")
    assert parse_tool_choice(None, ()) == ToolChoice("none")
    assert parse_tool_choice("required", tools).forced
    named = parse_tool_choice({"type": "function", "function": {"name": "ping"}}, tools)
    assert named == ToolChoice("function", "ping") and named.forced
    for value, message in [
        ("sometimes", "tool_choice must be \"none\", \"auto\", \"required\" or a named function"),
        ({"type": "function", "function": {"name": "fly"}},
         "tool_choice names the function 'fly', which is not in tools (tools: get_weather, place_order, ping)"),
        ({"type": "function"}, "tool_choice must be a string or"),
    ]:
        with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_tool_choice(value, tools)
    with pytest.raises(InvalidRequestError, match="needs at least one tool"):
        parse_tool_choice("required", ())


def test_formats_are_detected_from_the_template_then_the_vocabulary():
    qwen = "{% if tools %}...<tool_call>\\n{{ tool_call | tojson }}\\n</tool_call>{% endif %}"
    assert detect_format(qwen).name == "hermes"
    assert detect_format("{{ '[TOOL_CALLS]' + tool_calls|tojson }}").name == "mistral"
    assert detect_format("{% if tools %}<|start_header_id|>ipython<|end_header_id|>{% endif %}<|eot_id|>").name \
        == "llama3"
    assert detect_format("{% for t in tools %}{{ t }}{% endfor %}", vocab={"<tool_call>": 5}).name == "hermes"
    smol = load_tokenizer_cached()
    assert detect_format(smol.cfg.chat_template, smol.tok.get_vocab()).name == "generic"
    with pytest.raises(InvalidRequestError, match="unknown tool-call format 'xml'"):
        get_format("xml")


# Parsing ------------------------------------------------------------------------------------------------


# (format, reply, expected content, expected [(name, arguments dict)]) written out by hand.
CASES = [
    ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {W_ARGS}}}\n</tool_call>', None,
     [("get_weather", json.loads(W_ARGS))]),
    ("hermes", f'Let me check.\n\n<tool_call>\n{{"name": "get_weather", "arguments": {W_ARGS}}}\n</tool_call>\n'
               f'<tool_call>\n{{"name": "place_order", "arguments": {O_ARGS}}}\n</tool_call>\nDone.',
     "Let me check.Done.", [("get_weather", json.loads(W_ARGS)), ("place_order", json.loads(O_ARGS))]),
    ("hermes", '<tool_call>{"arguments": {"x": 1}, "name": "ping"}</tool_call>', None, [("ping", {"x": 1})]),
    ("hermes", '<tool_call>\n{"name": "ping", "arguments": "{\\"x\\": 1}"}\n</tool_call>', None, [("ping", {"x": 1})]),
    ("hermes", 'a < b and <tool_call>\n{"name": get_weather}\n</tool_call> c <tool_',
     'a < b and <tool_call>\n{"name": get_weather}\n</tool_call> c <tool_', []),
    ("hermes", 'x <tool_call>{"name": "f", "arguments": {"a": [1}}</tool_call>', None, None),  # bad JSON: see below
    ("llama3", f'{{"name": "get_weather", "parameters": {W_ARGS}}}', None, [("get_weather", json.loads(W_ARGS))]),
    ("llama3", f'<|python_tag|>{{"name": "get_weather", "parameters": {W_ARGS}}}; '
               f'{{"name": "place_order", "parameters": {O_ARGS}}}', None,
     [("get_weather", json.loads(W_ARGS)), ("place_order", json.loads(O_ARGS))]),
    ("llama3", 'The answer is {"name": "x"}.', 'The answer is {"name": "x"}.', []),
    ("llama3", '{"answer": 42}', '{"answer": 42}', []),
    ("mistral", f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {W_ARGS}}}, '
                f'{{"name": "ping", "arguments": {{}}}}]', None, [("get_weather", json.loads(W_ARGS)), ("ping", {})]),
    ("mistral", 'Sure: [TOOL_CALLS][{"name": "ping", "arguments": {}}]', "Sure:", [("ping", {})]),
    ("mistral", '[TOOL_CALLS] not a list', '[TOOL_CALLS] not a list', []),
    # Cut short by max_tokens after a call: the partial markup is dropped; a malformed block is content.
    ("hermes", '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_', None, [("ping", {})]),
    ("hermes", '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\n<tool_ca', None, [("ping", {})]),
    ("hermes", '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\n<tool_call>\n{"na', None,
     [("ping", {})]),
    ("hermes", '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": x}',
     '<tool_call>\n{"name": x}', [("ping", {})]),
    ("mistral", '[TOOL_CALLS][{"name": "ping", "arguments": {}}, {"na', None, [("ping", {})]),
    ("llama3", '{"name": "ping", "parameters": {}}; {"name": "get_weather", "param', None, [("ping", {})]),
    ("generic", f'  {{"tool_calls": [{{"name": "place_order", "arguments": {O_ARGS}}}]}}', None,
     [("place_order", json.loads(O_ARGS))]),
    ("generic", '{"answer": "tool_calls"}', '{"answer": "tool_calls"}', []),
    ("generic", 'Plain words { and braces }\n', 'Plain words { and braces }\n', []),
]


@pytest.mark.parametrize("fmt, reply, content, calls", [c for c in CASES if c[3] is not None])
def test_replies_parse_into_content_and_calls_for_each_format(fmt, reply, content, calls):
    got = parse_reply(reply, get_format(fmt), random.Random(0))
    assert got.content == content
    assert [(c.name, json.loads(c.arguments)) for c in got.tool_calls] == calls
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in got.tool_calls)
    assert len({c.id for c in got.tool_calls}) == len(calls)


def test_a_call_with_broken_arguments_keeps_what_was_generated_like_a_truncated_one():
    got = parse_reply('<tool_call>\n{"name": "f", "arguments": {"a": "tru', get_format("hermes"))
    assert got.content is None and [(c.name, c.arguments) for c in got.tool_calls] == [("f", '{"a": "tru')]


def test_call_ids_are_drawn_from_the_given_rng():
    reply = FORMATS["hermes"].render([("ping", "{}"), ("ping", "{}")])
    ids = [c.id for c in parse_reply(reply, FORMATS["hermes"], random.Random(7)).tool_calls]
    assert ids == [c.id for c in parse_reply(reply, FORMATS["hermes"], random.Random(7)).tool_calls]
    assert ids != [c.id for c in parse_reply(reply, FORMATS["hermes"], random.Random(8)).tool_calls]


def _stream(fmt, reply, cuts, seed=0):
    parser = ToolStreamParser(get_format(fmt), random.Random(seed))
    deltas, last = [], 0
    for cut in [*cuts, len(reply)]:
        deltas += parser.feed(reply[last:cut])
        last = cut
    return deltas + parser.finish()


MARKUP = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", '"tool_calls"')


@pytest.mark.parametrize("fmt, reply, content", [c[:3] for c in CASES])
def test_streaming_in_any_chunking_gives_the_whole_parse_and_never_leaks_markup(fmt, reply, content):
    whole = parse_reply(reply, get_format(fmt), random.Random(0))
    rng = random.Random(reply)
    chunkings = [list(range(1, len(reply)))] + [
        sorted(rng.sample(range(1, len(reply)), rng.randint(1, len(reply) // 3))) for _ in range(20)]
    for cuts in chunkings:
        deltas = _stream(fmt, reply, cuts)
        assert collect(deltas) == whole
        seen: set[int] = set()
        for d in deltas:
            if isinstance(d, ToolCallDelta):  # id, type and name first, then argument fragments only
                assert (d.index not in seen) == (d.id is not None) == (d.name is not None)
                assert d.index == len(seen) - (d.index in seen)
                seen.add(d.index)
        pieces = [d for d in deltas if isinstance(d, str)]
        assert all(pieces)
        if whole.tool_calls and not any(m in (content or "") for m in MARKUP):  # not a malformed block
            assert not any(m in p for p in pieces for m in MARKUP), pieces
    first = next(d for d in _stream(fmt, reply, []) if isinstance(d, ToolCallDelta)) if whole.tool_calls else None
    if first is not None:
        assert first.openai() == {"index": 0, "id": whole.tool_calls[0].id, "type": "function",
                                  "function": {"name": whole.tool_calls[0].name, "arguments": first.arguments}}


def test_text_that_may_start_a_marker_is_held_back_until_known():
    parser = ToolStreamParser(get_format("hermes"), random.Random(0))
    assert parser.feed("Hi <tool") == ["Hi"]
    assert parser.feed("box> ok") == [" <toolbox> ok"]
    assert parser.feed(" <tool_call>\n{\"name\": \"ping\", ") == []
    out = parser.feed('"arguments": {"a"')
    assert [(d.name, d.arguments) for d in out] == [("ping", ""), (None, '{"a"')]
    assert [d.arguments for d in parser.feed(": 1}}\n</tool_call>")] == [": 1}"]
    assert parser.finish() == []


# The generic fallback's messages --------------------------------------------------------------------------

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": W_ARGS}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "25 C"},
]


def test_generic_fallback_puts_tools_in_the_system_turn_and_history_calls_in_plain_turns(tools):
    f = FORMATS["generic"]
    out = rewrite_messages(HISTORY, tools, f, ToolChoice("auto"))
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in out)
    system = out[0]["content"]
    assert system.startswith("Be brief.\n\n")
    schemas = [json.loads(line) for line in system.splitlines() if line.startswith('{"name": ')]
    assert schemas == [{"name": t.name, "description": t.description, "parameters": t.schema} for t in tools]
    assert '{"tool_calls": [{"name": "tool_name", "arguments": {"argument": "value"}}]}' in system
    assert "plain text" in system
    replayed = parse_reply(out[2]["content"], f)
    assert [(c.name, json.loads(c.arguments)) for c in replayed.tool_calls] == [
        ("get_weather", json.loads(W_ARGS)), ("get_weather", {"city": "Rome", "unit": "celsius"})]
    assert out[3]["content"] == ("Result of get_weather (call call_1):\n21 C\n\n"
                                 "Result of get_weather (call call_2):\n25 C")
    named = rewrite_messages(HISTORY[1:2], tools, f, ToolChoice("function", "ping"), parallel=False)
    assert named[0]["role"] == "system" and "You must call the tool ping now." in named[0]["content"]
    assert "Call one tool at a time." in named[0]["content"]
    assert rewrite_messages(HISTORY[:2], (), f, ToolChoice("none")) == HISTORY[:2]
    rendered = load_tokenizer_cached().render_chat(out)  # the real SmolLM2 template renders it
    assert "Result of get_weather (call call_2):\n25 C" in rendered and '"tool_calls"' in rendered


def test_templates_with_tools_get_the_arguments_as_objects():
    out = messages_for_template(HISTORY)
    assert out[2]["tool_calls"][0]["function"]["arguments"] == json.loads(W_ARGS)
    assert HISTORY[2]["tool_calls"][0]["function"]["arguments"] == W_ARGS  # the input is left alone
    assert out[3:] == HISTORY[3:] and out[:2] == HISTORY[:2]


# The plan a request layer follows ---------------------------------------------------------------------------

QWEN_STYLE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n"
    "Reply with <tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for tc in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
    "{{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")


def test_the_plan_renders_tools_natively_or_through_the_generic_fallback(tools):
    import jinja2.sandbox

    smol = load_tokenizer_cached()
    vocab, special = smol.tok.get_vocab(), smol.cfg.special_ids
    generic = plan_tools(HISTORY, TOOLS_JSON, "required", chat_template=smol.cfg.chat_template, vocab=vocab,
                         special_ids=special)
    assert generic.format.name == "generic" and generic.template_tools is None
    assert generic.messages == rewrite_messages(HISTORY, tools, FORMATS["generic"], ToolChoice("required"))
    assert generic.constraint.kind == "lark" and not generic.keep_special_tokens
    assert isinstance(generic.parser(), ToolStreamParser)

    native = plan_tools(HISTORY, TOOLS_JSON, {"type": "function", "function": {"name": "ping"}}, False,
                        chat_template=QWEN_STYLE, vocab=vocab, special_ids=special)
    assert native.format.name == "hermes" and native.template_tools == TOOLS_JSON and not native.parallel
    assert native.constraint == tool_constraint(tools, ToolChoice("function", "ping"), FORMATS["hermes"], False)
    text = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(QWEN_STYLE).render(
        messages=native.messages, tools=native.template_tools)
    assert json.dumps(TOOLS_JSON[1], sort_keys=True) in text  # the tools, and the calls' arguments as objects:
    assert f'{{"name": "get_weather", "arguments": {W_ARGS}}}' in text

    none = plan_tools(HISTORY, TOOLS_JSON, "none", chat_template=QWEN_STYLE, vocab=vocab, special_ids=special)
    assert none.constraint is None and none.template_tools is None and none.parser() is None
    forced = plan_tools(HISTORY, TOOLS_JSON, "auto", chat_template=QWEN_STYLE, vocab=vocab, special_ids=special,
                        format_name="generic")
    assert forced.format.name == "generic" and forced.template_tools is None
    with pytest.raises(InvalidRequestError, match="parallel_tool_calls must be true or false"):
        plan_tools(HISTORY, TOOLS_JSON, "auto", "yes", chat_template=None, vocab=vocab, special_ids=special)
    with pytest.raises(InvalidRequestError, match="at most 65536 are accepted"):
        huge = [_fn(f"f{i}", parameters={"type": "object", "description": "x" * 8000}) for i in range(9)]
        plan_tools(HISTORY, huge, "required", chat_template=None, vocab=vocab, special_ids=special)
