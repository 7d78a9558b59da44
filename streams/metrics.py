"""Prometheus metrics of a worker (served on ``ECHOLM_METRICS_PORT`` when set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STAGE_EVENTS = Counter("echolm_stage_events_total", "Events consumed by a stage", ["stage"])
STAGE_ERRORS = Counter("echolm_stage_errors_total", "Requests a stage ended with an error", ["stage", "kind"])
STAGE_LATENCY = Histogram(
    "echolm_stage_batch_seconds", "Time a stage spends on one batch", ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
ROUTED = Counter("echolm_routed_total", "Requests routed to each tier", ["tier"])
CACHE_SIZE = Gauge("echolm_example_cache_size", "Examples held in this retriever's cache")
