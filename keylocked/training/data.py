"""Instance images and prompts for concept training.

Randomness is a pure function of (seed, step), so a resumed run draws exactly the batches an
uninterrupted run would have drawn.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..images import (  # noqa: F401 (re-exported: training's callers import them from here)
    IMAGE_SUFFIXES,
    images_to_tensor,
    load_instance_images,
    read_image,
    to_rgb,
)

# Textual Inversion's object templates (diffusers examples/textual_inversion).
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator seeded by (seed, step): batches do not depend on what ran before."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919) % (2**63 - 1))


def sample_batch(
    instance_pixels: Tensor,
    batch_size: int,
    generator: torch.Generator,
    flip: bool = True,
    num_templates: int = len(OBJECT_TEMPLATES),
) -> tuple[Tensor, Tensor]:
    """Draw images (with random horizontal flips) and template indices for one batch."""
    indices = torch.randint(len(instance_pixels), (batch_size,), generator=generator)
    pixels = instance_pixels[indices].clone()  # (B, 3, H, W)
    if flip:
        flips = torch.rand(batch_size, generator=generator) < 0.5
        pixels[flips] = pixels[flips].flip(-1)
    templates = torch.randint(num_templates, (batch_size,), generator=generator)
    return pixels, templates


def prompts_for(indices: Tensor, word: str, templates: tuple[str, ...] = OBJECT_TEMPLATES) -> list[str]:
    return [templates[int(i)].format(word) for i in indices]
