"""Generate images with one or more trained concepts loaded into a Stable Diffusion pipeline."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL.PngImagePlugin import PngInfo

from .base_model import KeylockedError, tokenize
from .concept import read_metadata
from .edit_options import EDITS, KEY_LOCKS
from .io import atomic_path
from .loading import load_concepts, pipeline_fingerprint, unload_concepts
from .validation import check_beta, check_choice, check_non_negative, check_tau
from .visual import image_grid

logger = logging.getLogger(__name__)
GRID_FILENAME = "grid.png"


@dataclass
class GenerateConfig:
    pretrained_model_name_or_path: str
    concepts: list[str]  # concept files
    prompt: str
    negative_prompt: str | None = None
    beta: float | list[float] | None = None  # one for all, one per concept, or None: each file's recommendation
    tau: float | list[float] | None = None
    lock: Literal["local", "global"] = "local"
    edit: str | None = None  # "paper" | "gated_residual"; None: the form the concepts were trained with
    key_lock: str | None = None  # "paper" | "exact"; None: the form the concepts were trained with
    num_images: int = 4
    seed: int = 0  # image i uses seed + i
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    output_dir: str = "keylocked-images"
    covariance: str | None = None  # None: the cached default covariance of the text encoder
    allow_other_base_model: bool = False
    progress: bool = True
    project: str | None = None  # for library references (docs/library.md)

    def __post_init__(self) -> None:
        self.concepts = [str(c) for c in ([self.concepts] if isinstance(self.concepts, str) else self.concepts)]
        if not self.concepts:
            raise KeylockedError("give at least one concept file")
        if not self.prompt.strip():
            raise KeylockedError("prompt must not be empty")
        self.beta = self._per_concept("beta", self.beta, check_beta)
        self.tau = self._per_concept("tau", self.tau, check_tau)
        if self.lock not in ("local", "global"):
            raise KeylockedError(f"lock must be 'local' or 'global', got {self.lock!r}")
        if self.edit is not None:
            check_choice("edit", self.edit, EDITS)
        if self.key_lock is not None:
            check_choice("key_lock", self.key_lock, KEY_LOCKS)
        for name in ("num_images", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise KeylockedError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        self.guidance_scale = check_non_negative("guidance_scale", self.guidance_scale)
        if self.seed < 0:
            raise KeylockedError(f"seed must be non-negative, got {self.seed!r}")

    def _per_concept(self, name: str, value: float | list[float] | None, check) -> float | list[float] | None:
        """A list of one value is that value for all; otherwise one value per concept, each checked."""
        if isinstance(value, (list, tuple)):
            if len(value) == 1:
                value = value[0]
            elif len(value) != len(self.concepts):
                raise KeylockedError(
                    f"{name} has {len(value)} values {list(value)} for {len(self.concepts)} concept(s); "
                    "give one value for all or one per concept"
                )
            else:
                return [check(v, name) for v in value]
        return None if value is None else check(value, name)


def _by_token(value: float | list[float] | None, tokens: list[str]) -> float | dict[str, float] | None:
    return dict(zip(tokens, value)) if isinstance(value, list) else value


@torch.no_grad()
def generate(config: GenerateConfig, pipe=None, api_key: str | None = None) -> list[Path]:
    """Generate ``num_images`` images and a grid; returns their paths (the grid last).

    ``pipe`` may be given to reuse a loaded pipeline; its concepts are unloaded afterwards.
    Library references among ``config.concepts`` are resolved with ``api_key`` (default ``$KEYLOCKED_API_KEY``).
    """
    from .library.resolve import looks_like_reference, provenance, record_generation, resolve_concept_sources

    # -- check the cheap inputs before loading a model -----------------------------------------
    for path in config.concepts:
        if not looks_like_reference(path):
            read_metadata(path)
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise KeylockedError(f"output_dir {output_dir} exists and is not a folder")
    if pipe is None:
        from .models import load_pipeline

        pipe = load_pipeline(config.pretrained_model_name_or_path)
        if torch.cuda.is_available():
            pipe.to("cuda")
    pipe.set_progress_bar_config(disable=not config.progress)
    fingerprint = None if config.allow_other_base_model else pipeline_fingerprint(pipe)
    sources, resolved = resolve_concept_sources(
        config.concepts, project=config.project, api_key=api_key, base_model_fingerprint=fingerprint
    )
    tokens = [read_metadata(path)["placeholder_token"] for path in sources]

    load_concepts(
        pipe,
        sources,
        beta=_by_token(config.beta, tokens),
        tau=_by_token(config.tau, tokens),
        lock=config.lock,
        edit=config.edit,
        key_lock=config.key_lock,
        covariance=config.covariance,
        strict=not config.allow_other_base_model,
    )
    try:
        _warn_if_no_concept_in(config.prompt, pipe.tokenizer, tokens)
        generators = [torch.Generator("cpu").manual_seed(config.seed + i) for i in range(config.num_images)]
        images = pipe(
            config.prompt,
            negative_prompt=config.negative_prompt,
            num_images_per_prompt=config.num_images,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            generator=generators,
        ).images
    finally:
        unload_concepts(pipe)

    # -- write: every file whole or not at all --------------------------------------------------
    settings = {**asdict(config), "concept_tokens": tokens, **({"library": provenance(resolved)} if resolved else {})}
    paths = []
    for index, image in enumerate(images):
        info = PngInfo()
        info.add_text("keylocked", json.dumps({**settings, "seed": config.seed + index}, sort_keys=True))
        paths.append(_save_png(image, output_dir / f"seed-{config.seed + index}.png", info))
    record_generation(resolved, config.prompt, paths, project=config.project, api_key=api_key)
    grid = image_grid(images, columns=min(4, len(images)))
    paths.append(_save_png(grid, output_dir / GRID_FILENAME))
    return paths


def _warn_if_no_concept_in(prompt: str, tokenizer, tokens: list[str]) -> None:
    """Warn when the prompt (as the pipeline will see it, truncated) holds no concept token."""
    input_ids = set(tokenize(tokenizer, [prompt]).input_ids[0].tolist())
    if not any(tokenizer.convert_tokens_to_ids(token) in input_ids for token in tokens):
        logger.warning(
            "the prompt %r contains none of the concept tokens %s (or they fall past the %d-token limit); "
            "the images will not show the concepts",
            prompt,
            ", ".join(tokens),
            tokenizer.model_max_length,
        )


def _save_png(image, path: Path, info: PngInfo | None = None) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path
