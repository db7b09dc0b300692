"""Proxy metrics for `keylocked demo`: does each grid column show the concept? (issue 13's demo targets)

Per column of the demo grid (one prompt, drawn once with the concept token and once with the
super-category word), with the emoji evaluator (or any ``ImageTextEmbedder``):

- image alignment: mean cosine between the image and the concept's training views, for the
  concept image and for the super-category baseline; the column passes when the concept's is higher;
- retrieval among the held-out emoji (never seen by the base model nor the evaluator): each is
  represented by example views, the demo concepts by their bundled views and, where
  ``data/emoji-world`` has been built, the 12 benchmark concepts by their sprites on white
  (plain, flipped, smaller); the concept is retrieved when its own views are the closest (mean
  cosine) to the concept image (top-1). So 16 candidates with the data, the 4 demo concepts without.

The report states how many columns pass each test. Nothing here imports ``emoji_world``: the
sprites are read from their files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .metrics import ImageTextEmbedder, image_alignment

# issue 13: image alignment above the baseline in every column, retrieval top-1 in >= 4 of 6
RETRIEVAL_TARGET_FRACTION = 4 / 6


@dataclass
class ColumnScore:
    label: str
    image_alignment: float  # concept image vs the training views
    baseline_image_alignment: float  # super-category image vs the training views
    retrieved: str  # best-matching held-out name for the concept image
    above_baseline: bool
    top1: bool


def held_out_gallery(model: str = "emoji-64", data: str | os.PathLike | None = None) -> dict[str, list[Image.Image]]:
    """{held-out name: example views}: the bundled demo concepts, plus the benchmark sprites when built."""
    from ..models import demo_concept_images, demo_concepts

    gallery = {
        name: [Image.open(path).convert("RGB") for path in demo_concept_images(name, model)]
        for name in demo_concepts(model)
    }
    data = Path(data) if data is not None else Path(__file__).resolve().parents[2] / "data" / "emoji-world"
    if not (data / "sprites.npz").is_file() or not (data / "sprites.json").is_file():
        return gallery
    entries = json.loads((data / "sprites.json").read_text())["entries"]
    sprites = np.load(data / "sprites.npz")["sprites"]  # (N, 64, 64, 4) uint8
    for sprite, entry in zip(sprites, entries):
        if entry.get("split") == "benchmark" and entry.get("style") == "noto" and entry["name"] not in gallery:
            gallery[entry["name"]] = _sprite_views(Image.fromarray(sprite, "RGBA"))
    return gallery


def _sprite_views(sprite: Image.Image, size: int = 64) -> list[Image.Image]:
    """The sprite on white: as is, flipped, and at 70 % size, centred."""
    views = []
    for picture, scale in ((sprite, 1.0), (sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 1.0), (sprite, 0.7)):
        side = round(size * scale)
        canvas = Image.new("RGB", (size, size), "white")
        offset = (size - side) // 2
        canvas.paste(
            picture.resize((side, side), Image.Resampling.BICUBIC), (offset, offset), picture.resize((side, side))
        )
        views.append(canvas)
    return views


def score_columns(
    embedder: ImageTextEmbedder,
    references: list[Image.Image],
    concept_images: list[Image.Image],
    baseline_images: list[Image.Image],
    labels: list[str],
    concept: str,
    gallery: dict[str, list[Image.Image]],
) -> list[ColumnScore]:
    """One score per column (``labels[i]``); ``gallery`` is {held-out name: example views}."""
    candidates = sorted(gallery)
    if concept not in candidates:
        raise ValueError(f"{concept!r} is not among the retrieval candidates {candidates}")
    references_embedded = embedder.embed_images(references)  # (M, D)
    concept_embedded = embedder.embed_images(concept_images)  # (N, D)
    concept_scores = image_alignment(concept_embedded, references_embedded)  # (N,)
    baseline_scores = image_alignment(embedder.embed_images(baseline_images), references_embedded)  # (N,)
    views = [embedder.embed_images(gallery[name]) for name in candidates]  # K x (M_k, D)
    by_image = torch.stack([image_alignment(concept_embedded, v) for v in views], dim=-1)  # (N, K)
    columns = []
    for index, label in enumerate(labels):
        retrieved = candidates[int(by_image[index].argmax())]
        columns.append(
            ColumnScore(
                label=label,
                image_alignment=round(float(concept_scores[index]), 4),
                baseline_image_alignment=round(float(baseline_scores[index]), 4),
                retrieved=retrieved,
                above_baseline=bool(concept_scores[index] > baseline_scores[index]),
                top1=retrieved == concept,
            )
        )
    return columns


def summary(columns: list[ColumnScore], candidates: int) -> dict:
    above = sum(c.above_baseline for c in columns)
    top1 = sum(c.top1 for c in columns)
    return {
        "columns": [asdict(c) for c in columns],
        "columns_above_baseline": f"{above}/{len(columns)}",
        "columns_retrieved_top1": f"{top1}/{len(columns)}",
        "retrieval_candidates": candidates,
        "target_met": above == len(columns) and top1 >= RETRIEVAL_TARGET_FRACTION * len(columns),
    }


def markdown(result: dict, embedder_name: str) -> str:
    lines = [
        f"Proxy metrics (evaluator: {embedder_name}). Image alignment: mean cosine to the training views. "
        + f"Retrieval among {result['retrieval_candidates']} held-out emoji by their example views "
        "(top-1: the concept's own views are the closest; 16 with data/emoji-world built, else the 4 demo concepts).",
        "",
        "| column | image alignment, concept | image alignment, super-category | above | retrieved | top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for c in result["columns"]:
        lines.append(
            f"| {c['label']} | {c['image_alignment']:.3f} | {c['baseline_image_alignment']:.3f} | "
            f"{'yes' if c['above_baseline'] else 'no'} | {c['retrieved']} | {'yes' if c['top1'] else 'no'} |"
        )
    lines += [
        "",
        f"Columns above the super-category baseline: **{result['columns_above_baseline']}** (target: all); "
        f"concept retrieved top-1: **{result['columns_retrieved_top1']}** (target: ≥ 4 of 6). "
        f"Target met: **{'yes' if result['target_met'] else 'no'}**.",
        "",
    ]
    return "\n".join(lines)


def demo_proxy_metrics(
    references: list[Image.Image],
    concept_images: list[Image.Image],
    baseline_images: list[Image.Image],
    labels: list[str],
    concept: str,
    model: str = "emoji-64",
    embedder: ImageTextEmbedder | None = None,
) -> dict:
    """Score every demo grid column with the shipped emoji evaluator (or ``embedder``); see the module doc."""
    if embedder is None:
        from .embedders import EmojiEvaluator

        embedder = EmojiEvaluator.load()
    gallery = held_out_gallery(model)
    columns = score_columns(embedder, references, concept_images, baseline_images, labels, concept, gallery)
    result = summary(columns, len(gallery))
    result["embedder"] = getattr(embedder, "name", type(embedder).__name__)
    return result
