"""Defects at the edge (issue 24, items 3-6): offline outputs never cut, requests whose client goes
away during submission cancelled, server-sent events under backpressure, and the smaller ones
(a raising sink in the recovery path, HTTP refusals in the metrics, imports, ``jax.config``).

gRPC and HTTP run in this process (on a thread's event loop, over real localhost sockets) so a
test can hold ``LLM.submit`` and watch the server's connections without timing anything."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import grpc
import pytest

from jserve.sampling import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
SLOTS, MAX_LEN, MAX_UNDELIVERED, MAX_WAITING = 2, 1024, 64, 2


class Events:
    """The orchestrator's events (forwarded to ``ServingMetrics``), kept with their requests."""

    def __init__(self):
        from jserve.metrics import ServingMetrics

        self.metrics = ServingMetrics()
        self.finished: list[tuple[str, object]] = []
        self._cv = threading.Condition()

    def __call__(self, kind: str, req, value: float) -> None:
        self.metrics.on_event(kind, req, value)
        if kind.startswith("finished:"):
            with self._cv:
                self.finished.append((kind.split(":", 1)[1], req))
                self._cv.notify_all()

    def wait_finished(self, match, timeout: float = 120.0) -> str:
        """The finish reason of the first request for which ``match(req)`` holds (waits for it)."""
        with self._cv:
            found = self._cv.wait_for(lambda: [r for r, q in self.finished if match(q)], timeout)
        assert found, "the request never finished"
        return found[0]


@pytest.fixture(scope="module")
def events():
    return Events()


class Servers:
    """gRPC and HTTP front ends over ``llm`` on one event loop in a thread, on localhost ports."""

    def __init__(self, llm, events: Events):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-servers", daemon=True)
        self.thread.start()
        self.call(self._start(llm, events))

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self, llm, events: Events) -> None:
        from jserve import http_api
        from jserve.server import GenerationService
        from jserve.v1 import jserve_pb2_grpc as pb_grpc

        handler_cancelled = self.handler_cancelled = threading.Event()

        class Watched(GenerationService):  # tells the test when a client's cancel reached the handler
            async def Generate(self, request, context):
                try:
                    async for resp in super().Generate(request, context):
                        yield resp
                except asyncio.CancelledError:
                    handler_cancelled.set()
                    raise

        self.service = Watched(events.metrics)
        self.service.llm = llm
        self.grpc = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(self.service, self.grpc)
        self.grpc_address = f"127.0.0.1:{self.grpc.add_insecure_port('127.0.0.1:0')}"
        await self.grpc.start()
        sock = http_api.bind("127.0.0.1", 0)
        # Accepted connections inherit a small send buffer: a client that stops reading blocks the
        # server's writes after tens of kilobytes, not megabytes.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.http = http_api.HttpFrontEnd(events.metrics)
        self.http.llm = llm
        self.uvicorn = http_api.make_server(self.http.app, sock)
        self.http_task = asyncio.ensure_future(self.uvicorn.serve(sockets=[sock]))
        self.http_port = sock.getsockname()[1]
        while not self.uvicorn.started:
            await asyncio.sleep(0.01)

    async def _connections(self) -> int:
        return len(self.uvicorn.server_state.connections)

    def wait_no_http_connection(self, timeout: float = 30.0) -> None:
        """Until the HTTP server has seen every connection close."""
        deadline = time.monotonic() + timeout
        while self.call(self._connections()):
            assert time.monotonic() < deadline, "the server never saw the client go away"
            time.sleep(0.01)

    async def _stop(self) -> None:
        self.uvicorn.should_exit = True
        await asyncio.wait_for(self.http_task, 10)
        await self.grpc.stop(0)

    def close(self) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Hold:
    """``llm.submit`` blocks (in the front end's executor) until ``release`` is set."""

    def __init__(self, llm, monkeypatch):
        self.entered, self.release = threading.Event(), threading.Event()
        submit = llm.submit

        def held(*args, **kwargs):
            self.entered.set()
            assert self.release.wait(120)
            return submit(*args, **kwargs)

        monkeypatch.setattr(llm, "submit", held)


