"""What each training method trains, prompts with, and saves; the loop in ``trainer.py`` is shared.

    perfusion           token embedding + one value target per cross-attention layer, keys locked
                        to the super-category, i* tracked by EMA, object-masked loss (Tewel et al. 2023)
    textual-inversion   the new token's input embedding (Gal et al. 2022)
    custom-diffusion    the token embedding + every cross-attention W_K, W_V (Kumari et al. 2023)
    lora                rank-r LoRA on every UNet attention projection, prompts "<identifier> <class>"
                        (DreamBooth-style, Ruiz et al. 2023 + Hu et al. 2021)

Deviations from the baselines' papers, kept so the comparison is on equal terms: no
prior-preservation images, no object mask in their loss (Perfusion's mask is part of its method),
the token embedding learning rate is Perfusion's (``learning_rate_embedding``).

Each baseline writes its own ecosystem's file plus ``keylocked_baseline.json`` (method, token,
prompt phrase, training info); ``keylocked.personalizations`` loads any of them.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..base_model import KeylockedError
from ..concept import Concept
from ..covariance import Covariance, pipeline_folder, resolve_covariance
from ..edit_options import track_concept_positions
from ..io import atomic_write_text, save_safetensors
from ..layers import KeyLockedContext, effective_linear
from ..loading import install_keylocked_layers, uninstall_keylocked_layers
from ..personalizations import (
    CD_FILENAME,
    CD_FORMAT,
    CD_VERSION,
    CONCEPT_FILENAME,
    LORA_FILENAME,
    MANIFEST_FILENAME,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    TI_FILENAME,
    unwrap_kv,
    wrap_kv,
)
from ..text_stack import text_stack
from ..validation import check_integer, check_positive
from .config import TrainConfig
from .data import prompts_for, sample_batch, step_generator


@dataclass
class BaselineOptions:
    """Method-specific knobs of the baselines (the shared ones live in ``TrainConfig``)."""

    lora_rank: int = 4
    learning_rate_lora: float = 1e-4
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # Custom Diffusion: 1e-5 per sample of the effective batch (its scale_lr rule) when None
    learning_rate_kv: float | None = None
    # DreamBooth: a rare identifier before the class word; prompts say "<identifier> <superclass>"
    identifier: str = "sks"

    def __post_init__(self) -> None:
        check_integer("lora_rank", self.lora_rank, minimum=1)
        self.learning_rate_lora = check_positive("learning_rate_lora", self.learning_rate_lora)
        if self.learning_rate_kv is not None:
            self.learning_rate_kv = check_positive("learning_rate_kv", self.learning_rate_kv)
        if not self.identifier.strip():
            raise KeylockedError("identifier must not be empty")
        self.lora_target_modules = tuple(self.lora_target_modules)


@dataclass
class Setup:
    """What the loop hands a method at setup: the placed pipeline and the run's fixed inputs."""

    pipe: Any
    device: torch.device
    instance: Tensor  # (N, 3 or 4, R, R)
    # text encoder key -> the new token's row in that encoder (token methods; SDXL: clip_l, clip_g),
    # hooked in by the loop
    token_embeddings: dict[str, nn.Parameter] | None


class TrainingMethod:
    """One method: what is trained, the prompt phrase, the loss mask, setup/teardown, saving."""

    name: ClassVar[str]
    uses_token: ClassVar[bool] = True  # adds the placeholder token and trains its embedding
    uses_mask: ClassVar[bool] = False  # config.mask applies to the loss

    def __init__(self, config: TrainConfig, options: BaselineOptions):
        self.config = config
        self.options = options
        self.superclass_ids: list[int] = []  # the super-category word's id in each tokenizer
        self.covariance_sha256 = ""

    @property
    def prompt_phrase(self) -> str:
        """What stands for the concept in prompts."""
        return self.config.placeholder_token

    def check(self, pipe) -> None:
        """Validate this method's inputs against the pipeline, before anything is changed."""
        if self.uses_token:
            stack = text_stack(pipe)
            stack.check_new_token(self.config.placeholder_token)
            self.superclass_ids = stack.single_token_ids(self.config.superclass_token)

    def setup(self, run: Setup) -> list[dict]:
        """Install what is trained on the pipeline; returns the optimizer's parameter groups."""
        self._token_embeddings = run.token_embeddings
        return [{"params": list(run.token_embeddings.values()), "lr": self.config.learning_rate_embedding}]

    def state(self) -> dict[str, Tensor]:
        """Everything a checkpoint must hold to resume: trainables and tracked buffers, by stable name."""
        return dict(self._token_embeddings)  # "token_embedding", or SDXL's "clip_l" / "clip_g"

    def observe(self, encodings: Tensor, is_placeholder: Tensor | None) -> None:
        """Called with each micro-batch's text encodings, before the UNet (Perfusion's i* EMA)."""

    def inference_settings(self) -> contextlib.AbstractContextManager:
        """While generating validation images."""
        return contextlib.nullcontext()

    def teardown(self, pipe) -> None:
        """Undo ``setup`` (the loop restores the vocabulary and hooks)."""

    def save(self, folder: Path, step: int, info: dict[str, Any]) -> Path:
        """Write the usable output into ``folder``; returns the main file."""
        raise NotImplementedError

    # shared by the baselines: text encoder key -> the token's trained row
    _token_embeddings: dict[str, nn.Parameter]

    def _manifest(self, folder: Path, weights: Path, fingerprint: str, info: dict[str, Any]) -> None:
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "method": self.name,
            "weights": weights.name,
            "placeholder_token": self.config.placeholder_token if self.uses_token else "",
            "superclass_token": self.config.superclass_token,
            "prompt_phrase": self.prompt_phrase,
            "base_model_fingerprint": fingerprint,
            "training": {**info, "options": _jsonable(asdict(self.options))},
        }
        atomic_write_text(folder / MANIFEST_FILENAME, json.dumps(manifest, indent=2, sort_keys=True))

    @property
    def output_dtype(self) -> torch.dtype:
        return torch.float16 if self.config.concept_dtype == "fp16" else torch.float32


