"""Serving one base model with many concepts: resident concept slots and batched generation.

``ConceptPool`` makes a concept usable with small tensor copies; ``GenerationEngine`` batches
concurrent requests with different concepts into one UNet call (docs/serving.md).
"""

from .engine import ConceptRef, EngineConfig, EngineMetrics, GenerationEngine, GenerationRequest
from .pool import ConceptCache, ConceptPool

__all__ = [
    "ConceptCache",
    "ConceptPool",
    "ConceptRef",
    "EngineConfig",
    "EngineMetrics",
    "GenerationEngine",
    "GenerationRequest",
]
