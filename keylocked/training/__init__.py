"""Training a concept with Perfusion or a baseline method, in one loop."""

from .config import TrainConfig
from .methods import METHODS, BaselineOptions
from .trainer import CONCEPT_FILENAME, train, train_concept

__all__ = ["CONCEPT_FILENAME", "METHODS", "BaselineOptions", "TrainConfig", "train", "train_concept"]
