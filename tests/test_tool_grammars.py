"""Tool calling's grammars, checked token by token with llguidance over the real SmolLM2 tokenizer:
valid calls accepted and wrong names or arguments refused in every format, random walks through
the grammars' masks whose every finished output parses into calls that ``jsonschema`` validates,
free text until a call starts under ``auto``, and a marker that is a special token named by id."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest

from jserve.structured import Grammars, advance, fill_mask
from jserve.tools import FORMATS, ToolChoice, parse_reply, parse_tools, special_markers, tool_constraint

from .tool_cases import O_ARGS, SCHEMAS, TOOLS_JSON, W_ARGS, load_tokenizer_cached


@pytest.fixture(scope="module")
def tools():
    return parse_tools(TOOLS_JSON)


@pytest.fixture(scope="module")
def grammars():
    tok = load_tokenizer_cached()
    return tok, Grammars(tok, tok.vocab_size, tok.eos_token_ids)


def _accepts(grammars, constraint, text):
    tok, g = grammars
    m = g.matcher(constraint)
    for t in tok.encode(text):
        if advance(m, t) is not None and m.is_error():
            return False
    return m.is_accepting()


CHOICES = {"required": ToolChoice("required"), "named": ToolChoice("function", "get_weather")}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_grammars_accept_valid_calls_and_reject_wrong_names_and_arguments(grammars, tools, fmt):
    f = FORMATS[fmt]
    required = tool_constraint(tools, CHOICES["required"], f)
    single = tool_constraint(tools, CHOICES["required"], f, parallel=False)
    named = tool_constraint(tools, CHOICES["named"], f)
    auto = tool_constraint(tools, ToolChoice("auto"), f)
    assert tool_constraint(tools, ToolChoice("none"), f) is None
    weather, order = ("get_weather", W_ARGS), ("place_order", O_ARGS)
    assert _accepts(grammars, required, f.render([weather]))
    assert _accepts(grammars, required, f.render([order, weather]))
    assert _accepts(grammars, single, f.render([order])) and not _accepts(grammars, single, f.render([order, weather]))
    assert _accepts(grammars, named, f.render([weather]))
    assert not _accepts(grammars, named, f.render([order]))
    for bad in [("get_wether", W_ARGS), ("get_weather", '{"city": "Paris"}'),
                ("get_weather", '{"city": "Paris", "unit": "kelvin"}'),
                ("place_order", '{"items": [{"sku": "a", "qty": 0}], "express": true}'),
                ("get_weather", '{"city": "Paris", "unit": "celsius", "extra": 1}')]:
        assert not _accepts(grammars, required, f.render([bad])), bad
        assert not _accepts(grammars, auto, f.render([bad])), bad
    assert not _accepts(grammars, required, "I will not call anything.")
    assert _accepts(grammars, auto, "I will not call anything.")
    assert _accepts(grammars, auto, f.render([weather, order]))
    if f.anywhere:
        assert _accepts(grammars, auto, "Checking. " + f.render([weather]))
        assert not _accepts(grammars, auto, "Checking. " + f.render([("get_weather", '{"town": "Paris"}')]))


def _allowed(m, words):
    mask = np.zeros(words, np.int32)
    fill_mask(m, mask)
    return np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))


def _walk(grammars, constraint, rng, prefix="", max_tokens=400):
    """Sample uniformly among the allowed tokens until the grammar ends; the text, or None."""
    tok, g = grammars
    m = g.matcher(constraint)
    out = tok.encode(prefix)
    for t in out:
        assert advance(m, t) is None
    eos = set(tok.eos_token_ids)
    for _ in range(max_tokens):
        allowed = _allowed(m, g.words)
        t = int(allowed[rng.randrange(len(allowed))])
        if t in eos:
            return tok.decode(out)
        out.append(t)
        state = advance(m, t)
        assert state is None or state == "stop", state
        if state == "stop":
            return tok.decode(out)
    return None


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("mode", ["required", "named", "single"])
def test_every_output_of_a_forced_grammar_parses_into_calls_that_validate(grammars, tools, fmt, mode):
    f = FORMATS[fmt]
    choice = CHOICES.get(mode, CHOICES["required"])
    constraint = tool_constraint(tools, choice, f, parallel=mode != "single")
    rng = random.Random(f"{fmt}-{mode}")
    finished, names = 0, set()
    for _ in range(8):
        text = _walk(grammars, constraint, rng)
        if text is None:
            continue
        finished += 1
        got = parse_reply(text, f)
        assert got.content is None and got.tool_calls, text
        if mode != "required":
            assert len(got.tool_calls) == 1
        for call in got.tool_calls:
            assert mode != "named" or call.name == "get_weather"
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
            names.add(call.name)
    assert finished >= 6 and len(names) >= (1 if mode == "named" else 2)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_auto_is_free_text_until_a_call_starts_then_the_call_is_held_valid(grammars, tools, fmt):
    f = FORMATS[fmt]
    constraint = tool_constraint(tools, ToolChoice("auto"), f)
    tok, g = grammars
    assert len(_allowed(g.matcher(constraint), g.words)) > tok.vocab_size // 2  # the first token is free
    prefix = ("Let me look that up. " if f.anywhere else "") + (f.spelling[0] or "{")
    rng = random.Random(fmt)
    finished = 0
    for _ in range(6):
        text = _walk(grammars, constraint, rng, prefix=prefix)
        if text is None:
            continue
        finished += 1
        got = parse_reply(text, f)
        assert got.tool_calls and (got.content or "") == ("Let me look that up." if f.anywhere else ""), text
        for call in got.tool_calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert finished >= 4


def test_a_marker_that_is_a_special_token_is_named_by_id_in_the_grammar(tools):
    from tokenizers import AddedToken, Tokenizer

    smol = load_tokenizer_cached()
    tok = Tokenizer.from_str(smol.tok.to_str())
    tok.add_special_tokens([AddedToken("[TOOL_CALLS]", special=True, normalized=False)])
    marker = tok.token_to_id("[TOOL_CALLS]")
    f = FORMATS["mistral"]
    special = special_markers(f, tok.get_vocab(), {marker})
    assert special == {"[TOOL_CALLS]": marker}
    from llguidance import LLTokenizer

    def ll_tokenizer(n_vocab, eos):
        return LLTokenizer(tok.to_str(), n_vocab=n_vocab, eos_token=eos[0] if eos else None)

    g = Grammars(SimpleNamespace(tok=tok, llguidance_tokenizer=ll_tokenizer),
                 tok.get_vocab_size(with_added_tokens=True), smol.eos_token_ids)
    body = f.render([("get_weather", W_ARGS)])[len("[TOOL_CALLS]"):]
    for choice in (ToolChoice("required"), ToolChoice("auto")):
        constraint = tool_constraint(tools, choice, f, special=special)
        for ids, ok in [([marker, *smol.encode(body)], True),
                        (smol.encode("[TOOL_CALLS]" + body), choice.mode == "auto"),
                        ([marker, *smol.encode(body.replace("celsius", "kelvin"))], False),
                        (smol.encode("[TOOL_CALLS]" + body.replace("celsius", "kelvin")), False)]:
            m = g.matcher(constraint)
            assert (m.validate_tokens(ids) == len(ids)) == ok, (choice, ids)
    text = "[TOOL_CALLS]" + body  # what a detokenizer keeping special tokens writes
    assert [c.name for c in parse_reply(text, f).tool_calls] == ["get_weather"]
