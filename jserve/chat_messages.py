"""Chat messages as the request layer takes them (``jserve.request`` re-exports all of it): OpenAI's
roles and the fields each documents, and ``normalize_chat``, which checks a chat and makes it
renderable by a chat template. Every front end's chat goes through it (gRPC, HTTP, ``LLM``), so
a message is refused with the same words and the same ``param`` whichever way it came in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jserve.errors import (
    ARRAY_TOO_LONG,
    INVALID_TYPE,
    INVALID_VALUE,
    MISSING,
    UNKNOWN_PARAMETER,
    UNSUPPORTED_PARAMETER,
    InvalidRequestError,
)

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# The fields OpenAI documents on each chat message's role (the ``openai`` client's
# ``ChatCompletion*MessageParam``), and jserve's one extra: ``reasoning_content`` on an assistant
# turn (an earlier reply's reasoning sent back, as vLLM takes it). A field its role does not take
# is refused by name (``messages[1].tool_call_id``, code ``unknown_parameter``), as one that no
# role takes, by every front end; a field of another role sent as null is let through (clients
# that serialize every field of a message class). ``function`` (deprecated) is no role here.
_ROLE_FIELDS = frozenset({"role", "content", "name"})
MESSAGE_FIELDS = {
    "system": _ROLE_FIELDS,
    "developer": _ROLE_FIELDS,
    "user": _ROLE_FIELDS,
    "assistant": _ROLE_FIELDS | {"tool_calls", "refusal", "audio", "function_call", "reasoning_content"},
    "tool": frozenset({"role", "content", "tool_call_id"}),
}
ANY_MESSAGE_FIELD = frozenset().union(*MESSAGE_FIELDS.values())
# An assistant message's documented fields that jserve cannot read back: refused, never dropped.
MESSAGE_UNSUPPORTED = {
    "audio": "an earlier reply's audio is not supported (this server writes text)",
    "function_call": "the deprecated function_call is not supported; send tool_calls",
}


def _content_text(i: int, content: Any) -> str:
    """A message's content as text: a string, or OpenAI's list of content parts whose text parts
    are joined (an assistant's ``refusal`` parts count as text); other parts are refused."""
    if isinstance(content, str):
        return content
    at = f"messages[{i}].content"
    if not isinstance(content, list):
        raise InvalidRequestError(f"message {i}: content must be a string, a list of text parts or null", INVALID_TYPE,
                                  at)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if kind == "refusal" else "text"
        if kind not in ("text", "refusal"):
            raise InvalidRequestError(f"message {i}: content part {j} has type {kind!r}; this server reads "
                                      f"text parts only (\"type\": \"text\")", INVALID_VALUE, f"{at}[{j}].type")
        if not isinstance(part.get(key), str):
            raise InvalidRequestError(f"message {i}: content part {j} needs a string {key!r}",
                                      MISSING if part.get(key) is None else INVALID_TYPE, f"{at}[{j}].{key}")
        texts.append(part[key])
    return "".join(texts)


def check_role_fields(i: int, role: str, m: dict[str, Any]) -> None:
    """Refuse a field of message ``i`` that its ``role`` (one of ``MESSAGE_FIELDS``) does not take
    (``unknown_parameter``; another role's field sent as null passes) or that cannot be honoured
    (``unsupported_parameter``). Shared by ``normalize_chat`` and the HTTP schema's messages."""
    at = f"messages[{i}]"
    takes = MESSAGE_FIELDS[role]
    extra = sorted(k for k in m if k not in takes and (m[k] is not None or k not in ANY_MESSAGE_FIELD))
    if extra:
        listed = ", ".join(repr(k) for k in extra)
        raise InvalidRequestError(f"{at}: unknown parameter{'s' if len(extra) > 1 else ''} {listed} on a {role} "
                                  f"message (it takes {', '.join(sorted(takes))})", UNKNOWN_PARAMETER,
                                  f"{at}.{extra[0]}")
    for key, why in MESSAGE_UNSUPPORTED.items():
        if m.get(key) is not None:
            raise InvalidRequestError(f"{at}.{key}: {why}", UNSUPPORTED_PARAMETER, f"{at}.{key}")


def normalize_chat(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages checked and made renderable: content as text (None stays None on an
    assistant turn with ``tool_calls``), ``developer`` as ``system``; ``InvalidRequestError`` with
    the message's index for anything else, its ``param`` the item refused (``messages[0].role``)."""
    from jserve.sampling import MAX_CHAT_MESSAGES

    if not messages:
        raise InvalidRequestError("the chat has no messages", param="messages")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise InvalidRequestError(f"a chat may have at most {MAX_CHAT_MESSAGES} messages, got {len(messages)}",
                                  ARRAY_TOO_LONG, "messages")
    out = []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequestError(f"message {i} must be an object", INVALID_TYPE, at)
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"message {i}: unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})",
                MISSING if role is None else INVALID_VALUE, f"{at}.role")
        check_role_fields(i, role, m)
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise InvalidRequestError(f"message {i}: only assistant messages carry tool_calls",
                                          param=f"{at}.tool_calls")
            if not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str) for c in calls):
                raise InvalidRequestError(f"message {i}: tool_calls must be a list of {{\"id\", \"type\": "
                                          f"\"function\", \"function\": {{\"name\", \"arguments\"}}}}",
                                          param=f"{at}.tool_calls")
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise InvalidRequestError(f"message {i}: a tool message needs the tool_call_id it answers",
                                      MISSING if m.get("tool_call_id") is None else INVALID_TYPE,
                                      f"{at}.tool_call_id")
        for key in ("name", "tool_call_id", "reasoning_content"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise InvalidRequestError(f"message {i}: {key} must be a string", INVALID_TYPE, f"{at}.{key}")
        msg = {k: v for k, v in m.items() if v is not None and k != "refusal"}  # an earlier refusal: text only
        if content is None:
            if role != "assistant":
                raise InvalidRequestError(f"message {i}: content is required (null only on an assistant message)",
                                          MISSING, f"{at}.content")
            msg["content"] = None
        else:
            msg["content"] = _content_text(i, content)
        if role == "developer":
            msg["role"] = "system"
        out.append(msg)
    return out
