"""Alignment metrics of personalization (DreamBench style), as pure functions of embeddings.

    image alignment   mean cosine between a generated image's embedding and the embeddings of
                      the concept's training images (Gal et al. 2022; Ruiz et al. 2023)
    text alignment    cosine between a generated image's embedding and the embedding of its prompt
                      with the concept phrase replaced by the super-category word
                      ("a <my-dog> on a blue background" -> "a dog on a blue background")

Raw cosines (not CLIP-score's 2.5·max(cos, 0)); always reported with the embedder's name.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from PIL import Image
from torch import Tensor


@runtime_checkable
class ImageTextEmbedder(Protocol):
    """Anything that embeds images and texts into one space (CLIP, the emoji evaluator, a test fake)."""

    name: str

    def embed_images(self, images: list[Image.Image]) -> Tensor:  # (N, D)
        ...

    def embed_texts(self, texts: list[str]) -> Tensor:  # (N, D)
        ...


def normalize(embeddings: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm (float32)."""
    embeddings = embeddings.float()
    return embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """(N, D) × (M, D) -> (N, M) cosines."""
    return normalize(a) @ normalize(b).T


def image_alignment(generated: Tensor, references: Tensor) -> Tensor:
    """(N, D) generated, (M, D) training-image embeddings -> (N,) mean cosine to the references."""
    if references.shape[0] == 0:
        raise ValueError("image alignment needs at least one reference image")
    return cosine_matrix(generated, references).mean(1)


def text_alignment(generated: Tensor, texts: Tensor) -> Tensor:
    """(N, D) images, (N, D) their prompts' embeddings -> (N,) pairwise cosine."""
    if generated.shape != texts.shape:
        raise ValueError(f"one text per image: got {tuple(generated.shape)} images and {tuple(texts.shape)} texts")
    return (normalize(generated) * normalize(texts)).sum(-1)


def superclass_prompt(prompt: str, phrase: str, superclass: str) -> str:
    """The prompt as the base model would say it: the concept's phrase replaced by its super-category."""
    if phrase not in prompt:
        raise ValueError(f"prompt {prompt!r} does not mention the concept {phrase!r}")
    return prompt.replace(phrase, superclass)


def present(generated: Tensor, references: Tensor, threshold: float) -> Tensor:
    """(N,) bool: is the concept in the image, i.e. image alignment above ``threshold``."""
    return image_alignment(generated, references) > threshold


def separating_threshold(positives: Tensor, negatives: Tensor) -> tuple[float, float]:
    """The threshold on a score that best separates positives (above) from negatives (below).

    Returns (threshold, accuracy on these samples, positives and negatives weighted equally).
    """
    if positives.numel() == 0 or negatives.numel() == 0:
        raise ValueError("need at least one positive and one negative score")
    candidates = torch.cat([positives, negatives]).float().sort().values  # (P+N,)
    midpoints = torch.cat([candidates[:1] - 1e-6, (candidates[1:] + candidates[:-1]) / 2, candidates[-1:] + 1e-6])
    true_pos = (positives.float()[None, :] > midpoints[:, None]).float().mean(1)  # (K,)
    true_neg = (negatives.float()[None, :] <= midpoints[:, None]).float().mean(1)  # (K,)
    balanced = (true_pos + true_neg) / 2
    best = int(balanced.argmax())
    return float(midpoints[best]), float(balanced[best])
