"""MetricsMiddleware's counts, with its cache of label series (and past the cache's bound)."""

from __future__ import annotations

import asyncio
from typing import Any

from service import metrics as metrics_module
from service.metrics import Metrics, MetricsMiddleware


def test_every_request_is_counted_and_timed_whether_or_not_its_series_is_cached(monkeypatch):
    monkeypatch.setattr(metrics_module, "MAX_CACHED_SERIES", 3)
    metrics = Metrics()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": scope["status"], "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def noop(message: Any) -> None:
        pass

    middleware = MetricsMiddleware(app, metrics)
    methods = ["GET", "POST", "PUT", "PATCH", "FOO"]  # more series than the cache holds
    for _ in range(4):
        for method in methods:
            for status in (200, 404):
                asyncio.run(middleware({"type": "http", "method": method, "status": status}, None, noop))
    assert len(metrics._children) == 3
    value = metrics.registry.get_sample_value
    for method in methods:
        for status in ("200", "404"):
            labels = {"endpoint": "unmatched", "method": method, "status": status}
            assert value("vae_requests_total", labels) == 4
    assert value("vae_request_seconds_count", {"endpoint": "unmatched"}) == 40
    assert value("vae_errors_total", {"endpoint": "unmatched", "status": "404"}) == 20
