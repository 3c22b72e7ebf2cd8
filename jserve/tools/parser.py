"""A model's reply → content text and tool calls, streamed as OpenAI-style deltas or whole.

``ToolStreamParser`` consumes the reply's text in pieces of any size and returns deltas: content
while the reply is plain text, and once a call starts, ``tool_calls`` deltas (index, id, type and
the function's name first, then fragments of its arguments). Text that may still become a call
marker is held back until it is known, so markup never reaches the content. ``parse_reply`` is the
same machine fed the whole reply, so streaming and not streaming agree for any chunking.

The rules (the same for every format, see ``jserve.tools.formats``):
- A call is committed once its marker and ``{"name": "<string>", "arguments": {`` are read; from
  then on its arguments stream as they come, up to the closing brace of the arguments object. A
  reply that ends inside a call (max_tokens) keeps the call with the arguments generated so far,
  as OpenAI does with finish reason "length".
- A call object whose keys come in another order (``"arguments"`` first) or whose arguments are a
  JSON string is taken whole once complete (name and arguments in one delta).
- A marker followed by anything else (malformed JSON, no name) is content, marker included. But a
  reply that has calls and ends (max_tokens) inside the next call's opening, or inside a closing
  marker, or in a marker's first characters, drops that cut-short markup.
- Whitespace right before or after a call block is dropped; text after a block is content (for the
  start-only formats no further block is looked for).
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

from jserve.tools.formats import Format
from jserve.tools.types import ToolCall, new_call_id

_WS = " \t\r\n"
_NEED, _FAIL = -1, -2


@dataclasses.dataclass(frozen=True)
class ToolCallDelta:
    """One piece of a streamed call: the first for a call has ``id`` and ``name``, later ones
    only argument fragments."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def openai(self) -> dict[str, Any]:
        """The entry of a chunk's ``delta.tool_calls`` list."""
        fn: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            fn = {"name": self.name, "arguments": self.arguments}
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out.update(id=self.id, type="function")
        out["function"] = fn
        return out


Delta = str | ToolCallDelta  # a content piece, or a piece of a call


@dataclasses.dataclass(frozen=True)
class ParsedReply:
    """A whole reply: ``content`` (None when empty and there are calls, as OpenAI sends it)."""

    content: str | None
    tool_calls: tuple[ToolCall, ...]


def collect(deltas: list[Delta]) -> ParsedReply:
    """Join deltas into the whole reply (what a non-streamed response carries)."""
    content = "".join(d for d in deltas if isinstance(d, str))
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if isinstance(d, ToolCallDelta):
            if d.id is not None:
                calls[d.index] = [d.id, d.name or "", ""]
            calls[d.index][2] += d.arguments
    return ParsedReply(content if content or not calls else None,
                       tuple(ToolCall(*calls[i]) for i in sorted(calls)))


def _skip_ws(buf: str, i: int) -> int:
    while i < len(buf) and buf[i] in _WS:
        i += 1
    return i


def _literals(buf: str, i: int, pieces: tuple[str, ...], eof: bool) -> int:
    """The position after ``pieces`` (whitespace allowed before each) from ``i``; _NEED if the
    text ends before that is known, _FAIL if they are not there."""
    for piece in pieces:
        i = _skip_ws(buf, i)
        got = buf[i:i + len(piece)]
        if got != piece[:len(got)]:
            return _FAIL
        if len(got) < len(piece):
            return _FAIL if eof else _NEED
        i += len(piece)
    return i


def _string_end(buf: str, i: int, eof: bool) -> int:
    """The position after the JSON string starting at ``buf[i] == '"'``."""
    escaped = False
    for j in range(i + 1, len(buf)):
        if escaped:
            escaped = False
        elif buf[j] == "\\":
            escaped = True
        elif buf[j] == '"':
            return j + 1
    return _FAIL if eof else _NEED


def _scan_header(buf: str, i: int, keys: tuple[str, ...], eof: bool) -> tuple[int, int, int]:
    """``{"name": "<string>", "<key>": {`` from ``i``: (the position after it, or _NEED / _FAIL;
    where the name's JSON string starts; where it ends)."""
    name_at = name_end = 0
    r = _literals(buf, i, ("{", '"name"', ":"), eof)
    if r >= 0:
        name_at = _skip_ws(buf, r)
        if name_at == len(buf):
            r = _FAIL if eof else _NEED
        else:
            r = name_end = _string_end(buf, name_at, eof) if buf[name_at] == '"' else _FAIL
    if r >= 0:
        r = _literals(buf, r, (",",), eof)
    if r >= 0:
        ends = [_literals(buf, r, (json.dumps(k), ":", "{"), eof) for k in keys]
        r = max(ends) if max(ends) >= 0 else (_NEED if _NEED in ends else _FAIL)
    return r, name_at, name_end


