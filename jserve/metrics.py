"""Prometheus metrics of a serving process, fed by the orchestrator's events.

Besides jserve's own names, the gauges a cluster router reads are served under vLLM's names, the
defaults of the Gateway API Inference Extension's endpoint picker (used by llm-d and GKE Inference
Gateway): ``vllm:num_requests_waiting`` (queued requests), ``vllm:num_requests_running`` (requests
holding a slot, prefilling or decoding) and ``vllm:kv_cache_usage_perc`` (0..1), with
``vllm:gpu_cache_usage_perc``, its older name, beside it. With a KV page pool (``bind_pages``) the
cache in use is the fraction of its pages held by requests (cached pages, kept for the prefix cache
and given up when needed, are not in use), with the pages free, cached and in use, and the
preemptions; without one (a sharded engine: each slot holds its positions) the fraction of slots held.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.0)


class ServingMetrics:
    """TTFT, inter-token and end-to-end latency, queue/slot gauges, token and request counters."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("jserve_time_to_first_token_seconds", "Arrival to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("jserve_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             registry=r, buckets=_TOKEN_BUCKETS)
        self.e2e = Histogram("jserve_request_latency_seconds", "Arrival to finish", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.prompt_tokens = Counter("jserve_prompt_tokens", "Prompt tokens of requests that started", registry=r)
        self.prefix_lookups = Counter("jserve_prefix_cache_lookups", "Prompts looked up in the prefix cache",
                                      registry=r)
        self.prefix_hit_tokens = Counter("jserve_prefix_cache_hit_tokens",
                                         "Prompt tokens whose keys/values came from the prefix cache", registry=r)
        self.spec_drafted = Counter("jserve_spec_drafted_tokens", "Tokens drafted by prompt lookup and checked "
                                    "by a speculative decode step", registry=r)
        self.spec_accepted = Counter("jserve_spec_accepted_tokens", "Drafted tokens the model agreed with (kept)",
                                     registry=r)
        self.generation_tokens = Counter("jserve_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("jserve_requests_finished", "Finished requests by reason", ["reason"], registry=r)
        self.rejected = Counter("jserve_requests_rejected", "Requests refused at the edge", ["reason"], registry=r)
        self.waiting = Gauge("jserve_requests_waiting", "Requests in the waiting queue", registry=r)
        self.running = Gauge("jserve_requests_running", "Requests decoding in a slot", registry=r)
        self.slots_in_use = Gauge("jserve_slots_in_use", "Batch slots holding a request", registry=r)
        self.slots_total = Gauge("jserve_slots", "Batch slots", registry=r)
        self.kv_usage = Gauge("jserve_kv_cache_usage_ratio", "Fraction of the KV cache held by requests (0..1): "
                              "slots in use / slots, a request holding its slot's positions", registry=r)
        # What cluster routers read (the Gateway API Inference Extension's model-server protocol).
        self.router_waiting = Gauge("vllm:num_requests_waiting", "Requests in the waiting queue", registry=r)
        self.router_running = Gauge("vllm:num_requests_running", "Requests holding a slot (prefill or decode)",
                                    registry=r)
        self.router_kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 0..1 (1 = full): slots in use / slots",
                               registry=r)
        self.router_kv_old = Gauge("vllm:gpu_cache_usage_perc", "KV-cache usage, 0..1: the older name of "
                                   "vllm:kv_cache_usage_perc", registry=r)
        self.kv_pages = Gauge("jserve_kv_pages", "KV page pool's pages: free, cached (prefix cache, evictable) "
                              "or in use by requests", ["state"], registry=r)
        self.kv_pages_total = Gauge("jserve_kv_pages_total", "Pages in the KV page pool", registry=r)
        self.kv_evictions = Gauge("jserve_kv_cache_evictions", "Cached KV pages given up for new ones, ever",
                                  registry=r)
        self.preemptions = Counter("jserve_preemptions", "Running requests that gave back their KV pages for "
                                   "lack of them (resumed later)", registry=r)
        self._last_token: dict[int, float] = {}
        self._lock = threading.Lock()

    def bind(self, slots: int, waiting: Callable[[], int], running: Callable[[], int],
             in_use: Callable[[], int]) -> None:
        self.slots_total.set(slots)
        self.waiting.set_function(waiting)
        self.running.set_function(running)
        self.slots_in_use.set_function(in_use)

        def usage() -> float:
            return in_use() / slots if slots else 0.0

        for gauge in (self.kv_usage, self.router_kv, self.router_kv_old):
            gauge.set_function(usage)
        self.router_waiting.set_function(waiting)
        self.router_running.set_function(running)

    def bind_pages(self, stats: Callable[[], Any]) -> None:
        """Read the KV page pool's state from ``stats()`` (a ``kv_pages.PoolStats``): usage is then
        the fraction of pages in use."""
        self.kv_pages_total.set_function(lambda: stats().pages)
        for name in ("free", "cached", "in_use"):
            self.kv_pages.labels(name).set_function(lambda name=name: getattr(stats(), name))
        self.kv_evictions.set_function(lambda: stats().evictions)
        for gauge in (self.kv_usage, self.router_kv, self.router_kv_old):
            gauge.set_function(lambda: stats().usage)

    def on_event(self, kind: str, req: Any, value: float) -> None:
        """The orchestrator's callback: ``first_token``, ``token``, ``finished:<reason>``, ``rejected``."""
        now = time.monotonic()
        key = id(req)
        if kind == "token":
            self.generation_tokens.inc()
            with self._lock:
                last = self._last_token.get(key)
                self._last_token[key] = now
            if last is not None:
                self.itl.observe(now - last)
        elif kind == "first_token":
            self.ttft.observe(value)
            self.prompt_tokens.inc(len(req.prompt_ids))
            self.generation_tokens.inc()
            with self._lock:
                self._last_token[key] = now
        elif kind.startswith("finished:"):
            self.e2e.observe(value)
            self.finished.labels(kind.split(":", 1)[1]).inc()
            with self._lock:
                self._last_token.pop(key, None)
        elif kind == "prefix_lookup":
            self.prefix_lookups.inc()
            self.prefix_hit_tokens.inc(value)
        elif kind == "preempted":
            self.preemptions.inc()
        elif kind == "spec_drafted":
            self.spec_drafted.inc(value)
        elif kind == "spec_accepted":
            self.spec_accepted.inc(value)
        elif kind == "rejected":
            self.rejected.labels("queue_full").inc()

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format and its content type (for a ``GET /metrics``)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
