"""Loading a trained concept of any method (Perfusion, Textual Inversion, Custom Diffusion, LoRA) into a pipeline.

The inference side of ``keylocked.training``'s outputs: each method's file is loaded with its own
ecosystem's loader (``load_textual_inversion``, ``load_lora_weights``) or, for Custom Diffusion's
K/V deltas, by wrapping ``to_k``/``to_v`` in a ``DeltaLinear`` (the base layer stays untouched).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from .base_model import KeylockedError, cross_attention_layers
from .layers import WrappedLinear
from .quiet import LORA_LOGS, LORA_WARNINGS, TEXTUAL_INVERSION_LOGS, quiet
from .text_stack import StackSnapshot, text_stack

METHODS = ("perfusion", "textual-inversion", "custom-diffusion", "lora")
BASELINE_METHODS = METHODS[1:]
CONCEPT_FILENAME = "concept.safetensors"
MANIFEST_FILENAME = "keylocked_baseline.json"
MANIFEST_FORMAT = "keylocked.baseline"
MANIFEST_VERSION = 1
TI_FILENAME = "learned_embeds.safetensors"
CD_FILENAME = "custom_diffusion.safetensors"
CD_FORMAT = "keylocked.custom_diffusion"
CD_VERSION = 2  # 2: one token embedding per text encoder, named as in Perfusion concept files
LORA_FILENAME = "pytorch_lora_weights.safetensors"  # diffusers' default LORA_WEIGHT_NAME_SAFE
OUTPUT_FILENAMES = (CONCEPT_FILENAME, MANIFEST_FILENAME, TI_FILENAME, CD_FILENAME, LORA_FILENAME)


# ---------------------------------------------------------------------------------------
# Custom Diffusion's K/V deltas, applied by wrapping (the base layer stays untouched).


class DeltaLinear(WrappedLinear):
    """``base_layer`` with ``W + Σ deltas``: Custom Diffusion's fine-tuned K/V, kept separable per concept."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__(base_layer)
        self.deltas = nn.ParameterDict()  # concept token -> (out, in)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.base_layer.weight
        for delta in self.deltas.values():
            weight = weight + delta.to(weight.dtype)
        return F.linear(x, weight, self.base_layer.bias)


def wrap_kv(unet: nn.Module) -> dict[str, DeltaLinear]:
    """Wrap every cross-attention to_k/to_v in a DeltaLinear; returns "layer.to_k" -> wrapper."""
    wrapped = {}
    for name, layer in cross_attention_layers(unet).items():
        for projection in ("to_k", "to_v"):
            module = getattr(layer, projection)
            if not isinstance(module, DeltaLinear):
                module = DeltaLinear(module)
                setattr(layer, projection, module)
            wrapped[f"{name}.{projection}"] = module
    return wrapped


def unwrap_kv(unet: nn.Module) -> None:
    from .loading import unwrap_projections

    unwrap_projections(unet, DeltaLinear)


# ---------------------------------------------------------------------------------------
# Loading any method's trained concept into a pipeline, and removing it again.


@dataclass
class Personalization:
    """A trained concept of any method, as found on disk."""

    method: str
    path: Path  # a Perfusion concept file, or a baseline's output folder
    placeholder_token: str
    superclass_token: str
    prompt_phrase: str  # what stands for the concept in prompts
    manifest: dict = field(default_factory=dict)

    @property
    def weights_path(self) -> Path:
        return self.path if self.method == "perfusion" else self.path / self.manifest["weights"]

    def size_bytes(self) -> int:
        """Bytes of what a user ships (the weights file; the manifest is a few hundred bytes of JSON)."""
        return self.weights_path.stat().st_size

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> Personalization:
        """A Perfusion concept file, a training output folder (concept.safetensors), or a baseline folder."""
        path = Path(path)
        if path.is_dir() and (path / MANIFEST_FILENAME).is_file():
            manifest = json.loads((path / MANIFEST_FILENAME).read_text())
            if manifest.get("format") != MANIFEST_FORMAT or manifest.get("method") not in BASELINE_METHODS:
                raise KeylockedError(f"{path}: not a keylocked baseline folder (format={manifest.get('format')!r})")
            if int(manifest.get("format_version", 0)) > MANIFEST_VERSION:
                raise KeylockedError(
                    f"{path}: baseline format version {manifest['format_version']} is newer than this keylocked"
                )
            if not (path / manifest["weights"]).is_file():
                raise KeylockedError(f"{path}: weights file {manifest['weights']} is missing")
            return cls(
                manifest["method"],
                path,
                manifest["placeholder_token"],
                manifest["superclass_token"],
                manifest["prompt_phrase"],
                manifest,
            )
        if path.is_dir() and (path / CONCEPT_FILENAME).is_file():
            path = path / CONCEPT_FILENAME
        from .concept import read_metadata

        metadata = read_metadata(path)  # raises a clear error for anything but a concept file
        token = metadata["placeholder_token"]
        return cls("perfusion", path, token, metadata["superclass_token"], token)


@dataclass
class _Loaded:
    items: list[Personalization]
    snapshot: StackSnapshot | None = None
    adapters: list[str] = field(default_factory=list)


