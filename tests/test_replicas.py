"""Several replicas behind gRPC's client-side round-robin load balancing."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from jserve.client import Client, target_for

from .servers import ServerProcess


def _metric_sum(server, prefix: str) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def _finished(server) -> float:
    return _metric_sum(server, "jserve_requests_finished_total{")


def _running(server) -> float:
    """Requests in a slot: admitted, with their first token already streamed."""
    return _metric_sum(server, "jserve_requests_running ")


def test_target_for_one_or_several_addresses():
    assert target_for("127.0.0.1:5000") == ("127.0.0.1:5000", [])
    target, opts = target_for("127.0.0.1:1, 127.0.0.1:2")
    assert target == "ipv4:127.0.0.1:1,127.0.0.1:2"
    config = json.loads(dict(opts)["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"]["serviceName"] == "jserve.v1.Generation"


@pytest.fixture(scope="module")
def servers(tiny_ckpt):
    """Two replicas for the module (the last test kills the second)."""
    flags = ("--slots", "2", "--max-len", "128", "--max-prompt-len", "32")
    servers = [ServerProcess(tiny_ckpt, *flags) for _ in range(2)]
    yield servers
    for s in servers:
        s.stop()


def test_client_with_two_addresses_spreads_20_requests_over_both(servers):
    before = [_finished(s) for s in servers]
    with Client([s.address for s in servers]) as client:
        client.model_info()  # connect before fanning out
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: client.complete([5, 6, 7 + i], max_tokens=4, temperature=0.0),
                                    range(20)))
    assert all(r.finish_reason == "length" and r.completion_tokens == 4 for r in results)
    counts = [_finished(s) - b for s, b in zip(servers, before)]
    assert sum(counts) == 20 and min(counts) >= 5, counts


def test_replica_going_away_costs_only_its_in_flight_requests(servers):
    finished_before = [_finished(s) for s in servers]
    with Client([s.address for s in servers]) as client:
        client.model_info()
        prompts = [[5, 6, 7 + i] for i in range(24)]
        before = time.monotonic()
        with ThreadPoolExecutor(1) as bg:
            pending = bg.submit(client.complete_many, prompts, concurrency=4, max_tokens=90, temperature=0.0,
                                ignore_eos=True)
            # Kill it while it streams: requests that got a first response cannot be retried.
            # "Running" starts when a request's first token is made, a moment before the client
            # has it: wait for a few more tokens on that replica too.
            while ((_finished(servers[1]) < finished_before[1] + 2 or _running(servers[1]) < 1)
                   and time.monotonic() - before < 120):
                time.sleep(0.01)
            tokens = _metric_sum(servers[1], "jserve_generation_tokens_total")
            while ((_metric_sum(servers[1], "jserve_generation_tokens_total") < tokens + 8
                    or _running(servers[1]) < 1) and time.monotonic() - before < 120):
                time.sleep(0.005)
            servers[1].proc.kill()  # abruptly: no drain
            results = pending.result(timeout=300)
        done_on_survivor = _finished(servers[0]) - finished_before[0]
    failed = [r for r in results if r.finish_reason == "error"]
    ok = [r for r in results if r.finish_reason == "length"]
    assert len(failed) + len(ok) == 24
    # only requests on the lost replica's 2 slots (plus any queued there) fail, and they say why
    assert 1 <= len(failed) <= 4, [r.error for r in failed]
    assert all(r.error.startswith("UNAVAILABLE") for r in failed), [r.error for r in failed]
    assert all(r.completion_tokens == 90 for r in ok)
    assert done_on_survivor >= len(ok) - 4  # after the loss, the rest went to the survivor
