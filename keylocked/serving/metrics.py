"""Prometheus metrics of one replica (prometheus-client), in a registry of its own so that
several apps in one process (tests, replicas) do not mix their numbers."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServiceMetrics:
    """What /metrics exposes: requests, latency, batches, queue depth, images, trainings."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "keylocked_http_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "keylocked_http_request_seconds",
            "HTTP request latency by route",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "keylocked_batch_images", "images (rows before guidance) per UNet batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "keylocked_batch_requests", "requests sharing one UNet batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "keylocked_batch_seconds", "wall time of one batched pipeline call", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("keylocked_queue_depth", "generation requests waiting for a batch", registry=r)
        self.images = Counter("keylocked_images", "images generated", registry=r)
        self.denied = Counter(
            "keylocked_denied", "requests refused by authentication or access", ["status"], registry=r
        )
        self.trainings = Gauge(
            "keylocked_training_jobs", "training jobs in this replica by status", ["status"], registry=r
        )
        self.started = time.time()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)
        if status in (401, 403):
            self.denied.labels(str(status)).inc()

    def observe_batch(self, images: int, requests: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.batch_requests.observe(requests)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