class ConceptParameters(nn.Module):
    """What Perfusion learns (embedding, value targets) and tracks (i* EMA, i*_super)."""

    def __init__(self, token_embeddings: dict[str, Tensor], superclass_input: Tensor, value_targets: dict[str, Tensor]):
        super().__init__()
        self.token_embeddings = nn.ParameterDict(
            {  # text encoder key -> (d_embed,); a Parameter is shared with the loop's embedding hook
                key: e if isinstance(e, nn.Parameter) else nn.Parameter(e.detach().clone().float())
                for key, e in token_embeddings.items()
            }
        )
        self.value_targets = nn.ParameterDict(
            {name.replace(".", "/"): nn.Parameter(t.detach().clone().float()) for name, t in value_targets.items()}
        )  # layer path -> (out,)
        self.register_buffer("concept_input", superclass_input.detach().clone().float())  # (d_text,) i*
        self.register_buffer("superclass_input", superclass_input.detach().clone().float())  # (d_text,)

    def value_target(self, layer_name: str) -> nn.Parameter:
        return self.value_targets[layer_name.replace(".", "/")]


class Perfusion(TrainingMethod):
    name = "perfusion"
    uses_mask = True

    def __init__(self, config: TrainConfig, options: BaselineOptions):
        super().__init__(config, options)
        self.covariance: Covariance | None = None
        self.context: KeyLockedContext | None = None
        self.params: ConceptParameters | None = None
        self.installed_here = False
        self.previous_active: set[str] = set()
        self.position_hook = None
        self.previous_options: tuple[str, str] = ("paper", "paper")
        self.fingerprint = ""

    def check(self, pipe) -> None:
        super().check(pipe)
        covariance = resolve_covariance(
            text_stack(pipe),
            path=self.config.covariance,
            progress=self.config.progress,
            model_dir=pipeline_folder(pipe),
            positions=self.config.covariance_positions,
        )
        self.covariance, self.covariance_sha256 = covariance, covariance.sha256

    def setup(self, run: Setup) -> list[dict]:
        config, pipe = self.config, run.pipe
        # i*_super: mean encoding of the super-category word in the first batch's prompts
        _, templates = sample_batch(
            run.instance,
            config.effective_batch_size,
            step_generator(config.seed, 0),
            num_templates=len(config.templates),
        )
        with torch.no_grad():
            prompts = prompts_for(templates, config.superclass_token, config.templates)
            encoded = text_stack(pipe).encode(prompts)  # (B, T, d_text)
            is_superclass = encoded.input_ids == self.superclass_ids[0]  # (B, T), tokenizer 1's positions
            superclass_input = encoded.encodings[is_superclass].float().mean(0)  # (d_text,)
        # stack on the user's loaded concepts (if any); they are inactive while this one trains
        self.installed_here = getattr(pipe.unet, "_keylocked_context", None) is None
        self.context = context = install_keylocked_layers(
            pipe.unet, self.covariance.inverse.to(run.device), text_stack(pipe).widths
        )
        self.previous_active = set(context.active)
        self.previous_options = (context.edit, context.key_lock)
        initial_values = {
            name: effective_linear(layer.base_layer, superclass_input[None])[0].float()
            for name, layer in context.value_layers.items()
        }
        self.params = params = ConceptParameters(run.token_embeddings, superclass_input, initial_values).to(run.device)
        context.add_concept(
            config.placeholder_token,
            params.concept_input,
            params.superclass_input,
            config.train_beta,
            config.train_tau,
            {name: params.value_target(name) for name in context.value_layers},
        )
        context.set_options(active={config.placeholder_token}, edit=config.edit, key_lock=config.key_lock)
        # the exact key lock finds the concept token by id in every prompt the text encoder encodes
        context.positions.token_ids[config.placeholder_token] = pipe.tokenizer.convert_tokens_to_ids(
            config.placeholder_token
        )
        self.position_hook = track_concept_positions(pipe.text_encoder, context.positions)
        return [
            {"params": list(params.token_embeddings.parameters()), "lr": config.learning_rate_embedding},
            {"params": list(params.value_targets.parameters()), "lr": config.learning_rate_values},
        ]

    def state(self) -> dict[str, Tensor]:
        # embeddings by their encoder key ("token_embedding"; SDXL "clip_l", "clip_g"), as the baselines name them
        state = self.params.state_dict(keep_vars=True)
        return {name.removeprefix("token_embeddings."): tensor for name, tensor in state.items()}

    def observe(self, encodings: Tensor, is_placeholder: Tensor | None) -> None:
        # the concept token's encodings drive the i* EMA (the gate's anchor)
        with torch.no_grad():
            observed = encodings[is_placeholder].float().mean(0)  # (d_text,)
            self.params.concept_input.mul_(self.config.ema_decay).add_(observed, alpha=1 - self.config.ema_decay)
        self.context.touch()

    @contextlib.contextmanager
    def inference_settings(self) -> Iterator[None]:
        token = self.config.placeholder_token
        self.context.set_options(beta={token: self.config.inference_beta}, tau={token: self.config.inference_tau})
        try:
            yield
        finally:
            self.context.set_options(beta={token: self.config.train_beta}, tau={token: self.config.train_tau})

    def teardown(self, pipe) -> None:
        context, token = self.context, self.config.placeholder_token
        if context is None:
            return
        if self.position_hook is not None:
            self.position_hook.remove()
            self.position_hook = None
        context.positions.token_ids.pop(token, None)
        if self.installed_here:
            uninstall_keylocked_layers(pipe.unet)
        else:  # only our own concept goes; the user's loaded ones stay as they were
            if token in context.concepts:
                context.remove_concept(token)
            edit, key_lock = self.previous_options
            context.set_options(active=self.previous_active & set(context.concepts), edit=edit, key_lock=key_lock)
        self.context = None

    def concept(self, step: int, info: dict[str, Any]) -> Concept:
        config, params = self.config, self.params
        return Concept(
            placeholder_token=config.placeholder_token,
            superclass_token=config.superclass_token,
            token_embeddings={key: e.detach().cpu() for key, e in params.token_embeddings.items()},
            concept_input=params.concept_input.detach().cpu(),
            superclass_input=params.superclass_input.detach().cpu(),
            value_targets={name: params.value_target(name).detach().cpu() for name in self.context.value_layers},
            base_model_fingerprint=info["base_model_fingerprint"],
            covariance_sha256=self.covariance_sha256,
            train_beta=config.train_beta,
            train_temperature=config.train_tau,
            beta=config.inference_beta,
            temperature=config.inference_tau,
            edit=config.edit,
            key_lock=config.key_lock,
            training={
                "covariance_positions": config.covariance_positions,
                "steps": step,
                "effective_batch_size": config.effective_batch_size,
                "learning_rate_embedding": config.learning_rate_embedding,
                "learning_rate_values": config.learning_rate_values,
                "mask": config.mask if config.mask in ("attention", "none") else "user",
                "seed": config.seed,
                "resolution": config.resolution,
                "base_model": str(config.pretrained_model_name_or_path),
            },
        )

    def save(self, folder: Path, step: int, info: dict[str, Any]) -> Path:
        return self.concept(step, info).save(folder / CONCEPT_FILENAME, dtype=self.output_dtype)


