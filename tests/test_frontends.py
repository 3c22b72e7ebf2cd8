"""One request, four front ends: gRPC (the client stub), HTTP (httpx, OpenAI's bodies), the Python
``LLM`` and ``scripts/generate.py``'s JSONL lines give the same tokens, the same finish reason and
the same error message, because each only maps fields onto ``jserve.request``.

One LLM serves all four (gRPC and HTTP in-process on one event loop, as ``jserve.server`` runs
them), so the model compiles once for the module."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import pathlib
import threading

import grpc
import httpx
import pytest

from jserve.client import Client, build_request
from jserve.errors import ErrorKind, RequestError
from jserve.request import ERRORS, FINISHES, FinishReason, sampling_params
from jserve.serving_config import EngineConfig
from jserve.v1 import jserve_pb2 as pb

SLOTS, MAX_LEN, MAX_PROMPT = 4, 128, 64
GENERATE = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "generate.py"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _load_generate_script():
    spec = importlib.util.spec_from_file_location("jserve_generate_script", GENERATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Frontends:
    """An LLM behind the gRPC service and the HTTP app on localhost ports, and the offline script."""

    def __init__(self, llm):
        from jserve import http_api
        from jserve.grpc_api import GenerationService
        from jserve.metrics import ServingMetrics
        from jserve.v1 import jserve_pb2_grpc as pb_grpc

        self.llm, self.script = llm, _load_generate_script()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="test-frontends", daemon=True).start()

        async def start() -> None:
            metrics = ServingMetrics()
            self.service = GenerationService(metrics)
            self.service.llm = llm
            self.grpc = grpc.aio.server()
            pb_grpc.add_GenerationServicer_to_server(self.service, self.grpc)
            self.grpc_address = f"127.0.0.1:{self.grpc.add_insecure_port('127.0.0.1:0')}"
            await self.grpc.start()
            sock = http_api.bind("127.0.0.1", 0)
            self.http = http_api.HttpFrontEnd(metrics)
            self.http.llm = llm
            self.uvicorn = http_api.make_server(self.http.app, sock)
            self.http_task = asyncio.ensure_future(self.uvicorn.serve(sockets=[sock]))
            self.http_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            while not self.uvicorn.started:
                await asyncio.sleep(0.01)

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(60)
        self.client = Client(self.grpc_address)
        self.httpx = httpx.Client(base_url=self.http_url, timeout=120)

    def close(self) -> None:
        async def stop() -> None:
            self.uvicorn.should_exit = True
            await self.http_task
            await self.grpc.stop(0)

        self.client.close()
        self.httpx.close()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)

    # Each front end answers (token ids, finish reason, completion tokens) or (kind, message).
    def grpc_answer(self, prompt, fields):
        req = build_request(prompt, **fields)
        if isinstance(prompt, list) and not prompt:
            req.token_ids.SetInParent()  # token_ids set, and empty
        try:
            responses = list(self.client.stub.Generate(req, timeout=120))
        except grpc.RpcError as e:
            return ("error", e.code(), e.details())
        last = responses[-1]
        reason = FinishReason[pb.FinishReason.Name(last.finish_reason)]
        return ([t for r in responses for t in r.token_ids], reason, last.usage.completion_tokens)

    def http_answer(self, prompt, fields):
        chat = isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)
        body = {"model": self.http.model_id, **fields, **({"messages": prompt} if chat else {"prompt": prompt})}
        r = self.httpx.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
        got = r.json()
        if r.status_code != 200:
            return ("error", r.status_code, got["error"]["message"], got["error"]["type"])
        [choice] = got["choices"]
        text = choice["message"]["content"] if chat else choice["text"]
        return (text, choice["finish_reason"], got["usage"]["completion_tokens"])

    def llm_answer(self, prompt, fields):
        try:
            params = sampling_params(**fields)
        except RequestError as e:
            return ("error", e.kind, e.message)
        [r] = self.llm.generate([prompt], params)
        if isinstance(r, RequestError):
            return ("error", r.kind, r.message)
        return (r.token_ids, r.text, FinishReason(r.finish_reason), r.completion_tokens)

    def script_answer(self, prompt, fields):
        key = "prompt" if isinstance(prompt, str) else "messages" if prompt and isinstance(prompt[0], dict) \
            else "token_ids"
        [rec], _ = self.script.run(self.llm, [json.dumps({"id": "x", key: prompt, **fields})])
        if "error" in rec:
            return ("error", rec["error"])
        return (rec["token_ids"], rec["text"], FinishReason(rec["finish_reason"]), rec["completion_tokens"])


@pytest.fixture(scope="module")
def fronts(tiny_ckpt):
    from jserve import LLM

    llm = LLM(tiny_ckpt, engine=EngineConfig(slots=SLOTS, max_len=MAX_LEN, max_prompt_len=MAX_PROMPT,
                                             top_logprobs=3))
    f = Frontends(llm)
    yield f
    f.close()
    llm.close(drain=False)


VALID = [
    ("text", "Once upon a time", dict(temperature=0.0, max_tokens=12, ignore_eos=True)),
    ("chat", CHAT, dict(temperature=0.0, max_tokens=10, ignore_eos=True, stop=["\n\n"])),
    # max_tokens not given: the one default, the rest of the context (MAX_LEN - 4 prompt tokens).
    ("ids_default_max_tokens", [5, 900, 12000, 77], dict(temperature=0.0, ignore_eos=True)),
    ("seeded", [7, 8, 9], dict(temperature=0.9, top_p=0.9, seed=11, max_tokens=9)),
]


@pytest.mark.parametrize("name, prompt, fields", VALID, ids=[v[0] for v in VALID])
def test_every_front_end_gives_the_same_tokens_and_finish_reason(fronts, name, prompt, fields):
    ids, text, reason, n = fronts.llm_answer(prompt, fields)
    assert n == len(ids) and n >= 1
    if "max_tokens" in fields:
        assert n <= fields["max_tokens"]
    else:
        assert n == MAX_LEN - len(prompt) and reason == FinishReason.LENGTH  # ignore_eos: to the context's end
    assert fronts.script_answer(prompt, fields) == (ids, text, reason, n)
    assert fronts.grpc_answer(prompt, fields) == (ids, reason, n)
    assert fronts.http_answer(prompt, fields) == (text, FINISHES[reason].openai, n)


def _context_message(prompt_tokens: int, max_tokens: int) -> str:
    return (f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context of {MAX_LEN} tokens; "
            f"lower max_tokens to at most {MAX_LEN - prompt_tokens}")


INVALID = [
    ("empty_prompt", "", {}, "the prompt is empty"),
    ("empty_ids", [], {}, "the prompt is empty"),
    ("max_tokens_past_the_context", [5, 6, 7], dict(max_tokens=MAX_LEN), _context_message(3, MAX_LEN)),
    ("max_tokens_zero", "hello", dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0"),
    ("negative_temperature", "hello", dict(temperature=-0.5),
     "temperature must be a finite number >= 0 (0 = greedy), got -0.5"),
    ("top_p_zero", "hello", dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    ("token_outside_vocabulary", [1, 2, 49152], {}, "token id 49152 at index 2 is outside the vocabulary [0, 49152)"),
    ("unknown_role", [{"role": "wizard", "content": "hi"}], {},
     "message 0: unknown role 'wizard' (expected one of system, developer, user, assistant, tool)"),
    ("too_many_stops", "hello", dict(stop=["a", "b"] * 9), "at most 16 stop strings are accepted, got 18"),
    ("prompt_too_long", list(range(20, 21 + MAX_PROMPT)), {},
     f"the prompt has {MAX_PROMPT + 1} tokens; this server accepts at most {MAX_PROMPT}"),
]


@pytest.mark.parametrize("name, prompt, fields, message", INVALID, ids=[v[0] for v in INVALID])
def test_every_front_end_refuses_with_the_same_message(fronts, name, prompt, fields, message):
    edge = ERRORS[ErrorKind.INVALID]
    assert fronts.llm_answer(prompt, fields) == ("error", ErrorKind.INVALID, message)
    assert fronts.script_answer(prompt, fields) == ("error", message)
    assert fronts.grpc_answer(prompt, fields) == ("error", grpc.StatusCode[edge.grpc], message)
    assert fronts.http_answer(prompt, fields) == ("error", edge.http, message, edge.openai_type)


def test_a_stop_of_the_wrong_type_is_refused_alike_where_the_protocol_can_carry_it(fronts):
    message = "stop must be a string or a list of strings; item 0 is int"
    fields = dict(stop=[1])
    assert fronts.llm_answer("hello", fields) == ("error", ErrorKind.INVALID, message)
    assert fronts.script_answer("hello", fields) == ("error", message)
    assert fronts.http_answer("hello", fields) == ("error", 400, message, "invalid_request_error")
    with pytest.raises(TypeError):  # gRPC's stop is `repeated string`: the stub cannot send it
        fronts.grpc_answer("hello", fields)


def test_the_server_the_llm_and_the_script_share_one_set_of_defaults():
    import dataclasses

    from jserve.sampling import SamplingParams
    from jserve.server import build_parser, engine_config, scheduler_config
    from jserve.serving_config import SchedulerConfig

    args = build_parser().parse_args([])
    assert engine_config(args) == EngineConfig() and scheduler_config(args) == SchedulerConfig()
    script = _load_generate_script().build_parser().parse_args(["--input", "-", "--output", "-"])
    for field in ("slots", "max_len", "max_prompt_len", "dtype", "quantize", "speculate"):
        assert getattr(script, field) == getattr(EngineConfig(), field), field
    assert SamplingParams().max_tokens is None  # the rest of the context, for every front end
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    assert defaults["speculate"] == 0 and defaults["top_logprobs"] == 5
