"""The concept file: what a trained concept is, and its safetensors format (docs/concept-format.md)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .base_model import KeylockedError
from .edit_options import EDITS, KEY_LOCKS
from .io import read_safetensors_header, save_safetensors
from .text_stack import TEXT_STACKS
from .validation import (
    check_beta,
    check_choice,
    check_finite_tensor,
    check_float_dtype,
    check_format_version,
    check_nonzero_vector,
    check_tau,
    check_token_text,
)

FORMAT_NAME = "keylocked.perfusion.concept"
# 2: one token embedding per text encoder, named by the model family's text stack ("token_embedding"
#    for one encoder, as in version 1; "clip_l" / "clip_g" on SDXL, its textual-inversion convention)
FORMAT_VERSION = 2
VALUE_PREFIX = "value_targets."
INPUT_NAMES = ("concept_input", "superclass_input")


@dataclass
class Concept:
    """Everything that cannot be recomputed from the base model.

    The locked keys are not stored: o*_K = W_K · superclass_input is recomputed per layer.
    """

    placeholder_token: str
    superclass_token: str
    # text encoder key -> (d_embed,) the new token's input word embedding in that encoder
    # (a single Tensor is taken as the one encoder's "token_embedding")
    token_embeddings: dict[str, Tensor]
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
        if isinstance(self.token_embeddings, Tensor):
            self.token_embeddings = {"token_embedding": self.token_embeddings}
        check_token_text(self.placeholder_token)
        for name in ("train_beta", "beta"):
            setattr(self, name, check_beta(getattr(self, name), name))
        for name in ("train_temperature", "temperature"):
            setattr(self, name, check_tau(getattr(self, name), name))
        check_concept_shapes({name: tuple(t.shape) for name, t in self.tensors().items()})
        check_choice("edit", self.edit, EDITS)
        check_choice("key_lock", self.key_lock, KEY_LOCKS)

    @property
    def name(self) -> str:
        return self.placeholder_token

    @property
    def token_embedding(self) -> Tensor:
        """The embedding of a single-encoder concept (SD 1.x/2.x)."""
        if len(self.token_embeddings) != 1:
            raise KeylockedError(
                f"{self.placeholder_token} has one embedding per text encoder ({sorted(self.token_embeddings)})"
            )
        return next(iter(self.token_embeddings.values()))

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def tensors(self) -> dict[str, Tensor]:
        tensors = {
            **self.token_embeddings,
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
        """Write atomically, with canonical bytes; fp16 by default (the metric is computed in fp32 at use)."""
        tensors = {k: t.detach().to("cpu", dtype).contiguous() for k, t in self.tensors().items()}
        return save_safetensors(tensors, path, self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike, dims: ConceptDims | None = None) -> Concept:
        """Read a concept file, checking its header (names, float dtypes, shapes, and ``dims`` when
        given) before any tensor is read, then its values (finite, i* not zero)."""
        path = Path(path)
        header = read_safetensors_header(path, "concept file")
        metadata = parse_metadata(path, header.metadata)
        for name, info in header.tensors.items():
            check_float_dtype(f"{path}: tensor {name!r}", info.dtype)
        check_concept_shapes({name: info.shape for name, info in header.tensors.items()}, dims, str(path))
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise KeylockedError(f"{path}: cannot read tensors ({error})") from error
        tensors = {name: check_finite_tensor(f"{path}: tensor {name!r}", t).float() for name, t in tensors.items()}
        check_nonzero_vector(f"{path}: concept_input (i*)", tensors["concept_input"])
        return cls(
            placeholder_token=metadata["placeholder_token"],
            superclass_token=metadata["superclass_token"],
            token_embeddings={k: t for k, t in tensors.items() if k in EMBEDDING_NAMES},
            concept_input=tensors["concept_input"],
            superclass_input=tensors["superclass_input"],
            value_targets={k[len(VALUE_PREFIX) :]: t for k, t in tensors.items() if k.startswith(VALUE_PREFIX)},
            base_model_fingerprint=metadata["base_model_fingerprint"],
            covariance_sha256=metadata["covariance_sha256"],
            train_beta=metadata["train_beta"],
            train_temperature=metadata["train_tau"],
            beta=metadata["beta"],
            temperature=metadata["tau"],
            training=metadata["training"],
            edit=metadata["edit"],
            key_lock=metadata["key_lock"],
        )


@dataclass(frozen=True)
class ConceptDims:
    """The widths a concept must have to fit one pipeline."""

    embed_dims: dict[str, int]  # text encoder key -> its input embedding width (SDXL: clip_l, clip_g)
    text_dim: int  # width of what the cross-attention sees (SDXL: both encoders concatenated)
    value_widths: dict[str, int]  # cross-attention layer path -> to_v.out_features


MAX_WIDTH = 1 << 16  # no text encoder or attention layer is this wide; bounds what a header may claim
MAX_LAYERS = 4096
# the token-embedding names of every model family (text_stack.TEXT_STACKS); a file holds one family's set
EMBEDDING_SETS = tuple(family.embedding_keys for family in TEXT_STACKS)
EMBEDDING_NAMES = tuple(dict.fromkeys(key for keys in EMBEDDING_SETS for key in keys))


def check_concept_shapes(shapes: dict[str, tuple[int, ...]], dims: ConceptDims | None = None, source: str = "") -> None:
    """The tensor names and shapes of a concept: from a file header or a ``Concept``, one rule for both."""
    where = f"{source}: " if source else ""
    embeddings = tuple(name for name in EMBEDDING_NAMES if name in shapes)
    missing = [name for name in INPUT_NAMES if name not in shapes]
    if not embeddings:
        missing.append(" or ".join("+".join(keys) for keys in EMBEDDING_SETS))
    layers = {k[len(VALUE_PREFIX) :]: shape for k, shape in shapes.items() if k.startswith(VALUE_PREFIX)}
    if missing or not layers:
        raise KeylockedError(f"{where}not a complete keylocked concept (missing {missing or 'value targets'})")
    if sorted(embeddings) not in [sorted(keys) for keys in EMBEDDING_SETS]:
        raise KeylockedError(f"{where}token embeddings {list(embeddings)} are not one model family's {EMBEDDING_SETS}")
    unexpected = sorted(set(shapes) - set(INPUT_NAMES) - set(embeddings) - {VALUE_PREFIX + k for k in layers})
    if unexpected or len(layers) > MAX_LAYERS:
        raise KeylockedError(f"{where}unexpected tensors in a concept file: {unexpected[:3] or len(layers)}")
    for name, shape in shapes.items():
        if len(shape) != 1 or not 1 <= shape[0] <= MAX_WIDTH:
            raise KeylockedError(f"{where}{name} must be a vector of 1 to {MAX_WIDTH} numbers, got shape {shape}")
    if shapes["concept_input"] != shapes["superclass_input"]:
        raise KeylockedError(
            f"{where}concept_input {shapes['concept_input']} and superclass_input "
            f"{shapes['superclass_input']} must be vectors of the same size"
        )
    if dims is None:
        return
    widths = {name: shapes[name][0] for name in embeddings}
    if widths != dims.embed_dims or shapes["concept_input"][0] != dims.text_dim:
        raise KeylockedError(
            f"{where}concept was trained on a text encoder of width {shapes['concept_input'][0]} "
            f"(embeddings {widths}); this model's is {dims.text_dim} ({dims.embed_dims})"
        )
    if set(layers) != set(dims.value_widths):
        missing_layers = sorted(set(dims.value_widths) - set(layers))[:3]
        extra = sorted(set(layers) - set(dims.value_widths))[:3]
        raise KeylockedError(
            f"{where}concept's cross-attention layers do not match this UNet "
            f"(missing {missing_layers}, unexpected {extra}); it was trained on another base model"
        )
    for name, width in dims.value_widths.items():
        if layers[name][0] != width:
            raise KeylockedError(
                f"{where}value target of {name} has {layers[name][0]} features, "
                f"the layer has {width}; the concept was trained on another base model"
            )


REQUIRED_METADATA = ("format", "format_version", "placeholder_token", "superclass_token")


def parse_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> dict[str, Any]:
    """The checked, typed metadata of a concept file; any bad value names the file and the key."""
    if metadata.get("format") != FORMAT_NAME:
        raise KeylockedError(f"{path}: not a keylocked concept file (format={metadata.get('format')!r})")
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise KeylockedError(f"{path}: concept metadata lacks the required key(s) {missing}")
    check_format_version(f"{path}: format_version", metadata["format_version"], FORMAT_VERSION)
    parsed: dict[str, Any] = {
        "placeholder_token": check_token_text(metadata["placeholder_token"], f"{path}: placeholder_token"),
        "superclass_token": check_token_text(metadata["superclass_token"], f"{path}: superclass_token"),
        "base_model_fingerprint": metadata.get("base_model_fingerprint", ""),
        "covariance_sha256": metadata.get("covariance_sha256", ""),
    }
    for key, check, default in (
        ("train_beta", check_beta, 0.75),
        ("train_tau", check_tau, 0.1),
        ("beta", check_beta, 0.7),
        ("tau", check_tau, 0.15),
    ):
        parsed[key] = check(metadata.get(key, default), f"{path}: {key}")
    try:
        training = json.loads(metadata.get("training", "{}"))
    except (ValueError, RecursionError):
        training = None
    if not isinstance(training, dict):
        raise KeylockedError(f"{path}: training must be a JSON object, got {metadata.get('training')!r:.80}")
    parsed["training"] = training
    # files written before these options existed used the paper's forms
    parsed["edit"] = check_choice(f"{path}: edit", metadata.get("edit", "paper"), EDITS)
    parsed["key_lock"] = check_choice(f"{path}: key_lock", metadata.get("key_lock", "paper"), KEY_LOCKS)
    return parsed


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a keylocked concept file, checked (format, version, required keys, values)."""
    header = read_safetensors_header(path, "concept file")
    parse_metadata(path, header.metadata)
    return header.metadata
