"""Tool calling's request types: tools, the tool choice, parsed calls; validation of OpenAI's fields.

``parse_tools`` and ``parse_tool_choice`` take the request's JSON values (``tools``, ``tool_choice``)
and either return typed values or raise ``InvalidRequestError`` with a message naming the field and
the tool at fault. They run at the edge, before anything is tokenized.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import re
import string
import threading
from typing import Any

from jserve.errors import INVALID_TYPE, INVALID_VALUE, InvalidRequestError

MAX_TOOLS = 128
MAX_SCHEMA_CHARS = 16 * 1024
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ID_ALPHABET = string.ascii_letters + string.digits


@dataclasses.dataclass(frozen=True)
class Tool:
    """An OpenAI function tool. ``parameters``: its arguments' JSON schema as JSON text (an object
    schema; ``{"type": "object", "properties": {}}`` when the request gave none)."""

    name: str
    description: str = ""
    parameters: str = '{"type": "object", "properties": {}}'

    @property
    def schema(self) -> dict[str, Any]:
        return json.loads(self.parameters)

    def openai(self) -> dict[str, Any]:
        """The tool as OpenAI writes it (what chat templates receive in ``tools``)."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        fn["parameters"] = self.schema
        return {"type": "function", "function": fn}


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    """``mode``: "none", "auto", "required" or "function" (then ``name`` is the function to call)."""

    mode: str = "auto"
    name: str | None = None

    @property
    def forced(self) -> bool:
        """Whether the reply must be tool calls (required or a named function)."""
        return self.mode in ("required", "function")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A call the model made. ``arguments``: a JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id(rng: random.Random) -> str:
    """An id like OpenAI's: ``call_`` and 24 letters or digits, drawn from ``rng``."""
    return "call_" + "".join(rng.choice(_ID_ALPHABET) for _ in range(24))


def _check_schema(name: str, schema: Any) -> str:
    where = f"tools: the parameters of {name!r}"
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{where} must be a JSON schema object, not {type(schema).__name__}")
    if schema.get("type", "object") != "object":
        raise InvalidRequestError(f"{where} must be an object schema (\"type\": \"object\"), "
                                  f"not {json.dumps(schema.get('type'))}")
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidRequestError(f"{where} has {len(text)} characters; at most {MAX_SCHEMA_CHARS} are accepted")
    error = _schema_error(schema)
    if error:
        raise InvalidRequestError(f"{where} is not a usable JSON schema: {error}")
    return text


class _SchemaVerdicts:
    """llguidance's verdict on each tool schema (its error, or None: usable), kept for the last
    ``CACHED`` distinct schemas by their canonical JSON: an agent resends the same tools every
    turn, and compiling a schema to check it costs ~0.24 ms each (as ``structured.Grammars``
    keeps compiled constraints). ``compiles`` counts the schemas compiled."""

    CACHED = 32

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: collections.OrderedDict[str, str | None] = collections.OrderedDict()
        self.compiles = 0

    def __call__(self, schema: dict[str, Any]) -> str | None:
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema)) or None
        with self._lock:
            self.compiles += 1
            self._kept[key] = error
            while len(self._kept) > self.CACHED:
                self._kept.popitem(last=False)
        return error


_schema_error = _SchemaVerdicts()


def parse_tools(tools: Any) -> tuple[Tool, ...]:
    """The request's ``tools`` (a list of ``{"type": "function", "function": {...}}``), checked:
    names match ``[A-Za-z0-9_-]{1,64}`` and are unique, parameters are object schemas llguidance
    compiles. ``None`` or an empty list: no tools."""
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise InvalidRequestError(f"tools must be a list, not {type(tools).__name__}", INVALID_TYPE)
    if len(tools) > MAX_TOOLS:
        raise InvalidRequestError(f"tools has {len(tools)} entries; at most {MAX_TOOLS} are accepted")
    out: list[Tool] = []
    seen: set[str] = set()
    for i, entry in enumerate(tools):
        if not isinstance(entry, dict) or entry.get("type") != "function":
            raise InvalidRequestError(f"tools[{i}] must be an object with \"type\": \"function\"")
        fn = entry.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError(f"tools[{i}].function must be an object")
        unknown = set(fn) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise InvalidRequestError(f"tools[{i}].function has unknown fields: {', '.join(sorted(unknown))}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequestError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', "
                                      f"not {json.dumps(name)}")
        if name in seen:
            raise InvalidRequestError(f"tools: the name {name!r} is given twice (tool names must be unique)")
        seen.add(name)
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise InvalidRequestError(f"tools[{i}].function.description must be a string")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        out.append(Tool(name, description, _check_schema(name, params)))
    return tuple(out)


def parse_tool_choice(choice: Any, tools: tuple[Tool, ...]) -> ToolChoice:
    """The request's ``tool_choice`` ("none", "auto", "required" or ``{"type": "function",
    "function": {"name": ...}}``) against its tools. Absent: "auto" with tools, "none" without."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequestError(f"tool_choice must be \"none\", \"auto\", \"required\" or a named "
                                      f"function, not {json.dumps(choice)}", INVALID_VALUE)
        if choice == "required" and not tools:
            raise InvalidRequestError("tool_choice \"required\" needs at least one tool in tools")
        return ToolChoice(choice)
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequestError("tool_choice must be a string or {\"type\": \"function\", "
                                  "\"function\": {\"name\": ...}}")
    names = [t.name for t in tools]
    if fn["name"] not in names:
        known = ", ".join(names) if names else "none"
        raise InvalidRequestError(f"tool_choice names the function {fn['name']!r}, which is not in tools "
                                  f"(tools: {known})")
    return ToolChoice("function", fn["name"])
