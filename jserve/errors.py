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


class RequestError(ValueError):
    """A request refused or ended by the serving edge; ``kind`` says which way, the message why."""

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind, self.message = ErrorKind(kind), message


class InvalidRequestError(RequestError):
    """A request that can never be served as given; the message says exactly why."""

    def __init__(self, message: str):
        super().__init__(ErrorKind.INVALID, message)
