"""One training job as the service runs it: ``keylocked.training.train_concept`` on a pipeline
of its own (never the serving one, whose wrapped layers serve requests meanwhile)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .trainings import TrainingRequest


def train_for_service(
    model: str, request: TrainingRequest, images_dir: Path, output_dir: Path, on_step: Callable[[int], None]
) -> Path:
    """Train ``request`` on the images in ``images_dir``; report optimizer steps through ``on_step``.

    Progress is observed, not reported by the trainer: each optimizer step runs
    ``gradient_accumulation_steps`` UNet forward passes with gradients on, so a forward hook on
    this job's own UNet counts them (and ``on_step`` may raise to stop the job).
    """
    from ..models import load_pipeline
    from ..training import TrainConfig, train_concept

    pipe = load_pipeline(model, device="cuda" if torch.cuda.is_available() else None)
    config = TrainConfig(
        pretrained_model_name_or_path=model,
        instance_data_dir=str(images_dir),
        placeholder_token=request.token,
        superclass_token=request.super_category,
        output_dir=str(output_dir),
        max_train_steps=request.steps,
        train_batch_size=request.train_batch_size,
        gradient_accumulation_steps=request.gradient_accumulation_steps,
        checkpointing_steps=request.steps,  # one checkpoint, at the end: jobs do not resume
        mask=request.mask,
        progress=False,
    )
    forwards = [0]

    def count(module, args, output) -> None:
        if torch.is_grad_enabled():
            forwards[0] += 1
            if forwards[0] % config.gradient_accumulation_steps == 0:
                on_step(forwards[0] // config.gradient_accumulation_steps)

    hook = pipe.unet.register_forward_hook(count)
    try:
        return Path(train_concept(config, pipe=pipe))
    finally:
        hook.remove()
