"""The gRPC server, end to end: a real server process on a free localhost port."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jserve.client import AsyncClient, Client
from jserve.v1 import jserve_pb2 as pb

from .servers import ServerProcess
from .step_hold import HoldableServer
from .waits import wait_until

SLOTS, MAX_LEN, MAX_PROMPT, MAX_WAITING = 8, 128, 64, 32
GREEDY = dict(temperature=0.0, ignore_eos=True)


# The server runs float32 and int8-dynamic (the fastest mode on CPU); weight-only int8 goes
# through the engine and orchestrator tests.
# Its decode steps can be held (``with server.hold:``, see step_hold.py): a deadline lands exactly.
@pytest.fixture(scope="module", params=[None, "int8-dynamic"], ids=["f32", "int8-dynamic"])
def server(tiny_ckpt, tmp_path_factory, request):
    quant = ["--quantize", request.param] if request.param else []
    s = HoldableServer(tiny_ckpt, tmp_path_factory.mktemp("hold") / "steps", "--slots", str(SLOTS), "--max-len",
                       str(MAX_LEN), "--max-prompt-len", str(MAX_PROMPT), "--max-waiting", str(MAX_WAITING), *quant)
    s.quantize = request.param
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address) as c:
        yield c


def _wait_slots_free(client) -> int:
    wait_until(lambda: client.model_info().slots_in_use == 0, "every slot free")
    return client.model_info().slots_in_use


def _metrics(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_model_info_and_tokenize(server, client):
    info = client.model_info()
    assert info.quantization == (server.quantize or "none") and info.architecture == "llama"
    limits = (info.slots, info.max_len, info.max_prompt_len, info.max_waiting)
    assert limits == (SLOTS, MAX_LEN, MAX_PROMPT, MAX_WAITING)
    assert info.vocab_size == 49152 and list(info.eos_token_ids) == [2] and info.has_chat_template
    assert client.tokenize("Hello world") == [19556, 905]
    chat = client.tokenize(chat=[{"role": "user", "content": "Hi"}])
    assert chat[0] == 1 and chat[-4:] == [1, 520, 9531, 198]  # ... <|im_start|>assistant\n


def test_grpc_greedy_equals_offline_script(server, client, tiny_ckpt, tmp_path):
    requests = [
        {"id": "chat", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
        {"id": "text", "prompt": "Once upon a time"},
        {"id": "ids", "token_ids": [5, 900, 12000, 77]},
    ]
    for r in requests:
        r.update(temperature=0, max_tokens=24)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in requests))
    script = [sys.executable, "scripts/generate.py", "--checkpoint", str(tiny_ckpt), "--input", str(inp),
              "--output", str(out), "--slots", str(SLOTS), "--max-len", str(MAX_LEN), "--max-prompt-len",
              str(MAX_PROMPT), "--no-progress", *(["--quantize", server.quantize] if server.quantize else [])]
    subprocess.run(script, check=True, capture_output=True, timeout=600)
    offline = [json.loads(x) for x in out.read_text().splitlines()]
    prompts = [requests[0]["messages"], requests[1]["prompt"], requests[2]["token_ids"]]
    for prompt, ref in zip(prompts, offline):
        got = client.complete(prompt, temperature=0.0, max_tokens=24)
        assert got.token_ids == ref["token_ids"] and got.text == ref["text"], ref["id"]
        assert got.finish_reason == ref["finish_reason"]
        assert (got.prompt_tokens, got.completion_tokens) == (ref["prompt_tokens"], ref["completion_tokens"])


def test_32_concurrent_streams_on_8_slots_complete_correctly(server, client):
    prompts = [[100 + i, 200 + 3 * i, 300 + 7 * i] for i in range(32)]
    lengths = [8 + (i % 5) * 4 for i in range(32)]
    alone = [client.complete(p, max_tokens=n, **GREEDY).token_ids for p, n in zip(prompts, lengths)]

    async def run():
        async with AsyncClient(server.address) as ac:
            async def one(p, n):
                pieces = [r async for r in ac.stream(p, max_tokens=n, **GREEDY)]
                return pieces
            return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths)))

    results = asyncio.run(run())
    for i, pieces in enumerate(results):
        ids = [t for r in pieces for t in r.token_ids]
        assert ids == alone[i], f"request {i}"
        assert sum(1 for r in pieces if r.finish_reason) == 1 and pieces[-1].finish_reason == pb.LENGTH
        assert pieces[-1].usage.completion_tokens == lengths[i]
    assert _wait_slots_free(client) == 0


def test_cancel_mid_stream_frees_the_slot(server, client):
    """Cancelled after 3 of its 120 tokens, its steps then held (so it cannot finish first on any
    device) until the server has been told: it ends as cancelled, counted once, its slot free."""
    reason = 'jserve_requests_finished_total{reason="cancelled"}'
    before, cancels = _metric(_metrics(server), reason), server.said("CANCELLED")
    call = client.stream([1, 2, 3], max_tokens=120, **GREEDY)
    got = [next(call) for _ in range(3)]
    assert all(r.token_ids for r in got)
    with server.hold:
        call.cancel()
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.CANCELLED
        wait_until(lambda: server.said("CANCELLED") > cancels, "the server cancelled the request")
    assert _wait_slots_free(client) == 0
    wait_until(lambda: _metric(_metrics(server), reason) > before, "the cancel counted")
    assert _metric(_metrics(server), reason) == before + 1  # (the series existed after any earlier cancel)


DEADLINE_S = 2.0  # the wall time a deadline test must spend; the request is held, so its length is no race


def test_deadline_gives_deadline_exceeded_and_frees_the_slot(server, client):
    """The request's decode steps are held, so it is running and cannot finish when its deadline
    passes, on any device: the client gets DEADLINE_EXCEEDED, and once the steps go on the server
    ends it as a deadline (not a cancel) and frees its slot."""
    reason = 'jserve_requests_finished_total{reason="deadline"}'
    before, held = _metric(_metrics(server), reason), server.said("STEP HELD")
    with server.hold:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            list(client.stream([1, 2, 3], max_tokens=120, timeout=DEADLINE_S, **GREEDY))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert server.said("STEP HELD") > held  # it was running, waiting in a step, when its time ran out
        # The server's deadline is the client's, read off the call on arrival (both clocks are
        # CLOCK_MONOTONIC): past it for sure, the steps go on.
        wait_until(lambda: time.monotonic() > start + DEADLINE_S + 0.5, "the server's deadline passed too")
    wait_until(lambda: _metric(_metrics(server), reason) > before, "the deadline counted")
    assert _metric(_metrics(server), reason) == before + 1  # counted as a deadline, not a cancel
    assert _wait_slots_free(client) == 0


def test_overload_gets_resource_exhausted_while_admitted_work_completes(server, client):
    """Decode steps held, so no request can finish and make room first (on any device): every
    request is either queued, in a slot or refused before the steps go on."""
    n = SLOTS + MAX_WAITING + 24
    refused = []

    async def run():
        async with AsyncClient(server.address) as ac:
            async def one(i):
                try:
                    return await ac.complete([7, 8, 9 + i], max_tokens=100, **GREEDY)
                except grpc.aio.AioRpcError as e:
                    refused.append(e)
                    return e
            return await asyncio.gather(*(one(i) for i in range(n)))

    def placed() -> int:
        info = client.model_info()
        return len(refused) + info.waiting + info.slots_in_use

    _wait_slots_free(client)
    with ThreadPoolExecutor(1) as pool:
        with server.hold:
            running = pool.submit(asyncio.run, run())
            wait_until(lambda: placed() == n, "every request queued, in a slot or refused")
        results = running.result()
    rejected = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    done = [r for r in results if not isinstance(r, grpc.aio.AioRpcError)]
    assert rejected and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in rejected)
    assert "waiting queue is full" in rejected[0].details()
    assert len(done) >= MAX_WAITING and len(done) + len(rejected) == n
    assert all(d.finish_reason == "length" and d.completion_tokens == 100 for d in done)
    assert _wait_slots_free(client) == 0


@pytest.mark.parametrize("prompt, kwargs, message", [
    ("", {}, "the prompt is empty"),
    (list(range(20, 20 + MAX_PROMPT + 1)), {}, f"accepts at most {MAX_PROMPT}"),
    ("hello", {"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ("hello", {"max_tokens": MAX_LEN}, f"exceeds the context of {MAX_LEN} tokens"),
    ("hello", {"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ("hello", {"top_p": 0.0}, "top_p must be in (0, 1]"),
    ("hello", {"top_p": 1.5}, "top_p must be in (0, 1]"),
    ([{"role": "wizard", "content": "hi"}], {}, "unknown role 'wizard'"),
    ([1, 2, 49152], {}, "token id 49152 at index 2 is outside the vocabulary"),
    ([1, -1], {}, "token id -1 at index 1 is outside the vocabulary"),
    ("hello", {"logprobs": 50}, "logprobs must be in [0, 5]"),
    ("hello", {"stop": ["a", "b"] * 9}, "at most 16 stop strings are accepted, got 18"),
    ("hello", {"request_id": "r" * 300}, "request_id may have at most 256 characters, got 300"),
    ("hello " * 40000, {}, "the prompt has 240000 bytes"),
    ([{"role": "user", "content": ""}] * 1025, {}, "a chat may have at most 1024 messages, got 1025"),
])
def test_bad_input_gets_invalid_argument_and_the_server_keeps_serving(client, prompt, kwargs, message):
    with pytest.raises(grpc.RpcError) as e:
        list(client.stream(prompt, **kwargs))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()
    assert client.complete("still fine?", max_tokens=3, temperature=0.0).completion_tokens == 3


def test_request_without_input_is_invalid(client):
    with pytest.raises(grpc.RpcError) as e:
        list(client.stub.Generate(pb.GenerateRequest(max_tokens=3)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no input" in e.value.details()


def test_logprobs_over_grpc(client):
    rs = list(client.stream([4, 5, 6], max_tokens=3, logprobs=2, **GREEDY))
    lps = [lp for r in rs for lp in r.logprobs]
    assert len(lps) == 3 and all(len(lp.top) == 2 and lp.top[0].token_id == lp.token_id for lp in lps)


def _metric(text: str, name: str) -> float:
    """A sample's value in Prometheus text (0 when the series is absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_move_with_the_work_done(server, client):
    names = ("jserve_time_to_first_token_seconds_count", "jserve_inter_token_latency_seconds_count",
             "jserve_request_latency_seconds_count", "jserve_prompt_tokens_total", "jserve_generation_tokens_total",
             'jserve_requests_finished_total{reason="length"}')
    before = {n: _metric(_metrics(server), n) for n in names}
    r = client.complete([5, 6, 7, 8], max_tokens=4, temperature=0.0)
    after = {n: _metric(_metrics(server), n) for n in names}
    moved = {n: after[n] - before[n] for n in names}
    # This server is shared with other tests that may finish work meanwhile: at least this request's share.
    assert moved["jserve_time_to_first_token_seconds_count"] >= 1
    assert moved["jserve_inter_token_latency_seconds_count"] >= r.completion_tokens - 1
    assert moved["jserve_request_latency_seconds_count"] >= 1
    assert moved["jserve_prompt_tokens_total"] >= 4
    assert moved["jserve_generation_tokens_total"] >= 4
    assert moved['jserve_requests_finished_total{reason="length"}'] >= 1
    assert _metric(_metrics(server), "jserve_slots") == SLOTS


