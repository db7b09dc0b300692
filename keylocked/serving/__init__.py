"""Serving one base model with many concepts: the batched engine and the HTTP service (docs/serving.md)."""
