"""What is inside a keylocked file (concept or covariance): the rows ``keylocked inspect`` prints."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import concept as concept_format
from . import covariance as covariance_format
from .base_model import KeylockedError
from .io import read_safetensors_header


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Label -> value for a concept or covariance file (values are str, int, float or dict)."""
    path = Path(path)
    header = read_safetensors_header(path)
    metadata = header.metadata
    dtypes = sorted(set(header.dtypes.values()))
    kind = metadata.get("format")
    common = {"file": str(path), "format": kind, "file size (bytes)": path.stat().st_size, "dtype": ", ".join(dtypes)}
    if kind == concept_format.FORMAT_NAME:
        return _describe_concept(path, {**common, "format version": metadata.get("format_version")})
    if kind == covariance_format.FORMAT_NAME:
        return _describe_covariance(path, common)
    raise KeylockedError(f"{path}: not a keylocked concept or covariance file (format={kind!r})")


def _describe_concept(path: Path, common: dict[str, Any]) -> dict[str, Any]:
    concept = concept_format.Concept.load(path)
    return {
        **common,
        "token": concept.placeholder_token,
        "super-category": concept.superclass_token,
        "base model fingerprint": concept.base_model_fingerprint or "(none)",
        "covariance sha256": concept.covariance_sha256 or "(none)",
        "parameters": concept.num_parameters(),
        "token embedding width": concept.token_embedding.shape[0],
        "text encoding width": concept.concept_input.shape[0],
        "recommended beta": concept.beta,
        "recommended tau": concept.temperature,
        "training beta": concept.train_beta,
        "training tau": concept.train_temperature,
        "training": json.dumps(concept.training, sort_keys=True),
        "layers": {name: target.shape[0] for name, target in concept.value_targets.items()},
    }


def _describe_covariance(path: Path, common: dict[str, Any]) -> dict[str, Any]:
    covariance = covariance_format.Covariance.load(path)
    return {
        **common,
        "dimension": covariance.inverse.shape[0],
        "text encoder fingerprint": covariance.text_encoder_fingerprint or "(none)",
        "sha256": covariance.sha256,
        **covariance.info,
    }


def format_description(description: dict[str, Any]) -> str:
    """Plain aligned text: one 'label  value' row each; a dict value becomes an indented block."""
    width = max(len(label) for label in description)
    lines = []
    for label, value in description.items():
        if isinstance(value, dict):
            lines.append(f"{label:<{width}}  {len(value)}")
            inner = max((len(k) for k in value), default=0)
            lines.extend(f"  {k:<{inner}}  {v}" for k, v in value.items())
        else:
            lines.append(f"{label:<{width}}  {value}")
    return "\n".join(lines)
