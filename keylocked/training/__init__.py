"""Concept training."""

from .config import TrainConfig
from .trainer import CONCEPT_FILENAME, train_concept

__all__ = ["CONCEPT_FILENAME", "TrainConfig", "train_concept"]
