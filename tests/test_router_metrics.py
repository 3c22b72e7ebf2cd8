"""The gauges a cluster router reads (the Gateway API Inference Extension's model-server protocol,
under vLLM's names) move with held requests, on --metrics-port and at GET /metrics on the HTTP port."""

from __future__ import annotations

import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jserve.client import Client

from .step_hold import HoldableServer
from .waits import wait_until

SLOTS = 2
ROUTER = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    s = HoldableServer(tiny_ckpt, tmp_path_factory.mktemp("hold") / "steps", "--slots", str(SLOTS), "--max-len",
                       "128", "--max-prompt-len", "64", "--http-port", "0", "--speculate", "0")
    yield s
    assert s.stop() == 0


def _scrape(url: str) -> dict[str, float]:
    """Every sample of a scrape, parsed by prometheus_client's own parser (name → value)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


def _gauges(server) -> list[dict[str, float]]:
    ports = [f"http://127.0.0.1:{server.metrics_port}/metrics", f"http://{server.http_address}/metrics"]
    return [{n: got[n] for n in (*ROUTER, "jserve_requests_waiting", "jserve_requests_running",
                                 "jserve_kv_cache_usage_ratio", "vllm:gpu_cache_usage_perc")}
            for got in map(_scrape, ports)]


def _expect(server, waiting: int, running: int) -> None:
    want = {"vllm:num_requests_waiting": waiting, "vllm:num_requests_running": running,
            "vllm:kv_cache_usage_perc": running / SLOTS}

    def matches() -> bool:
        return all(all(g[k] == v for k, v in want.items()) for g in _gauges(server))

    wait_until(matches, f"gauges at {want}")
    for g in _gauges(server):  # jserve's own names say the same
        assert g["jserve_requests_waiting"] == waiting and g["jserve_requests_running"] == running
        assert g["jserve_kv_cache_usage_ratio"] == g["vllm:gpu_cache_usage_perc"] == running / SLOTS


def test_router_gauges_follow_held_requests_on_both_ports(server):
    _expect(server, 0, 0)
    done: list = []
    with Client(server.address) as client:
        def one(i: int) -> None:
            done.append(client.complete([5 + i, 6, 7], max_tokens=20, temperature=0.0, ignore_eos=True))

        with server.hold:
            threads = [threading.Thread(target=one, args=(0,))]
            threads[0].start()
            wait_until(lambda: server.said("STEP HELD") >= 1, "the first request's decode step held")
            _expect(server, 0, 1)  # one request in its slot: half the cache
            more = [threading.Thread(target=one, args=(i,)) for i in (1, 2)]
            for t in more:
                t.start()
            # The loop is held inside a step: the newcomers wait in the queue until it goes on.
            _expect(server, 2, 1)
            threads += more
        for t in threads:
            t.join(120)
    assert len(done) == 3 and all(r.completion_tokens == 20 for r in done)
    _expect(server, 0, 0)
