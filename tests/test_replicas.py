"""Several replicas behind gRPC's client-side round-robin load balancing."""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor

from jserve.client import Client, target_for

from .servers import ServerProcess


def _finished(server) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("jserve_requests_finished_total{"))


def test_target_for_one_or_several_addresses():
    assert target_for("127.0.0.1:5000") == ("127.0.0.1:5000", [])
    target, opts = target_for("127.0.0.1:1, 127.0.0.1:2")
    assert target == "ipv4:127.0.0.1:1,127.0.0.1:2" and ("grpc.lb_policy_name", "round_robin") in opts


def test_client_with_two_addresses_spreads_20_requests_over_both(tiny_ckpt):
    servers = [ServerProcess(tiny_ckpt, "--slots", "2", "--max-len", "64", "--max-prompt-len", "32")
               for _ in range(2)]
    try:
        with Client([s.address for s in servers]) as client:
            client.model_info()  # connect before fanning out
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda i: client.complete([5, 6, 7 + i], max_tokens=4, temperature=0.0),
                                        range(20)))
        assert all(r.finish_reason == "length" and r.completion_tokens == 4 for r in results)
        counts = [_finished(s) for s in servers]
        assert sum(counts) == 20 and min(counts) >= 5, counts
    finally:
        for s in servers:
            s.stop()