class TextualInversion(TrainingMethod):
    name = "textual-inversion"

    def save(self, folder: Path, step: int, info: dict[str, Any]) -> Path:
        # diffusers' formats: {token: (1, d)} for one encoder; SDXL's {"clip_l": (1, 768), "clip_g": (1, 1280)}
        embeddings = self._token_embeddings
        single = len(embeddings) == 1
        tensors = {self.config.placeholder_token if single else key: e.detach()[None] for key, e in embeddings.items()}
        path = _save_tensors(folder / TI_FILENAME, tensors, self.output_dtype)
        self._manifest(folder, path, info["base_model_fingerprint"], {**info, "steps": step})
        return path


class CustomDiffusion(TrainingMethod):
    name = "custom-diffusion"

    def check(self, pipe) -> None:
        super().check(pipe)
        if getattr(pipe.unet, "_keylocked_context", None) is not None:
            raise KeylockedError(
                "custom-diffusion cannot train over loaded keylocked concepts; unload_concepts() first"
            )

    def setup(self, run: Setup) -> list[dict]:
        self.deltas: dict[str, nn.Parameter] = {}
        for name, module in wrap_kv(run.pipe.unet).items():
            delta = nn.Parameter(torch.zeros_like(module.base_layer.weight, dtype=torch.float32))  # (out, in)
            module.deltas[self.config.placeholder_token] = delta
            self.deltas[name] = delta
        lr_kv = self.options.learning_rate_kv
        lr_kv = lr_kv if lr_kv is not None else 1e-5 * self.config.effective_batch_size
        return super().setup(run) + [{"params": list(self.deltas.values()), "lr": lr_kv}]

    def state(self) -> dict[str, Tensor]:
        return {**self._token_embeddings, **{f"deltas.{k}": v for k, v in self.deltas.items()}}

    def teardown(self, pipe) -> None:
        unwrap_kv(pipe.unet)

    def save(self, folder: Path, step: int, info: dict[str, Any]) -> Path:
        metadata = {
            "format": CD_FORMAT,
            "format_version": str(CD_VERSION),
            "placeholder_token": self.config.placeholder_token,
            "superclass_token": self.config.superclass_token,
            "base_model_fingerprint": info["base_model_fingerprint"],
        }
        path = _save_tensors(folder / CD_FILENAME, self.state(), self.output_dtype, metadata)
        self._manifest(folder, path, info["base_model_fingerprint"], {**info, "steps": step})
        return path


