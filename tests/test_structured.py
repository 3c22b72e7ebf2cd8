"""Structured output: the allowed-token mask on the device, and constrained answers on the real
model that always parse and validate, amid unconstrained requests that stay unchanged."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from jserve import InvalidRequestError, SamplingParams
from jserve.engine import apply_bitmask, mask_words
from jserve.structured import Constraint


def test_apply_bitmask_keeps_exactly_the_set_bits_and_all_set_is_the_identity():
    rng = np.random.default_rng(0)
    v = 100
    logits = rng.standard_normal((3, v)).astype(np.float32)
    allowed = [{0, 31, 32, 99}, set(range(v)), {57}]
    mask = np.zeros((3, mask_words(v)), np.uint32)
    for row, ids in enumerate(allowed):
        for t in ids:
            mask[row, t // 32] |= np.uint32(1 << (t % 32))
    mask = mask.view(np.int32)
    mask[1] = -1
    out = np.asarray(apply_bitmask(jnp.asarray(logits), jnp.asarray(mask)))
    for row, ids in enumerate(allowed):
        keep = np.isin(np.arange(v), sorted(ids))
        assert np.array_equal(out[row][keep], logits[row][keep]) and np.all(out[row][~keep] == -np.inf)
    same = np.asarray(apply_bitmask(jnp.asarray(logits), jnp.full((3, mask_words(v)), -1, jnp.int32)))
    assert same.tobytes() == logits.tobytes()


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                         "city": {"enum": ["Paris", "Rome", "Berlin"]}}}
ORDER = {"type": "object", "additionalProperties": False, "required": ["items", "paid"],
         "properties": {"items": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 12}},
                        "paid": {"type": "boolean"}}}


def test_constrained_answers_parse_and_validate_amid_unconstrained_ones_that_stay_unchanged(real_llm):
    ask = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    free = [(ask("What is the capital of France?"), SamplingParams(temperature=0.0, max_tokens=24)),
            (ask("Name three fruits."), SamplingParams(temperature=0.0, max_tokens=24))]
    alone = [r.token_ids for r in real_llm.generate([m for m, _ in free], [p for _, p in free])]
    constrained = [
        (ask("Describe a person as JSON."), SamplingParams(
            temperature=0.0, max_tokens=60, constraint=Constraint("json_schema", json.dumps(PERSON)))),
        (ask("Give me an order as JSON."), SamplingParams(
            temperature=0.7, seed=3, max_tokens=60, constraint=Constraint("json_schema", json.dumps(ORDER)))),
        (ask("Any JSON object, please."), SamplingParams(
            temperature=0.0, max_tokens=60, constraint=Constraint("json_object"))),
        (ask("Pick a number."), SamplingParams(temperature=0.9, seed=5, max_tokens=10,
                                               constraint=Constraint("regex", "[1-9][0-9]{0,2}"))),
        (ask("Is the sky blue?"), SamplingParams(temperature=0.0, max_tokens=10,
                                                 constraint=Constraint("choice", ("yes", "no", "maybe")))),
    ]
    mixed = [free[0], *constrained[:3], free[1], *constrained[3:]]
    results = real_llm.generate([m for m, _ in mixed], [p for _, p in mixed])
    assert [results[0].token_ids, results[4].token_ids] == alone  # masks never touch unconstrained rows
    person, order, anything, number, choice = (results[i] for i in (1, 2, 3, 5, 6))
    for r in (person, order, anything):
        assert r.finish_reason == "stop", r.text
    jsonschema.validate(json.loads(person.text), PERSON)
    jsonschema.validate(json.loads(order.text), ORDER)
    assert isinstance(json.loads(anything.text), dict)
    assert re.fullmatch(r"[1-9][0-9]{0,2}", number.text)
    assert choice.text in ("yes", "no", "maybe") and choice.finish_reason == "stop"


@pytest.mark.parametrize("constraint, message", [
    (Constraint("regex", "[a-"), "the regex constraint is invalid"),
    (Constraint("json_schema", "{not json"), "the JSON schema is not valid JSON"),
    (Constraint("json_schema", "[1, 2]"), "the JSON schema must be a JSON object"),
    (Constraint("choice", ()), "choice needs 1..256 non-empty strings"),
    (Constraint("regex", "a" * 70000), "the regex constraint has 70000 characters"),
])
def test_a_bad_constraint_is_refused_at_submission(tiny_llm, constraint, message):
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        tiny_llm.submit([1, 2, 3], SamplingParams(max_tokens=5, constraint=constraint))


def _allowed(matcher, words: int) -> set[int]:
    from jserve.structured import fill_mask

    mask = np.zeros(words, np.int32)
    fill_mask(matcher, mask)
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
    return set(np.flatnonzero(bits).tolist())


def test_a_constraint_seen_before_is_copied_not_compiled_and_each_copy_is_its_own(real_ckpt):
    from jserve.checkpoint import load_tokenizer
    from jserve.structured import Grammars, advance

    tok = load_tokenizer(real_ckpt)
    g = Grammars(tok, tok.vocab_size, tok.eos_token_ids)
    person = Constraint("json_schema", json.dumps(PERSON))
    first, second = g.matcher(person), g.matcher(Constraint("json_schema", json.dumps(PERSON)))
    assert g.compiles == 1
    # The reference: a matcher compiled by another Grammars, never copied.
    fresh = Grammars(tok, tok.vocab_size, tok.eos_token_ids).matcher(person)
    start = _allowed(fresh, g.words)
    answer = tok.encode('{"name":"Ada","age":36,"city":"Rome"}')  # compact: the grammar allows no spaces
    for t in answer[:-1]:
        assert advance(first, t) is None
    # Advancing one copy moves neither the other nor the kept one: both still start afresh.
    assert _allowed(second, g.words) == start != _allowed(first, g.words)
    third = g.matcher(person)
    assert g.compiles == 1 and _allowed(third, g.words) == start
    assert advance(first, answer[-1]) == "stop" and first.is_accepting()
    for t in answer:
        advance(third, t)
    assert third.is_accepting() and not second.is_stopped()


def test_the_compiled_constraints_kept_are_bounded_and_a_bad_one_is_never_kept(real_ckpt):
    from jserve.checkpoint import load_tokenizer
    from jserve.structured import Grammars

    tok = load_tokenizer(real_ckpt)
    g = Grammars(tok, tok.vocab_size, tok.eos_token_ids)
    g.CACHED = 2
    a, b, c = (Constraint("regex", r) for r in ("[0-9]+", "[a-z]+", "(yes|no)"))
    for constraint in (a, b, a, c):  # a is used again before c arrives: b is the one let go
        g.matcher(constraint)
    assert g.compiles == 3
    g.matcher(a)
    assert g.compiles == 3
    g.matcher(b)
    assert g.compiles == 4
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match="the regex constraint is invalid"):
            g.matcher(Constraint("regex", "[a-"))
    assert g.compiles == 4
    g.matcher(Constraint("choice", ["x", "y"]))  # a list (unhashable): compiled each time, not kept
    g.matcher(Constraint("choice", ["x", "y"]))
    assert g.compiles == 6


def test_a_tokenizer_llguidance_cannot_read_gives_every_constrained_request_the_reason():
    """llguidance refusing the model's tokenizer is a 400 with its reason for each constrained request
    (not an internal error), asked of llguidance once."""
    from jserve.structured import Grammars

    class Refused:
        calls = 0

        def llguidance_tokenizer(self, n_vocab, eos):
            Refused.calls += 1
            raise ValueError("can't determine decoder type\nmore detail")

    grammars = Grammars(Refused(), 512, (2,))
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match="not available with this model's tokenizer.*"
                                                      "can't determine decoder type") as e:
            grammars.matcher(Constraint("choice", ("yes", "no")))
        assert e.value.code == "unsupported_parameter"
    assert Refused.calls == 1
