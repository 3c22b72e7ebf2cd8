"""The request layer: one typed request, one validation, one set of defaults and messages.

Every front end (gRPC ``jserve.server``, HTTP ``jserve.http_api``, the offline
``scripts/generate.py`` and the Python ``LLM``) maps its fields onto a ``GenerateRequest`` and its
outcome back through the tables at the end of this file, so the same request gets the same
tokens, the same finish reason and the same error message whichever way it came in:

    GenerateRequest (prompt: text | token ids | chat messages; SamplingParams: sampling, stops,
    constraint, speculation, max_tokens; request_id; timeout)
      → check(request, limits)          before tokenizing: shapes, ranges, sizes
      → LLM tokenizes (chat template)   off the event loop for the servers
      → fit(ids, params, limits)        the prompt's length and the context; max_tokens resolved
      → the orchestrator's stream of outputs, each final one with a ``FinishReason``
      → finish_error(...)               a finish that is a failure, as a ``RequestError``

Defaults (one set, for every front end): those of ``SamplingParams``; ``max_tokens`` not given
means the rest of the context (``max_len`` minus the prompt's tokens), as OpenAI's API has it.
No JAX and no transport here: the HTTP front end imports this before a model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from jserve.chat_messages import (  # noqa: F401 (the chat checks: re-exported, part of the request layer)
    ANY_MESSAGE_FIELD,
    CHAT_ROLES,
    MESSAGE_FIELDS,
    MESSAGE_UNSUPPORTED,
    check_role_fields,
    normalize_chat,
)
from jserve.errors import (
    INVALID_TYPE,
    INVALID_VALUE,
    MISSING,
    ErrorKind,
    InvalidRequestError,
    RequestError,
    range_code,
)
from jserve.streams import FinishReason  # why a request ended: the orchestrator's enum

if TYPE_CHECKING:
    from jserve.sampling import SamplingParams

__all__ = ["ERRORS", "FINISHES", "ErrorKind", "FinishReason", "GenerateRequest", "Limits", "RequestError",
           "check", "finish_error", "fit", "normalize_chat", "sampling_params"]

PromptInput = str | Sequence[dict[str, Any]] | Sequence[int]

@dataclasses.dataclass(frozen=True)
class Limits:
    """What a loaded server accepts (``LLM.limits``)."""

    vocab_size: int
    max_len: int  # prompt + output positions per slot
    max_prompt_len: int
    max_logprobs: int
    max_token_bytes: int | None  # the longest token's bytes; None without a tokenizer
    kv_positions: int | None = None  # positions the KV page pool holds in all (--kv-memory); None: no pool


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """One generation request, as every front end hands it to ``LLM``.

    ``prompt``: text, a list of token ids, or OpenAI chat messages. ``params``: sampling, stops,
    structured-output constraint, speculation, logit bias and ``max_tokens`` (None: the rest of
    the context). ``timeout``: seconds from submission to the deadline (one already passed ends the
    request as ``deadline`` before its first token, as a gRPC call whose deadline passed in flight)."""

    prompt: PromptInput
    params: SamplingParams | None = None
    request_id: str | None = None
    timeout: float | None = None


def parse_stop(stop: Any) -> tuple[str, ...]:
    """``stop`` as the APIs send it (None, a string, or a list of strings) as a tuple of strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if not isinstance(stop, (list, tuple)):
        raise InvalidRequestError(wrong_type("stop", "a string or a list of strings", stop), INVALID_TYPE)
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise InvalidRequestError(wrong_type(f"stop[{i}]", "a string", s), INVALID_TYPE)
    return tuple(stop)


# The type each sampling field takes, and the words every front end uses for a value of another type.
FIELD_TYPES: dict[str, type] = {
    "max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "min_p": float, "seed": int,
    "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float, "logprobs": int,
    "speculate": bool, "ignore_eos": bool, "skip_special_tokens": bool,
    "n": int, "timeout": float,  # the HTTP body's own (bounds checked by pydantic)
}
TYPE_WORDS = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", list: "a list",
              dict: "an object"}


