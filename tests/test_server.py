"""The gRPC server, end to end: one real server process on a free localhost port, over a real model
(float32 and int8-dynamic): model info, greedy tokens equal the offline script's, metrics, the
prefix cache, the client's command line, reflection, structured output.

The front ends' behaviour (finish reasons, stop strings, errors, logprobs, streaming, cancel,
deadlines, overload) is asserted exactly over the mock engine in tests/test_frontends_mock.py;
the server's start-up, drain and failure in tests/test_server_lifecycle.py."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import grpc
import pytest

from jserve.client import Client

from .servers import ServerProcess

SLOTS, MAX_LEN, MAX_PROMPT, MAX_WAITING = 8, 128, 64, 32
GREEDY = dict(temperature=0.0, ignore_eos=True)


# The server runs float32 and int8-dynamic (the fastest mode on CPU); weight-only int8 goes
# through the engine and orchestrator tests.
@pytest.fixture(scope="module", params=[None, "int8-dynamic"], ids=["f32", "int8-dynamic"])
def server(tiny_ckpt, request):
    quant = ["--quantize", request.param] if request.param else []
    s = ServerProcess(tiny_ckpt, "--slots", str(SLOTS), "--max-len", str(MAX_LEN), "--max-prompt-len", str(MAX_PROMPT),
                      "--max-waiting", str(MAX_WAITING), *quant)
    s.quantize = request.param
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address) as c:
        yield c


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


def test_client_command_line_streams_the_completion(server, client):
    want = client.complete("Tell me a story", max_tokens=6, temperature=0.0)
    out = subprocess.run([sys.executable, "-m", "jserve.client", "--address", server.address, "Tell me a story",
                          "--max-tokens", "6", "--temperature", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == want.text + "\n"
    assert "length" in out.stderr and "completion 6 tokens" in out.stderr


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
