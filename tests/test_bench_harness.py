"""scripts/bench_harness.py's ``start_server`` over stand-in servers (a few lines of Python that
print what ``jserve.server`` prints): the addresses read, a server gone or silent refused; its
decode timing (``settle``, ``time_decode``) over stand-in engines that log their steps."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
from bench_harness import settle, start_server, time_decode  # noqa: E402


def _stand_in(*lines: str, then: str = "import time; time.sleep(60)") -> list[str]:
    return [sys.executable, "-c", "\n".join([*(f"print({line!r}, flush=True)" for line in lines), then])]


def test_the_addresses_printed_before_serving_are_read_and_the_output_drained_after():
    flood = "for _ in range(2000): print('log line ' * 20, flush=True)"  # far more than a pipe holds
    s = start_server([], cmd=_stand_in("jserve listening on 127.0.0.1:5001", "jserve http listening on 127.0.0.1:5002",
                                       "jserve SERVING", then=flood))
    assert (s.grpc_address, s.http_address) == ("127.0.0.1:5001", "127.0.0.1:5002")
    assert s.proc.wait(60) == 0  # it wrote all of it and exited: nothing blocked on a full pipe


def test_a_server_without_http_has_no_http_address():
    s = start_server([], cmd=_stand_in("jserve listening on [::]:7", "jserve SERVING"))
    try:
        assert (s.grpc_address, s.http_address) == ("[::]:7", None)
    finally:
        s.stop()


def test_a_server_that_exits_before_serving_is_refused_with_its_exit_code():
    with pytest.raises(RuntimeError, match=r"exited \(3\) before SERVING"):
        start_server([], cmd=_stand_in("jserve listening on 127.0.0.1:5001", then="raise SystemExit(3)"))


def test_a_server_that_never_serves_is_killed_after_the_timeout():
    with pytest.raises(RuntimeError, match="not SERVING within 0.5 s"):
        start_server([], timeout=0.5, cmd=_stand_in("jserve listening on 127.0.0.1:5001"))


class _Engine:
    """Stands in for ``JaxEngine.generate``: the state counts this engine's steps; every step is logged."""

    def __init__(self, name: str, log: list[str]):
        self.name, self.log = name, log

    def generate(self, state: int):
        self.log.append(self.name)
        return state + 1, [[float(state)]]


def test_decode_timing_takes_rounds_of_every_engine_in_turn_and_keeps_each_state():
    log: list[str] = []
    a, b = _Engine("a", log), _Engine("b", log)
    runs = {"a": (a, settle(a, 0)), ("b", 8): (b, settle(b, 100, steps=3))}
    assert (runs["a"][1], runs[("b", 8)][1]) == (2, 103) and log == ["a"] * 2 + ["b"] * 3
    log.clear()
    medians = time_decode(runs, rounds=3, steps=4)
    assert log == (["a"] * 4 + ["b"] * 4) * 3  # round-robin: noise hits every engine alike
    assert list(medians) == ["a", ("b", 8)] and all(m >= 0 for m in medians.values())