def kind_of(value: Any) -> str:
    """A value's JSON kind in words, with the value when it is short: ``a string: "ten"``."""
    if value is None:
        return "null"
    kind = next((w for t, w in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                                ((list, tuple), "a list"), (dict, "an object")) if isinstance(value, t)), None)
    if kind is None:
        return type(value).__name__
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return f"{kind}: {text if len(text) <= 40 else text[:37] + '...'}"


def wrong_type(field: str, expected: str, value: Any) -> str:
    """The one message for a field of the wrong type: ``max_tokens must be an integer, got a string: "ten"``."""
    return f"{field} must be {expected}, got {kind_of(value)}"


def check_types(fields: dict[str, Any]) -> None:
    """Refuse a sampling field (``FIELD_TYPES``) given with a value of another type (None: not given)."""
    for name, value in fields.items():
        want = FIELD_TYPES.get(name)
        if want is None or value is None:
            continue
        ok = isinstance(value, (int, float) if want is float else want)
        if want is not bool and isinstance(value, bool):
            ok = False
        if not ok:
            raise InvalidRequestError(wrong_type(name, TYPE_WORDS[want], value), INVALID_TYPE)


# pydantic's error types (a JSON body) in the words of ``TYPE_WORDS``.
_PYDANTIC_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "string_type": "a string", "bool_type": "a boolean", "bool_parsing": "a boolean", "list_type": "a list",
    "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
}
# pydantic's bound errors: the comparison, its key in the error's ``ctx``, whether the value is below it.
_PYDANTIC_BOUNDS = {"greater_than": (">", "gt", True), "greater_than_equal": (">=", "ge", True),
                    "less_than": ("<", "lt", False), "less_than_equal": ("<=", "le", False)}
_UNION_BRANCHES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
                   "list[int]": "a list of integers", "list[str]": "a list of strings",
                   "list[list[int]]": "a list of lists of integers"}


def _branch_words(tag: str) -> str:
    """A union branch's tag (``str``, ``list[int]``, ``list[ContentPart]``) in words."""
    if tag in _UNION_BRANCHES:
        return _UNION_BRANCHES[tag]
    return "a list" if tag.startswith("list[") else "an object" if tag.startswith("dict[") else f"a {tag}"


