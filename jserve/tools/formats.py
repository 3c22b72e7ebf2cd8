"""The tool-call formats of the model families, and which one a checkpoint uses.

A format says how a reply spells its calls. Each call is a JSON object ``{"name": ..., "arguments":
{...}}`` (Llama 3 says ``"parameters"``), placed in a *block*:

========  ===========================================================  =============================
name      a reply with two calls                                       where a block may start
========  ===========================================================  =============================
hermes    ``<tool_call>\\n{call}\\n</tool_call>\\n<tool_call>…``          anywhere (one call per block)
llama3    ``{call}; {call}`` (optionally after ``<|python_tag|>``)     at the reply's start only
mistral   ``[TOOL_CALLS][{call}, {call}]``                             anywhere
generic   ``{"tool_calls": [{call}, {call}]}``                         at the reply's start only
========  ===========================================================  =============================

Hermes is Qwen 2 / 2.5 / 3's and NousResearch Hermes'; llama3 is Meta's JSON tool calling (3.1-3.3);
mistral is ``[TOOL_CALLS]`` before a JSON list (Mistral 7B v0.3, Nemo, Small; not the v11 tokenizer's
``[TOOL_CALLS]name[ARGS]{...}``); generic is jserve's own, for templates that know no tools:
``jserve.tools.generic`` then writes the tools into the system turn. Whitespace is allowed between
the literal pieces when parsing; grammars write exactly the spelling in ``Format.spelling``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection

from jserve.errors import InvalidRequestError


@dataclasses.dataclass(frozen=True)
class Format:
    """How a family spells tool calls.

    ``opens``: alternatives (tried in order) for the literal pieces that open a block, e.g.
    ``(("[TOOL_CALLS]", "["),)``; ``sep``: between calls in a block (None: one call per block);
    ``close``: the pieces that close a block; ``anywhere``: a block may follow text (else only
    whitespace may precede it); ``keys``: the arguments' key names accepted, the first one written;
    ``spelling``: (open, sep, close, between blocks) exactly as grammars and renderers write them.
    """

    name: str
    opens: tuple[tuple[str, ...], ...]
    sep: str | None
    close: tuple[str, ...]
    anywhere: bool
    keys: tuple[str, ...]
    spelling: tuple[str, str, str, str]

    @property
    def markers(self) -> tuple[str, ...]:
        """The first piece of each opening that has one: a block starts with one of these."""
        return tuple(o[0] for o in self.opens if o)

    def call_prefix(self, name: str) -> str:
        """A call's text before its arguments: ``{"name": "f", "arguments": ``."""
        return "{" + f'"name": {json.dumps(name)}, {json.dumps(self.keys[0])}: '

    def render(self, calls: list[tuple[str, str]]) -> str:
        """The reply text of ``calls`` [(name, arguments JSON)] as this format writes them."""
        opened, sep, close, between = self.spelling
        texts = [self.call_prefix(name) + args + "}" for name, args in calls]
        if self.sep is None:
            return between.join(opened + t + close for t in texts)
        return opened + sep.join(texts) + close


FORMATS = {
    "hermes": Format("hermes", (("<tool_call>",),), None, ("</tool_call>",), True, ("arguments", "parameters"),
                     ("<tool_call>\n", "", "\n</tool_call>", "\n")),
    "llama3": Format("llama3", (("<|python_tag|>",), ()), ";", (), False, ("parameters", "arguments"),
                     ("", "; ", "", "")),
    "mistral": Format("mistral", (("[TOOL_CALLS]", "["),), ",", ("]",), True, ("arguments", "parameters"),
                      ("[TOOL_CALLS][", ", ", "]", "")),
    "generic": Format("generic", (("{", '"tool_calls"', ":", "["),), ",", ("]", "}"), False, ("arguments",),
                      ('{"tool_calls": [', ", ", "]}", "")),
}


def get_format(name: str) -> Format:
    """The format called ``name`` (a server flag's value); ``InvalidRequestError`` if unknown."""
    if name not in FORMATS:
        raise InvalidRequestError(f"unknown tool-call format {name!r} (expected one of {', '.join(FORMATS)})")
    return FORMATS[name]


def template_renders_tools(chat_template: str | None) -> bool:
    """Whether the chat template reads a ``tools`` variable (else tools go in as generic text)."""
    return bool(chat_template) and "tools" in chat_template


def detect_format(chat_template: str | None, vocab: Collection[str] = ()) -> Format:
    """The format a checkpoint's template writes (its call markers in the template text), else
    the one its vocabulary's marker tokens suggest when the template reads ``tools``, else
    ``generic``. ``vocab``: the tokenizer's token strings (a dict's keys will do)."""
    text = chat_template or ""
    for marker, name in (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"), ("<|python_tag|>", "llama3")):
        if marker in text:
            return FORMATS[name]
    if template_renders_tools(text):
        for marker, name in (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"), ("<|python_tag|>", "llama3")):
            if marker in vocab:
                return FORMATS[name]
        if "<|eot_id|>" in text or "<|start_header_id|>" in text:
            return FORMATS["llama3"]
    return FORMATS["generic"]
