"""Prometheus collectors; /metrics renders them (with MAE_WORKERS > 1, every process's, from the shared directory)."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter(
    "mae_requests_total", "HTTP requests by route and status (499: the client went away first)", ["route", "status"]
)
LATENCY = Histogram("mae_request_latency_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS)
QUEUE_WAIT = Histogram("mae_queue_wait_seconds", "time an image waited for a batch", buckets=_LATENCY_BUCKETS)
COMPUTE_TIME = Histogram("mae_compute_seconds", "model time per batch", ["op"], buckets=_LATENCY_BUCKETS)
BATCH_SIZE = Histogram("mae_batch_size", "images per forward pass", ["op"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
IMAGES = Counter("mae_images_total", "images run through the model", ["op"])
CANCELLED = Counter(
    "mae_cancelled_images_total", "queued images dropped before compute: client_closed | drain", ["reason"]
)
REJECTS = Counter("mae_rejects_total", "requests refused, by reason", ["reason"])
# multiprocess_mode: how the gauge reads with MAE_WORKERS > 1 (app.supervisor); ignored in one process.
QUEUE_DEPTH = Gauge("mae_queue_depth", "images waiting for the model", multiprocess_mode="livemax")
OPEN_CONNECTIONS = Gauge("mae_open_connections", "open HTTP connections", multiprocess_mode="livesum")
CONNECTIONS_DROPPED = Counter(
    "mae_connections_dropped_total",
    "connections closed by the server: header_timeout | header_too_large | evicted (idle, to make room) | over_limit",
    ["reason"],
)


def render() -> tuple[bytes, str]:
    """The exposition text of this process, or of all of the server's processes (prometheus_client multiprocess)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