class LoRA(TrainingMethod):
    name = "lora"
    uses_token = False

    @property
    def prompt_phrase(self) -> str:
        return f"{self.options.identifier} {self.config.superclass_token}"

    def check(self, pipe) -> None:
        if getattr(pipe.unet, "_keylocked_context", None) is not None or getattr(pipe.unet, "peft_config", None):
            raise KeylockedError("lora training needs a UNet without loaded concepts or adapters; unload them first")

    def setup(self, run: Setup) -> list[dict]:
        from peft import LoraConfig

        run.pipe.unet.add_adapter(
            LoraConfig(
                r=self.options.lora_rank,
                lora_alpha=self.options.lora_rank,
                init_lora_weights="gaussian",
                target_modules=list(self.options.lora_target_modules),
            )
        )
        self.unet = run.pipe.unet
        self.pipeline_class = type(run.pipe)  # its own save_lora_weights (SDXL's on SDXL)
        self.lora = {name: p for name, p in self.unet.named_parameters() if p.requires_grad}
        for parameter in self.lora.values():
            parameter.data = parameter.data.float()  # trainables in fp32 even under mixed precision
        return [{"params": list(self.lora.values()), "lr": self.options.learning_rate_lora}]

    def state(self) -> dict[str, Tensor]:
        return dict(self.lora)

    def teardown(self, pipe) -> None:
        if getattr(pipe.unet, "peft_config", None):
            pipe.unet.unload_lora()

    def save(self, folder: Path, step: int, info: dict[str, Any]) -> Path:
        """diffusers' LoRA format: the pipeline class's ``save_lora_weights(unet_lora_layers=...)``
        (``StableDiffusionXLPipeline``'s on SDXL) from ``convert_state_dict_to_diffusers(peft state)``."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        state = {k: v.detach().to("cpu", self.output_dtype).contiguous() for k, v in state.items()}
        folder.mkdir(parents=True, exist_ok=True)
        # diffusers writes in place: write into a scratch folder, then move the file over atomically
        with tempfile.TemporaryDirectory(prefix=".lora-", dir=folder) as scratch:
            self.pipeline_class.save_lora_weights(
                save_directory=scratch,
                unet_lora_layers=state,
                safe_serialization=True,
                unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict(),
            )
            path = folder / LORA_FILENAME
            Path(scratch, LORA_FILENAME).replace(path)
        self._manifest(folder, path, info["base_model_fingerprint"], {**info, "steps": step})
        return path


METHODS: dict[str, type[TrainingMethod]] = {
    method.name: method for method in (Perfusion, TextualInversion, CustomDiffusion, LoRA)
}


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _save_tensors(
    path: Path, tensors: dict[str, Tensor], dtype: torch.dtype, metadata: dict[str, str] | None = None
) -> Path:
    tensors = {k: t.detach().to("cpu", dtype).contiguous() for k, t in tensors.items()}
    return save_safetensors(tensors, path, metadata or {})
