"""One call for the request layer: a chat request's tool fields → what to render, constrain, parse.

``plan_tools`` validates ``tools``, ``tool_choice`` and ``parallel_tool_calls``, picks the format
(the server's override, else detected from the checkpoint), and returns a ``ToolPlan``:

- ``messages`` and ``template_tools``: render with ``render_chat(plan.messages,
  tools=plan.template_tools)`` (``template_tools`` is None for the generic fallback, whose tools are
  already written into ``messages``' system turn);
- ``constraint``: the structured-output constraint to run the request with (None: unconstrained);
- ``parser()``: a fresh ``ToolStreamParser`` for each choice's text (n > 1: one each), None when the
  reply is plain content (tool_choice "none"); ``keep_special_tokens``: detokenize the reply with
  special tokens kept (a marker is a special token), else the parser would never see it.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Collection, Mapping
from typing import Any

from jserve.constraint import Constraint
from jserve.errors import INVALID_TYPE, InvalidRequestError
from jserve.tools.formats import Format, detect_format, get_format, template_renders_tools
from jserve.tools.generic import messages_for_template, rewrite_messages
from jserve.tools.grammar import special_markers, tool_constraint
from jserve.tools.parser import ToolStreamParser
from jserve.tools.types import Tool, ToolChoice, parse_tool_choice, parse_tools


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    format: Format
    tools: tuple[Tool, ...]
    choice: ToolChoice
    parallel: bool
    messages: list[dict[str, Any]]
    template_tools: list[dict[str, Any]] | None
    constraint: Constraint | None
    keep_special_tokens: bool

    def parser(self, rng: random.Random | None = None) -> ToolStreamParser | None:
        return None if self.choice.mode == "none" else ToolStreamParser(self.format, rng)


def plan_tools(messages: list[dict[str, Any]], tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None,
               *, chat_template: str | None, vocab: Mapping[str, int], special_ids: Collection[int],
               format_name: str | None = None) -> ToolPlan:
    """The plan for one chat request (see the module's docstring). ``vocab``: token → id;
    ``special_ids``: the ids decoded away unless special tokens are kept; ``format_name``: the
    server's override of the detected format."""
    parsed = parse_tools(tools)
    choice = parse_tool_choice(tool_choice, parsed)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise InvalidRequestError("parallel_tool_calls must be true or false", INVALID_TYPE)
    parallel = parallel_tool_calls is not False
    fmt = get_format(format_name) if format_name else detect_format(chat_template, vocab)
    special = special_markers(fmt, vocab, frozenset(special_ids))
    native = template_renders_tools(chat_template) and fmt.name != "generic"
    offered = parsed if choice.mode != "none" else ()
    if native:
        rendered = messages_for_template(messages)
        template_tools = [t.openai() for t in offered] or None
    else:
        rendered, template_tools = rewrite_messages(messages, offered, fmt, choice, parallel), None
    return ToolPlan(fmt, parsed, choice, parallel, rendered, template_tools,
                    tool_constraint(offered, choice, fmt, parallel, special) if offered else None,
                    bool(special) and choice.mode != "none")
