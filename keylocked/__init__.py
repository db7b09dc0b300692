"""keylocked: Perfusion (key-locked rank-one editing) personalization for diffusers pipelines."""

from .base_model import KeylockedError
from .concept import Concept
from .covariance import Covariance, estimate_covariance
from .loading import load_concepts, loaded_concepts, set_concept_options, unload_concepts

__version__ = "0.1.0"

__all__ = [
    "Concept",
    "Covariance",
    "KeylockedError",
    "estimate_covariance",
    "load_concepts",
    "loaded_concepts",
    "set_concept_options",
    "unload_concepts",
    "__version__",
]
