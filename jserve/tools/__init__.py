"""Tool calling without a transport: types and validation, the families' call formats, parsing
replies (whole or streamed) into OpenAI tool calls, grammars that enforce calls, and the generic
fallback's message rewriting for templates that know no tools. See ``docs``-style notes in each
module; front ends call the names re-exported here."""

from jserve.tools.formats import FORMATS, Format, detect_format, get_format, template_renders_tools
from jserve.tools.parser import Delta, ParsedReply, ToolCallDelta, ToolStreamParser, collect, parse_reply
from jserve.tools.types import Tool, ToolCall, ToolChoice, new_call_id, parse_tool_choice, parse_tools

__all__ = [
    "FORMATS", "Delta", "Format", "ParsedReply", "Tool", "ToolCall", "ToolCallDelta", "ToolChoice",
    "ToolStreamParser", "collect", "detect_format", "get_format", "new_call_id", "parse_reply",
    "parse_tool_choice", "parse_tools", "template_renders_tools",
]
