"""Render composition layouts on any torch device (the GPU training path).

Layouts and captions come from :mod:`emoji_world.compose` (``sample_composition`` /
``layout_caption``); only the pixels are drawn here, batched: sprites of one size are resized
together with ``F.interpolate(..., antialias=True)`` (the antialiased bilinear filter PIL uses
for downscaling), flipped, and alpha-composited over the named colour.  Resizing premultiplied
RGBA matches PIL, which premultiplies RGBA before resampling; what differs is PIL's rounding
to uint8 between steps (measured in ``tests/test_emoji_world_gpu.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .compose import COLOURS, IMAGE_SIZE, Layout


class TorchCompositor:
    """Holds the sprites on ``device``; :meth:`render` draws a batch of layouts.

    ``sprites``: (N, H, W, 4) uint8 RGBA (or a list of such arrays), indexed by ``Placed.index``.
    """

    def __init__(self, sprites: np.ndarray | Sequence[np.ndarray], device: torch.device | str = "cpu"):
        array = np.stack(list(sprites)) if not isinstance(sprites, np.ndarray) else sprites
        if array.ndim != 4 or array.shape[-1] != 4 or array.dtype != np.uint8:
            raise ValueError(f"sprites must be (N, H, W, 4) uint8 RGBA, got {array.shape} {array.dtype}")
        self.device = torch.device(device)
        rgba = torch.from_numpy(array).to(self.device).permute(0, 3, 1, 2).float() / 255.0  # (N, 4, H, W)
        # premultiplied alpha: resampling then never bleeds the colour of transparent pixels
        self.sprites = torch.cat([rgba[:, :3] * rgba[:, 3:], rgba[:, 3:]], dim=1)
        self.colour_index = {name: i for i, name in enumerate(COLOURS)}
        self.colours = torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=self.device) / 255.0

    def render(self, layouts: Sequence[Layout]) -> torch.Tensor:
        """(B, 3, 64, 64) float images in [0, 1] on the compositor's device."""
        from .layout_worker import placement_table

        colours = [self.colour_index[lay.colour] for lay in layouts]
        return self.render_table(placement_table(layouts), colours)

    @torch.no_grad()
    def render_table(self, placed: np.ndarray, colours: Sequence[int]) -> torch.Tensor:
        """Render from a placement table: (n, 6) int rows (image, sprite, size, x, y, flip) and the
        colour index (into ``COLOURS``) of each of the B images."""
        batch = len(colours)
        colour = torch.as_tensor(np.asarray(colours, dtype=np.int64), device=self.device)
        canvas = self.colours[colour].view(batch, 3, 1, 1).expand(batch, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous()
        pixels = canvas.permute(0, 2, 3, 1)  # (B, H, W, 3) view of the same memory
        # rows sorted by size and copied to the device once; then one resize per distinct size,
        # on a contiguous slice
        placed = np.asarray(placed, dtype=np.int64).reshape(-1, 6)
        placed = placed[np.argsort(placed[:, 2], kind="stable")]
        sizes, starts, counts = np.unique(placed[:, 2], return_index=True, return_counts=True)
        columns = torch.from_numpy(np.ascontiguousarray(placed.T)).to(self.device)  # (6, n): contiguous slices
        for size, first, count in zip(sizes.tolist(), starts.tolist(), counts.tolist()):
            image, index, _, x, y, flip = columns[:, first : first + count].unbind(0)
            small = F.interpolate(self.sprites[index], size=(size, size), mode="bilinear", antialias=True)
            # the filter is symmetric, so flipping after resizing is the same as before, and cheaper
            small = torch.where(flip.bool().view(-1, 1, 1, 1), small.flip(-1), small)
            small = small.clamp(0.0, 1.0).permute(0, 2, 3, 1)  # (n, s, s, 4)
            offsets = torch.arange(size, device=self.device)
            ys = (y.view(-1, 1) + offsets).view(-1, size, 1)  # (n, s, 1)
            xs = (x.view(-1, 1) + offsets).view(-1, 1, size)  # (n, 1, s)
            images = image.view(-1, 1, 1)
            # sprites of one image never overlap (pairs sit in separate halves), so one gather and
            # one scatter per size group compose them all
            region = pixels[images, ys, xs]  # (n, s, s, 3)
            pixels[images, ys, xs] = region * (1.0 - small[..., 3:]) + small[..., :3]
        return canvas
