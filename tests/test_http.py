"""The OpenAI-compatible HTTP API, driven by the official ``openai`` client against a real server
process (the tiny model), and compared with the gRPC path on the same server."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from jserve.client import Client

from .servers import ServerProcess
from .step_hold import HoldableServer
from .waits import wait_until

SLOTS, MAX_LEN, MAX_PROMPT, MAX_WAITING = 4, 128, 64, 4


# Its decode steps can be held (``with server.hold:``, see step_hold.py): a deadline, a full queue
# or a client going away lands while requests run, on any device.
@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    s = HoldableServer(tiny_ckpt, tmp_path_factory.mktemp("hold") / "steps", "--slots", str(SLOTS), "--max-len",
                       str(MAX_LEN), "--max-prompt-len", str(MAX_PROMPT), "--max-waiting", str(MAX_WAITING),
                       "--http-port", "0")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"http://{server.http_address}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(oai):
    return oai.models.list().data[0].id


def _post(server, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{server.http_address}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_health(server, oai, model):
    assert model == "tiny" and oai.models.list().data[0].max_model_len == MAX_LEN
    with urllib.request.urlopen(f"http://{server.http_address}/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}


def test_chat_completion_greedy_equals_grpc(server, oai, model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = oai.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    with Client(server.address) as c:
        ref = c.complete(messages, max_tokens=12, temperature=0.0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == {"length": "length", "stop": "stop"}[ref.finish_reason]
    assert r.usage.prompt_tokens == ref.prompt_tokens and r.usage.completion_tokens == ref.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_with_text_and_token_ids_prompts(oai, model):
    a = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    ids = [5, 900, 12000, 77]
    b = oai.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
    assert a.choices[0].text and a.usage.completion_tokens == 8 and a.choices[0].finish_reason == "length"
    assert b.usage.prompt_tokens == len(ids)
    two = oai.completions.create(model=model, prompt=["Once upon a time", "Hello"], max_tokens=8, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == a.choices[0].text


def test_streaming_chat_matches_the_whole_answer_and_reports_usage(oai, model):
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = oai.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
    chunks = list(oai.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_completion(oai, model):
    chunks = list(oai.completions.create(model=model, prompt="Hello", max_tokens=6, temperature=0, stream=True))
    whole = oai.completions.create(model=model, prompt="Hello", max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_n_choices_and_seed_reproducibility(server, oai, model):
    kw = dict(model=model, messages=[{"role": "user", "content": "Say something."}], max_tokens=10,
              temperature=1.5, seed=1234)
    a, b = oai.chat.completions.create(n=3, **kw), oai.chat.completions.create(n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # seed, seed+1, seed+2: different draws
    with Client(server.address) as c:  # each choice is the same request with seed + index
        for i, choice in enumerate(a.choices):
            ref = c.complete(kw["messages"], max_tokens=10, temperature=1.5, seed=1234 + i)
            assert choice.message.content == ref.text


def test_top_p_zero_takes_the_most_likely_token_at_any_temperature(oai, model):
    """OpenAI takes ``top_p: 0``: only the most likely token survives, so at temperature 1 every
    choice is the greedy answer, token for token (the seeds that make plain sampling differ)."""
    kw = dict(model=model, prompt="Once upon a time", max_tokens=12, extra_body={"ignore_eos": True})
    greedy = oai.completions.create(temperature=0, **kw).choices[0].text
    nucleus = oai.completions.create(temperature=1, top_p=0, n=3, seed=5, **kw)
    assert [c.text for c in nucleus.choices] == [greedy] * 3
    sampled = oai.completions.create(temperature=1, n=3, seed=5, **kw)  # the same seeds without top_p
    assert any(c.text != greedy for c in sampled.choices)
    chat = dict(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert (oai.chat.completions.create(temperature=1, top_p=0, seed=9, **chat).choices[0].message.content
            == oai.chat.completions.create(temperature=0, **chat).choices[0].message.content)


def test_logprobs_chat_and_completions(oai, model):
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                    temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token
    c = oai.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)


def test_stop_strings(oai, model):
    base = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=20, temperature=0)
    text = base.choices[0].text
    cut = text[3:6]
    r = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=20, temperature=0, stop=[cut])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[:text.index(cut)]


def test_extras_in_the_body(oai, model):
    r = oai.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0.8, seed=3,
                               extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True})
    assert r.usage.completion_tokens == 5


def test_errors_have_openai_bodies_and_statuses(server, oai, model):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=-1)
    assert "temperature must be a finite number >= 0" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=model, prompt="Hello", max_tokens=5000)
    assert "exceeds the context of 128 tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=model, prompt="x " * 500, max_tokens=5)
    assert "the prompt has" in e.value.message
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4", prompt="Hello", max_tokens=5)
    status, body = _post(server, "/v1/completions", {"model": model, "prompt": "Hi", "bogus": 1})
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "bogus" in body["error"]["message"]
    status, body = _post(server, "/v1/chat/completions", {"model": model, "messages": []})
    assert status == 400 and body["error"]["param"] == "messages"


DEADLINE_S = 2.0  # the wall time the deadline test must spend; the request is held, so its length is no race


def test_a_deadline_that_passes_while_the_request_runs_is_a_504(server, model):
    """Its decode steps held, the request is running and cannot finish before its deadline on any
    device; once they go on, the server answers 504 with what had been made: at most the prompt's
    token, as every step came after the deadline."""
    _wait_idle(server)
    held, before = server.said("STEP HELD"), _finished(server, "deadline")
    with ThreadPoolExecutor(1) as pool:
        with server.hold:
            answer = pool.submit(_post, server, "/v1/completions", {"model": model, "prompt": "Hi",
                                                                     "max_tokens": 50, "timeout": DEADLINE_S,
                                                                     "ignore_eos": True})
            wait_until(lambda: server.said("STEP HELD") > held, "the request reached a decode step")
            # Its deadline is DEADLINE_S after it was submitted, which was before its step was held:
            # past this, it has passed for sure (both clocks are CLOCK_MONOTONIC).
            seen = time.monotonic()
            wait_until(lambda: time.monotonic() > seen + DEADLINE_S, "its deadline passed")
            assert not answer.done()
        status, body = answer.result()
    assert status == 504 and body["error"]["code"] == "deadline_exceeded"
    assert re.search(r"the deadline passed after [01] tokens", body["error"]["message"]), body
    assert _finished(server, "deadline") == before + 1


def _wait_idle(server) -> None:
    with Client(server.address) as c:
        wait_until(lambda: not (c.model_info().slots_in_use or c.model_info().waiting), "the server idle")


def test_a_full_queue_is_429(server, oai, model):
    """With decode steps held (so no request can finish first, on any device), open streams until
    one is refused: at most slots + queue fit (fewer when the loop has not yet moved the first ones
    from the queue into slots)."""
    held = []
    try:
        with server.hold, pytest.raises(openai.RateLimitError) as e:
            for _ in range(SLOTS + MAX_WAITING + 1):
                held.append(oai.completions.create(model=model, prompt="Hello", max_tokens=100, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True}))
        assert "queue is full" in e.value.message and MAX_WAITING <= len(held) <= SLOTS + MAX_WAITING
    finally:
        for s in held:
            s.close()
        _wait_idle(server)  # the closed streams' requests are cancelled and their slots freed


def test_a_client_that_disconnects_frees_its_slot(server, oai, model):
    """The stream is closed while its request runs (held in a step, so it cannot finish first on any
    device): the server cancels it, and it ends as cancelled, not after its 100 tokens."""
    _wait_idle(server)
    held, cancels, before = server.said("STEP HELD"), server.said("CANCELLED"), _finished(server, "cancelled")
    with server.hold:
        stream = oai.completions.create(model=model, prompt="Hello", max_tokens=100, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True})
        wait_until(lambda: server.said("STEP HELD") > held, "the request reached a decode step")
        stream.close()
        wait_until(lambda: server.said("CANCELLED") > cancels, "the server cancelled the request")
    wait_until(lambda: _finished(server, "cancelled") > before, "the cancel counted")
    assert _finished(server, "cancelled") == before + 1
    _wait_idle(server)


def _finished(server, reason: str) -> float:
    with urllib.request.urlopen(f"http://{server.http_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(f'jserve_requests_finished_total{{reason="{reason}"}}'))


def test_a_non_streaming_client_that_disconnects_has_its_request_cancelled(server, model):
    import http.client

    _wait_idle(server)
    before = _finished(server, "cancelled")
    host, port = server.http_address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": model, "prompt": "Hello", "max_tokens": MAX_LEN - 8, "ignore_eos": True, "temperature": 0}
    held, cancels = server.said("STEP HELD"), server.said("CANCELLED")
    with server.hold:  # it cannot finish before the server notices, on any device
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        wait_until(lambda: server.said("STEP HELD") > held, "the request reached a decode step")
        conn.sock.shutdown(2)  # the client goes away without its answer
        conn.close()
        wait_until(lambda: server.said("CANCELLED") > cancels, "the server cancelled the request")
    wait_until(lambda: _finished(server, "cancelled") > before, "the cancel counted")
    assert _finished(server, "cancelled") == before + 1  # ended as cancelled, not after its 120 tokens
    _wait_idle(server)


FAULTY_SERVER = """
import sys
import jserve.engine as e
calls = {"generate": 0}
generate = e.JaxEngine.generate
def generate_failing_once(self, state, mask=None, slots=None, **kw):
    calls["generate"] += 1
    if calls["generate"] == 3:
        raise RuntimeError("injected device fault")
    return generate(self, state, mask, slots, **kw)