def test_a_repeated_prompt_prefix_is_served_from_the_cache_and_reported(server, client):
    names = ("jserve_prefix_cache_lookups_total", "jserve_prefix_cache_hit_tokens_total")
    before = {n: _metric(_metrics(server), n) for n in names}
    prompt = list(range(7000, 7040))
    first = client.complete(prompt, max_tokens=5, **GREEDY)
    again = client.complete(prompt[:-1] + [9], max_tokens=5, **GREEDY)
    assert client.model_info().prefix_cache
    assert again.cached_prompt_tokens == len(prompt) - 1 and first.cached_prompt_tokens == 0
    after = {n: _metric(_metrics(server), n) for n in names}
    assert after[names[0]] - before[names[0]] >= 2
    assert after[names[1]] - before[names[1]] >= len(prompt) - 1


def test_an_oversized_request_gets_invalid_argument_naming_the_limit(client):
    with pytest.raises(grpc.RpcError) as e:
        list(client.stream("x" * (5 << 20), max_tokens=2))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "this server accepts at most 4194304 (--max-request-bytes)" in e.value.details()


def test_several_stop_strings_over_grpc_end_at_the_earliest(client):
    full = client.complete("The weather today is", max_tokens=40, **GREEDY)
    n = len(full.text)
    assert n >= 12
    first, later = full.text[n // 3:n // 3 + 3], full.text[-4:-1]  # several characters, maybe several tokens
    got = client.complete("The weather today is", max_tokens=40, stop=[later, "zzz-never", first], **GREEDY)
    assert got.finish_reason == "stop"
    cut = min(i for i in (full.text.find(w) for w in (later, first)) if i >= 0)
    assert got.text == full.text[:cut]


def test_client_command_line_streams_the_completion(server, client):
    want = client.complete("Tell me a story", max_tokens=6, temperature=0.0)
    out = subprocess.run([sys.executable, "-m", "jserve.client", "--address", server.address, "Tell me a story",
                          "--max-tokens", "6", "--temperature", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == want.text + "\n"
    assert "length" in out.stderr and "completion 6 tokens" in out.stderr


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        return check(health_pb2.HealthCheckRequest(service="jserve.v1.Generation"), timeout=5).status


def test_health_is_not_serving_during_warmup_and_sigterm_drains_then_exits_0(tiny_ckpt, tmp_path):
    s = HoldableServer(tiny_ckpt, tmp_path / "hold", "--slots", "2", "--max-len", "1024", "--max-prompt-len", "128",
                       wait_serving=False)
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
                call = c.stream([1, 2, 3], max_tokens=1000, **GREEDY)
                wait_until(lambda: s.said("STEP HELD"), "the request reached a decode step")
                s.proc.send_signal(signal.SIGTERM)
                wait_until(lambda: _health(s.address) == health_pb2.HealthCheckResponse.NOT_SERVING, "draining")
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
    s = HoldableServer(tiny_ckpt, tmp_path / "hold", "--slots", "2", "--max-len", "1024", "--max-prompt-len", "16",
                       "--drain-timeout", "0.1")
    try:
        with Client(s.address) as c:
            with s.hold:  # still running when the 0.1 s drain ends, on any device
                call = c.stream([1, 2, 3], max_tokens=1000, **GREEDY)
                wait_until(lambda: s.said("STEP HELD"), "the request reached a decode step")
                signalled = time.monotonic()
                s.proc.send_signal(signal.SIGTERM)
                wait_until(lambda: _health(s.address) == health_pb2.HealthCheckResponse.NOT_SERVING, "draining")
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


def test_a_second_signal_while_draining_exits_at_once(tiny_ckpt, tmp_path):
    s = HoldableServer(tiny_ckpt, tmp_path / "hold", "--slots", "2", "--max-len", "1024", "--max-prompt-len", "16",
                       "--drain-timeout", "600")
    try:
        with Client(s.address) as c, s.hold:  # the request cannot finish (and the drain end) on its own
            call = c.stream([1, 2, 3], max_tokens=1000, **GREEDY)
            wait_until(lambda: s.said("STEP HELD"), "the request reached a decode step")
            s.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: _health(s.address) == health_pb2.HealthCheckResponse.NOT_SERVING, "draining")
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


def test_server_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [resp] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=10))
    names = {s.name for s in resp.list_services_response.service}
    assert {"jserve.v1.Generation", "grpc.health.v1.Health"} <= names


def test_a_port_in_use_is_refused_not_shared(server, tiny_ckpt):
    port = server.address.rsplit(":", 1)[1]
    proc = subprocess.run([sys.executable, "-m", "jserve.server", "--checkpoint", str(tiny_ckpt), "--port", port,
                           "--log-level", "ERROR"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"could not bind 127.0.0.1:{port}" in proc.stderr


def test_structured_output_over_grpc(client):
    chat = [{"role": "user", "content": "Well?"}]
    r = client.complete(chat, max_tokens=10, temperature=1.0, seed=7, choice=["left", "right"])
    assert r.text in ("left", "right") and r.finish_reason == "stop"
    r = client.complete(chat, max_tokens=10, temperature=1.0, seed=7, regex="[0-9]{4}")
    assert len(r.text) == 4 and r.text.isdigit()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.complete(chat, max_tokens=20, temperature=0.0, json_schema=schema)
    assert json.loads(r.text) in ({"ok": True}, {"ok": False})
    with pytest.raises(grpc.RpcError) as e:
        client.complete(chat, max_tokens=5, regex="(")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "regex constraint is invalid" in e.value.details()


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
