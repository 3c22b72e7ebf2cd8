"""What a structured-output request asks its answer to match: ``Constraint`` (a JSON schema, any
JSON object, a regular expression, a choice among strings, or a Lark grammar jserve builds), and
its llguidance grammar text, checked at the edge (``InvalidRequestError`` for a bad schema, an
oversized constraint, an empty regex). A leaf of the request's types, beside ``jserve.errors``:
``SamplingParams`` carries it, ``jserve.structured`` compiles it into matchers; llguidance is
imported only to write the grammar."""

from __future__ import annotations

import dataclasses
import json

from jserve.errors import InvalidRequestError

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
MAX_CONSTRAINT_CHARS = 64 * 1024
MAX_CHOICES = 256


@dataclasses.dataclass(frozen=True)
class Constraint:
    """``kind``: one of ``KINDS``; ``value``: the schema (JSON text), the regex, the choices, or a
    llguidance Lark grammar (built by jserve, e.g. ``jserve.tools.grammar``; not a request field)."""

    kind: str
    value: str | tuple[str, ...] = ""

    def grammar(self) -> str:
        from llguidance import LLMatcher

        if self.kind not in KINDS:
            raise InvalidRequestError(f"unknown constraint {self.kind!r} (expected one of {', '.join(KINDS)})")
        size = len(self.value) if isinstance(self.value, str) else sum(len(c) for c in self.value)
        if size > MAX_CONSTRAINT_CHARS:
            raise InvalidRequestError(f"the {self.kind} constraint has {size} characters; at most "
                                      f"{MAX_CONSTRAINT_CHARS} are accepted")
        # Compact JSON: no free whitespace, so a model cannot pad the answer with it forever.
        compact = {"whitespace_flexible": False}
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=compact)
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.value)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {e}") from e
            if not isinstance(schema, dict):
                raise InvalidRequestError("the JSON schema must be a JSON object")
            return LLMatcher.grammar_from_json_schema(schema, overrides=compact)
        if self.kind == "lark":
            return LLMatcher.grammar_from_lark(self.value)
        if self.kind == "regex":
            if not self.value:
                raise InvalidRequestError("the regex is empty")
            return LLMatcher.grammar_from_regex(self.value)
        choices = tuple(self.value)
        if not choices or len(choices) > MAX_CHOICES or not all(isinstance(c, str) and c for c in choices):
            raise InvalidRequestError(f"choice needs 1..{MAX_CHOICES} non-empty strings")
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
