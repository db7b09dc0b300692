"""Latent caching: the VAE posterior of every training view, computed once per run.

A concept is trained on a few photos for hundreds of steps (SD 1.5 default: 400 × 16 = 6,400
samples of 1–10 images), so encoding every micro-batch with the VAE repeats the same few
encoder passes thousands of times. ``LatentCache`` encodes each view once (each image, and its
mirror image when flips are on) and then stands in for the VAE in ``noised_batch``: it answers
``encode(pixels).latent_dist`` with the cached mean and std of each row, found by its pixels.
Image sampling, flips and the seeded posterior/noise draws are untouched, so a run is as
reproducible (and resumable) as before; the latents equal the uncached ones up to the rounding
of batched vs one-at-a-time convolutions.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn

MAX_CACHED_VIEWS = 1024  # beyond this (a large data set, not a concept's few photos) encode per batch


class LatentCache:
    """A VAE stand-in whose ``encode`` looks the posterior of each row up instead of running the encoder."""

    def __init__(self, vae: nn.Module, views: Tensor, chunk: int = 8):
        self.config = vae.config
        self.pixels = views  # (V, 3, H, W) on the VAE's device, in its dtype
        means, stds = [], []
        with torch.no_grad():
            for part in views.split(chunk):
                posterior = vae.encode(part).latent_dist
                means.append(posterior.mean)
                stds.append(posterior.std)
        self.mean, self.std = torch.cat(means), torch.cat(stds)  # (V, C, h, w) each

    def encode(self, pixels: Tensor) -> SimpleNamespace:
        rows = [self._index(row) for row in pixels]  # pixels (B, 3, H, W)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=self.mean[rows], std=self.std[rows]))

    def _index(self, row: Tensor) -> int:
        for index, view in enumerate(self.pixels):
            if torch.equal(view, row):
                return index
        raise RuntimeError("a training view is missing from the latent cache")


def latent_encoder(
    vae: nn.Module | None, instance: Tensor, flip: bool, device, dtype
) -> nn.Module | LatentCache | None:
    """The VAE to encode training batches with: a ``LatentCache`` of every view when there are few."""
    if vae is None:
        return None
    pixels = instance[:, :3]  # (N, 3, H, W); a 4th channel is a user mask, not encoded
    views = torch.cat([pixels, pixels.flip(-1)]) if flip else pixels
    if len(views) > MAX_CACHED_VIEWS:
        return vae
    return LatentCache(vae, views.to(device, dtype))
