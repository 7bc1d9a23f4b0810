"""Reading a Prometheus text page as a scraper does, with prometheus_client's own parser (tests,
benchmarks and notebooks read the service's ``/metrics`` this way)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


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