@pytest.fixture(scope="module")
def llm(tiny_ckpt, events):
    """Two slots, a small undelivered bound and waiting queue, long outputs possible."""
    from jserve import LLM

    llm = LLM(tiny_ckpt, slots=SLOTS, max_len=MAX_LEN, max_prompt_len=64, top_logprobs=3,
              max_waiting=MAX_WAITING, max_undelivered=MAX_UNDELIVERED, on_event=events)
    yield llm
    llm.close(drain=False)


# ---- 3: offline generation never cuts an output ---------------------------------------------------
def test_generate_returns_every_output_whole_however_long_the_unread_backlog(llm):
    """Six prompts on two slots, each output 200 pieces (3x the undelivered bound): results are read
    in input order while later prompts run, and none may end as a slow reader."""
    prompts = [[5 + i, 6, 7, 8] for i in range(6)]
    n = 3 * MAX_UNDELIVERED + 8
    sp = SamplingParams(max_tokens=n, **GREEDY)
    finished = []
    results = llm.generate(prompts, sp, on_finish=lambda i, r: finished.append(i))
    assert [r.finish_reason for r in results] == ["length"] * 6
    assert [r.completion_tokens for r in results] == [n] * 6
    assert [len(r.token_ids) for r in results] == [n] * 6
    assert finished == list(range(6))
    # The same tokens as each prompt alone (nothing lost or repeated in the pieces).
    for prompt, r in zip(prompts, results):
        [alone] = llm.generate([prompt], sp)
        assert r.token_ids == alone.token_ids


@pytest.fixture(scope="module")
def servers(llm, events):
    s = Servers(llm, events)
    yield s
    s.close()


def _idle(llm) -> bool:
    o = llm.orchestrator
    return o.slots_in_use == 0 and o.num_running == 0 and o.num_waiting == 0


# ---- 4: a client gone while its request is being submitted ------------------------------------------
def test_a_grpc_client_gone_during_submission_has_its_request_cancelled(llm, servers, events, monkeypatch):
    from jserve.client import build_request
    from jserve.v1 import jserve_pb2_grpc as pb_grpc

    hold = Hold(llm, monkeypatch)
    servers.handler_cancelled.clear()
    with grpc.insecure_channel(servers.grpc_address) as channel:
        call = pb_grpc.GenerationStub(channel).Generate(
            build_request([5, 6, 7], request_id="gone-grpc", max_tokens=900, **GREEDY))
        assert hold.entered.wait(60)
        call.cancel()
        assert servers.handler_cancelled.wait(60)  # the handler is gone while submit is still held
    hold.release.set()
    assert events.wait_finished(lambda req: req.request_id == "gone-grpc") == "cancelled"
    assert _idle(llm)


