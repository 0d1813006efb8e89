"""Prometheus metrics of one serving replica, scraped at GET /metrics on the serving port.

Each replica keeps its own registry (a scrape through Serve's proxy reaches one replica; scrape
the replicas' own HTTP ports, or use Ray's metrics export, for a per-cluster view). Names follow
vLLM's where they mean the same thing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("ftray_num_requests_running", "rows decoding now", ["model"], registry=r)
        self.waiting = Gauge("ftray_num_requests_waiting", "requests waiting for cache slots", ["model"],
                             registry=r)
        self.ttft = Histogram("ftray_time_to_first_token_seconds", "submit to first token (streams)",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("ftray_time_per_output_token_seconds", "mean time between output tokens",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("ftray_request_latency_seconds", "submit to last token", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("ftray_generation_tokens", "generated tokens", ["model"], registry=r)
        self.requests = Counter("ftray_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)

    def request_done(self, model: str, seconds: float, tokens: int, first_token_s: float | None = None) -> None:
        self.latency.labels(model).observe(seconds)
        self.tokens.labels(model).inc(tokens)
        if first_token_s is not None:
            self.ttft.labels(model).observe(first_token_s)
            if tokens > 1:
                self.tpot.labels(model).observe((seconds - first_token_s) / (tokens - 1))
        elif tokens:
            self.tpot.labels(model).observe(seconds / tokens)

    def render(self, engines: dict) -> bytes:
        """The text exposition, with the engines' load read now."""
        for name, engine in engines.items():
            self.running.labels(name).set(engine.num_running)
            self.waiting.labels(name).set(engine.num_waiting)
        return generate_latest(self.registry)