e.JaxEngine.generate = generate_failing_once
from jserve.server import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_engine_fault_is_a_500_and_the_server_recovers(tiny_ckpt):
    s = ServerProcess(tiny_ckpt, "--slots", "2", "--max-len", "64", "--speculate", "0", "--http-port", "0",
                      launch=("-c", FAULTY_SERVER))
    try:
        client = openai.OpenAI(base_url=f"http://{s.http_address}/v1", api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model=model, prompt="Hello", max_tokens=20, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert err.value.status_code == 500 and "injected device fault" in str(err.value)
        # The engine's state was rebuilt: the next request is served.
        r = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5
    finally:
        s.stop()


def test_metrics_on_the_http_port(server, oai, model):
    oai.completions.create(model=model, prompt="Hello", max_tokens=2)
    with urllib.request.urlopen(f"http://{server.http_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "jserve_time_to_first_token_seconds_count" in text
    count = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("jserve_time_to_first_token_seconds_count "))
    assert count >= 1


def test_concurrent_clients(server, oai, model):
    _wait_idle(server)
    results = []

    def one(i: int) -> None:
        r = oai.completions.create(model=model, prompt=f"Number {i}", max_tokens=6, temperature=0)
        results.append(r.usage.completion_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(MAX_WAITING)]  # always fit the queue
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [6] * MAX_WAITING


def test_json_schema_response_format_parsed_by_pydantic(oai, model):
    from typing import Literal

    import pydantic

    class Answer(pydantic.BaseModel):
        ok: bool
        colour: Literal["red", "green", "blue"]

    r = oai.chat.completions.parse(model=model, messages=[{"role": "user", "content": "Answer as JSON."}],
                                   response_format=Answer, max_tokens=40, temperature=0.9, seed=2)
    answer = r.choices[0].message.parsed
    assert isinstance(answer, Answer) and r.choices[0].finish_reason == "stop"


def test_guided_choice_regex_and_json_object(oai, model):
    chat = [{"role": "user", "content": "Well?"}]
    c = oai.chat.completions.create(model=model, messages=chat, max_tokens=10, temperature=1.0, seed=4,
                                    extra_body={"guided_choice": ["alpha", "beta"]})
    assert c.choices[0].message.content in ("alpha", "beta") and c.choices[0].finish_reason == "stop"
    r = oai.completions.create(model=model, prompt="Code:", max_tokens=10, temperature=1.0, seed=4,
                               extra_body={"guided_regex": "[A-Z]{2}-[0-9]{3}"})
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", r.choices[0].text)
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=model, prompt="x", max_tokens=5, extra_body={"guided_regex": "[a-"})
    assert "the regex constraint is invalid" in e.value.message
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=model, prompt="x", max_tokens=5,
                               extra_body={"guided_regex": "a", "response_format": {"type": "json_object"}})