def _http_request(port: int, path: str, body: dict, rcvbuf: int | None = None) -> socket.socket:
    """An HTTP/1.1 POST sent on a raw socket (nothing read yet)."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_an_http_client_gone_during_submission_has_its_request_cancelled(llm, servers, events, monkeypatch, stream):
    hold = Hold(llm, monkeypatch)
    tokens = 901 if stream else 902  # tells this request apart
    sock = _http_request(servers.http_port, "/v1/completions",
                         {"model": llm.checkpoint.name, "prompt": [5, 6, 7], "max_tokens": tokens,
                          "stream": stream, **GREEDY})
    assert hold.entered.wait(60)
    sock.close()
    servers.wait_no_http_connection()  # the server saw it go while submit is still held
    hold.release.set()
    assert events.wait_finished(lambda req: req.params.max_tokens == tokens) == "cancelled"
    assert _idle(llm)


async def _post_asgi(app, path: str, body: dict) -> None:
    """POST to the ASGI app itself, as a server that cancels a handler when its client goes does."""
    data = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]}
    sent = asyncio.Event()

    async def receive() -> dict:
        if not sent.is_set():
            sent.set()
            return {"type": "http.request", "body": data, "more_body": False}
        await asyncio.Event().wait()  # the client never leaves on its own: it is cancelled

    async def send(message: dict) -> None:
        pass

    await app(scope, receive, send)


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_an_http_handler_cancelled_during_submission_cancels_its_request(llm, servers, events, monkeypatch, stream):
    hold = Hold(llm, monkeypatch)
    tokens = 903 if stream else 904

    async def start() -> asyncio.Task:
        return asyncio.ensure_future(_post_asgi(servers.http.app, "/v1/completions", {
            "model": llm.checkpoint.name, "prompt": [5, 6, 7], "max_tokens": tokens, "stream": stream, **GREEDY}))

    async def settled(task: asyncio.Task) -> bool:
        await asyncio.wait([task])
        return task.cancelled()

    task = servers.call(start())
    assert hold.entered.wait(60)
    servers.loop.call_soon_threadsafe(task.cancel)
    assert servers.call(settled(task))  # the handler is gone while submit is still held
    hold.release.set()
    assert events.wait_finished(lambda req: req.params.max_tokens == tokens) == "cancelled"
    assert _idle(llm)


# ---- 5: server-sent events under backpressure ---------------------------------------------------------
def _sse_events(sock: socket.socket) -> list[dict]:
    """The JSON events of one chunked SSE response read from ``sock`` (up to its last chunk)."""
    sock.settimeout(60)
    f = sock.makefile("rb")
    status = f.readline()
    assert status.startswith(b"HTTP/1.1 200"), status
    while f.readline() not in (b"\r\n", b""):
        pass
    body = b""
    while size := int(f.readline().strip(), 16):
        body += f.read(size)
        f.readline()
    return [json.loads(e[len("data: "):]) for e in body.decode().split("\n\n") if e.startswith("data: {")]


def test_an_sse_client_that_stops_reading_has_its_request_ended_as_a_slow_reader(llm, servers, events):
    """A client reads nothing of its stream (a small receive buffer, so the server's writes block
    after tens of kilobytes of 1000 tokens): its request ends as gRPC's slow reader does and its
    slot is freed; reading on, it gets what was sent and then the slow-reader error event."""
    tokens = MAX_LEN - 24
    sock = _http_request(servers.http_port, "/v1/completions",
                         {"model": llm.checkpoint.name, "prompt": [5, 6, 7], "max_tokens": tokens, "stream": True,
                          "logprobs": 3, **GREEDY}, rcvbuf=4096)
    with sock:
        assert events.wait_finished(lambda req: req.params.max_tokens == tokens) == "slow_reader"
        assert _idle(llm)
        got = _sse_events(sock)
    *pieces, last = got
    assert last["error"]["code"] == "slow_reader" and "--max-undelivered" in last["error"]["message"]
    assert MAX_UNDELIVERED < sum(len(p["choices"][0]["logprobs"]["tokens"]) for p in pieces) < tokens
    assert all(p["choices"][0]["finish_reason"] is None for p in pieces)


# ---- 6: the smaller ones ------------------------------------------------------------------------------
class _GenerateFailsOnce:
    """The engine, but its ``at``-th ``generate`` call raises (the loop's recovery path runs)."""

    def __init__(self, engine, at: int):
        self._engine, self.at, self.calls = engine, at, 0

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def generate(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("injected device fault")
        return self._engine.generate(*args, **kwargs)


def _final(stream, timeout: float = 60.0):
    pieces = []
    while not pieces or pieces[-1].finish_reason is None:
        pieces.append(stream._q.get(timeout=timeout))
    return pieces[-1]


def test_a_sink_that_raises_in_the_recovery_path_ends_only_its_own_request(llm):
    from jserve.orchestrator import Orchestrator, Stream

    class Broken(Stream):  # a consumer that fails on the final message
        def put(self, out):
            if out.finish_reason is not None:
                raise RuntimeError("broken consumer")
            super().put(out)

    engine = _GenerateFailsOnce(llm.engine, at=3)
    orch = Orchestrator(engine, llm.tokenizer)
    try:
        sp = SamplingParams(max_tokens=50, **GREEDY)
        broken = orch.submit([5, 6, 7], sp, Broken())
        other = orch.submit([8, 9, 10], sp, Stream())
        end = _final(other)
        assert end.finish_reason == "error" and "injected device fault" in end.error
        assert engine.calls >= 3 and broken.request is not None
        again = orch.submit([1, 2, 3], SamplingParams(max_tokens=5, **GREEDY), Stream())
        assert _final(again).finish_reason == "length"
        assert orch.dead is None and orch.slots_in_use == 0
    finally:
        orch.shutdown(drain=False, timeout=10)


def _rejected(events: Events, reason: str) -> float:
    return events.metrics.registry.get_sample_value("jserve_requests_rejected_total", {"reason": reason}) or 0.0


def _post(servers: Servers, path: str, body: dict | bytes) -> int:
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{servers.http_port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_http_refusals_are_counted_in_the_metrics_as_grpc_rejections_are(llm, servers, events):
    from jserve.client import build_request
    from jserve.v1 import jserve_pb2_grpc as pb_grpc

    reasons = ("invalid_argument", "not_found", "unavailable", "queue_full")
    before = {r: _rejected(events, r) for r in reasons}
    model = llm.checkpoint.name
    ok = {"model": model, "prompt": [5, 6, 7], "max_tokens": 4}
    assert _post(servers, "/v1/completions", {**ok, "temperature": -1.0}) == 400  # refused by validation
    assert _post(servers, "/v1/completions", {**ok, "n": 0}) == 400  # refused by the body's schema
    assert _post(servers, "/v1/completions", {**ok, "model": "nope"}) == 404
    limit, servers.http.max_request_bytes = servers.http.max_request_bytes, 64
    try:
        assert _post(servers, "/v1/completions", b"{" + b" " * 64 + b"}") == 400  # over --max-request-bytes
    finally:
        servers.http.max_request_bytes = limit
    with grpc.insecure_channel(servers.grpc_address) as channel:  # the same bad input over gRPC
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.GenerationStub(channel).Generate(build_request([5, 6, 7], max_tokens=4, temperature=-1.0)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    servers.http.draining = True
    try:
        assert _post(servers, "/v1/completions", ok) == 503
    finally:
        servers.http.draining = False
    from jserve.orchestrator import Stream

    class Unread(Stream):  # never read, never a slow reader: holds its slot or place in the queue
        def backlog(self) -> int:
            return 0

    sp = SamplingParams(max_tokens=1000, **GREEDY)
    held = [llm.orchestrator.submit([5, 6, 7 + i], sp, Unread(), block=True) for i in range(SLOTS + MAX_WAITING)]
    try:
        assert _post(servers, "/v1/completions", ok) == 429
    finally:
        for s in held:
            s.cancel()
    after = {r: _rejected(events, r) - before[r] for r in reasons}
    assert after == {"invalid_argument": 4, "not_found": 1, "unavailable": 1, "queue_full": 1}


def _python(code: str) -> str:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_importing_the_http_api_does_not_load_jax():
    assert _python("import sys, jserve.http_api; print('jax' in sys.modules)") == "False"


def test_constructing_an_llm_leaves_jax_config_as_it_was(tiny_ckpt):
    out = _python(f"""
import json, jax
from jserve import LLM
names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
         "jax_persistent_cache_min_entry_size_bytes", "jax_enable_x64", "jax_default_matmul_precision")
before = {{n: getattr(jax.config, n) for n in names}}
llm = LLM({str(tiny_ckpt)!r}, slots=1, max_len=64, warmup=False)
llm.close(drain=False)
print(json.dumps([before, {{n: getattr(jax.config, n) for n in names}}]))
""")
    before, after = json.loads(out.splitlines()[-1])
    assert after == before


def test_structured_output_and_sampling_do_not_import_each_other():
    """``Constraint`` (what a request asks its answer to match) lives in the leaf ``jserve.constraint``:
    sampling names it there, structured compiles it, and neither imports the other, even for types."""
    import ast
    import pathlib

    import jserve

    root = pathlib.Path(jserve.__file__).parent
    for name, other in (("sampling", "structured"), ("structured", "sampling")):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert f"jserve.{other}" not in imported, f"jserve.{name} imports jserve.{other}"
    assert _python("import sys, jserve.structured; print('jax' in sys.modules)") == "False"
