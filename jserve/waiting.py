"""The bounded queue of requests waiting for a slot, and whether the orchestrator still takes work.

Any thread puts and withdraws requests; the orchestrator's loop waits on it for work and takes
requests from it, oldest first. Backpressure: a full queue refuses (``QueueFullError``) or blocks
the submitter. One lock guards the queue and the orchestrator's run state (stopping, aborting,
dead), so a request is never queued behind a shutdown that will not serve it.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from jserve.streams import SHUTDOWN, EngineDeadError, FinishReason, QueueFullError, Request, ShuttingDownError


class WaitingQueue:
    """At most ``max_waiting`` requests, oldest first. Thread-safe."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._cv = threading.Condition()
        self._q: collections.deque[Request] = collections.deque()
        self.stopping = False  # no new requests; the loop ends once nothing is left
        self.aborting = False  # shutdown without (or past) its drain: the loop cuts everything
        self.dead: str | None = None  # the engine died: why

    def __len__(self) -> int:
        return len(self._q)

    def put(self, req: Request, block: bool, on_full: Callable[[], None]) -> None:
        """Queue ``req``; when full, call ``on_full`` and raise ``QueueFullError`` (or, ``block``,
        wait for room). Raises ``ShuttingDownError`` (``EngineDeadError``) once no work is taken."""
        with self._cv:
            while True:
                if self.dead is not None:
                    raise EngineDeadError(self.dead)
                if self.stopping:
                    raise ShuttingDownError("server is shutting down; not accepting new requests")
                if len(self._q) < self.max_waiting:
                    break
                if not block:
                    on_full()
                    raise QueueFullError(f"waiting queue is full ({self.max_waiting} requests); retry later")
                self._cv.wait(0.05)
            self._q.append(req)
            self._cv.notify_all()

    def put_front(self, req: Request) -> None:
        """Put back a request taken but not started (its KV pages are not there yet): first in line
        again, whatever the queue's bound."""
        with self._cv:
            self._q.appendleft(req)
            self._cv.notify_all()

    def withdraw(self, req: Request) -> bool:
        """Mark ``req`` cancelled and take it out of the queue; True if it was waiting."""
        with self._cv:
            req.cancelled = True
            try:
                self._q.remove(req)
                waiting = True
            except ValueError:
                waiting = False
            self._cv.notify_all()
        return waiting

    def stop(self, abort: bool) -> None:
        """Take no more work; ``abort``: and cut what runs and waits."""
        with self._cv:
            self.stopping = True
            self.aborting = self.aborting or abort
            self._cv.notify_all()

    def kill(self, message: str) -> list[Request]:
        """The engine is dead (``message``): refuse new work; returns every waiting request."""
        with self._cv:
            self.dead = message
            self.stopping = True
            waiting, self._q = list(self._q), collections.deque()
            self._cv.notify_all()
        return waiting

    def wait_for_work(self, busy: Callable[[], bool]) -> bool:
        """Block while nothing runs (``busy``) or waits; False once stopping with nothing left."""
        with self._cv:
            while not busy() and not self._q and not self.stopping:
                self._cv.wait()
            return not (self.stopping and not busy() and not self._q)

    def wake(self) -> None:
        """Wake blocked submitters: the queue may have room."""
        with self._cv:
            self._cv.notify_all()

    def take_ended(self, now: float) -> list[tuple[Request, FinishReason]]:
        """Remove the requests that must end before they start (cancelled, expired, or all when
        aborting), with why."""
        with self._cv:
            keep: collections.deque[Request] = collections.deque()
            ended = []
            for req in self._q:
                reason = SHUTDOWN if self.aborting else req.ended(now)
                if reason:
                    ended.append((req, reason))
                else:
                    keep.append(req)
            self._q = keep
        return ended

    def take(self, skipped: int, skip: Callable[[Request], bool], most_skipped: int) -> tuple[Request | None, int]:
        """The oldest request after the first ``skipped``, removed from the queue, passing over (and
        counting) those ``skip`` says must wait, at most ``most_skipped`` in all; (None, skipped)
        when there is none. ``skip`` is called under the queue's lock."""
        with self._cv:
            while skipped < len(self._q) and skipped <= most_skipped:
                req = self._q[skipped]
                if skip(req):
                    skipped += 1
                    continue
                del self._q[skipped]
                return req, skipped
        return None, skipped
