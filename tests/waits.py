"""Waiting in tests on conditions and on counted decode steps, never on the clock.

A test that sleeps a fixed time to let something happen, or asserts that something happened
within so many seconds, passes or fails with the speed of the machine. These wait for the thing
itself; the bound is only there to fail a hung test, far above any wait that is expected.
"""

from __future__ import annotations

import time
from collections.abc import Callable

BOUND_S = 120.0  # for a hung test only: never an expectation of speed


def wait_until(cond: Callable[[], bool], what: str, bound_s: float = BOUND_S) -> None:
    """Poll ``cond`` until it is true; fail naming ``what`` if it is still false after ``bound_s``."""
    give_up = time.monotonic() + bound_s
    while not cond():
        assert time.monotonic() < give_up, f"never happened: {what}"
        time.sleep(0.002)


def wait_steps(orch, n: int) -> None:
    """Return once ``orch``'s decode loop has taken ``n`` more steps, or has nothing left to run:
    a request submitted next joins the batch a known number of steps later, on any device."""
    target = orch.steps + n
    wait_until(lambda: orch.steps >= target or not (orch.num_running or orch.num_waiting),
               f"{n} more decode steps")
