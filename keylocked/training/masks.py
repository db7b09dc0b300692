"""The zero-shot object mask: the UNet's own cross-attention map of the concept token.

The concept token's keys are locked to the super-category's keys, so its attention map is
where the model puts "a teddy": a segmentation of the super-category that needs no extra
model (the paper used an external zero-shot segmenter). Maps are read during the training
forward pass itself, detached, averaged over heads and layers, and normalised per image.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor
from PIL import Image, ImageOps
from torch import Tensor, nn

from ..base_model import KeylockedError, cross_attention_layers


class AttentionMapProbe:
    """Records the cross-attention probability mass on chosen token positions."""

    def __init__(self) -> None:
        self.token_mask: Tensor | None = None  # (B, T) bool, set before each forward
        self.maps: list[Tensor] = []  # each (B, Q)

    def reset(self, token_mask: Tensor) -> None:
        self.token_mask = token_mask
        self.maps = []

    def record(self, attention_probs: Tensor, heads: int) -> None:
        if self.token_mask is None:
            return
        probs = attention_probs.detach().float()  # (B*heads, Q, T)
        probs = probs.unflatten(0, (-1, heads))  # (B, heads, Q, T)
        mask = self.token_mask.to(probs.device, probs.dtype)[:, None, None, :]  # (B, 1, 1, T)
        self.maps.append((probs * mask).sum(-1).mean(1))  # (B, Q)

    def object_mask(self, height: int, width: int) -> Tensor:
        """(B, 1, height, width) in [0, 1], max-normalised per image."""
        if not self.maps:
            raise RuntimeError("no attention maps were recorded")
        resized = []
        for flat in self.maps:  # (B, Q)
            scale = math.sqrt(height * width / flat.shape[1])
            h, w = round(height / scale), round(width / scale)
            resized.append(
                F.interpolate(flat.reshape(-1, 1, h, w), size=(height, width), mode="bilinear", align_corners=False)
            )
        mask = torch.stack(resized).mean(0)  # (B, 1, H, W)
        return mask / mask.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)


class AttentionProbeProcessor(AttnProcessor):
    """diffusers' own ``AttnProcessor`` (explicit softmax), reporting the probabilities it computes.

    The probabilities are taken from ``attn.get_attention_scores`` while the stock processor runs,
    so the attention itself is diffusers' code, unchanged.
    """

    def __init__(self, probe: AttentionMapProbe):
        super().__init__()
        self.probe = probe

    def __call__(self, attn, *args, **kwargs):
        scores = attn.get_attention_scores

        def recording_scores(query, key, attention_mask=None):
            probabilities = scores(query, key, attention_mask)  # (B*heads, Q, T)
            self.probe.record(probabilities, attn.heads)
            return probabilities

        attn.get_attention_scores = recording_scores  # instance attribute shadows the method for this call
        try:
            return super().__call__(attn, *args, **kwargs)
        finally:
            del attn.get_attention_scores


class probing_cross_attention:
    """Context manager: cross-attention layers report maps to ``probe``; processors restored on exit."""

    def __init__(self, unet: nn.Module, probe: AttentionMapProbe):
        self.layers = cross_attention_layers(unet)
        self.probe = probe
        self.saved: dict[str, object] = {}

    def __enter__(self) -> AttentionMapProbe:
        processor = AttentionProbeProcessor(self.probe)
        for name, layer in self.layers.items():
            self.saved[name] = layer.processor
            layer.set_processor(processor)
        return self.probe

    def __exit__(self, *exc) -> None:
        for name, layer in self.layers.items():
            layer.set_processor(self.saved[name])


def load_user_masks(mask_dir: str | os.PathLike, count: int, resolution: int) -> Tensor:
    """(N, 1, R, R) masks in [0, 1] from a folder of images, matched to the instance images by sorted order."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise KeylockedError(f"mask directory not found: {mask_dir}")
    paths = sorted(p for p in mask_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if len(paths) != count:
        raise KeylockedError(
            f"{mask_dir} has {len(paths)} mask files for {count} instance images; give one per image, in the same sorted order"
        )
    masks = []
    for path in paths:
        try:
            with Image.open(path) as handle:
                gray = handle.convert("L")
        except OSError as error:
            raise KeylockedError(f"{path}: unreadable mask ({error})") from error
        gray = ImageOps.fit(gray, (resolution, resolution), Image.Resampling.BILINEAR)  # same crop as the images
        masks.append(torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0))
    return torch.stack(masks)[:, None]
