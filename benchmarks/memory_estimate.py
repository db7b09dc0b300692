"""Expected GPU memory of Perfusion training, computed from shapes (an estimate until measured).

Runs one training forward pass of the real-shaped models on the ``meta`` device (no weights
allocated, seconds on a CPU) and adds up:

- weights: UNet and VAE in the mixed-precision dtype, the text encoder(s) in fp32 (gradients
  flow through them into the new token's embedding);
- activations kept for the backward pass: every tensor autograd saves during the UNet and
  text-encoder forward (counted once per storage; frozen weights excluded), with attention as
  flash / memory-efficient SDPA keeps it on a GPU (q, k, v, output and the log-sum-exp; no L×L
  matrix);
- the trained state (token embeddings, value targets) with its gradient and two AdamW moments.

Not counted: the CUDA context (~0.5 GiB, outside ``max_memory_allocated``), allocator
fragmentation and backward-pass temporaries (typically +10–30 %), the VAE's encoder activations
(run under ``no_grad``, freed before the UNet runs) and, with gradient checkpointing, the one block
being recomputed at a time. ``benchmarks/gpu_check.sh`` measures the real peak.

    python benchmarks/memory_estimate.py [--output benchmarks/results/memory-estimate.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import unet_config  # noqa: E402

GIB = 2**30
CASES = (  # family, resolution, micro-batch (the trainer's default 4 × 4 accumulation on SD 1.5)
    ("sd15", 512, 4),
    ("sd15", 512, 1),
    ("sdxl", 1024, 1),
    ("sdxl", 1024, 4),
)
TEXT_ENCODERS = {  # (width, layers, heads, intermediate) of each encoder, CLIP ViT-L/14 and OpenCLIP bigG/14
    "sd15": [(768, 12, 12, 3072)],
    "sdxl": [(768, 12, 12, 3072), (1280, 32, 20, 5120)],
}
VAE_PARAMETERS = 83_653_863  # AutoencoderKL of SD 1.5 / SDXL (same architecture)
VOCAB, MAX_LENGTH = 49_408, 77


class SavedBytes:
    """Counts the bytes autograd saves for backward, once per storage, excluding given parameters."""

    def __init__(self, parameters):
        self.excluded = {p.untyped_storage()._cdata for p in parameters}
        self.storages: dict[int, int] = {}

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.excluded:
            self.storages[storage._cdata] = storage.nbytes()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def flash_attention(self, query, key, value, *args, **kwargs):
        """SDPA as flash attention stores it: q, k, v, output, log-sum-exp (no L×L matrix)."""
        output = torch.empty(
            query.shape[:-1] + (value.shape[-1],), dtype=query.dtype, device=query.device, requires_grad=True
        )
        logsumexp = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
        for tensor in (query, key, value, output, logsumexp):
            self.add(tensor)
        return output


def unet_activations(family: str, resolution: int, batch: int, dtype, checkpointing: bool) -> tuple[int, int]:
    """(bytes saved for backward by one UNet forward, UNet parameter count)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(family)).to(dtype).requires_grad_(False)
        if checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()
        size = resolution // 8
        latents = torch.empty(batch, 4, size, size, dtype=dtype)
        encodings = torch.empty(batch, MAX_LENGTH, unet.config.cross_attention_dim, dtype=dtype, requires_grad=True)
        timesteps = torch.zeros(batch, dtype=torch.long)
        extra = {}
        if unet.config.addition_embed_type == "text_time":
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.empty(batch, pooled, dtype=dtype),
                "time_ids": torch.empty(batch, 6, dtype=dtype),
            }
    counter = SavedBytes(unet.parameters())
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = counter.flash_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            unet(latents, timesteps, encodings, **extra)
    finally:
        F.scaled_dot_product_attention = sdpa
    return counter.total, sum(p.numel() for p in unet.parameters())


def text_encoder_activations(width: int, layers: int, heads: int, intermediate: int, batch: int) -> tuple[int, int]:
    """(bytes saved for backward by one fp32 CLIP text encoder forward into the token embedding, parameters)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=MAX_LENGTH,
    )
    with torch.device("meta"):
        model = CLIPTextModel(config).requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # the new token's row is trained
        input_ids = torch.zeros(batch, MAX_LENGTH, dtype=torch.long)
    counter = SavedBytes(model.parameters())
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = counter.flash_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            model(input_ids, output_hidden_states=True)
    finally:
        F.scaled_dot_product_attention = sdpa
    return counter.total, sum(p.numel() for p in model.parameters())


def estimate(family: str, resolution: int, batch: int, precision: str = "bf16", checkpointing: bool = False) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[precision]
    half = torch.finfo(dtype).bits // 8
    unet_saved, unet_parameters = unet_activations(family, resolution, batch, dtype, checkpointing)
    text_saved, text_parameters = 0, 0
    for shape in TEXT_ENCODERS[family]:
        saved, parameters = text_encoder_activations(*shape, batch)
        text_saved, text_parameters = text_saved + saved, text_parameters + parameters
    # trained state: embeddings (one per encoder) + one value target per layer, fp32 × (param, grad, 2 moments)
    value_width = {"sd15": 12_480, "sdxl": 83_200}[family]
    embedding_width = sum(width for width, *_ in TEXT_ENCODERS[family])
    trained = (value_width + embedding_width) * 4 * 4
    weights = (unet_parameters + VAE_PARAMETERS) * half + text_parameters * 4
    total = weights + unet_saved + text_saved + trained
    return {
        "family": family,
        "resolution": resolution,
        "micro_batch": batch,
        "mixed_precision": precision,
        "gradient_checkpointing": checkpointing,
        "weights_gib": round(weights / GIB, 2),
        "unet_activations_gib": round(unet_saved / GIB, 2),
        "text_encoder_activations_gib": round(text_saved / GIB, 2),
        "trained_state_mib": round(trained / 2**20, 2),
        "total_gib": round(total / GIB, 2),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = [
        estimate(family, resolution, batch, checkpointing=checkpointing)
        for family, resolution, batch in CASES
        for checkpointing in (False, True)
    ]
    print(
        f"{'model':<6}{'px':>6}{'batch':>6}{'ckpt':>6}{'weights':>9}{'UNet act':>10}{'text act':>10}{'total GiB':>11}"
    )
    for row in rows:
        print(
            f"{row['family']:<6}{row['resolution']:>6}{row['micro_batch']:>6}{'yes' if row['gradient_checkpointing'] else 'no':>6}"
            f"{row['weights_gib']:>9}{row['unet_activations_gib']:>10}{row['text_encoder_activations_gib']:>10}"
            f"{row['total_gib']:>11}"
        )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            json.dumps({"estimate": "from shapes, meta device; see the docstring", "rows": rows}, indent=1) + "\n"
        )
    return rows


if __name__ == "__main__":
    main()
