"""The gRPC server's process: health while warming up, SIGTERM drains, a drain that runs out of time,
a second signal, an engine that dies, slow tokenizing off the event loop. Each test starts its own
server process (tests/test_server.py shares one)."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jserve.client import Client
from jserve.v1 import jserve_pb2 as pb

from .servers import ServerProcess
from .step_hold import HoldableServer
from .waits import wait_until

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        return check(health_pb2.HealthCheckRequest(service="jserve.v1.Generation"), timeout=5).status


def _held_server(tiny_ckpt, tmp_path, *args: str, **kwargs) -> HoldableServer:
    return HoldableServer(tiny_ckpt, tmp_path / "hold", "--slots", "2", "--max-len", "1024", *args, **kwargs)


def _sigterm_while_streaming(s: HoldableServer, c: Client) -> tuple[Iterator[pb.GenerateResponse], float]:
    """Inside ``with s.hold``: a long stream held in a decode step when SIGTERM comes (on any
    device); returns the call and when the signal went, once the server is draining."""
    call = c.stream([1, 2, 3], max_tokens=1000, **GREEDY)
    wait_until(lambda: s.said("STEP HELD"), "the request reached a decode step")
    signalled = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: _health(s.address) == health_pb2.HealthCheckResponse.NOT_SERVING, "draining")
    return call, signalled


def test_health_is_not_serving_during_warmup_and_sigterm_drains_then_exits_0(tiny_ckpt, tmp_path):
    s = _held_server(tiny_ckpt, tmp_path, "--max-prompt-len", "128", wait_serving=False)
    try:
        channel = grpc.insecure_channel(s.address)
        health = health_pb2_grpc.HealthStub(channel)
        statuses = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            st = health.Check(health_pb2.HealthCheckRequest(service="jserve.v1.Generation"), timeout=5).status
            if not statuses or statuses[-1] != st:
                statuses.append(st)
            if st == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.05)
        assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING]

        with Client(s.address) as c:
            with s.hold:  # the request is running (held in a step) when the signal comes, on any device
                call, _ = _sigterm_while_streaming(s, c)
                with pytest.raises(grpc.RpcError) as e:  # while draining, new work is refused
                    list(c.stream("new work", max_tokens=2))
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
            pieces = list(call)  # in-flight work is finished, not cut
            assert pieces[-1].finish_reason == pb.LENGTH
            assert sum(len(p.token_ids) for p in pieces) == 1000
        assert s.proc.wait(60) == 0
    finally:
        s.stop()


def test_a_drain_that_runs_out_of_time_ends_streams_with_unavailable(tiny_ckpt, tmp_path):
    s = _held_server(tiny_ckpt, tmp_path, "--max-prompt-len", "16", "--drain-timeout", "0.1")
    try:
        with Client(s.address) as c:
            with s.hold:  # still running when the 0.1 s drain ends, on any device
                call, signalled = _sigterm_while_streaming(s, c)
                # The drain gives up 0.1 s after it starts, then waits 5 s for the loop to cut the
                # request: the steps go on between the two.
                wait_until(lambda: time.monotonic() > signalled + 1.5, "the drain ran out")
            with pytest.raises(grpc.RpcError) as e:
                list(call)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shut down before request" in e.value.details() and "retry" in e.value.details()
        assert s.proc.wait(60) == 0
    finally:
        s.stop()


def test_sigterm_during_warmup_exits_without_waiting_for_compilation(tiny_ckpt, tmp_path):
    s = ServerProcess(tiny_ckpt, "--slots", "2", "--max-len", "1024", "--max-prompt-len", "1000",
                      "--compile-cache", str(tmp_path / "empty-cache"), "--log-level", "INFO", wait_serving=False)
    try:
        s.proc.send_signal(signal.SIGTERM)  # the model is still loading or compiling
        assert s.proc.wait(60) == 0
        assert "stopped during start-up" in s.stderr_tail()  # (waits for stderr to be read)
        log = "\n".join(getattr(s, "err", []))
        assert "warm-up compiled" not in log  # it did not wait for the compilation to finish
        assert not s._serving.is_set()
    finally:
        s.stop()


# A server whose background compilation (warm-up's second phase) is held inside a call until a
# release file appears: a stand-in for an XLA compile of many seconds.
HELD_COMPILE_SERVER = """
import os, pathlib, sys, threading, time
import jserve.engine as e
release = pathlib.Path(os.environ["JSERVE_TEST_RELEASE"])
compile_ = e.JaxEngine._compile
def held(self, key, *args, **kwargs):
    if threading.current_thread().name == "jserve-warmup":
        os.write(1, b"BACKGROUND COMPILE HELD\\n")
        give_up = time.monotonic() + 120
        while not release.exists() and time.monotonic() < give_up:
            time.sleep(0.01)
        os.write(1, b"BACKGROUND COMPILE RELEASED\\n")
    return compile_(self, key, *args, **kwargs)
