"""Messages with tools → messages a chat template can render.

For a template that reads ``tools`` (``template_renders_tools``), ``messages_for_template`` only
turns each assistant call's ``arguments`` JSON text into the object templates expect (Qwen's and
Llama's write it with ``tojson``); the tools go in the template's ``tools`` variable.

For a template that knows no tools (the generic fallback), ``rewrite_messages`` makes plain turns:

- the system turn gets the tools (one JSON line each: name, description, parameters schema) and
  the instructions ``tools_instructions`` writes: reply with only the calls, spelled in the format
  (for ``generic``: ``{"tool_calls": [{"name": ..., "arguments": {...}}]}``), or in plain text;
  a system turn is added first when there is none (``developer`` counts as system);
- an assistant turn's ``tool_calls`` become its text, spelled in the same format, after its
  content if any;
- ``tool`` turns become a user turn (consecutive ones: one turn), each result introduced by
  ``Result of <name> (call <id>):``.
"""

from __future__ import annotations

import json
from typing import Any

from jserve.tools.formats import Format
from jserve.tools.types import Tool, ToolChoice


def _text(content: Any) -> str:
    """A message's content as text (None → "", a list of parts → their texts joined)."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _arguments_text(arguments: Any) -> str:
    """A call's arguments as compact-spaced JSON text (as the format spells them)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return json.dumps(arguments)
    return json.dumps(arguments)


def tools_instructions(tools: tuple[Tool, ...], fmt: Format, choice: ToolChoice, parallel: bool = True) -> str:
    """The system text that describes ``tools`` and how to call them in ``fmt``."""
    lines = ["You can call the following tools (functions). Each is given as JSON: its name, what it does, "
             "and the JSON schema of its arguments.", ""]
    for t in tools:
        lines.append(json.dumps({"name": t.name, "description": t.description, "parameters": t.schema}))
    example = fmt.render([("tool_name", '{"argument": "value"}')])
    lines += ["", "To call tools, reply with only the calls, written exactly like this:", example,
              "with a tool's name and its arguments as a JSON object that matches the tool's schema."]
    if parallel and choice.mode != "function":
        lines.append("You may call several tools at once: " + fmt.render([("tool_a", "{}"), ("tool_b", "{}")]))
    else:
        lines.append("Call one tool at a time.")
    if choice.mode == "required":
        lines.append("You must call at least one tool now.")
    elif choice.mode == "function":
        lines.append(f"You must call the tool {choice.name} now.")
    else:
        lines.append("If no tool is needed, reply in plain text instead" +
                     ("." if fmt.anywhere else " (not starting with \"{\")."))
    return "\n".join(lines)


def rewrite_messages(messages: list[dict[str, Any]], tools: tuple[Tool, ...], fmt: Format,
                     choice: ToolChoice, parallel: bool = True) -> list[dict[str, str]]:
    """``messages`` (OpenAI chat messages, with tool calls and tool results) as plain
    ``{"role", "content"}`` turns for a template that knows no tools. ``tools`` may be empty
    (tool_choice "none" with calls in the history): then no instructions are added."""
    names = {tc.get("id"): tc.get("function", {}).get("name", "")
             for m in messages if m.get("role") == "assistant" for tc in m.get("tool_calls") or ()}
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = m.get("role"), _text(m.get("content"))
        if role == "developer":
            role = "system"
        if role == "assistant" and m.get("tool_calls"):
            calls = [(tc["function"]["name"], _arguments_text(tc["function"].get("arguments", "{}")))
                     for tc in m["tool_calls"]]
            content = (content + "\n" if content else "") + fmt.render(calls)
        elif role == "tool":
            call_id = m.get("tool_call_id", "")
            result = f"Result of {names.get(call_id) or 'a tool'} (call {call_id}):\n{content}"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n\n" + result
                continue
            out.append({"role": "user", "content": result, "_tool": "1"})
            continue
        out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool", None)
    if tools and choice.mode != "none":
        text = tools_instructions(tools, fmt, choice, parallel)
        if out and out[0]["role"] == "system":
            out[0]["content"] = (out[0]["content"] + "\n\n" if out[0]["content"] else "") + text
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def messages_for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` for a template that reads ``tools``: each call's ``arguments`` JSON text
    becomes an object (kept as text when it is not valid JSON); nothing else changes."""
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = []
            for tc in m["tool_calls"]:
                fn = dict(tc.get("function", {}))
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
                calls.append({**tc, "function": fn})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out