def load_personalizations(
    pipe,
    items: Iterable[Personalization | str | os.PathLike],
    beta=None,
    tau=None,
    lock: str = "local",
    covariance=None,
    lora_scale: float = 1.0,
    strict: bool = True,
) -> dict[str, str]:
    """Load concepts of one method into ``pipe`` (several = trained apart, used together).

    Returns {placeholder or identifier phrase: super-category}. ``beta``/``tau``/``lock``/``covariance``
    apply to Perfusion, ``lora_scale`` to LoRA. ``unload_personalizations`` restores the pipeline.
    """
    items = [i if isinstance(i, Personalization) else Personalization.from_path(i) for i in items]
    if not items:
        raise KeylockedError("no concepts given")
    methods = {i.method for i in items}
    if len(methods) != 1:
        raise KeylockedError(f"load concepts of one method at a time, got {sorted(methods)}")
    if getattr(pipe, "_keylocked_personalizations", None) is not None:
        raise KeylockedError("personalizations are already loaded; unload_personalizations(pipe) first")
    phrases = [i.prompt_phrase for i in items]
    if len(set(phrases)) != len(phrases):
        raise KeylockedError(f"two concepts use the same prompt phrase: {phrases}")
    method = methods.pop()
    loaded = _Loaded(items)
    if method == "perfusion":
        from .loading import load_concepts

        load_concepts(
            pipe, [i.path for i in items], beta=beta, tau=tau, lock=lock, covariance=covariance, strict=strict
        )
    elif method == "textual-inversion":
        stack = text_stack(pipe)
        loaded.snapshot = stack.snapshot()
        try:
            for item in items:
                if len(stack.slots) == 1:
                    with quiet(TEXTUAL_INVERSION_LOGS):  # the new rows are overwritten by the file's embedding
                        pipe.load_textual_inversion(str(item.weights_path), token=item.placeholder_token)
                    continue
                state = load_file(str(item.weights_path))  # SDXL: once per encoder, as diffusers documents
                for slot in stack:
                    if slot.key not in state:
                        raise ValueError(f"{item.weights_path} has no {slot.key!r} embedding")
                    with quiet(TEXTUAL_INVERSION_LOGS):
                        pipe.load_textual_inversion(
                            state[slot.key],
                            token=item.placeholder_token,
                            text_encoder=slot.text_encoder,
                            tokenizer=slot.tokenizer,
                        )
        except ValueError as error:
            stack.restore(loaded.snapshot)
            raise KeylockedError(f"cannot load textual inversion: {error}") from error
    elif method == "custom-diffusion":
        tensors = [_read_custom_diffusion(item, pipe) for item in items]  # validate all, then mutate
        stack = text_stack(pipe)
        loaded.snapshot = stack.snapshot()
        stack.add_tokens(
            {i.placeholder_token: {key: t[key] for key in stack.embedding_keys} for i, t in zip(items, tensors)}
        )
        wrapped = wrap_kv(pipe.unet)
        for item, state in zip(items, tensors):
            for name, module in wrapped.items():
                weight = module.base_layer.weight
                module.deltas[item.placeholder_token] = nn.Parameter(
                    state[f"deltas.{name}"].to(weight.device, weight.dtype), requires_grad=False
                )
    else:
        # Over loaded concepts too: their wrappers step aside for peft (keylocked.loading.PEFT_VERBS).
        for index, item in enumerate(items):
            name = f"keylocked_{index}"
            with quiet(LORA_LOGS, LORA_WARNINGS):  # UNet-only files, several adapters: both intended
                pipe.load_lora_weights(str(item.path), weight_name=item.manifest["weights"], adapter_name=name)
            loaded.adapters.append(name)
        pipe.set_adapters(loaded.adapters, adapter_weights=[lora_scale] * len(items))
    pipe._keylocked_personalizations = loaded
    return {i.prompt_phrase: i.superclass_token for i in items}


def _read_custom_diffusion(item: Personalization, pipe) -> dict[str, Tensor]:
    with safe_open(str(item.weights_path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != CD_FORMAT:
        raise KeylockedError(f"{item.weights_path}: not a keylocked Custom Diffusion file")
    stack = text_stack(pipe)
    stack.check_new_token(item.placeholder_token)
    state = {k: v.float() for k, v in load_file(str(item.weights_path)).items()}
    for key, width in stack.embedding_dims().items():
        if key not in state or tuple(state[key].shape) != (width,):
            raise KeylockedError(
                f"{item.weights_path}: no {width}-wide {key!r} embedding for this model's text encoders"
            )
    for name, layer in cross_attention_layers(pipe.unet).items():
        for projection in ("to_k", "to_v"):
            module = getattr(layer, projection)
            weight = getattr(module, "base_layer", module).weight
            key = f"deltas.{name}.{projection}"
            if key not in state or state[key].shape != weight.shape:
                raise KeylockedError(
                    f"{item.weights_path}: {key} does not fit this UNet (trained on another base model)"
                )
    return state


def unload_personalizations(pipe) -> None:
    """Undo ``load_personalizations``: the stock pipeline again."""
    loaded = getattr(pipe, "_keylocked_personalizations", None)
    if loaded is None:
        return
    method = loaded.items[0].method
    if method == "perfusion":
        from .loading import unload_concepts

        unload_concepts(pipe)
    elif method == "lora":
        pipe.unload_lora_weights()
    else:
        unwrap_kv(pipe.unet)
        text_stack(pipe).restore(loaded.snapshot)
    pipe._keylocked_personalizations = None


def set_personalization_options(pipe, beta=None, tau=None, lock=None, lora_scale: float | None = None) -> None:
    """Change Perfusion's β/τ/lock or LoRA's scale of the loaded concepts, without reloading."""
    loaded = getattr(pipe, "_keylocked_personalizations", None)
    if loaded is None:
        raise KeylockedError("no personalizations are loaded")
    method = loaded.items[0].method
    if method == "perfusion":
        from .loading import set_concept_options

        set_concept_options(pipe, beta=beta, tau=tau, lock=lock)
    elif method == "lora" and lora_scale is not None:
        pipe.set_adapters(loaded.adapters, adapter_weights=[lora_scale] * len(loaded.adapters))
