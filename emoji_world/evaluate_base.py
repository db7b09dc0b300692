"""Quality check of the emoji-64 base model: colour following, identity retrieval, a sample grid.

    python -m emoji_world.evaluate_base --model emoji-64 --n 4 --output outputs/eval-emoji-64

1. Background colour: for every named colour, N prompts "a <X> on a <colour> background"
   (X = held-in concepts); a sample counts as right when the median of its border ring
   (pixels 1-4 in from the edge) is nearest (RGB distance) to the named colour.
2. Identity retrieval: one sample per prompted held-in concept ("a <X> on a white
   background"), embedded and ranked by cosine against real renders of every held-in
   concept (both art styles; best style counts).  Embedding (documented, simple): the
   foreground = pixels farther than 40 (RGB distance) from the border colour; crop to its
   bounding box, composite the crop on mid-gray, resize to 16×16, flatten to 768 values,
   subtract the mean, L2-normalise.  Reports top-1 / top-5, chance levels, and the same
   measure on real compositions of the prompted concepts (``real_top1``: the ceiling).
3. A sample grid PNG (names, colours, placements, pairs) with its prompts.
Runs in a few minutes on CPU with the defaults.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from keylocked.visual import border_colour, nearest_colour

from .compose import COLOURS, Layout, make_caption, render_layout, sample_layout

GRID_PROMPTS = [
    "a fox face",
    "a red apple on a white background",
    "a bear face on a blue background",
    "a strawberry on a yellow background",
    "a police car on a green background",
    "an owl on a pink background",
    "a small cactus in the top left corner on a white background",
    "a small banana in the bottom right corner on a blue background",
    "a large tiger face on a black background",
    "a rocket on a purple background",
    "a cat and a hamburger on a white background",
    "a penguin and a pineapple on an orange background",
    "a bear",
    "a flower on a gray background",
    "a car on a red background",
    "a dog on a yellow background",
]


def embed(image: np.ndarray, size: int = 16, threshold: float = 40.0) -> np.ndarray:
    """Simple object embedding of an (H, W, 3) uint8 image (see module docstring)."""
    bg = border_colour(image)
    mask = np.linalg.norm(image.astype(np.float32) - bg, axis=-1) > threshold  # (H, W)
    if mask.sum() < 4:
        mask[:] = True
    ys, xs = np.nonzero(mask)
    crop = image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    cmask = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1, None]
    crop = np.where(cmask, crop, 128.0)
    vec = np.asarray(
        Image.fromarray(crop.astype(np.uint8)).resize((size, size), Image.BILINEAR), dtype=np.float32
    ).reshape(-1)  # (size*size*3,)
    vec -= vec.mean()
    return vec / (np.linalg.norm(vec) + 1e-8)


def generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 16) -> list[np.ndarray]:
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np").images
        images += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]
    return images


def colour_accuracy(pipe, names: list[str], n: int, seed: int, steps: int, guidance: float) -> dict:
    rng = np.random.default_rng(seed)
    prompts, targets = [], []
    for colour in COLOURS:
        for name in rng.choice(names, size=n, replace=False):
            prompts.append(make_caption([str(name)], colour))
            targets.append(colour)
    images = generate(pipe, prompts, seed, steps, guidance)
    found = [nearest_colour(border_colour(im)) for im in images]
    per = {c: float(np.mean([f == c for f, t in zip(found, targets) if t == c])) for c in COLOURS}
    return {
        "accuracy": float(np.mean([f == t for f, t in zip(found, targets)])),
        "per_colour": per,
        "samples_per_colour": n,
        "confusions": [[t, f] for f, t in zip(found, targets) if f != t],
    }


def identity_retrieval(pipe, data: Path, k: int, seed: int, steps: int, guidance: float) -> dict:
    from .build_dataset import load_sprites

    sprites, entries = load_sprites(data, split="train")
    gallery_names = sorted({e["name"] for e in entries})
    index = {name: i for i, name in enumerate(gallery_names)}
    ref = np.zeros((len(gallery_names), 2, 768), dtype=np.float32)
    for sprite, entry in zip(sprites, entries):
        slot = 0 if entry["style"] == "noto" else 1
        view = _centre_on_white(sprite)
        ref[index[entry["name"]], slot] = embed(view)
    for i, _name in enumerate(gallery_names):  # a concept with one style: copy it
        if not ref[i, 1].any():
            ref[i, 1] = ref[i, 0]
    rng = np.random.default_rng(seed + 1)
    chosen = [str(x) for x in rng.choice(gallery_names, size=k, replace=False)]
    images = generate(pipe, [make_caption([c], "white") for c in chosen], seed + 1000, steps, guidance)
    ranks = _ranks(ref, index, chosen, images)
    # ceiling: the same embedding on real compositions (random style, size, offset, flip) of the prompts
    by_name = {}
    for sprite, entry in zip(sprites, entries):
        by_name.setdefault(entry["name"], []).append(sprite)
    real = []
    for name in chosen:
        options = by_name[name]
        layout = sample_layout(rng, [0])
        layout = Layout("white", tuple(replace(p, index=0) for p in layout.objects))
        real.append(render_layout(layout, [options[int(rng.integers(len(options)))]]))
    real_ranks = _ranks(ref, index, chosen, real)
    return {
        "top1": float((ranks < 1).mean()),
        "top5": float((ranks < 5).mean()),
        "real_top1": float((real_ranks < 1).mean()),
        "real_top5": float((real_ranks < 5).mean()),
        "prompts": k,
        "gallery": len(gallery_names),
        "chance_top1": 1 / len(gallery_names),
        "chance_top5": 5 / len(gallery_names),
        "median_rank": float(np.median(ranks)),
    }


@torch.no_grad()
def vae_psnr(vae, data: Path, n: int = 64, seed: int = 4242) -> dict:
    """VAE reconstruction PSNR (dB, images in [0, 1], MSE pooled over all pixels) on ``n`` fresh
    compositions of the held-in sprites, through the posterior mode."""
    from .common import make_batch, training_sprites

    sprites, names = training_sprites(data)
    pixels, _ = make_batch(sprites, names, n, seed, 0)  # (n, 3, 64, 64) in [-1, 1]
    param = next(vae.parameters())
    latents = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode()
    recon = vae.decode(latents).sample.float().cpu().clamp(-1, 1)
    mse = float((((recon - pixels) / 2) ** 2).mean())
    return {"psnr_db": round(10 * float(np.log10(1.0 / max(mse, 1e-12))), 2), "images": n, "seed": seed}


def _ranks(ref: np.ndarray, index: dict, names: list[str], images: list[np.ndarray]) -> np.ndarray:
    """Rank (0 = best) of each image's true concept among the gallery, by best-style cosine."""
    ranks = []
    for name, image in zip(names, images):
        scores = (ref @ embed(image)).max(1)  # (G,)
        ranks.append(int((scores > scores[index[name]]).sum()))
    return np.asarray(ranks)


