"""The concept file: what a trained concept is, and its safetensors format (docs/concept-format.md)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .base_model import KeylockedError
from .edit_options import EDITS, KEY_LOCKS
from .io import atomic_path, read_safetensors_header
from .validation import check_choice

FORMAT_NAME = "keylocked.perfusion.concept"
FORMAT_VERSION = 1
VALUE_PREFIX = "value_targets."


@dataclass
class Concept:
    """Everything that cannot be recomputed from the base model.

    The locked keys are not stored: o*_K = W_K · superclass_input is recomputed per layer.
    """

    placeholder_token: str
    superclass_token: str
    token_embedding: Tensor  # (d_embed,)  the new token's input word embedding
    concept_input: Tensor  # (d_text,)  i*: EMA of the concept token's encoding
    superclass_input: Tensor  # (d_text,)  i*_super: mean encoding of the super-category word
    value_targets: dict[str, Tensor]  # cross-attention layer path -> (out,)  o*_V
    base_model_fingerprint: str = ""
    covariance_sha256: str = ""
    train_beta: float = 0.75
    train_temperature: float = 0.1
    beta: float = 0.7  # recommended inference values
    temperature: float = 0.15
    training: dict[str, Any] = field(default_factory=dict)
    edit: str = "paper"  # edit form trained with (edit_options.EDITS); the default at inference
    key_lock: str = "paper"  # key lock trained with (edit_options.KEY_LOCKS)

    def __post_init__(self) -> None:
        if not self.placeholder_token or any(c.isspace() for c in self.placeholder_token):
            raise KeylockedError(f"placeholder token must be one word without spaces, got {self.placeholder_token!r}")
        d_text = self.concept_input.shape
        if self.superclass_input.shape != d_text or len(d_text) != 1:
            raise KeylockedError(
                f"concept_input {tuple(self.concept_input.shape)} and superclass_input "
                f"{tuple(self.superclass_input.shape)} must be vectors of the same size"
            )
        if self.token_embedding.dim() != 1:
            raise KeylockedError(f"token_embedding must be a vector, got shape {tuple(self.token_embedding.shape)}")
        for name, target in self.value_targets.items():
            if target.dim() != 1:
                raise KeylockedError(f"value target of {name!r} must be a vector, got {tuple(target.shape)}")

    @property
    def name(self) -> str:
        return self.placeholder_token

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def tensors(self) -> dict[str, Tensor]:
        tensors = {
            "token_embedding": self.token_embedding,
            "concept_input": self.concept_input,
            "superclass_input": self.superclass_input,
        }
        tensors.update({VALUE_PREFIX + name: t for name, t in self.value_targets.items()})
        return tensors

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "placeholder_token": self.placeholder_token,
            "superclass_token": self.superclass_token,
            "base_model_fingerprint": self.base_model_fingerprint,
            "covariance_sha256": self.covariance_sha256,
            "train_beta": repr(self.train_beta),
            "train_tau": repr(self.train_temperature),
            "beta": repr(self.beta),
            "tau": repr(self.temperature),
            "training": json.dumps(self.training, sort_keys=True),
            "edit": self.edit,
            "key_lock": self.key_lock,
        }

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
        """Write atomically; fp16 by default (the metric is computed in fp32 at use)."""
        tensors = {k: t.detach().to("cpu", dtype).contiguous() for k, t in self.tensors().items()}
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=self.metadata())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Concept:
        path = Path(path)
        metadata = read_metadata(path)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise KeylockedError(f"{path}: cannot read tensors ({error})") from error
        missing = {"token_embedding", "concept_input", "superclass_input"} - tensors.keys()
        value_targets = {k[len(VALUE_PREFIX) :]: t.float() for k, t in tensors.items() if k.startswith(VALUE_PREFIX)}
        if missing or not value_targets:
            raise KeylockedError(
                f"{path}: not a complete keylocked concept (missing {sorted(missing) or 'value targets'})"
            )
        try:  # files written before these options existed used the paper's forms
            edit = check_choice("edit", metadata.get("edit", "paper"), EDITS)
            key_lock = check_choice("key_lock", metadata.get("key_lock", "paper"), KEY_LOCKS)
        except KeylockedError as error:
            raise KeylockedError(f"{path}: {error}") from error
        try:
            return cls(
                placeholder_token=metadata["placeholder_token"],
                superclass_token=metadata["superclass_token"],
                token_embedding=tensors["token_embedding"].float(),
                concept_input=tensors["concept_input"].float(),
                superclass_input=tensors["superclass_input"].float(),
                value_targets=value_targets,
                base_model_fingerprint=metadata.get("base_model_fingerprint", ""),
                covariance_sha256=metadata.get("covariance_sha256", ""),
                train_beta=float(metadata.get("train_beta", 0.75)),
                train_temperature=float(metadata.get("train_tau", 0.1)),
                beta=float(metadata.get("beta", 0.7)),
                temperature=float(metadata.get("tau", 0.15)),
                training=json.loads(metadata.get("training", "{}")),
                edit=edit,
                key_lock=key_lock,
            )
        except (KeyError, ValueError, json.JSONDecodeError) as error:
            raise KeylockedError(f"{path}: malformed keylocked metadata ({error})") from error


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a keylocked concept file, checked for format and version."""
    metadata, _ = read_safetensors_header(path, "concept file")
    if metadata.get("format") != FORMAT_NAME:
        raise KeylockedError(f"{path}: not a keylocked concept file (format={metadata.get('format')!r})")
    version = int(metadata.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise KeylockedError(
            f"{path}: format version {version} is newer than this keylocked ({FORMAT_VERSION}); upgrade keylocked"
        )
    return metadata
