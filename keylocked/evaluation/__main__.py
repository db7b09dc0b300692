"""``python -m keylocked.evaluation``: score trained concepts of any method (the future ``keylocked evaluate``).

    python -m keylocked.evaluation --pretrained_model_name_or_path emoji-64 \\
        --concept runs/dog/concept.safetensors --references photos/dog --superclass dog \\
        --prompt "a {} on a blue background" --prompt "a {} and a red apple" --seeds 0 1 --betas 0.6 0.7 0.8 \\
        --embedder emoji --output eval-dog

``--concept`` is a Perfusion concept file/folder or a baseline's output folder; repeat
``--concept``/``--references``/``--superclass`` in the same order for several concepts.
``--embedder`` is ``emoji`` (the shipped emoji-world evaluator) or a local CLIP folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..base_model import KeylockedError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m keylocked.evaluation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``keylocked evaluate`` (also ``python -m keylocked.evaluation``)."""
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument(
        "--concept", action="append", required=True, help="concept file, baseline folder or library NAME[@N] (repeat)"
    )
    parser.add_argument(
        "--references", action="append", required=True, help="folder of the concept's training images (repeat)"
    )
    parser.add_argument("--superclass", action="append", required=True, help="super-category word (repeat)")
    parser.add_argument(
        "--prompt", action="append", required=True, help="prompt template with {} for the concept (repeat)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--betas", nargs="+", type=float, default=[0.6, 0.7, 0.8])
    parser.add_argument("--locks", nargs="+", default=["local"], choices=["local", "global"])
    parser.add_argument("--global_betas", nargs="+", type=float, default=None)
    parser.add_argument("--lora_scales", nargs="+", type=float, default=[1.0])
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--covariance", default=None)
    parser.add_argument("--embedder", default="emoji", help="'emoji' or a local CLIP folder")
    parser.add_argument("--no_base", action="store_true", help="skip the stock-model reference rows")
    parser.add_argument("--save_images", action="store_true")
    parser.add_argument("--output", type=Path, default=Path("keylocked-eval"))
    parser.add_argument("--project", help="concept library project, for --concept NAME[@VERSION] (docs/library.md)")
    parser.add_argument("--api_key", help="concept library key (default $KEYLOCKED_API_KEY; none: the local owner)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (KeylockedError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    """Evaluate the concepts named in ``args``; writes rows, summary and the Pareto plot."""
    from ..library.resolve import looks_like_reference, resolve_concept_sources
    from ..loading import pipeline_fingerprint
    from ..models import load_pipeline
    from ..training.baselines import Personalization
    from ..training.data import load_instance_images
    from .embedders import CLIPEmbedder, EmojiEvaluator
    from .evaluate import EvalConfig, EvalItem, evaluate

    if not len(args.concept) == len(args.references) == len(args.superclass):
        raise KeylockedError("give one --references and one --superclass per --concept, in the same order")
    config = EvalConfig(
        prompts=tuple(args.prompt),
        seeds=tuple(args.seeds),
        betas=tuple(args.betas),
        locks=tuple(args.locks),
        global_betas=tuple(args.global_betas) if args.global_betas else None,
        lora_scales=tuple(args.lora_scales),
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        images_dir=str(args.output / "images") if args.save_images else None,
    )
    pipe = None
    if any(looks_like_reference(c) for c in args.concept):  # library references need the model's fingerprint
        pipe = load_pipeline(args.pretrained_model_name_or_path)
        args.concept, _ = resolve_concept_sources(
            args.concept, project=args.project, api_key=args.api_key, base_model_fingerprint=pipeline_fingerprint(pipe)
        )
    items = [Personalization.from_path(path) for path in args.concept]  # validate before loading models
    pipe = pipe or load_pipeline(args.pretrained_model_name_or_path)
    embedder = EmojiEvaluator.load() if args.embedder == "emoji" else CLIPEmbedder(args.embedder)
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 1
    resolution = scale * int(pipe.unet.config.sample_size)
    entries = []
    for item, references, superclass in zip(items, args.references, args.superclass):
        images = load_instance_images(references, resolution)
        name = Path(references).name
        if not args.no_base:
            entries.append(EvalItem(name, superclass, images))
        entries.append(EvalItem(name, superclass, images, item))
    evaluate(pipe, entries, embedder, config, output_dir=args.output, covariance=args.covariance)
    print(f"wrote {args.output}/rows.csv, summary.md, pareto.png")


if __name__ == "__main__":
    sys.exit(main())
