"""Prometheus metrics (one registry per app, so tests and several apps do not collide)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 4000, 8000, 16000, 32000, 64000)
MAX_CACHED_SERIES = 256  # the middleware's cache of label series (HTTP methods are the client's to make up)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "vae_requests_total",
            "HTTP requests by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "vae_request_seconds", "request latency by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.images_scored = Counter("vae_images_scored_total", "images scored", ["model"], registry=r)
        self.errors = Counter(
            "vae_errors_total",
            "responses with status >= 400 by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.queue_seconds = Histogram(
            "vae_queue_seconds", "time from submission to the first engine call, by operation", ["op"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_rows = Histogram(
            "vae_batch_rows", "rows of each engine call (images; images x samples for score), by operation", ["op"],
            buckets=ROWS_BUCKETS, registry=r,
        )  # fmt: skip
        self.engine_seconds = Histogram(
            "vae_engine_seconds", "duration of each engine call", ["op", "engine"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queued_work = Gauge("vae_queued_samples", "importance samples (or images) queued or running", registry=r)
        self.queued_seconds = Gauge(
            "vae_queued_seconds",
            "estimated time to drain the queued work, at each operation's measured engine cost",
            registry=r,
        )
        self.rejected = Counter(
            "vae_rejected_total", "requests refused by admission control (503), by operation", ["op"], registry=r
        )
        self.reloads = Counter("vae_repository_scans_total", "repository scans (start-up and reloads)", registry=r)
        # (metric, labels) -> its labelled child: prometheus_client's labels() takes a lock and checks its
        # arguments on every call (2.5 against 0.9 us a request, on every request's and engine call's path)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), from a cache of at most MAX_CACHED_SERIES series."""
        key = (id(metric), labels)
        series = self._children.get(key)
        if series is None:
            series = metric.labels(*labels)
            if len(self._children) < MAX_CACHED_SERIES:
                self._children[key] = series
        return series

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """One HTTP request answered: counted and timed by its route template, and as an error from 400 up."""
        self.child(self.requests, endpoint, method, str(status)).inc()
        self.child(self.latency, endpoint).observe(seconds)
        if status >= 400:
            self.child(self.errors, endpoint, str(status)).inc()


class MetricsMiddleware:
    """Counts requests and errors and times them, labelled by the route template (not the raw path).

    V2 inference requests are counted by service.v2.InferLane, which answers them before this layer."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(endpoint, scope["method"], status["code"], time.perf_counter() - start)
