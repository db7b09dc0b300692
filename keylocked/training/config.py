"""Training configuration (flag names follow diffusers' training scripts where they exist)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..base_model import KeylockedError
from ..edit_options import COVARIANCE_POSITIONS, EDITS, KEY_LOCKS
from ..validation import check_choice

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
    seed: int = 0
    checkpointing_steps: int = 100
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
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
        positive = {
            "train_batch_size": self.train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "max_train_steps": self.max_train_steps,
            "checkpointing_steps": self.checkpointing_steps,
            "validation_steps": self.validation_steps,
            "train_tau": self.train_tau,
            "inference_tau": self.inference_tau,
        }
        for name, value in positive.items():
            if not value > 0:
                raise KeylockedError(f"{name} must be positive, got {value!r}")
        if self.resolution is not None and self.resolution < 8:
            raise KeylockedError(f"resolution must be at least 8, got {self.resolution!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise KeylockedError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.learning_rate_embedding < 0 or self.learning_rate_values < 0:
            raise KeylockedError("learning rates must be non-negative")
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
