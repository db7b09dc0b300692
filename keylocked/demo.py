"""`keylocked demo`: personalize the embedded emoji-64 model end to end, offline, on a CPU.

Trains a concept from the bundled views of a held-out demo emoji, then draws one grid that
shows what Perfusion does: the concept alone, on several background colours, next to another
object, across a β sweep, each beside the same prompt with the super-category word instead.
Writes the grid, the concept file and a Markdown report with the measured numbers.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .base_model import KeylockedError
from .io import atomic_path, atomic_write_text
from .loading import load_concepts, set_concept_options, unload_concepts
from .visual import border_colour, image_grid, nearest_colour

# The emoji-64 captions' own vocabulary: "a fox face on a blue background".
DEMO_TEMPLATES = ("a {}", "a {} on a white background", "a large {}", "a {} in the center", "a small {}")
DEMO_COLOURS = ("red", "blue", "green", "yellow")


@dataclass
class DemoConfig:
    output_dir: str = "keylocked-demo"
    pretrained_model_name_or_path: str = "emoji-64"
    concept: str = "teddy bear"  # a held-out demo emoji bundled with the model
    placeholder_token: str = "<my-emoji>"
    other_object: str = "apple"
    max_train_steps: int = 300
    train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate_embedding: float = 0.006
    learning_rate_values: float = 0.03
    betas: tuple[float, ...] = (
        0.5,
        0.7,
        0.9,
        1.1,
    )  # wide: the concept token scores s ≈ 1, so the gate closes near β ≈ 1
    beta: float = 0.7
    tau: float = 0.15
    colours: tuple[str, ...] = DEMO_COLOURS
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_train_steps < 1:
            raise KeylockedError(f"max_train_steps must be positive, got {self.max_train_steps!r}")
        if not self.betas:
            raise KeylockedError("betas must list at least one value")


@dataclass
class DemoResult:
    output_dir: Path
    grid: Path
    concept: Path
    report: Path
    numbers: dict = field(default_factory=dict)


def foreground_similarity(image: Image.Image, references: list[Image.Image], size: int = 16) -> float:
    """Max cosine between centred, downsampled centre crops: a crude, documented identity score."""

    def vector(picture: Image.Image) -> np.ndarray:
        width, height = picture.size
        box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
        array = np.asarray(
            picture.convert("RGB").crop(box).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32
        )
        flat = array.reshape(-1) - array.mean()
        return flat / (np.linalg.norm(flat) + 1e-8)

    target = vector(image)
    return float(max(target @ vector(reference) for reference in references))


def _generate(pipe, prompts: list[str], config: DemoConfig) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(config.seed)
    return pipe(
        prompts,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        generator=generator,
    ).images


def run_demo(config: DemoConfig, pipe=None) -> DemoResult:
    """Train a demo concept and write grid, concept file and report into ``config.output_dir``."""
    from .models import demo_concept_images, demo_super_category, load_pipeline
    from .training import TrainConfig, train_concept

    output_dir = Path(config.output_dir)
    images = demo_concept_images(config.concept, config.pretrained_model_name_or_path)
    superclass = demo_super_category(config.concept, config.pretrained_model_name_or_path)
    if pipe is None:
        pipe = load_pipeline(config.pretrained_model_name_or_path)
    stages = tqdm(total=3, desc="demo", disable=not config.progress, unit="stage")

    # 1. train the concept on the bundled views (in a scratch folder; only results are kept)
    with tempfile.TemporaryDirectory(prefix="keylocked-demo-") as scratch:
        scratch = Path(scratch)
        instance_dir = scratch / "images"
        instance_dir.mkdir()
        for path in images:
            shutil.copy(path, instance_dir / path.name)
        train_config = TrainConfig(
            pretrained_model_name_or_path=config.pretrained_model_name_or_path,
            instance_data_dir=str(instance_dir),
            placeholder_token=config.placeholder_token,
            superclass_token=superclass,
            output_dir=str(scratch / "train"),
            train_batch_size=config.train_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            max_train_steps=config.max_train_steps,
            checkpointing_steps=config.max_train_steps,
            learning_rate_embedding=config.learning_rate_embedding,
            learning_rate_values=config.learning_rate_values,
            inference_beta=config.beta,
            inference_tau=config.tau,
            prompt_templates=DEMO_TEMPLATES,
            seed=config.seed,
            progress=config.progress,
        )
        started = time.perf_counter()
        trained = train_concept(train_config, pipe=pipe)
        train_seconds = time.perf_counter() - started
        concept_path = output_dir / "concept.safetensors"
        output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(concept_path) as tmp:
            shutil.copy(trained, tmp)
    stages.update(1)

    # 2. the grid: each row pairs the concept prompt with the same prompt using the super-category
    token = config.placeholder_token
    rows: list[tuple[str, str]] = [("alone", "a {}")]
    rows += [(colour, f"a {{}} on a {colour} background") for colour in config.colours]
    rows += [
        (
            f"+ {config.other_object}",
            f"a {{}} and an {config.other_object}"
            if config.other_object[0] in "aeiou"
            else f"a {{}} and a {config.other_object}",
        )
    ]
    concept_prompts = [template.format(token) for _, template in rows]
    baseline_prompts = [template.format(superclass) for _, template in rows]
    started = time.perf_counter()
    baseline_images = _generate(pipe, baseline_prompts, config)
    load_concepts(pipe, concept_path, beta=config.beta, tau=config.tau)  # the model's bundled covariance
    try:
        concept_images = _generate(pipe, concept_prompts, config)
        sweep_prompt = f"a {token} on a blue background"
        sweep_images = []
        for beta in config.betas:
            set_concept_options(pipe, beta=beta)
            sweep_images += _generate(pipe, [sweep_prompt], config)
    finally:
        unload_concepts(pipe)
    generate_seconds = time.perf_counter() - started
    stages.update(1)

    # 3. numbers, grid and report
    references = [Image.open(path).convert("RGB") for path in images]
    colour_rows = [i for i, (label, _) in enumerate(rows) if label in config.colours]

    def colour_hits(pictures: list[Image.Image]) -> int:
        return sum(nearest_colour(border_colour(np.asarray(pictures[i]))) == rows[i][0] for i in colour_rows)

    numbers = {
        "concept": config.concept,
        "super_category": superclass,
        "train_steps": config.max_train_steps,
        "train_batch_size": config.train_batch_size,
        "train_seconds": round(train_seconds, 1),
        "generate_seconds": round(generate_seconds, 1),
        "concept_bytes": concept_path.stat().st_size,
        "background_colour_correct_with_concept": f"{colour_hits(concept_images)}/{len(colour_rows)}",
        "background_colour_correct_superclass": f"{colour_hits(baseline_images)}/{len(colour_rows)}",
        "identity_similarity_with_concept": round(
            float(np.mean([foreground_similarity(im, references) for im in concept_images])), 3
        ),
        "identity_similarity_superclass": round(
            float(np.mean([foreground_similarity(im, references) for im in baseline_images])), 3
        ),
        "beta_sweep_identity_similarity": {
            str(beta): round(foreground_similarity(im, references), 3) for beta, im in zip(config.betas, sweep_images)
        },
        "threads": torch.get_num_threads(),
    }
    # issue 13's proxy for "a person recognises the concept": per column, evaluator alignment vs baseline, retrieval
    from .evaluation.demo_metrics import demo_proxy_metrics
    from .evaluation.demo_metrics import markdown as proxy_markdown

    proxy = demo_proxy_metrics(
        references,
        concept_images,
        baseline_images,
        [label for label, _ in rows],
        config.concept,
        config.pretrained_model_name_or_path,
    )
    numbers["columns_above_superclass_baseline"] = proxy["columns_above_baseline"]
    numbers["columns_concept_retrieved_top1"] = (
        f"{proxy['columns_retrieved_top1']} of {proxy['retrieval_candidates']} held-out"
    )
    grid = image_grid(
        concept_images + baseline_images,
        columns=len(rows),
        row_labels=[token, superclass],
        column_labels=[label for label, _ in rows],
        scale=2,
    )
    sweep = image_grid(
        sweep_images, columns=len(sweep_images), column_labels=[f"beta {b}" for b in config.betas], scale=2
    )
    views = image_grid(references, columns=len(references), scale=2)
    grid_path, sweep_path, views_path = (
        output_dir / "grid.png",
        output_dir / "beta_sweep.png",
        output_dir / "training_views.png",
    )
    for picture, path in ((grid, grid_path), (sweep, sweep_path), (views, views_path)):
        with atomic_path(path) as tmp:
            picture.save(tmp, format="PNG")
    atomic_write_text(
        output_dir / "numbers.json",
        json.dumps({"config": asdict(config), "numbers": numbers, "proxy": proxy}, indent=2),
    )
    report = output_dir / "report.md"
    atomic_write_text(report, _report(config, numbers, superclass) + "\n" + proxy_markdown(proxy, proxy["embedder"]))
    stages.update(1)
    stages.close()
    return DemoResult(output_dir, grid_path, concept_path, report, numbers)


def _report(config: DemoConfig, numbers: dict, superclass: str) -> str:
    sweep = " | ".join(f"β={beta}: {score}" for beta, score in numbers["beta_sweep_identity_similarity"].items())
    return f"""# keylocked demo: `{config.placeholder_token}` ({config.concept}, super-category "{superclass}")

