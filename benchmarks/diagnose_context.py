"""Does the learned token spoil the rest of the prompt? (issue 13: why Perfusion trails)

MiniLM (emoji-64's text encoder) is bidirectional, so a learned token changes the encodings of
every other word of the prompt ("blue", "background", "apple"), which reach the UNet's values
ungated. This script, on the Perfusion concepts a `personalization.py` run trained:

1. measures how far the other words' encodings move (relative L2 change and cosine, CLS/SEP and
   padding excluded), concept prompt vs the same prompt with the super-category word;
2. ablates it: generates the benchmark prompts (and the pairs) once as usual and once with a
   "context lock", i.e. every non-concept row of the encoding taken from the super-category
   prompt (passed as ``prompt_embeds``), and scores both with the emoji evaluator.

    python benchmarks/diagnose_context.py --run benchmarks/results/personalization-cpu-240 --beta 0.7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from keylocked.base_model import encode_prompts  # noqa: E402
from keylocked.concept import Concept  # noqa: E402
from keylocked.evaluation.embedders import EmojiEvaluator  # noqa: E402
from keylocked.evaluation.metrics import image_alignment, text_alignment  # noqa: E402
from keylocked.loading import load_concepts, set_concept_options, unload_concepts  # noqa: E402
from keylocked.models import load_pipeline  # noqa: E402

PAIR_TEMPLATE = "a {} and a {} on a white background"


@torch.no_grad()
def encode(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(encodings (B, T, d), input ids (B, T)), exactly as the pipeline encodes a prompt."""
    return encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts)


def concept_rows(pipe, ids: torch.Tensor, tokens: list[str]) -> torch.Tensor:
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for token in tokens:
        keep |= ids == pipe.tokenizer.convert_tokens_to_ids(token)
    return keep  # (B, T)


def context_locked(pipe, concept_prompts: list[str], super_prompts: list[str], tokens: list[str]) -> torch.Tensor:
    """The concept prompt's rows at the concept tokens, the super-category prompt's everywhere else."""
    concept_encoding, ids = encode(pipe, concept_prompts)
    super_encoding, _ = encode(pipe, super_prompts)
    return torch.where(concept_rows(pipe, ids, tokens)[..., None], concept_encoding, super_encoding)


def other_word_shift(pipe, concept: Concept, template: str) -> tuple[float, float]:
    """Mean relative L2 change and cosine of the non-concept words' encodings (CLS, SEP, padding excluded)."""
    concept_encoding, ids = encode(pipe, [template.format(concept.placeholder_token)])
    super_encoding, _ = encode(pipe, [template.format(concept.superclass_token)])
    real = (ids[0] != pipe.tokenizer.pad_token_id) & ~concept_rows(pipe, ids, [concept.placeholder_token])[0]
    real[0] = False  # CLS
    real[int((ids[0] != pipe.tokenizer.pad_token_id).nonzero().max())] = False  # SEP
    a, b = concept_encoding[0, real], super_encoding[0, real]
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).mean()), float(torch.cosine_similarity(a, b, dim=-1).mean())


