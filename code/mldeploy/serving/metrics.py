"""Prometheus metrics for the service, in a registry of the app's own (so many apps can coexist)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """Requests by path and status, latency, batches, queue wait, faults, shed load, connections."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0.0):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "mldeploy_requests", "HTTP requests", ["method", "path", "status"], registry=r
        )
        self.latency = Histogram(
            "mldeploy_request_seconds",
            "Request latency inside the server",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mldeploy_batch_size", "Samples per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.model_seconds = Histogram(
            "mldeploy_model_seconds",
            "Time of one model call, as the event loop waits for it (hand-off included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "mldeploy_queue_wait_seconds",
            "Time a request waited in the queue before its model call",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shed = Counter(
            "mldeploy_shed", "Requests answered 503 because a queue was full", registry=r
        )
        self.model_errors = Counter(
            "mldeploy_model_errors", "Model calls that failed (answered 500)", registry=r
        )
        self.timed_out = Counter(
            "mldeploy_timed_out", "Requests that ran past the request timeout", registry=r
        )
        self.abandoned = Counter(
            "mldeploy_abandoned", "Queued requests not computed because the client left", registry=r
        )
        self.connections_refused = Counter(
            "mldeploy_connections_refused",
            "Connections refused at once because the connection cap was reached",
            registry=r,
        )
        self.connections_timed_out = Counter(
            "mldeploy_connections_timed_out",
            "Connections closed because a request did not arrive in time (slow or idle client)",
            registry=r,
        )
        self.queue = Gauge("mldeploy_queue_depth", "Samples waiting for a batch", registry=r)
        self.queue.set_function(queue_depth)

    def observe_request(self, method: str, path: str, status: int, seconds: float) -> None:
        self.requests.labels(method, path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.model_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
