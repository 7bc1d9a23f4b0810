"""Prometheus metrics for the service, in a registry of the app's own (so many apps can coexist)."""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client as prom

SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SAMPLES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """Requests by path and status, latency, batches, queue wait, faults, shed load, connections."""

    content_type = prom.CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0.0):
        self.registry = r = prom.CollectorRegistry()

        def counter(name: str, text: str, labels: tuple = ()) -> prom.Counter:
            return prom.Counter(f"mldeploy_{name}", text, labels, registry=r)

        def histogram(
            name: str, text: str, buckets: tuple = SECONDS, labels: tuple = ()
        ) -> prom.Histogram:
            return prom.Histogram(f"mldeploy_{name}", text, labels, buckets=buckets, registry=r)

        self.requests = counter("requests", "HTTP requests", ("method", "path", "status"))
        self.latency = histogram("request_seconds", "Latency inside the server", labels=("path",))
        self.batch_size = histogram("batch_size", "Samples per model call", SAMPLES)
        self.model_seconds = histogram("model_seconds", "One model call, hand-off included")
        self.queue_wait = histogram("queue_wait_seconds", "Wait in the queue before the model")
        self.shed = counter("shed", "Requests answered 503 because the service was full")
        self.model_errors = counter("model_errors", "Model calls that failed (answered 500)")
        self.timed_out = counter("timed_out", "Requests that ran past the request timeout")
        self.abandoned = counter("abandoned", "Queued requests not computed: the client left")
        self.connections_refused = counter(
            "connections_refused", "Connections refused at once: the connection cap was reached"
        )
        self.connections_timed_out = counter(
            "connections_timed_out", "Connections closed: a request did not arrive in time"
        )
        self.queue = prom.Gauge("mldeploy_queue_depth", "Samples waiting for a batch", registry=r)
        self.queue.set_function(queue_depth)

    def observe_request(self, method: str, path: str, status: int, seconds: float) -> None:
        self.requests.labels(method, path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.model_seconds.observe(seconds)

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)
