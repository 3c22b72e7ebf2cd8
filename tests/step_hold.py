"""A server process whose decode steps a test can hold, and which says when it cancels a request.

A deadline that passes, a client that goes away, a drain that runs out of time: each must land
while a request is still running. Racing the device for that (a 0.05 s deadline on 120 tokens)
fails on a fast one. Here the test holds the engine's decode steps (``with server.hold:``), so the
request cannot finish whatever the device's speed, and waits for what it needs on the server's
stdout: ``STEP HELD`` when a step starts waiting, ``CANCELLED <request id>`` when the orchestrator
is asked to cancel a request. (Patched in the server process: jserve has no such switch.)
"""

from __future__ import annotations

import pathlib

import pytest

from .servers import ServerProcess

ENV = "JSERVE_TEST_HOLD_STEPS"

LAUNCH_CODE = """
import os, pathlib, sys, time
import jserve.engine as e
import jserve.orchestrator as o
hold = pathlib.Path(os.environ["JSERVE_TEST_HOLD_STEPS"])
def held(call):
    def step(self, *args, **kwargs):
        if hold.exists():
            os.write(1, b"STEP HELD\\n")
            give_up = time.monotonic() + 300
            while hold.exists() and time.monotonic() < give_up:
                time.sleep(0.002)
        return call(self, *args, **kwargs)
    return step
for name in ("generate", "verify"):
    if hasattr(e.JaxEngine, name):
        setattr(e.JaxEngine, name, held(getattr(e.JaxEngine, name)))
cancel = o.Orchestrator.cancel
def said_cancel(self, req, *args, **kwargs):
    cancel(self, req, *args, **kwargs)
    os.write(1, f"CANCELLED {req.request_id}\\n".encode())
o.Orchestrator.cancel = said_cancel
from jserve.server import main
sys.exit(main(sys.argv[1:]))
"""


class StepHold:
    """While open, every decode step of its server waits (the step is not lost: it runs on release)."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __enter__(self) -> StepHold:
        self.path.touch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


class HoldableServer(ServerProcess):
    """A ``ServerProcess`` with ``hold`` (a ``StepHold``) and counts of what it said on stdout."""

    def __init__(self, checkpoint: pathlib.Path, hold_file: pathlib.Path, *args: str, **kwargs):
        hold_file.unlink(missing_ok=True)
        self.hold = StepHold(hold_file)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(ENV, str(hold_file))
            super().__init__(checkpoint, *args, launch=("-c", LAUNCH_CODE), **kwargs)

    def said(self, prefix: str) -> int:
        """Lines of stdout so far that start with ``prefix`` (``STEP HELD``, ``CANCELLED``)."""
        return sum(line.startswith(prefix) for line in list(self.lines))

