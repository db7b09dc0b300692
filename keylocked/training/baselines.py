"""Baselines trained in the same loop as Perfusion: Textual Inversion, Custom Diffusion, DreamBooth-LoRA.

Same data pipeline and step/batch rules as ``train_concept``: the instance images, the prompt
templates, ``step_generator(seed, step)`` per micro-batch and ``noised_batch`` (so every method
sees the very same images, noise and timesteps), ``max_train_steps`` optimizer steps of
``train_batch_size × gradient_accumulation_steps`` samples. What differs is what is trained:

    textual-inversion   the new token's input embedding (Gal et al. 2022)
    custom-diffusion    the token embedding + every cross-attention W_K, W_V (Kumari et al. 2023)
    lora                rank-r LoRA on every UNet attention projection, prompts "<identifier> <class>"
                        (DreamBooth-style, Ruiz et al. 2023 + Hu et al. 2021)

Deviations from the papers, kept so the comparison is on equal terms: no prior-preservation /
regularization images, no object mask in the loss (Perfusion's mask is part of its method), the
token embedding learning rate is Perfusion's (``learning_rate_embedding``).

Each writes its own ecosystem's file plus ``keylocked_baseline.json`` (method, token, prompt
phrase, training info): ``learned_embeds.safetensors`` (diffusers ``load_textual_inversion``),
``pytorch_lora_weights.safetensors`` (diffusers ``load_lora_weights``), and
``custom_diffusion.safetensors`` (token embedding + K/V deltas; ``load_personalizations``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..base_model import KeylockedError, base_model_fingerprint, cross_attention_layers, encode_prompts, single_token_id
from ..io import atomic_path, atomic_write_text
from ..layers import WrappedLinear
from ..quiet import LORA_LOGS, LORA_WARNINGS, TEXTUAL_INVERSION_LOGS, quiet
from ..tokens import TokenizerSnapshot, add_tokens, check_new_token, restore_vocabulary
from .config import TrainConfig
from .data import images_to_tensor, load_instance_images, prompts_for, step_generator
from .trainer import CONCEPT_FILENAME, _masked_mse, _resolution, freeze_and_place, noised_batch, train_concept

logger = logging.getLogger(__name__)

METHODS = ("perfusion", "textual-inversion", "custom-diffusion", "lora")
MANIFEST_FILENAME = "keylocked_baseline.json"
MANIFEST_FORMAT = "keylocked.baseline"
MANIFEST_VERSION = 1
TI_FILENAME = "learned_embeds.safetensors"
CD_FILENAME = "custom_diffusion.safetensors"
CD_FORMAT = "keylocked.custom_diffusion"
LORA_FILENAME = "pytorch_lora_weights.safetensors"  # diffusers' default LORA_WEIGHT_NAME_SAFE


@dataclass
class BaselineOptions:
    """Method-specific knobs (the shared ones live in ``TrainConfig``)."""

    lora_rank: int = 4
    learning_rate_lora: float = 1e-4
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # Custom Diffusion: 1e-5 per sample of the effective batch (its scale_lr rule) when None
    learning_rate_kv: float | None = None
    # DreamBooth: a rare identifier before the class word; prompts say "<identifier> <superclass>"
    identifier: str = "sks"

    def __post_init__(self) -> None:
        if self.lora_rank < 1:
            raise KeylockedError(f"lora_rank must be at least 1, got {self.lora_rank!r}")
        if not self.identifier.strip():
            raise KeylockedError("identifier must not be empty")
        self.lora_target_modules = tuple(self.lora_target_modules)


def train(config: TrainConfig, method: str = "perfusion", pipe=None, options: BaselineOptions | None = None) -> Path:
    """Train one concept with ``method``; returns the saved file (a concept file or a baseline's weights)."""
    if method not in METHODS:
        raise KeylockedError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "perfusion":
        return train_concept(config, pipe=pipe)
    return train_baseline(config, method, pipe=pipe, options=options)


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


def _wrap_kv(unet: nn.Module) -> dict[str, DeltaLinear]:
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


def _unwrap_kv(unet: nn.Module) -> None:
    from ..loading import unwrap_projections

    unwrap_projections(unet, DeltaLinear)


# ---------------------------------------------------------------------------------------
# Training.


def _trigger_phrase(method: str, config: TrainConfig, options: BaselineOptions) -> str:
    """What stands for the concept in prompts: the new token, or DreamBooth's "<identifier> <class>"."""
    return f"{options.identifier} {config.superclass_token}" if method == "lora" else config.placeholder_token


def train_baseline(config: TrainConfig, method: str, pipe=None, options: BaselineOptions | None = None) -> Path:
    """Train a Textual Inversion, Custom Diffusion or DreamBooth-LoRA concept; the pipeline is restored after."""
    if method not in METHODS[1:]:
        raise KeylockedError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS[1:])}")
    options = options or BaselineOptions()
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
    )
    if pipe is None:
        from ..models import load_pipeline

        pipe = load_pipeline(config.pretrained_model_name_or_path)
    tokenizer, text_encoder, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet

    # -- validate every input before touching the model -------------------------------------
    uses_token = method in ("textual-inversion", "custom-diffusion")
    if uses_token:
        check_new_token(tokenizer, config.placeholder_token)
        superclass_id = single_token_id(tokenizer, config.superclass_token)
    if config.resume_from_checkpoint:
        raise KeylockedError(f"{method}: resuming is only implemented for perfusion")
    if config.mask != "attention":
        logger.info("%s trains with the plain (unmasked) loss; mask=%r is ignored", method, config.mask)
    resolution = _resolution(config, pipe)
    instance = images_to_tensor(load_instance_images(config.instance_data_dir, resolution))  # (N, 3, R, R)
    phrase = _trigger_phrase(method, config, options)
    snapshot = TokenizerSnapshot(tokenizer)
    fingerprint = base_model_fingerprint(text_encoder, unet, snapshot.vocab_size)

    device = accelerator.device
    weight_dtype = freeze_and_place(pipe, device, config.mixed_precision)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    hooks, trainables, groups = [], {}, []
    try:
        # -- what this method trains -----------------------------------------------------------
        if uses_token:
            table = text_encoder.get_input_embeddings()
            init = table.weight[superclass_id].detach().clone()
            placeholder_id = add_tokens(tokenizer, text_encoder, {config.placeholder_token: init})[
                config.placeholder_token
            ]
            token_embedding = nn.Parameter(init.float().to(device))  # (d_embed,)
            trainables["token_embedding"] = token_embedding

            def replace_placeholder(module, inputs, output):
                is_placeholder = (inputs[0] == placeholder_id).unsqueeze(-1)  # (B, T, 1)
                return torch.where(is_placeholder, token_embedding.to(output.dtype), output)

            hooks.append(text_encoder.get_input_embeddings().register_forward_hook(replace_placeholder))
            groups.append({"params": [token_embedding], "lr": config.learning_rate_embedding})
        if method == "custom-diffusion":
            wrapped = _wrap_kv(unet)
            deltas = []
            for name, module in wrapped.items():
                delta = nn.Parameter(torch.zeros_like(module.base_layer.weight, dtype=torch.float32))  # (out, in)
                module.deltas[config.placeholder_token] = delta
                trainables[name] = delta
                deltas.append(delta)
            lr_kv = (
                options.learning_rate_kv if options.learning_rate_kv is not None else 1e-5 * config.effective_batch_size
            )
            groups.append({"params": deltas, "lr": lr_kv})
        if method == "lora":
            from peft import LoraConfig

            unet.add_adapter(
                LoraConfig(
                    r=options.lora_rank,
                    lora_alpha=options.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=list(options.lora_target_modules),
                )
            )
            lora = [p for p in unet.parameters() if p.requires_grad]
            for parameter in lora:
                parameter.data = parameter.data.float()  # trainables in fp32 even under mixed precision
            groups.append({"params": lora, "lr": options.learning_rate_lora})
        optimizer = accelerator.prepare(torch.optim.AdamW(groups, weight_decay=config.adam_weight_decay))

        # -- the loop: same batches as Perfusion (seeded by step), plain noise-prediction loss ---
        started = time.perf_counter()
        for step in range(config.max_train_steps):
            for micro in range(config.gradient_accumulation_steps):
                generator = step_generator(config.seed, step * config.gradient_accumulation_steps + micro + 1)
                with accelerator.accumulate(), accelerator.autocast():
                    loss = baseline_loss(
                        config, instance, generator, pipe, noise_scheduler, phrase, method, device, weight_dtype
                    )
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if config.progress and (step + 1) % max(1, config.max_train_steps // 10) == 0:
                logger.info("%s step %d/%d loss %.4f", method, step + 1, config.max_train_steps, loss.item())
        seconds = time.perf_counter() - started

        # -- save in the method's own format + the manifest -------------------------------------
        training = {
            "steps": config.max_train_steps,
            "effective_batch_size": config.effective_batch_size,
            "seconds": round(seconds, 3),
            "seed": config.seed,
            "resolution": resolution,
            "base_model": str(config.pretrained_model_name_or_path),
            "options": _jsonable(asdict(options)),
            "learning_rates": [g["lr"] for g in groups],
        }
        dtype = torch.float16 if config.concept_dtype == "fp16" else torch.float32
        if method == "textual-inversion":
            path = _save_tensors(
                output_dir / TI_FILENAME,
                {config.placeholder_token: trainables["token_embedding"].detach()[None]},
                dtype,
            )
        elif method == "custom-diffusion":
            tensors = {"token_embedding": trainables["token_embedding"].detach()}
            tensors.update(
                {f"deltas.{name}": t.detach() for name, t in trainables.items() if name != "token_embedding"}
            )
            path = _save_tensors(
                output_dir / CD_FILENAME,
                tensors,
                dtype,
                metadata={
                    "format": CD_FORMAT,
                    "format_version": "1",
                    "placeholder_token": config.placeholder_token,
                    "superclass_token": config.superclass_token,
                    "base_model_fingerprint": fingerprint,
                },
            )
        else:
            path = _save_lora(unet, output_dir, dtype)
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "method": method,
            "weights": path.name,
            "placeholder_token": config.placeholder_token if uses_token else "",
            "superclass_token": config.superclass_token,
            "prompt_phrase": phrase,
            "base_model_fingerprint": fingerprint,
            "training": training,
        }
        atomic_write_text(output_dir / MANIFEST_FILENAME, json.dumps(manifest, indent=2, sort_keys=True))
        logger.info("saved %s (%d bytes) in %.1f s", path, path.stat().st_size, seconds)
        return path
    finally:
        for hook in hooks:
            hook.remove()
        _unwrap_kv(unet)
        if method == "lora" and getattr(unet, "peft_config", None):
            unet.unload_lora()
        restore_vocabulary(tokenizer, text_encoder, snapshot)