def _health(address: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_503_while_warming_up_and_draining_then_exit_0(tiny_ckpt, tmp_path):
    s = HoldableServer(tiny_ckpt, tmp_path / "hold", "--slots", "2", "--max-len", "1024", "--max-prompt-len", "128",
                       "--http-port", "0", wait_serving=False)
    try:
        statuses = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            st = _health(s.http_address)
            if not statuses or statuses[-1] != st:
                statuses.append(st)
            if st == 200:
                break
            time.sleep(0.05)
        assert statuses == [503, 200]
        client = openai.OpenAI(base_url=f"http://{s.http_address}/v1", api_key="unused", max_retries=0, timeout=60)
        with s.hold:  # the request is running when the signal comes, and still when new work is refused
            stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=300, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            wait_until(lambda: s.said("STEP HELD"), "the request reached a decode step")
            s.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: _health(s.http_address) == 503, "draining")
            with pytest.raises(openai.APIStatusError) as e:  # while draining, new work is refused
                client.completions.create(model="tiny", prompt="more", max_tokens=2)
            assert e.value.status_code == 503 and "shutting down" in e.value.message
        chunks = list(stream)  # in-flight work is finished, not cut
        assert chunks[-1].choices[0].finish_reason == "length"
        assert s.proc.wait(60) == 0
    finally:
        s.stop()