def field_path(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# What an item of a field (by the field's name) is, where "an object" alone would not say which.
_ITEM_WORDS = {"content": "a content part"}


def _one_of(words: Sequence[str]) -> str:
    """``a string``, ``a string or a list``, ``an integer, a string or a list``."""
    words = list(dict.fromkeys(words))
    return " or ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " or " + words[-1]


def _item_error(branches: Sequence[dict[str, Any]], n: int, value: Any) -> tuple[str, str] | None:
    """When the value sent is a list (or an object), the error of the item inside it, by the
    field's type of list (or object) that gets furthest into it: the only one
    (``messages[0].content[0] must be an object ...``), or of several (``prompt``: ``prompt[1]
    must be an integer ...`` for ``[1, "a"]``, ``prompt[1][1] ...`` for ``[[1, 2], [3, "a"]]``);
    where they tie, the item and each type it could take. None when no item is at fault."""
    kind = "list[" if isinstance(value, list) else "dict[" if isinstance(value, dict) else None
    first: dict[str, dict[str, Any]] = {}  # each such type's first error inside the value
    for e in branches:
        if kind is not None and str(e["loc"][n]).startswith(kind) and len(e["loc"]) > n + 1:
            first.setdefault(e["loc"][n], e)
    if not first:
        return None
    if len(first) > 1 and not all(isinstance(x, int) for e in first.values() for x in e["loc"][n + 1:]):
        return None
    at = max(tuple(e["loc"][n + 1:]) for e in first.values())  # the furthest into the value
    best = [e for e in first.values() if tuple(e["loc"][n + 1:]) == at]
    words = [_PYDANTIC_EXPECTED.get(e.get("type", "")) for e in best]
    if None in words or (len(best) > 1 and any(len(e["loc"]) != n + 2 for e in best)):
        return None
    inner = best[0]
    loc = inner["loc"][:n] + inner["loc"][n + 1:]
    expected = _one_of(words)
    item = _ITEM_WORDS.get(str(inner["loc"][n - 1]))
    if item is not None and expected == "an object":
        expected = f"an object ({item})"
    return wrong_type(field_path(loc), expected, inner.get("input")), field_path(loc)


def body_error(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None, str | None]:
    """A JSON body's validation errors (pydantic's) as one message, the field it names and
    OpenAI's error code for it (``INVALID_TYPE``, ``MISSING``, ``INVALID_VALUE`` or None), worded
    as ``wrong_type`` words them: which field, the type it takes, what was sent."""
    errors = [{**e, "loc": tuple(x for x in e.get("loc", ()) if x != "body")} for e in errors]
    if not errors:
        return "invalid request body", None, None
    first = errors[0]
    loc = first["loc"]
    # A field of several types (``prompt``: a string or lists): one error per type, tagged by the type.
    n = len(loc) - 1
    branches = [e for e in errors if len(e["loc"]) > n and e["loc"][:n] == loc[:n] and isinstance(e["loc"][n], str)]
    tags = list(dict.fromkeys(e["loc"][n] for e in branches))
    if n >= 1 and len(tags) > 1:
        field = field_path(loc[:n])
        expected = _one_of([_branch_words(t) for t in tags])
        value = next((e.get("input") for e in branches if len(e["loc"]) == n + 1), first.get("input"))
        inner = _item_error(branches, n, value)
        message, where = inner if inner is not None else (wrong_type(field, expected, value), field)
        return message, where, INVALID_TYPE
    field = field_path(loc)
    if first.get("type") == "missing":
        return f"{field} is required", field, MISSING
    expected = _PYDANTIC_EXPECTED.get(first.get("type", ""))
    if expected is not None:
        return wrong_type(field, expected, first.get("input")), field, INVALID_TYPE
    bound = _PYDANTIC_BOUNDS.get(first.get("type", ""))
    if bound is not None:  # a number past a bound of the body's own (``n``, ``timeout``)
        op, key, below = bound
        value, limit = first.get("input"), (first.get("ctx") or {}).get(key)
        integer = FIELD_TYPES.get(str(loc[-1]), type(value)) is int
        return f"{field} must be {op} {limit}, got {kind_of(value)}", field, range_code(integer, below)
    return ("; ".join(f"{field_path(e['loc'])}: {e.get('msg')}" for e in errors[:5]), field or None,
            INVALID_VALUE if first.get("type") in ("literal_error", "enum") else None)


def sampling_params(*, stop: Any = None, logit_bias: Any = None, stop_token_ids: Any = None,
                    **given: Any) -> SamplingParams:
    """``SamplingParams`` from a front end's fields: a field that is None (not given) takes the one
    default, ``SamplingParams``'; ``stop`` may be a string or a list, ``logit_bias`` a mapping of
    token id (int or decimal string, as JSON sends it) to bias, or (id, bias) pairs."""
    from jserve.sampling import SamplingParams

    fields = {k: v for k, v in given.items() if v is not None}
    check_types(fields)
    if logit_bias:  # checked, and made (int, float) pairs, by ``check_params``
        fields["logit_bias"] = tuple(logit_bias.items() if hasattr(logit_bias, "items") else logit_bias)
    return SamplingParams(stop=parse_stop(stop), stop_token_ids=tuple(stop_token_ids or ()), **fields)


def check_text_fits(text: str, what: str, limits: Limits) -> None:
    """Refuse, before tokenizing it, a text that must hold more tokens than a prompt may: every
    token stands for at most ``max_token_bytes`` bytes, so more bytes than that many tokens'
    worth can never fit (a multi-megabyte prompt is refused at once, not after tokenizing)."""
    if limits.max_token_bytes is None:
        raise InvalidRequestError("this checkpoint has no tokenizer; send token ids")
    limit = limits.max_prompt_len * limits.max_token_bytes
    if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
        n = len(text.encode("utf-8", "surrogatepass"))
        raise InvalidRequestError(
            f"{what} has {n} bytes; this server accepts prompts of at most {limits.max_prompt_len} tokens, "
            f"which is at most {limits.max_token_bytes * limits.max_prompt_len} bytes of text "
            f"({limits.max_token_bytes} bytes per token at most)")


def prompt_kind(prompt: Any, limits: Limits) -> str:
    """``"text"``, ``"chat"`` or ``"ids"`` after the checks that need no tokenizer: present,
    non-empty, of one kind, token ids in the vocabulary, text not beyond what can fit."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        check_text_fits(prompt, "the prompt", limits)
        return "text"
    if not isinstance(prompt, Sequence) or isinstance(prompt, bytes):
        raise InvalidRequestError(f"a prompt must be text, chat messages or token ids, got {type(prompt).__name__}")
    if not prompt:
        raise InvalidRequestError("the prompt is empty")
    if all(isinstance(m, dict) for m in prompt):
        return "chat"  # checked by ``normalize_chat`` before its template renders it
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        v = limits.vocab_size
        for i, t in enumerate(prompt):
            if not 0 <= t < v:
                raise InvalidRequestError(f"token id {t} at index {i} is outside the vocabulary [0, {v})",
                                          INVALID_VALUE, f"prompt[{i}]")
        return "ids"
    raise InvalidRequestError("a list prompt must hold only chat messages (objects) or only token ids (integers)")


def check(request: GenerateRequest, limits: Limits) -> SamplingParams:
    """Everything about ``request`` that can be checked before tokenizing, in one place; returns
    its ``SamplingParams`` (the defaults when it has none). ``InvalidRequestError`` if not servable."""
    from jserve.sampling import MAX_REQUEST_ID_CHARS, SamplingParams

    rid = request.request_id
    if rid is not None and len(rid) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(f"request_id may have at most {MAX_REQUEST_ID_CHARS} characters, got {len(rid)}")
    params = check_params(request.params if request.params is not None else SamplingParams(), limits)
    prompt_kind(request.prompt, limits)
    return params


def check_params(params: SamplingParams, limits: Limits) -> SamplingParams:
    """The sampling parameters' own checks (ranges, stops, logit bias, logprobs); ``params`` with
    its logit bias as (int token id, float bias) pairs."""
    from jserve.sampling import validate_logit_bias

    if not isinstance(params.stop, tuple) or not all(isinstance(s, str) for s in params.stop):
        parse_stop(params.stop)  # refuses with the one message for a stop of the wrong type
    params.validate(limits.vocab_size, limits.max_logprobs)
    if params.logit_bias:
        params = dataclasses.replace(params, logit_bias=validate_logit_bias(params.logit_bias, limits.vocab_size))
    return params


# OpenAI's code for a prompt (with its max_tokens) longer than the model's context.
CONTEXT_CODE = "context_length_exceeded"


def fit(ids: Sequence[int], params: SamplingParams, limits: Limits) -> SamplingParams:
    """The checks that need the prompt's tokens; returns ``params`` with ``max_tokens`` resolved
    (not given: the rest of the context)."""
    if not ids:
        raise InvalidRequestError("the prompt is empty")
    if len(ids) > limits.max_prompt_len:
        raise InvalidRequestError(f"the prompt has {len(ids)} tokens; this server accepts at most "
                                  f"{limits.max_prompt_len}", code=CONTEXT_CODE)
    room = limits.max_len - len(ids)
    if limits.kv_positions is not None and len(ids) + 1 > limits.kv_positions:
        raise InvalidRequestError(f"the prompt has {len(ids)} tokens; the KV cache holds at most "
                                  f"{limits.kv_positions} positions in all (--kv-memory)", code=CONTEXT_CODE)
    if params.max_tokens is None:
        return dataclasses.replace(params, max_tokens=min(room, _pool_room(ids, limits)))
    if params.max_tokens > room:
        raise InvalidRequestError(
            f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
            f"{limits.max_len} tokens; lower max_tokens to at most {room}", code=CONTEXT_CODE)
    if params.max_tokens > _pool_room(ids, limits):
        raise InvalidRequestError(
            f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) needs more than the "
            f"{limits.kv_positions} positions the KV cache holds in all (--kv-memory); lower max_tokens to "
            f"at most {_pool_room(ids, limits)}", code=CONTEXT_CODE)
    return params


def _pool_room(ids: Sequence[int], limits: Limits) -> int:
    """Output tokens a request with prompt ``ids`` can have in the KV page pool when it runs alone."""
    return limits.max_len if limits.kv_positions is None else limits.kv_positions - len(ids)


def finish_error(reason: str | None, request_id: str, completion_tokens: int, error: str | None,
                 max_undelivered: int) -> RequestError | None:
    """The error a request's final piece stands for, if it did not end normally (one message for
    every front end)."""
    if reason == FinishReason.DEADLINE:
        return RequestError(ErrorKind.DEADLINE, f"request {request_id}: the deadline passed after "
                                                f"{completion_tokens} tokens")
    if reason == FinishReason.SHUTDOWN:
        return RequestError(ErrorKind.SHUTTING_DOWN, f"the server shut down before request {request_id} finished "
                                                     f"({completion_tokens} tokens sent); retry it")
    if reason == FinishReason.SLOW_READER:
        return RequestError(ErrorKind.SLOW_READER, f"request {request_id} ended after {completion_tokens} tokens: "
                                                   f"the client left more than {max_undelivered} pieces unread "
                                                   "(--max-undelivered)")
    if reason == FinishReason.ERROR:
        return RequestError(ErrorKind.INTERNAL, f"request {request_id} failed: {error}")
    return None


# ---- the protocols, side by side -----------------------------------------------------------------
class Edge(NamedTuple):
    """How one error kind reads in each protocol; ``rejected``: the label it is counted under in
    ``jserve_requests_rejected`` when it refuses a request before it runs (None: not counted there;
    a full queue is counted by the orchestrator whichever front end it came through)."""

    grpc: str  # grpc.StatusCode's name
    http: int  # HTTP status
    openai_type: str  # OpenAI's error "type"
    openai_code: str | None  # OpenAI's error "code"
    rejected: str | None


ERRORS: dict[ErrorKind, Edge] = {
    ErrorKind.INVALID: Edge("INVALID_ARGUMENT", 400, "invalid_request_error", None, "invalid_argument"),
    ErrorKind.NOT_FOUND: Edge("NOT_FOUND", 404, "invalid_request_error", "model_not_found", "not_found"),
    ErrorKind.QUEUE_FULL: Edge("RESOURCE_EXHAUSTED", 429, "server_error", "queue_full", None),
    ErrorKind.WARMING_UP: Edge("UNAVAILABLE", 503, "server_error", "warming_up", "unavailable"),
    ErrorKind.SHUTTING_DOWN: Edge("UNAVAILABLE", 503, "server_error", "shutting_down", "unavailable"),
    ErrorKind.DEADLINE: Edge("DEADLINE_EXCEEDED", 504, "timeout", "deadline_exceeded", None),
    ErrorKind.SLOW_READER: Edge("RESOURCE_EXHAUSTED", 429, "server_error", "slow_reader", None),
    ErrorKind.INTERNAL: Edge("INTERNAL", 500, "server_error", "internal_error", None),
}


class Finish(NamedTuple):
    """How a finish reason reads in each protocol: the gRPC ``FinishReason`` enum's name and
    OpenAI's ``finish_reason`` (None: the finish is an error, ``finish_error``'s)."""

    grpc: str | None
    openai: str | None


FINISHES: dict[FinishReason, Finish] = {
    FinishReason.STOP: Finish("STOP", "stop"),  # after tool calls: TOOL_CALLS / "tool_calls"
    FinishReason.LENGTH: Finish("LENGTH", "length"),
    FinishReason.CANCELLED: Finish("CANCELLED", None),  # the client is gone: nobody reads it
    FinishReason.DEADLINE: Finish(None, None),
    FinishReason.ERROR: Finish(None, None),
    FinishReason.SHUTDOWN: Finish(None, None),
    FinishReason.SLOW_READER: Finish(None, None),
}