def baseline_loss(config, instance, generator, pipe, noise_scheduler, phrase, method, device, weight_dtype) -> Tensor:
    """One micro-batch of a baseline: the shared noised batch, prompts with ``phrase``, plain MSE."""
    latents, noisy_latents, timesteps, target, templates, _ = noised_batch(
        config, instance, generator, pipe.vae, noise_scheduler, device, weight_dtype
    )
    prompts = prompts_for(templates, phrase, config.templates)
    with torch.no_grad() if method == "lora" else torch.enable_grad():
        encodings, _ = encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts)  # (B, T, d)
    prediction = pipe.unet(noisy_latents, timesteps, encodings.to(weight_dtype)).sample
    return _masked_mse(prediction, target, None)


def _jsonable(value):
    return (
        list(value)
        if isinstance(value, tuple)
        else value
        if not isinstance(value, dict)
        else {k: _jsonable(v) for k, v in value.items()}
    )


def _save_tensors(
    path: Path, tensors: dict[str, Tensor], dtype: torch.dtype, metadata: dict[str, str] | None = None
) -> Path:
    tensors = {k: t.detach().to("cpu", dtype).contiguous() for k, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _save_lora(unet: nn.Module, output_dir: Path, dtype: torch.dtype) -> Path:
    """diffusers' LoRA format: ``save_lora_weights(unet_lora_layers=convert_state_dict_to_diffusers(peft state))``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(output_dir),
        unet_lora_layers=state,
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    return output_dir / LORA_FILENAME


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
            if manifest.get("format") != MANIFEST_FORMAT or manifest.get("method") not in METHODS[1:]:
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
        from ..concept import read_metadata

        metadata = read_metadata(path)  # raises a clear error for anything but a concept file
        token = metadata["placeholder_token"]
        return cls("perfusion", path, token, metadata["superclass_token"], token)


@dataclass
class _Loaded:
    items: list[Personalization]
    snapshot: TokenizerSnapshot | None = None
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
        from ..loading import load_concepts

        load_concepts(
            pipe, [i.path for i in items], beta=beta, tau=tau, lock=lock, covariance=covariance, strict=strict
        )
    elif method == "textual-inversion":
        loaded.snapshot = TokenizerSnapshot(pipe.tokenizer)
        try:
            for item in items:
                with quiet(TEXTUAL_INVERSION_LOGS):  # the new rows are overwritten by the file's embedding
                    pipe.load_textual_inversion(str(item.weights_path), token=item.placeholder_token)
        except ValueError as error:
            restore_vocabulary(pipe.tokenizer, pipe.text_encoder, loaded.snapshot)
            raise KeylockedError(f"cannot load textual inversion: {error}") from error
    elif method == "custom-diffusion":
        tensors = [_read_custom_diffusion(item, pipe) for item in items]  # validate all, then mutate
        loaded.snapshot = TokenizerSnapshot(pipe.tokenizer)
        add_tokens(
            pipe.tokenizer,
            pipe.text_encoder,
            {i.placeholder_token: t["token_embedding"] for i, t in zip(items, tensors)},
        )
        wrapped = _wrap_kv(pipe.unet)
        for item, state in zip(items, tensors):
            for name, module in wrapped.items():
                weight = module.base_layer.weight
                module.deltas[item.placeholder_token] = nn.Parameter(
                    state[f"deltas.{name}"].to(weight.device, weight.dtype), requires_grad=False
                )
    else:
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
    check_new_token(pipe.tokenizer, item.placeholder_token)
    state = {k: v.float() for k, v in load_file(str(item.weights_path)).items()}
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
        from ..loading import unload_concepts

        unload_concepts(pipe)
    elif method == "lora":
        pipe.unload_lora_weights()
    else:
        _unwrap_kv(pipe.unet)
        restore_vocabulary(pipe.tokenizer, pipe.text_encoder, loaded.snapshot)
    pipe._keylocked_personalizations = None


def set_personalization_options(pipe, beta=None, tau=None, lock=None, lora_scale: float | None = None) -> None:
    """Change Perfusion's β/τ/lock or LoRA's scale of the loaded concepts, without reloading."""
    loaded = getattr(pipe, "_keylocked_personalizations", None)
    if loaded is None:
        raise KeylockedError("no personalizations are loaded")
    method = loaded.items[0].method
    if method == "perfusion":
        from ..loading import set_concept_options

        set_concept_options(pipe, beta=beta, tau=tau, lock=lock)
    elif method == "lora" and lora_scale is not None:
        pipe.set_adapters(loaded.adapters, adapter_weights=[lora_scale] * len(loaded.adapters))
