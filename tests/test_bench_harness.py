"""scripts/bench_harness.py's ``start_server`` over stand-in servers (a few lines of Python that
print what ``jserve.server`` prints): the addresses read, a server gone or silent refused."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
from bench_harness import start_server  # noqa: E402


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
