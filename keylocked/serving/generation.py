"""The service's handle on the batched engine (``keylocked.serving.engine``): one pipeline, one
``ConceptPool``, one ``GenerationEngine``, their events wired to the Prometheus metrics."""

from __future__ import annotations

from concurrent.futures import Future

from .engine import ConceptRef, EngineConfig, EngineMetrics, GenerationEngine, GenerationRequest
from .metrics import ServiceMetrics
from .pool import ConceptPool


class Generator:
    """Owns the engine of one replica; ``submit`` is safe from any thread."""

    def __init__(self, pipe, max_batch_size: int, max_wait_ms: float, cache_bytes: int, metrics: ServiceMetrics):
        self.pool = ConceptPool(pipe, cache_bytes=cache_bytes)
        self.fingerprint: str = self.pool.fingerprint
        self.metrics = metrics
        events = EngineMetrics(listeners=[self._on_event])
        self.engine = GenerationEngine(
            self.pool, EngineConfig(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms), events, start=False
        )
        self._batch: dict[str, float] = {}

    def _on_event(self, event: str, value: float) -> None:
        if event == "queue_depth":
            self.metrics.queue_depth.set(value)
        elif event in ("batch_images", "batch_requests"):
            self._batch[event] = value
        elif event == "batch_seconds":  # the last of a batch's three events
            self.metrics.observe_batch(
                int(self._batch.get("batch_images", 0)), int(self._batch.get("batch_requests", 0)), value
            )

    def start(self) -> None:
        self.engine.start()

    def submit(self, request: GenerationRequest) -> Future:
        return self.engine.submit(request)

    def defaults(self, source: str) -> tuple[float, float]:
        """The (β, τ) a concept file recommends (read once, from the engine's cache)."""
        concept = self.pool.read(source).concept
        return concept.beta, concept.temperature

    def queue_depth(self) -> int:
        return self.engine.metrics.queue_depth

    def healthy(self) -> bool:
        worker = self.engine._worker
        return worker is not None and worker.is_alive()

    def close(self) -> None:
        self.engine.close(wait=True)


__all__ = ["ConceptRef", "GenerationRequest", "Generator"]
