"""Tool calling without a transport: types and validation (``types``), the families' call formats
and their detection (``formats``), replies parsed whole or streamed into OpenAI tool calls
(``parser``), grammars that enforce calls (``grammar``), and messages made renderable with or
without a template that knows tools (``generic``). Front ends use the names re-exported here."""

from jserve.tools.formats import FORMATS, Format, detect_format, get_format, template_renders_tools
from jserve.tools.generic import messages_for_template, rewrite_messages, tools_instructions
from jserve.tools.grammar import special_markers, tool_constraint, tool_grammar
from jserve.tools.parser import Delta, ParsedReply, ToolCallDelta, ToolStreamParser, collect, parse_reply
from jserve.tools.plan import ToolPlan, plan_tools
from jserve.tools.types import Tool, ToolCall, ToolChoice, new_call_id, parse_tool_choice, parse_tools

__all__ = [
    "FORMATS", "Delta", "Format", "ParsedReply", "Tool", "ToolCall", "ToolCallDelta", "ToolChoice",
    "ToolPlan", "ToolStreamParser", "collect", "detect_format", "get_format", "messages_for_template", "new_call_id",
    "parse_reply", "parse_tool_choice", "parse_tools", "plan_tools", "rewrite_messages", "special_markers",
    "template_renders_tools", "tool_constraint", "tool_grammar", "tools_instructions",
]