class _Scanner:
    """Tracks nesting through JSON text, one character at a time (strings and escapes aware)."""

    def __init__(self, depth: int = 0):
        self.depth, self.in_string, self.escaped = depth, False, False

    def run(self, buf: str, i: int) -> tuple[int, bool]:
        """Scan from ``i``; (position reached, whether the depth came back to 0 there)."""
        for j in range(i, len(buf)):
            c = buf[j]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return j + 1, True
        return len(buf), False


class ToolStreamParser:
    """Feed the reply's text with ``feed``, then call ``finish``; each returns the new deltas.
    ``rng`` draws the call ids (seed it for reproducible ids)."""

    def __init__(self, fmt: Format, rng: random.Random | None = None):
        self.fmt = fmt
        self._rng = rng or random.Random()
        self._buf = ""
        self._pos = 0  # everything before it is consumed
        self._search = 0  # markers are looked for from here
        self._state = "text"
        self._at_start = True  # only whitespace so far
        self._after_call = False
        self._pending_ws = ""
        self._block_start = 0
        self._in_block = 0  # calls committed in the current block
        self._calls = 0
        self._scan = _Scanner()
        self._whole_at: tuple[int, int, _Scanner] = (-1, -1, self._scan)  # object start, scanned to
        self._out: list[Delta] = []
        self._eof = False

    def feed(self, text: str) -> list[Delta]:
        self._buf += text
        return self._run()

    def finish(self) -> list[Delta]:
        self._eof = True
        out = self._run()
        if self._pending_ws and not self._calls:
            out.append(self._pending_ws)
        self._pending_ws = ""
        return out

    def _run(self) -> list[Delta]:
        while getattr(self, "_" + self._state)():
            pass
        keep = min(self._pos, self._block_start) if self._state != "text" else self._pos
        self._buf, self._pos, self._search = self._buf[keep:], self._pos - keep, max(self._search - keep, 0)
        self._block_start = max(self._block_start - keep, 0)
        at, reached, scanner = self._whole_at
        self._whole_at = (at - keep, reached - keep, scanner) if at >= keep else (-1, -1, scanner)
        out, self._out = self._out, []
        return out

    # Content ------------------------------------------------------------------------------------------

    def _text_out(self, s: str) -> None:
        if self._after_call:
            s = s.lstrip(_WS)
            self._after_call = not s
        body = s.rstrip(_WS)
        if body:
            self._out.append(self._pending_ws + body)
            self._pending_ws = ""
            self._at_start = False
        self._pending_ws += s[len(body):]

    def _text(self) -> bool:
        buf, pos = self._buf, self._pos
        if not self.fmt.anywhere:
            if not self._at_start:
                self._text_out(buf[pos:])
                self._pos = len(buf)
                return False
            j = _skip_ws(buf, pos)
            self._text_out(buf[pos:j])
            self._pos = j
            if j == len(buf):
                return False
            return self._open_block(j)
        start = max(self._search, pos)
        found = [m for m in (buf.find(k, start) for k in self.fmt.markers) if m >= 0]
        if found:
            m = min(found)
            self._text_out(buf[pos:m])
            return self._open_block(m)
        hold = len(buf)
        longest = max(map(len, self.fmt.markers))
        for m in range(max(start, len(buf) - longest + 1), len(buf)):
            if any(k.startswith(buf[m:]) for k in self.fmt.markers):
                hold = m
                break
        if self._eof and not (self._calls and hold < len(buf)):
            hold = len(buf)  # the reply's end: a marker's beginning is text, unless it follows calls
        self._text_out(buf[pos:hold])
        self._pos = len(buf) if self._eof else hold
        return False

    def _open_block(self, at: int) -> bool:
        self._pos = self._block_start = at
        self._in_block = 0
        self._state = "open"
        return True

    def _fail(self, at: int) -> bool:
        """What was read from ``at`` is not a call: it is content (the marker too)."""
        self._state = "text"
        self._pos = at
        self._search = at + 1
        if not self.fmt.anywhere:
            self._at_start = False
        return True

    # Calls --------------------------------------------------------------------------------------------

    def _open(self) -> bool:
        for pieces in self.fmt.opens:
            r = _literals(self._buf, self._pos, pieces, self._eof)
            if r == _NEED:
                return False
            if r >= 0:
                self._pos = r
                self._state = "header"
                return True
        if self._drop_truncated(self._block_start, opening=True):
            return True
        return self._fail(self._block_start)

    def _start_call(self, name: str, arguments: str = "") -> None:
        if self._in_block == 0:  # the block is a call: the whitespace before it goes
            self._pending_ws = ""
        self._out.append(ToolCallDelta(self._calls, arguments, new_call_id(self._rng), name))
        self._calls += 1
        self._in_block += 1
        self._at_start = False

    def _header(self) -> bool:
        buf = self._buf
        r, name_at, name_end = _scan_header(buf, self._pos, self.fmt.keys, self._eof)
        if r == _NEED:
            return False
        if r < 0:
            return self._whole()
        try:
            name = json.loads(buf[name_at:name_end])
        except json.JSONDecodeError:
            return self._whole()
        if not name:
            return self._whole()
        self._start_call(name)
        self._pos = r - 1  # the arguments' opening brace
        self._scan = _Scanner()
        self._state = "arguments"
        return True

    def _whole(self) -> bool:
        """A call object read whole: keys in another order, or arguments given as a string."""
        buf, start = self._buf, _skip_ws(self._buf, self._pos)
        if start == len(buf) and not self._eof:
            return False
        if start < len(buf) and buf[start] == "{":
            if self._whole_at[0] != start:
                self._whole_at = (start, start, _Scanner())
            _, reached, scanner = self._whole_at
            end, closed = scanner.run(buf, reached)
            self._whole_at = (start, end, scanner)
            if not closed:
                return False if not self._eof else self._fail_call()
            try:
                obj = json.loads(buf[start:end])
            except json.JSONDecodeError:
                return self._fail_call()
            key = next((k for k in self.fmt.keys if isinstance(obj, dict) and k in obj), None)
            args = obj.get(key) if key else None
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    args = None
            name = obj.get("name")
            if isinstance(name, str) and name and isinstance(args, dict):
                self._start_call(name, json.dumps(args))
                self._pos = end
                self._state = "after"
                return True
        return self._fail_call()

    def _truncated(self, at: int, opening: bool) -> bool:
        """Whether the reply ended (at eof) inside a call's opening from ``at``: a block marker,
        its header or its object, cut short rather than malformed."""
        buf = self._buf
        starts = [_literals(buf, at, pieces, False) for pieces in self.fmt.opens] if opening else [at]
        for r in starts:
            if r == _NEED:
                return True
            if r >= 0:
                if _scan_header(buf, r, self.fmt.keys, False)[0] == _NEED:
                    return True
                j = _skip_ws(buf, r)
                if j == len(buf) or (buf[j] == "{" and not _Scanner().run(buf, j)[1]):
                    return True
        return False

    def _drop_truncated(self, at: int, opening: bool) -> bool:
        """A reply with calls that ends inside the next one's opening: that markup is dropped."""
        if self._eof and self._calls and self._truncated(at, opening):
            self._pos, self._state = len(self._buf), "text"
            return True
        return False

    def _fail_call(self) -> bool:
        if self._in_block == 0:
            if self._drop_truncated(self._block_start, opening=True):
                return True
            return self._fail(self._block_start)
        if self._drop_truncated(self._pos, opening=False):
            return True
        self._after_call = True
        return self._fail(self._pos)

    def _arguments(self) -> bool:
        end, closed = self._scan.run(self._buf, self._pos)
        if end > self._pos:
            self._out.append(ToolCallDelta(self._calls - 1, self._buf[self._pos:end]))
        self._pos = end
        if closed:
            self._scan = _Scanner(depth=1)
            self._state = "tail"
            return True
        return False

    def _tail(self) -> bool:
        """The rest of the call object after its arguments (normally just ``}``)."""
        self._pos, closed = self._scan.run(self._buf, self._pos)
        if closed:
            self._state = "after"
        return closed

    def _after(self) -> bool:
        buf, eof = self._buf, self._eof
        if self.fmt.sep is not None:
            r = _literals(buf, self._pos, (self.fmt.sep,), eof)
            if r == _NEED:
                return False
            if r >= 0:
                self._pos = r
                self._state = "header"
                return True
        r = _literals(buf, self._pos, self.fmt.close, eof)
        if r == _NEED:
            return False
        if r == _FAIL and eof and _literals(buf, self._pos, self.fmt.close, False) == _NEED:
            r = len(buf)  # the reply ended inside the closing marker
        self._after_call = True
        self._state = "text"
        if r >= 0:
            self._pos = self._search = r
        elif not self.fmt.anywhere:
            self._at_start = False
        return True


def parse_reply(text: str, fmt: Format, rng: random.Random | None = None) -> ParsedReply:
    """The whole reply ``text`` as content and calls (the streaming parser fed it at once)."""
    parser = ToolStreamParser(fmt, rng)
    return collect(parser.feed(text) + parser.finish())
