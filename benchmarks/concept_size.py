"""Size of one Perfusion concept file for Stable Diffusion 1.5 and SDXL (fp16 and fp32).

Builds the UNet on the ``meta`` device (only module names and layer widths matter, no weights
are allocated), fills a ``Concept`` with random tensors of the real shapes (SD 1.5: CLIP
ViT-L/14, text width 768; SDXL: 70 cross-attention layers, Σ out = 83,200, d_text 2048 and the
two token embeddings 768 + 1280), saves it as keylocked would, and prints bytes and counts.

    python benchmarks/concept_size.py
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from keylocked.base_model import cross_attention_layers
from keylocked.concept import Concept

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import unet_config  # noqa: E402

TEXT_DIM = 768  # CLIP ViT-L/14: token embedding width = encoding width = cross_attention_dim
TARGET_FP16_BYTES = 32 * 1024
SDXL_EMBEDDINGS = {"clip_l": 768, "clip_g": 1280}  # SDXL's textual-inversion names and widths
SDXL_TARGET_FP16_BYTES = 192 * 1024


def sd15_unet_on_meta() -> UNet2DConditionModel:
    """SD 1.5's UNet2DConditionModel config (runwayml/stable-diffusion-v1-5/unet/config.json)."""
    with init_empty_weights():
        return UNet2DConditionModel(**unet_config("sd15", cross_attention_dim=TEXT_DIM))


def sdxl_unet_on_meta() -> UNet2DConditionModel:
    """SDXL base's UNet2DConditionModel config (stabilityai/stable-diffusion-xl-base-1.0/unet/config.json)."""
    with init_empty_weights():
        return UNet2DConditionModel(**unet_config("sdxl"))


def shaped_concept(unet: UNet2DConditionModel, embeddings: dict[str, int] | None = None) -> Concept:
    """A concept with this UNet's shapes and realistic metadata; the values are random.

    ``embeddings``: text encoder key -> width (default: SD 1.5's one 768-wide embedding)."""
    generator = torch.Generator().manual_seed(0)
    layers = cross_attention_layers(unet)
    embeddings = embeddings or {"token_embedding": TEXT_DIM}
    d_text = sum(embeddings.values())
    return Concept(
        placeholder_token="<my-teddy>",
        superclass_token="teddy",
        token_embeddings={key: torch.randn(width, generator=generator) for key, width in embeddings.items()},
        concept_input=torch.randn(d_text, generator=generator),
        superclass_input=torch.randn(d_text, generator=generator),
        value_targets={
            name: torch.randn(layer.to_v.out_features, generator=generator) for name, layer in layers.items()
        },
        base_model_fingerprint=hashlib.sha256(b"stable-diffusion-v1-5").hexdigest(),
        covariance_sha256=hashlib.sha256(b"clip-vit-l-14 covariance").hexdigest(),
        training={
            "steps": 400,
            "effective_batch_size": 16,
            "learning_rate_embedding": 0.006,
            "learning_rate_values": 0.03,
            "mask": "attention",
            "seed": 0,
            "resolution": 512,
            "base_model": "/models/stable-diffusion-v1-5",
        },
    )


def measure(name: str, unet: UNet2DConditionModel, concept: Concept, target: int) -> int:
    """Print and return the fp16 file size (and fp32) of ``concept``."""
    widths = [t.numel() for t in concept.value_targets.values()]
    d_text = concept.concept_input.numel()
    embeddings = " + ".join(f"{e.numel()} ({k})" for k, e in concept.token_embeddings.items())
    print(
        f"{name} UNet (meta device): {sum(p.numel() for p in unet.parameters()):,} parameters, "
        f"{len(widths)} cross-attention layers, value widths {sorted(set(widths))}"
    )
    parameters = concept.num_parameters()
    print(f"concept: {parameters:,} numbers = {embeddings} + 2 x {d_text} + {sum(widths):,} value-target entries\n")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
            path = concept.save(Path(folder) / f"concept-{label}.safetensors", dtype=dtype)
            size = path.stat().st_size
            tensor_bytes = parameters * torch.finfo(dtype).bits // 8
            rows.append((label, size, tensor_bytes, size - tensor_bytes))
            assert Concept.load(path).value_targets.keys() == concept.value_targets.keys()
    print(f"{'dtype':<6} {'file bytes':>11} {'KiB':>7} {'tensor bytes':>13} {'header bytes':>13}")
    for label, size, tensor_bytes, header in rows:
        print(f"{label:<6} {size:>11,} {size / 1024:>7.1f} {tensor_bytes:>13,} {header:>13,}")
    fp16 = rows[0][1]
    verdict = "within" if fp16 <= target else "OVER"
    print(f"\n{name} fp16 file {fp16:,} bytes: {verdict} the {target:,}-byte ({target // 1024} KiB) target\n")
    return fp16


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    unet = sd15_unet_on_meta()
    measure("SD 1.5", unet, shaped_concept(unet), TARGET_FP16_BYTES)
    unet = sdxl_unet_on_meta()
    measure("SDXL", unet, shaped_concept(unet, SDXL_EMBEDDINGS), SDXL_TARGET_FP16_BYTES)


if __name__ == "__main__":
    main()
