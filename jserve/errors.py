"""The one error type of a request the edge refuses or ends: ``RequestError(kind, message)``.

A leaf module (no JAX, no transport): the layers below raise ``InvalidRequestError`` (the
``INVALID`` kind), the request layer raises the other kinds, and each front end maps a kind to
its protocol's status with the tables of ``jserve.request``.
"""

from __future__ import annotations

import enum


class ErrorKind(str, enum.Enum):
    INVALID = "invalid_argument"  # the request can never be served as given
    NOT_FOUND = "not_found"  # an unknown model or route
    QUEUE_FULL = "queue_full"  # the waiting queue is at capacity: retry later
    WARMING_UP = "warming_up"  # the model is not loaded yet: retry shortly
    SHUTTING_DOWN = "shutting_down"  # the server is draining or has stopped
    DEADLINE = "deadline_exceeded"  # the request's deadline passed while it ran
    SLOW_READER = "slow_reader"  # the client left more output unread than --max-undelivered
    INTERNAL = "internal"  # the engine failed under the request


# OpenAI's error ``code`` for a field refused at the edge (``RequestError.code``; None where OpenAI
# gives none or we do not know its one, e.g. an unknown field); a number out of range: ``range_code``.
INVALID_TYPE = "invalid_type"  # a value of another JSON type than the field takes
MISSING = "missing_required_parameter"  # a required field not given
INVALID_VALUE = "invalid_value"  # a value that is none of the field's known ones (a role, a token id)
ARRAY_TOO_LONG = "array_above_max_length"  # more items than a list takes (stop, messages)
STRING_TOO_LONG = "string_above_max_length"  # a string longer than the field takes (a stop string)
UNKNOWN_PARAMETER = "unknown_parameter"  # a field OpenAI does not document where it was sent
UNSUPPORTED_PARAMETER = "unsupported_parameter"  # a documented field this server cannot honour
# An object with more entries than the field takes (logit_bias past 300): OpenAI's code for an
# object with too many properties (its API's answer to ``metadata`` past 16 entries).
OBJECT_TOO_LARGE = "object_above_max_properties"


def range_code(integer: bool, below: bool) -> str:
    """OpenAI's code for a number outside its field's range, by the field's kind (an integer field
    or a number, "decimal", whatever JSON number was sent) and the bound it passed:
    ``integer_below_min_value``, ``integer_above_max_value``, ``decimal_below_min_value``,
    ``decimal_above_max_value`` (its API answers ``temperature: 200`` with the last)."""
    return f"{'integer' if integer else 'decimal'}_{'below_min' if below else 'above_max'}_value"


class RequestError(ValueError):
    """A request refused or ended by the serving edge; ``kind`` says which way, the message why;
    ``code``: the OpenAI error code it has, if more precise than its kind's; ``param``: the field
    (or the item of one, ``messages[0].role``) it refuses, where the message alone does not say."""

    def __init__(self, kind: ErrorKind, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.code, self.param = ErrorKind(kind), message, code, param


class InvalidRequestError(RequestError):
    """A request that can never be served as given; the message says exactly why."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None):
        super().__init__(ErrorKind.INVALID, message, code, param)
