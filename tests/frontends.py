"""Every front end in one process over one ``LLM``: the gRPC service and the HTTP app on localhost
ports (on one event loop of their own, as ``jserve.server`` runs them), the Python ``LLM`` and
``scripts/generate.py``'s ``run``; each answers a request in a comparable form."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import pathlib
import threading

import grpc
import httpx

from jserve.client import Client, build_request
from jserve.errors import RequestError
from jserve.request import FinishReason, sampling_params
from jserve.v1 import jserve_pb2 as pb

GENERATE = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "generate.py"


def load_generate_script():
    spec = importlib.util.spec_from_file_location("jserve_generate_script", GENERATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Frontends:
    """An LLM behind the gRPC service and the HTTP app on localhost ports, and the offline script."""

    def __init__(self, llm, metrics=None):
        from jserve import http_api
        from jserve.grpc_api import GenerationService
        from jserve.metrics import ServingMetrics
        from jserve.server import GRPC_RECEIVE_LIMIT
        from jserve.v1 import jserve_pb2_grpc as pb_grpc

        self.llm, self.script = llm, load_generate_script()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="test-frontends", daemon=True).start()

        async def start() -> None:
            self.metrics = metrics or ServingMetrics()
            self.service = GenerationService(self.metrics)
            self.service.llm = llm
            self.grpc = grpc.aio.server(options=[("grpc.max_receive_message_length", GRPC_RECEIVE_LIMIT)])
            pb_grpc.add_GenerationServicer_to_server(self.service, self.grpc)
            self.grpc_address = f"127.0.0.1:{self.grpc.add_insecure_port('127.0.0.1:0')}"
            await self.grpc.start()
            sock = http_api.bind("127.0.0.1", 0)
            self.http = http_api.HttpFrontEnd(self.metrics)
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


def mock_llm(engine, metrics=None, tokenizer=None, **settings):
    """An ``LLM`` over ``engine`` (tests/mock_engine.py's ``MockEngine``) and ``tokenizer`` (default
    the letters tokenizer): nothing compiled, every token and text worked out by hand.
    ``metrics``: fed its events."""
    from jserve.config import ModelConfig
    from jserve.llm import LLM, LoadedModel

    from .mock_engine import letters_tokenizer

    tok = tokenizer or letters_tokenizer()
    config = ModelConfig(vocab_size=engine.vocab_size, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8,
                         ffn_dim=8, eos_token_ids=tok.eos_token_ids, arch="mock")
    model = LoadedModel(pathlib.Path("mock"), config, tok, engine, None, 0, 0.0)
    return LLM.over(model, on_event=metrics.on_event if metrics is not None else None, **settings)


# The mock's shape for the front-end tests (tests/test_frontends_mock.py, tests/test_frontends_errors.py).
MOCK_SHAPE = dict(slots=2, max_len=64, vocab_size=32, top_logprobs=3, max_prompt_len=32)


def start_mock(max_waiting: int = 16, tokenizer=None, **engine_kw) -> Frontends:
    """Every front end over a ``MockEngine`` of ``MOCK_SHAPE`` (``engine_kw`` overrides it), its
    metrics in a registry of their own and bound to the orchestrator's gauges."""
    from prometheus_client import CollectorRegistry

    from jserve.metrics import ServingMetrics

    from .mock_engine import MockEngine

    metrics = ServingMetrics(CollectorRegistry())
    llm = mock_llm(MockEngine(**(MOCK_SHAPE | engine_kw)), metrics, tokenizer, max_waiting=max_waiting,
                   prefill_budget=64)
    o = llm.orchestrator
    metrics.bind(llm.engine.slots, lambda: o.num_waiting, lambda: o.num_running, lambda: o.slots_in_use)
    return Frontends(llm, metrics)


def serve_mock(**kw):
    """A fixture's body: every front end over the mock (``start_mock(**kw)``) for a module's tests,
    then the front ends closed and the ``LLM`` with them."""
    f = start_mock(**kw)
    yield f
    f.close()
    f.llm.close(drain=False)
