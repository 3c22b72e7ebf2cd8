"""Grammars that enforce tool calls: llguidance Lark grammars over the tools' JSON schemas.

- ``required``: the reply is one or more calls (one when ``parallel_tool_calls`` is false) to any of
  the tools, in the format's exact spelling, each call's arguments valid against its tool's schema.
- a named function: exactly one call, to that function.
- ``auto``: lazy. For formats whose calls may follow text (hermes, mistral) the text is free until
  the format's marker appears; the lexeme that ends with the marker is lazy, so it closes at the
  marker's first occurrence and everything after it is held to valid calls. For the formats whose
  calls start the reply (llama3, generic) a reply whose first non-blank character is ``{`` is a
  call and is held to valid calls; any other reply is free text.
- ``none``: no grammar.

A call's arguments are embedded with ``%json`` and compact, fixed separators (``", "``, ``": "``,
as Python's ``json.dumps`` and Jinja's ``tojson`` write, which is what templates show the models)
and no free whitespace, so a model cannot pad forever. When a marker is a special token of the
tokenizer (Qwen's ``<tool_call>``, Mistral's ``[TOOL_CALLS]``), the grammar names the token itself
(``<[id]>``); the front end then must detokenize with special tokens kept so the parser sees it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from jserve.constraint import MAX_CONSTRAINT_CHARS, Constraint
from jserve.errors import InvalidRequestError
from jserve.tools.formats import Format
from jserve.tools.types import Tool, ToolChoice

_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _lit(text: str, special: Mapping[str, int]) -> str:
    """A Lark literal for ``text`` (several space-separated ones if it contains special tokens)."""
    parts: list[str] = []
    rest = text
    while rest:
        hits = [(rest.find(k), k) for k in special if k and rest.find(k) >= 0]
        if not hits:
            parts.append(json.dumps(rest))
            break
        at, k = min(hits)
        if at:
            parts.append(json.dumps(rest[:at]))
        parts.append(f"<[{special[k]}]>")
        rest = rest[at + len(k):]
    return " ".join(parts)


def _call_rule(fmt: Format, tool: Tool) -> str:
    schema = tool.schema
    schema["x-guidance"] = _JSON_STYLE
    return f"{json.dumps(fmt.call_prefix(tool.name))} %json {json.dumps(schema)} \"}}\""


def tool_grammar(tools: tuple[Tool, ...], choice: ToolChoice, fmt: Format, parallel: bool = True,
                 special: Mapping[str, int] | None = None) -> str | None:
    """The Lark grammar enforcing ``choice`` over ``tools`` in ``fmt``; None for "none".
    ``special``: the format's markers that are single special tokens of the tokenizer, with their
    ids (see ``special_markers``)."""
    special = dict(special or {})
    if choice.mode == "none":
        return None
    if choice.mode == "function":
        chosen = tuple(t for t in tools if t.name == choice.name)
        if not chosen:
            raise InvalidRequestError(f"tool_choice names the function {choice.name!r}, which is not in tools")
        many = False
    else:
        chosen, many = tools, parallel
    if not chosen:
        raise InvalidRequestError(f"tool_choice {choice.mode!r} needs at least one tool")
    opened, sep, close, between = fmt.spelling
    rules = [f"call_{i}: {_call_rule(fmt, t)}" for i, t in enumerate(chosen)]
    rules.append("call: " + " | ".join(f"call_{i}" for i in range(len(chosen))))
    if fmt.sep is None:  # a block per call
        rules.append(f"block: {_lit(opened, special)} call {_lit(close, special)}")
        calls = f"block ({_lit(between, special)} block)*" if many else "block"
        rest_of_block = f"{_lit(opened[len(fmt.markers[0]):], special)} call {_lit(close, special)}"
        rest = f"{rest_of_block} ({_lit(between, special)} block)*" if many else rest_of_block
    else:
        more = f" ({_lit(sep, special)} call)*" if many else ""
        calls = f"{_lit(opened, special)} call{more} {_lit(close, special)}"
        rest = f"{_lit(opened[len(fmt.markers[0]):], special)} call{more} {_lit(close, special)}" \
            if fmt.anywhere else ""
    if choice.forced:
        head = [f"start: {calls}"]
    elif fmt.anywhere:
        marker = fmt.markers[0]
        head = [f"start: TEXT | before_call {rest}", f"before_call[lazy]: TEXT {json.dumps(marker)}"]
        if marker in special:  # the special token, or the marker spelled in plain text, starts a call
            head[0] += f" | TEXT <[{special[marker]}]> {rest}"
        head.append(r"TEXT: /(.|\n)*/")
    else:
        head = [f"start: TEXT | {calls}", r"TEXT: /([ \t\r\n]*[^{ \t\r\n](.|\n)*)?/"]
    return "\n".join(["%llguidance {}", *head, *rules]) + "\n"


def tool_constraint(tools: tuple[Tool, ...], choice: ToolChoice, fmt: Format, parallel: bool = True,
                    special: Mapping[str, int] | None = None) -> Constraint | None:
    """The structured-output constraint for a request with tools (None: unconstrained)."""
    grammar = tool_grammar(tools, choice, fmt, parallel, special)
    if grammar is not None and len(grammar) > MAX_CONSTRAINT_CHARS:
        raise InvalidRequestError(f"the tools come to a grammar of {len(grammar)} characters; at most "
                                  f"{MAX_CONSTRAINT_CHARS} are accepted (send fewer or smaller tool schemas)")
    return None if grammar is None else Constraint("lark", grammar)


def special_markers(fmt: Format, vocab: Mapping[str, int], special_ids: frozenset[int] | set[int]) -> dict[str, int]:
    """The pieces of ``fmt``'s spelling that are one special token of the tokenizer, with their ids.
    ``vocab``: token string → id (``tokenizers.Tokenizer.get_vocab()``); ``special_ids``: the ids
    the tokenizer treats as special (left out of decoded text unless asked)."""
    found = {}
    for piece in (*fmt.markers, *fmt.close):
        i = vocab.get(piece)
        if i is not None and i in special_ids:
            found[piece] = i
    return found