Training views (bundled, held out of the base model's training):

![training views](training_views.png)

Top row: prompts with the concept token; bottom row: the same prompts with "{superclass}"
(the base model alone). Columns: the concept alone, on {", ".join(config.colours)} backgrounds, next to {config.other_object}.

![grid](grid.png)

β sweep for "a {config.placeholder_token} on a blue background" (lower β = stronger concept):

![beta sweep](beta_sweep.png)

| measured | value |
|---|---|
| training | {numbers["train_steps"]} steps × batch {numbers["train_batch_size"]}, {numbers["train_seconds"]} s on {numbers["threads"]} CPU threads |
| generation (all cells) | {numbers["generate_seconds"]} s |
| concept file | {numbers["concept_bytes"]} bytes |
| background colour right (border pixels), with concept | {numbers["background_colour_correct_with_concept"]} |
| background colour right, super-category prompt | {numbers["background_colour_correct_superclass"]} |
| identity similarity to the views, with concept | {numbers["identity_similarity_with_concept"]} |
| identity similarity, super-category prompt | {numbers["identity_similarity_superclass"]} |
| identity similarity across the β sweep | {sweep} |

Identity similarity: the maximum cosine, over the training views, between mean-centred
16×16 downsamples of the central half of each image. Crude (pixels, not semantics); the
evaluator of `keylocked evaluate` is the measured one.
"""
