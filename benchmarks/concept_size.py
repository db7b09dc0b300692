"""Size of one Perfusion concept file for Stable Diffusion 1.5 (fp16 and fp32).

Builds the SD 1.5 UNet on the ``meta`` device (only module names and layer widths matter,
no weights are allocated), fills a ``Concept`` with random tensors of the real shapes
(CLIP ViT-L/14 text width 768), saves it as keylocked would, and prints bytes and counts.

    python benchmarks/concept_size.py
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from keylocked.base_model import cross_attention_layers
from keylocked.concept import Concept

TEXT_DIM = 768  # CLIP ViT-L/14: token embedding width = encoding width = cross_attention_dim
TARGET_FP16_BYTES = 32 * 1024


def sd15_unet_on_meta() -> UNet2DConditionModel:
    """SD 1.5's UNet2DConditionModel config (runwayml/stable-diffusion-v1-5/unet/config.json)."""
    with init_empty_weights():
        return UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_DIM,
            attention_head_dim=8,
            norm_num_groups=32,
        )


def sd15_concept(unet: UNet2DConditionModel) -> Concept:
    """A concept with SD 1.5's shapes and realistic metadata; the values are random."""
    generator = torch.Generator().manual_seed(0)
    layers = cross_attention_layers(unet)
    return Concept(
        placeholder_token="<my-teddy>",
        superclass_token="teddy",
        token_embedding=torch.randn(TEXT_DIM, generator=generator),
        concept_input=torch.randn(TEXT_DIM, generator=generator),
        superclass_input=torch.randn(TEXT_DIM, generator=generator),
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


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    unet = sd15_unet_on_meta()
    concept = sd15_concept(unet)
    widths = [t.numel() for t in concept.value_targets.values()]
    print(
        f"SD 1.5 UNet (meta device): {sum(p.numel() for p in unet.parameters()):,} parameters, "
        f"{len(widths)} cross-attention layers, value widths {sorted(set(widths))}"
    )
    parameters = concept.num_parameters()
    print(f"concept: {parameters:,} numbers = 3 x {TEXT_DIM} + {sum(widths):,} value-target entries\n")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
            path = concept.save(Path(folder) / f"concept-{name}.safetensors", dtype=dtype)
            size = path.stat().st_size
            tensor_bytes = parameters * torch.finfo(dtype).bits // 8
            rows.append((name, size, tensor_bytes, size - tensor_bytes))
            assert Concept.load(path).value_targets.keys() == concept.value_targets.keys()
    print(f"{'dtype':<6} {'file bytes':>11} {'KiB':>7} {'tensor bytes':>13} {'header bytes':>13}")
    for name, size, tensor_bytes, header in rows:
        print(f"{name:<6} {size:>11,} {size / 1024:>7.1f} {tensor_bytes:>13,} {header:>13,}")
    fp16 = rows[0][1]
    verdict = "within" if fp16 <= TARGET_FP16_BYTES else "OVER"
    print(f"\nfp16 file {fp16:,} bytes: {verdict} the {TARGET_FP16_BYTES:,}-byte (32 KiB) target")


if __name__ == "__main__":
    main()
