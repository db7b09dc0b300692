"""Alignment metrics, embedders and the evaluation loop (issue 4)."""

from .embedders import CLIPEmbedder, EmojiEvaluator
from .evaluate import EvalConfig, EvalItem, evaluate, evaluate_pairs, plot_pareto, summarize, write_results
from .metrics import (
    ImageTextEmbedder,
    cosine_matrix,
    image_alignment,
    separating_threshold,
    superclass_prompt,
    text_alignment,
)

__all__ = [
    "CLIPEmbedder",
    "EmojiEvaluator",
    "EvalConfig",
    "EvalItem",
    "ImageTextEmbedder",
    "cosine_matrix",
    "evaluate",
    "evaluate_pairs",
    "image_alignment",
    "plot_pareto",
    "separating_threshold",
    "summarize",
    "superclass_prompt",
    "text_alignment",
    "write_results",
]