e.JaxEngine._compile = held
from jserve.server import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_the_background_compilation_exits_without_waiting_for_it(tiny_ckpt, tmp_path, monkeypatch):
    release = tmp_path / "release"
    monkeypatch.setenv("JSERVE_TEST_RELEASE", str(release))
    s = ServerProcess(tiny_ckpt, "--slots", "2", "--max-len", "128", "--speculate", "4", "--log-level", "INFO",
                      launch=("-c", HELD_COMPILE_SERVER))
    try:
        wait_until(lambda: "BACKGROUND COMPILE HELD" in s.lines, "the background phase is inside a compile")
        with Client(s.address) as c:  # serving goes on meanwhile
            assert c.complete([1, 2, 3], max_tokens=4, timeout=60, **GREEDY).completion_tokens == 4
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(60) == 0
        assert "stopped (all requests finished)" in s.stderr_tail()  # (waits for stderr to be read)
        # It exited while the compile was still held: not after it, nor after the phase's end.
        assert "BACKGROUND COMPILE RELEASED" not in s.lines
        assert not any("background compilation" in line for line in s.err)
    finally:
        release.touch()
        s.stop()


def test_a_second_signal_while_draining_exits_at_once(tiny_ckpt, tmp_path):
    s = _held_server(tiny_ckpt, tmp_path, "--max-prompt-len", "16", "--drain-timeout", "600")
    try:
        with Client(s.address) as c, s.hold:  # the request cannot finish (and the drain end) on its own
            call, _ = _sigterm_while_streaming(s, c)
            s.proc.send_signal(signal.SIGINT)
            assert s.proc.wait(60) == 1  # not after the 600 s drain: the request was still running
            with pytest.raises(grpc.RpcError):
                list(call)
        assert "second signal" in s.stderr_tail()
    finally:
        s.stop()


# A server whose device fails for good: decode steps fail after a few, and the state cannot be
# rebuilt. (Patched in the server process itself: jserve has no fault-injection switch.)
DYING_SERVER = """
import sys
import jserve.engine as e
calls = {"generate": 0, "init": 0}
generate, init_state = e.JaxEngine.generate, e.JaxEngine.init_state
def failing_generate(self, state, mask=None, slots=None):
    calls["generate"] += 1
    if calls["generate"] > 5:
        raise RuntimeError("injected device fault")
    return generate(self, state, mask, slots)
def failing_init_state(self):
    calls["init"] += 1
    if calls["init"] > 1:
        raise RuntimeError("injected: the device state cannot be rebuilt")
    return init_state(self)
e.JaxEngine.generate, e.JaxEngine.init_state = failing_generate, failing_init_state
from jserve.server import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_engine_that_dies_ends_streams_turns_not_serving_and_exits_1(tiny_ckpt):
    s = ServerProcess(tiny_ckpt, "--slots", "2", "--max-len", "128", "--speculate", "0", launch=("-c", DYING_SERVER))
    try:
        with Client(s.address) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.complete([5, 6, 7], max_tokens=50, timeout=60, **GREEDY)
            assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
            assert s.proc.wait(60) == 1  # a supervisor sees the failure and restarts it
        assert any("cannot be rebuilt" in line for line in s.err)
    finally:
        s.stop()


# A server whose tokenizer stalls on any text holding "HOLD" until a release file appears: a
# stand-in for a prompt that takes long to tokenize or to render with its chat template.
HOLDING_SERVER = """
import os, pathlib, sys, threading, time
import jserve.tokenizer as t
release = pathlib.Path(os.environ["JSERVE_TEST_RELEASE"])
encode, render_chat = t.TextTokenizer.encode, t.TextTokenizer.render_chat
def hold(what, text):
    if "HOLD" in text:
        # One write(2) per line: lines from threads holding at once must not interleave.
        os.write(1, f"HOLDING {what} on {threading.current_thread().name}\\n".encode())
        deadline = time.monotonic() + 120
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
def held_encode(self, text):
    hold("encode", text)
    return encode(self, text)
