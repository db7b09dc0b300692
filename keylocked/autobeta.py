"""Choose a concept's inference β automatically: the arg-max of the harmonic mean of image and text alignment.

The paper (and its public reimplementation) say β must be chosen per concept, by eye. Here it
is chosen by measurement: for each β of a small grid, generate a few validation prompts, score
the images' alignment with the concept's example images and with the prompt written with the
super-category word, and keep the β whose harmonic mean of the two is highest. The choice is
written into the concept file as its recommended β (metadata only: the tensor bytes are kept).

The scorer is a parameter, so this module does not import the evaluation package (nor does
``keylocked.training``); ``embedder_scorer`` builds the default one from any embedder.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .base_model import KeylockedError
from .concept import Concept, read_metadata
from .io import atomic_write_bytes
from .validation import check_beta, check_positive

# (generated images, the same prompts with the super-category word) -> (image alignment, text alignment)
Scorer = Callable[[list[Image.Image], list[str]], tuple[float, float]]

VALIDATION_PROMPTS = ("a {}", "a {} on a red background", "a large {} on a white background", "a {} and a cat face")


@dataclass
class BetaSearch:
    """The β grid and the validation prompts (each with one ``{}`` for the concept)."""

    betas: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    prompts: tuple[str, ...] = VALIDATION_PROMPTS
    seeds: tuple[int, ...] = (0,)
    tau: float | None = None  # None: the concept's recommended τ
    num_inference_steps: int = 25
    guidance_scale: float = 7.5

    def __post_init__(self) -> None:
        self.betas = tuple(check_beta(b) for b in self.betas)
        self.prompts, self.seeds = tuple(self.prompts), tuple(self.seeds)
        if not self.betas or not self.seeds:
            raise KeylockedError("the β search needs at least one β and one seed")
        bad = [p for p in self.prompts if p.count("{}") != 1]
        if not self.prompts or bad:
            raise KeylockedError(f"validation prompts must each contain one '{{}}', got {bad or 'none'}")
        if self.tau is not None:
            self.tau = check_positive("tau", self.tau)


@dataclass
class BetaChoice:
    beta: float
    image_alignment: dict[float, float] = field(default_factory=dict)
    text_alignment: dict[float, float] = field(default_factory=dict)
    harmonic_means: dict[float, float] = field(default_factory=dict)


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b) for positive a, b; 0 when either is ≤ 0 (a cosine at or below 0 is no alignment)."""
    return 2 * a * b / (a + b) if a > 0 and b > 0 else 0.0


def choose_beta(image_alignment: dict[float, float], text_alignment: dict[float, float]) -> BetaChoice:
    """The β with the highest harmonic mean of the two alignments (ties: the higher β, closer to the prompt)."""
    means = {beta: round(harmonic_mean(image_alignment[beta], text_alignment[beta]), 6) for beta in image_alignment}
    best = max(means, key=lambda beta: (means[beta], beta))
    return BetaChoice(best, dict(image_alignment), dict(text_alignment), means)


def embedder_scorer(embedder, references: list[Image.Image]) -> Scorer:
    """Mean image alignment with ``references`` and mean text alignment, by any ``ImageTextEmbedder``."""
    from .evaluation.metrics import image_alignment, text_alignment

    reference_embeddings = embedder.embed_images(references)

    def score(images: list[Image.Image], prompts: list[str]) -> tuple[float, float]:
        generated = embedder.embed_images(images)
        return (
            float(image_alignment(generated, reference_embeddings).mean()),
            float(text_alignment(generated, embedder.embed_texts(prompts)).mean()),
        )

    return score


@torch.no_grad()
def search_beta(
    pipe, concept_path: str | os.PathLike, scorer: Scorer, search: BetaSearch, covariance=None
) -> BetaChoice:
    """Generate the validation prompts at every β of the grid with the concept loaded; pick β."""
    from .loading import load_concepts, set_concept_options, unload_concepts

    concept = Concept.load(concept_path)
    token = concept.placeholder_token
    cases = [(prompt, seed) for prompt in search.prompts for seed in search.seeds]
    prompts = [prompt.format(token) for prompt, _ in cases]
    superclass_prompts = [prompt.format(concept.superclass_token) for prompt, _ in cases]
    image_scores, text_scores = {}, {}
    load_concepts(pipe, concept, tau=search.tau, covariance=covariance)
    try:
        for beta in search.betas:
            set_concept_options(pipe, beta=beta)
            generators = [torch.Generator(pipe.unet.device).manual_seed(seed) for _, seed in cases]
            images = pipe(
                prompts,
                num_inference_steps=search.num_inference_steps,
                guidance_scale=search.guidance_scale,
                generator=generators,
            ).images
            image_scores[beta], text_scores[beta] = scorer(images, superclass_prompts)
    finally:
        unload_concepts(pipe)
    return choose_beta(image_scores, text_scores)


def tune_beta(
    pipe, concept_path: str | os.PathLike, scorer: Scorer, search: BetaSearch | None = None, covariance=None
) -> BetaChoice:
    """Choose the concept's β (``search_beta``) and store it as the file's recommended β."""
    search = search or BetaSearch()
    choice = search_beta(pipe, concept_path, scorer, search, covariance)
    record = {
        "beta": choice.beta,
        "betas": list(search.betas),
        "prompts": list(search.prompts),
        "seeds": list(search.seeds),
    }
    record.update({k: {repr(b): v for b, v in d.items()} for k, d in asdict(choice).items() if isinstance(d, dict)})
    set_recommended_beta(concept_path, choice.beta, json.dumps(record, sort_keys=True))
    return choice


def set_recommended_beta(path: str | os.PathLike, beta: float, search_record: str | None = None) -> Path:
    """Rewrite a concept file's recommended β (and the search that chose it) atomically.

    Only the header's metadata changes; every tensor byte is copied as it was.
    """
    path = Path(path)
    read_metadata(path)  # a clear error for anything but a concept file
    beta = check_beta(beta)
    raw = path.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_size])
    metadata = header.setdefault("__metadata__", {})
    metadata["beta"] = repr(beta)
    if search_record is not None:
        metadata["beta_search"] = search_record
    # the header as io.canonical_safetensors_bytes writes it: sorted keys, padded with spaces to 8 bytes
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return atomic_write_bytes(path, struct.pack("<Q", len(encoded)) + encoded + raw[8 + header_size :])


def tune_concept_file(
    pretrained_model_name_or_path: str,
    concept_path: str | os.PathLike,
    references: str | os.PathLike,
    embedder: str = "emoji",
    search: BetaSearch | None = None,
    covariance: str | None = None,
    pipe=None,
) -> BetaChoice:
    """``keylocked tune-beta``: load the model and a scorer (``"emoji"``: the shipped emoji evaluator,
    else a local CLIP folder), score against the images in ``references``, store the chosen β."""
    from .evaluation.embedders import CLIPEmbedder, EmojiEvaluator
    from .images import load_instance_images
    from .models import load_pipeline

    Concept.load(concept_path)  # a clear error before loading any model
    if pipe is None:
        pipe = load_pipeline(pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)
    scorer_model = EmojiEvaluator.load() if embedder == "emoji" else CLIPEmbedder(embedder)
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 1
    images = load_instance_images(references, scale * int(pipe.unet.config.sample_size))
    return tune_beta(pipe, concept_path, embedder_scorer(scorer_model, images), search, covariance)
