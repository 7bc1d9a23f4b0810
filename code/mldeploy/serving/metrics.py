"""Prometheus metrics for the service, in a registry of the app's own (so many apps can coexist),
and a reader for the text format built on prometheus_client's own parser."""

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
from prometheus_client.parser import text_string_to_metric_families

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


def read_metrics(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text page, keyed ``name`` or ``name{label="value",...}``
    (labels sorted), parsed by prometheus_client itself."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value (0.0 when absent), e.g. ``metric(text, "mldeploy_shed_total")``."""
    key = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return read_metrics(text).get(f"{name}{{{key}}}" if key else name, 0.0)