def generate(pipe, seeds, prompts=None, embeds=None, steps=25, guidance=4.0):
    images = []
    for seed in seeds:
        n = len(prompts) if prompts is not None else embeds.shape[0]
        inputs = dict(prompt=prompts) if prompts is not None else dict(prompt_embeds=embeds, negative_prompt=[""] * n)
        generators = [torch.Generator().manual_seed(seed) for _ in range(n)]
        images += pipe(**inputs, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images
    return images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a personalization.py output folder (with work/)")
    parser.add_argument("--beta", type=float, default=0.7)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--pair_seeds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None, help="default: RUN/context-lock.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    summary = json.loads((args.run / "summary.json").read_text())
    prompts = summary["settings"]["prompts"]
    thresholds = {k: v["threshold"] for k, v in json.loads((args.run / "pairs.json").read_text())["thresholds"].items()}
    pipe = load_pipeline(summary.get("model", "emoji-64"))
    pipe.set_progress_bar_config(disable=True)
    embedder = EmojiEvaluator.load()
    concepts = {}
    for path in sorted((args.run / "work" / "concepts" / "perfusion").glob("*/concept.safetensors")):
        references = [
            Image.open(p).convert("RGB")
            for p in sorted((args.run / "work" / "instances" / path.parent.name).glob("*.png"))
        ]
        concepts[path.parent.name.replace("-", " ")] = (path, Concept.load(path), references)

    shifts, scores = [], {"standard": [], "context lock": []}
    seeds = tuple(range(args.seeds))
    for name, (path, concept, references) in concepts.items():
        load_concepts(pipe, path)  # first: the placeholder must be a token of the tokenizer
        shifts += [other_word_shift(pipe, concept, t) for t in prompts if t != "a {}"]
        set_concept_options(pipe, beta=args.beta)
        concept_prompts = [p.format(concept.placeholder_token) for p in prompts]
        super_prompts = [p.format(concept.superclass_token) for p in prompts]
        locked = context_locked(pipe, concept_prompts, super_prompts, [concept.placeholder_token])
        for variant, images in (
            ("standard", generate(pipe, seeds, prompts=concept_prompts)),
            ("context lock", generate(pipe, seeds, embeds=locked)),
        ):
            generated = embedder.embed_images(images)
            image = image_alignment(generated, embedder.embed_images(references))
            text = text_alignment(generated, embedder.embed_texts(super_prompts * len(seeds)))
            scores[variant].append({"concept": name, "image": float(image.mean()), "text": float(text.mean())})
        unload_concepts(pipe)
        print(name, {k: (round(v[-1]["image"], 4), round(v[-1]["text"], 4)) for k, v in scores.items()}, flush=True)

    names = list(concepts)
    pairs = [(names[2 * i], names[2 * i + 1]) for i in range(len(names) // 2)]
    both = {"standard": 0, "context lock": 0}
    pair_seeds = tuple(range(args.pair_seeds))
    for a, b in pairs:
        (path_a, concept_a, refs_a), (path_b, concept_b, refs_b) = concepts[a], concepts[b]
        load_concepts(pipe, [path_a, path_b])
        set_concept_options(pipe, beta=args.beta)
        prompt = PAIR_TEMPLATE.format(concept_a.placeholder_token, concept_b.placeholder_token)
        super_prompt = PAIR_TEMPLATE.format(concept_a.superclass_token, concept_b.superclass_token)
        locked = context_locked(
            pipe, [prompt], [super_prompt], [concept_a.placeholder_token, concept_b.placeholder_token]
        )
        for variant, images in (
            ("standard", generate(pipe, pair_seeds, prompts=[prompt])),
            ("context lock", generate(pipe, pair_seeds, embeds=locked)),
        ):
            generated = embedder.embed_images(images)
            present_a = image_alignment(generated, embedder.embed_images(refs_a)) > thresholds[a]
            present_b = image_alignment(generated, embedder.embed_images(refs_b)) > thresholds[b]
            both[variant] += int((present_a & present_b).sum())
        unload_concepts(pipe)

    result = {
        "run": str(args.run),
        "beta": args.beta,
        "lock": "local",
        "other_words_relative_change": round(statistics.mean(s for s, _ in shifts), 4),
        "other_words_cosine": round(statistics.mean(c for _, c in shifts), 4),
        "alignment": {
            k: {
                "image": round(statistics.mean(r["image"] for r in v), 4),
                "text": round(statistics.mean(r["text"] for r in v), 4),
                "per_concept": v,
            }
            for k, v in scores.items()
        },
        "pairs_both_present": {k: f"{v}/{len(pairs) * len(pair_seeds)}" for k, v in both.items()},
    }
    output = args.output or args.run / "context-lock.json"
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "alignment"}))
    print({k: (v["image"], v["text"]) for k, v in result["alignment"].items()})


if __name__ == "__main__":
    main()
