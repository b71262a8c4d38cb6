"""Prometheus metrics of one serving replica, exposed at ``GET /metrics`` (text exposition format).

Each ``ServingCore`` owns its own ``CollectorRegistry`` (prometheus-client's global registry would be
shared by every app in the process, and a second app would fail on duplicate names). Under Ray Serve
each replica answers ``/metrics`` for itself; with several replicas, scrape Ray's own metrics export
(``ray_serve_*``) or each replica. Names follow Prometheus conventions (``_total`` counters,
``_seconds`` histograms)."""

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
OTHER_ROUTE = "other"  # paths that are no route of the app: one label, not one per probed URL


class Metrics:
    """The replica's counters, histograms and gauge; ``exposition()`` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "seg_rt_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.images = Counter("seg_rt_images", "images generated", registry=r)
        self.sampling_seconds = Histogram(
            "seg_rt_sampling_seconds",
            "seconds per sampling run (one engine batch)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.batch_images = Histogram(
            "seg_rt_batch_images", "images per sampling run", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.batch_requests = Histogram(
            "seg_rt_batch_requests",
            "requests per batch handed to the core",
            buckets=(1, 2, 4, 8, 16, 32),
            registry=r,
        )
        self.queue_depth = Gauge(
            "seg_rt_queue_depth", "accepted requests waiting for or in sampling on this replica", registry=r
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware counting every HTTP answer by route and status, refusals (401, 413) included.

    The route label is the matched route's path template (``/v1/models/{model_id:path}``), as the
    router leaves it in the scope; a path that matched no route (or was refused before routing) is
    counted as itself when it is one of ``routes``, else as ``other``."""

    def __init__(self, app, *, metrics: Metrics, routes: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        status = 500  # an exception before any answer started

        async def send_counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            matched = getattr(scope.get("route"), "path", None)
            route = matched or (path if path in self.routes else OTHER_ROUTE)
            self.metrics.requests.labels(route=route, status=str(status)).inc()