def _centre_on_white(sprite: np.ndarray) -> np.ndarray:
    """A training-like view: the sprite at 40 px, centred on white."""
    canvas = Image.new("RGBA", (64, 64), (255, 255, 255, 255))
    canvas.alpha_composite(Image.fromarray(sprite, "RGBA").resize((40, 40), Image.BILINEAR), (12, 12))
    return np.asarray(canvas.convert("RGB"))


def sample_grid(pipe, path: Path, seed: int, steps: int, guidance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = generate(pipe, GRID_PROMPTS, seed, steps, guidance)
    cols = 4
    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.9))
    for ax, image, prompt in zip(axes.flat, images, GRID_PROMPTS):
        ax.imshow(image, interpolation="nearest")
        ax.set_title("\n".join(_wrap(prompt, 30)), fontsize=7)
        ax.axis("off")
    for ax in list(axes.flat)[len(images) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="emoji-64")
    parser.add_argument("--data", type=Path, default=Path("data/emoji-world"))
    parser.add_argument("--output", type=Path, default=Path("outputs/eval-emoji-64"))
    parser.add_argument("--n", type=int, default=4, help="samples per named colour")
    parser.add_argument("--k", type=int, default=30, help="held-in concepts prompted for retrieval")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG scale (the pipeline default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    parser.add_argument("--device", default="cpu", help="where the pipeline runs (samples are seeded on the CPU)")
    parser.add_argument("--psnr_images", type=int, default=64, help="fresh compositions for the VAE's PSNR")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from keylocked.models import load_pipeline

    from .catalog import load_splits

    start = time.time()
    pipe = load_pipeline(args.model, device=args.device)
    args.output.mkdir(parents=True, exist_ok=True)
    names = load_splits()["train"]
    report = {"model": str(args.model), "steps": args.steps, "guidance": args.guidance, "seed": args.seed}
    report["colour"] = colour_accuracy(pipe, names, args.n, args.seed, args.steps, args.guidance)
    report["identity"] = identity_retrieval(pipe, args.data, args.k, args.seed, args.steps, args.guidance)
    report["vae"] = vae_psnr(pipe.vae, args.data, args.psnr_images)
    sample_grid(pipe, args.output / "samples.png", args.seed, args.steps, args.guidance)
    report["grid_prompts"] = GRID_PROMPTS
    report["seconds"] = round(time.time() - start, 1)
    (args.output / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    c, i = report["colour"], report["identity"]
    print(
        f"background colour accuracy {c['accuracy']:.2f} ({c['samples_per_colour']} per colour); "
        f"identity top-1 {i['top1']:.2f} top-5 {i['top5']:.2f} over {i['gallery']} concepts "
        f"(real renders {i['real_top1']:.2f}/{i['real_top5']:.2f}, chance {i['chance_top1']:.3f}/{i['chance_top5']:.3f}); "
        f"VAE {report['vae']['psnr_db']:.2f} dB; grid {args.output / 'samples.png'}; "
        f"{report['seconds']} s"
    )


if __name__ == "__main__":
    main()
