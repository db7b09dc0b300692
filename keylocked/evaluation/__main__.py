"""``keylocked evaluate`` (also ``python -m keylocked.evaluation``): score trained concepts of any method.

    keylocked evaluate --pretrained_model_name_or_path emoji-64 \\
        --concept runs/dog/concept.safetensors --references photos/dog --superclass dog \\
        --prompt "a {} on a blue background" --prompt "a {} and a red apple" --seeds 0 1 --betas 0.6 0.7 0.8 \\
        --embedder emoji --output eval-dog

``--concept`` is a Perfusion concept file/folder or a baseline's output folder; repeat
``--concept``/``--references``/``--superclass`` in the same order for several concepts.
``--embedder`` is ``emoji`` (the shipped emoji-world evaluator) or a local CLIP folder.
The flags are generated from :class:`EvaluateInputs` and ``EvalConfig``, so they cannot drift.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base_model import KeylockedError


@dataclass
class EvaluateInputs:
    """What ``keylocked evaluate`` scores (the sweep itself is ``EvalConfig``)."""

    pretrained_model_name_or_path: str
    concepts: tuple[str, ...]
    references: tuple[str, ...]
    superclasses: tuple[str, ...]
    covariance: str | None = None
    embedder: str = "emoji"
    stock_rows: bool = True
    output: str = "keylocked-eval"
    project: str | None = None  # for library references NAME[@VERSION] among the concepts (docs/library.md)

    def __post_init__(self) -> None:
        if not len(self.concepts) == len(self.references) == len(self.superclasses):
            raise KeylockedError("give one --references and one --superclass per --concept, in the same order")


def _repeated(flag: str, metavar: str, help: str) -> dict[str, Any]:
    return dict(flags=[flag], action="append", nargs=None, metavar=metavar, help=f"{help} (repeat)")


FLAGS: dict[str, dict[str, Any]] = {
    "concepts": _repeated("--concept", "PATH", "a concept file, a baseline's output folder or a library NAME[@N]"),
    "references": _repeated("--references", "DIR", "folder of the concept's training images, same order"),
    "superclasses": _repeated("--superclass", "WORD", "the concept's super-category word, same order"),
    "prompts": _repeated("--prompt", "TEMPLATE", "prompt template with {} for the concept"),
    "embedder": dict(help="'emoji' (the shipped emoji-world evaluator) or a local CLIP folder (default: emoji)"),
    "stock_rows": dict(help="also score the stock model prompted with the super-category word (default: yes)"),
    "locks": dict(choices=["local", "global"], help="key locking modes to sweep (default: local)"),
    "global_betas": dict(help="beta values for the global lock (default: --betas)"),
    "tau": dict(help="gate temperature (default: each concept's recommendation)"),
    "images_dir": dict(help="save every generated image in this folder"),
    "covariance": dict(help="covariance file from `keylocked covariance` (default: the cached one)"),
    "output": dict(help="folder for rows, summary and the Pareto plot (default: keylocked-eval)"),
    "project": dict(help="concept library project, for --concept NAME[@VERSION] (docs/library.md)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``keylocked evaluate``: one per field of EvaluateInputs and EvalConfig."""
    from ..cli import add_dataclass_arguments
    from .evaluate import EvalConfig

    add_dataclass_arguments(parser, EvaluateInputs, overrides=FLAGS)
    add_dataclass_arguments(parser, EvalConfig, overrides=FLAGS)
    parser.add_argument("--api_key", help="concept library key (default $KEYLOCKED_API_KEY; none: the local owner)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keylocked.evaluation ...`` is ``keylocked evaluate ...``."""
    from ..cli import main as cli_main

    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


def run(inputs: EvaluateInputs, config, api_key: str | None = None) -> None:
    """Evaluate the concepts of ``inputs`` over ``config``'s sweep; writes rows, summary and the Pareto plot.

    ``api_key`` (default ``$KEYLOCKED_API_KEY``) is for library references among the concepts.
    """
    from ..images import load_instance_images
    from ..library.resolve import looks_like_reference, resolve_concept_sources
    from ..loading import pipeline_fingerprint
    from ..models import load_pipeline
    from ..personalizations import Personalization
    from ..quiet import no_loading_bars
    from .embedders import CLIPEmbedder, EmojiEvaluator
    from .evaluate import EvalItem, evaluate

    pipe, concepts = None, list(inputs.concepts)
    if any(looks_like_reference(c) for c in concepts):  # library references: checked against the model's fingerprint
        pipe = load_pipeline(inputs.pretrained_model_name_or_path)
        concepts, _ = resolve_concept_sources(
            concepts, project=inputs.project, api_key=api_key, base_model_fingerprint=pipeline_fingerprint(pipe)
        )
    items = [Personalization.from_path(path) for path in concepts]  # validate before loading models
    pipe = pipe or load_pipeline(inputs.pretrained_model_name_or_path)
    with no_loading_bars():
        embedder = EmojiEvaluator.load() if inputs.embedder == "emoji" else CLIPEmbedder(inputs.embedder)
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 1
    resolution = scale * int(pipe.unet.config.sample_size)
    entries = []
    for item, references, superclass in zip(items, inputs.references, inputs.superclasses):
        images = load_instance_images(references, resolution)
        name = Path(references).name
        if inputs.stock_rows:
            entries.append(EvalItem(name, superclass, images))
        entries.append(EvalItem(name, superclass, images, item))
    output = Path(inputs.output)
    evaluate(pipe, entries, embedder, config, output_dir=output, covariance=inputs.covariance)
    print(f"wrote {output}/rows.csv, summary.md, pareto.png")


if __name__ == "__main__":
    sys.exit(main())
