"""Training configuration (flag names follow diffusers' training scripts where they exist)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..base_model import KeylockedError
from ..edit_options import COVARIANCE_POSITIONS, EDITS, KEY_LOCKS
from ..validation import (
    check_beta,
    check_choice,
    check_finite,
    check_integer,
    check_non_negative,
    check_positive,
    check_tau,
)

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    pretrained_model_name_or_path: str
    instance_data_dir: str
    placeholder_token: str
    superclass_token: str
    output_dir: str = "keylocked-concept"
    resolution: int | None = None  # None: the model's native size
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 4  # effective batch 16, as in the paper
    max_train_steps: int = 400
    learning_rate_embedding: float = 0.006
    learning_rate_values: float = 0.03
    adam_weight_decay: float = 0.0
    train_beta: float = 0.75
    train_tau: float = 0.1
    inference_beta: float = 0.7  # recommended values written into the concept file
    inference_tau: float = 0.15
    ema_decay: float = 0.99
    mask: str = "attention"  # "attention" | "none" | a folder of mask images
    random_flip: bool = True
    prompt_templates: tuple[str, ...] | None = None  # None: Textual Inversion's object templates
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False  # recompute UNet activations in the backward pass: less memory, ~20 % slower
    seed: int = 0
    checkpointing_steps: int = 100
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    overwrite: bool = False  # replace another run's outputs and checkpoints in output_dir
    validation_prompt: str | None = None
    validation_steps: int = 100
    num_validation_images: int = 4
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    covariance: str | None = None
    covariance_positions: str = "text"  # "text" | "all": positions of the default covariance (docs/method.md)
    edit: str = "paper"  # "paper" (W e⊥ + σ·o*) | "gated_residual" (W e + σ·(o* − W i*)); stored in the concept
    key_lock: str = "paper"  # "paper" | "exact" (concept token's key = W_K i*_super); stored in the concept
    concept_dtype: Literal["fp16", "fp32"] = "fp16"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in (
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "checkpointing_steps",
            "validation_steps",
            "num_validation_images",
            "num_inference_steps",
        ):
            check_positive(name, check_integer(name, getattr(self, name)))
        if self.checkpoints_total_limit is not None:
            check_positive(
                "checkpoints_total_limit", check_integer("checkpoints_total_limit", self.checkpoints_total_limit)
            )
        if self.resolution is not None:
            check_integer("resolution", self.resolution, minimum=8)
        check_integer("seed", self.seed)
        # every float through keylocked.validation: NaN/inf never reach the optimizer or the file
        self.learning_rate_embedding = check_non_negative("learning_rate_embedding", self.learning_rate_embedding)
        self.learning_rate_values = check_non_negative("learning_rate_values", self.learning_rate_values)
        self.adam_weight_decay = check_non_negative("adam_weight_decay", self.adam_weight_decay)
        self.train_beta = check_beta(self.train_beta, "train_beta")
        self.inference_beta = check_beta(self.inference_beta, "inference_beta")
        self.train_tau = check_tau(self.train_tau, "train_tau")
        self.inference_tau = check_tau(self.inference_tau, "inference_tau")
        self.guidance_scale = check_finite("guidance_scale", self.guidance_scale)
        self.ema_decay = check_finite("ema_decay", self.ema_decay)
        if not 0.0 <= self.ema_decay < 1.0:
            raise KeylockedError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.overwrite and self.resume_from_checkpoint:
            raise KeylockedError("overwrite and resume_from_checkpoint exclude each other; choose one")
        if self.mixed_precision not in MIXED_PRECISION:
            raise KeylockedError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.concept_dtype not in ("fp16", "fp32"):
            raise KeylockedError(f"concept_dtype must be 'fp16' or 'fp32', got {self.concept_dtype!r}")
        if not self.placeholder_token or any(c.isspace() for c in self.placeholder_token):
            raise KeylockedError(f"placeholder_token must be one word without spaces, got {self.placeholder_token!r}")
        if self.prompt_templates is not None:
            self.prompt_templates = tuple(self.prompt_templates)
            bad = [t for t in self.prompt_templates if t.count("{}") != 1]
            if not self.prompt_templates or bad:
                raise KeylockedError(f"prompt_templates must each contain one '{{}}', got {bad or 'none'}")
        check_choice("edit", self.edit, EDITS)
        check_choice("key_lock", self.key_lock, KEY_LOCKS)
        check_choice("covariance_positions", self.covariance_positions, COVARIANCE_POSITIONS)
        if not self.superclass_token.strip():
            raise KeylockedError("superclass_token must not be empty")

    @property
    def templates(self) -> tuple[str, ...]:
        from .data import OBJECT_TEMPLATES

        return self.prompt_templates or OBJECT_TEMPLATES

    @property
    def effective_batch_size(self) -> int:
        return self.train_batch_size * self.gradient_accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