def held_render_chat(self, messages, *args, **kwargs):
    hold("render_chat", " ".join(m["content"] for m in messages))
    return render_chat(self, messages, *args, **kwargs)
t.TextTokenizer.encode, t.TextTokenizer.render_chat = held_encode, held_render_chat
from jserve.server import main
sys.exit(main(sys.argv[1:]))
"""


def test_slow_tokenizing_and_chat_rendering_never_hold_up_other_streams(tiny_ckpt, tmp_path, monkeypatch):
    """Requests whose text is slow to tokenize or to render (held here until released) stall
    only themselves: while four are held (gRPC Generate text and chat, Tokenize, HTTP chat), a new
    request is accepted and streamed to its end. Were any of them tokenized on the server's event
    loop, the new request could not even start and its deadline would fail the test."""
    release = tmp_path / "release"
    monkeypatch.setenv("JSERVE_TEST_RELEASE", str(release))
    s = ServerProcess(tiny_ckpt, "--slots", "4", "--max-len", "128", "--http-port", "0",
                      "--speculate", "0", launch=("-c", HOLDING_SERVER))
    try:
        held_text = "HOLD the quick brown fox"
        held_chat = [{"role": "user", "content": "HOLD what is two plus two?"}]
        with Client(s.address) as c, ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(c.complete, held_text, timeout=120, max_tokens=4, **GREEDY),
                pool.submit(c.complete, held_chat, timeout=120, max_tokens=4, **GREEDY),
                pool.submit(c.tokenize, held_text),
                pool.submit(_post_json, s, "/v1/chat/completions",
                            {"model": tiny_ckpt.name, "messages": held_chat, "max_tokens": 4, "temperature": 0}),
            ]
            deadline = time.monotonic() + 60
            while sum(line.count("HOLDING") for line in s.lines) < 4:
                assert time.monotonic() < deadline, f"not all requests reached the tokenizer: {s.lines}"
                assert not any(f.done() for f in futures), [f.result() for f in futures if f.done()]
                time.sleep(0.01)
            assert not any("MainThread" in line for line in s.lines)
            # Meanwhile a new request (text too, so it needs the tokenizer's executor as well) runs to its end.
            done = c.complete("the quick brown fox", timeout=60, max_tokens=24, **GREEDY)
            assert done.completion_tokens == 24 and done.finish_reason == "length"
            assert not any(f.done() for f in futures)
            release.touch()
            text_done, chat_done, ids, http_body = (f.result(timeout=60) for f in futures)
        assert (text_done.completion_tokens, chat_done.completion_tokens) == (4, 4)
        assert http_body["usage"]["completion_tokens"] == 4
        with Client(s.address) as c:
            assert ids == c.tokenize(held_text) and ids
    finally:
        release.touch()
        assert s.stop() == 0


def _post_json(server: ServerProcess, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://{server.http_address}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())
