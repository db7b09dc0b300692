"""Pictures: image grids with optional row/column labels; the background colour of an emoji-64 image."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# emoji-64's named background colours (caption word -> RGB), each a single BERT token. The
# training compositions (emoji_world.compose) draw with these; the demo scores against them.
EMOJI_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (250, 220, 40),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "purple": (130, 50, 175),
    "pink": (250, 145, 190),
}


def image_grid(
    images: list[Image.Image],
    columns: int,
    row_labels: list[str] | None = None,
    column_labels: list[str] | None = None,
    scale: int = 1,
    pad: int = 2,
) -> Image.Image:
    """Lay images out in a grid (row-major); labels are drawn left of rows / above columns."""
    if not images:
        raise ValueError("no images to lay out")
    width, height = images[0].size
    width, height = width * scale, height * scale
    rows = (len(images) + columns - 1) // columns
    font = ImageFont.load_default()
    left = max((int(font.getlength(t)) for t in row_labels or []), default=-pad) + pad * 2
    top = 14 if column_labels else 0
    canvas = Image.new("RGB", (left + columns * (width + pad), top + rows * (height + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        tile = image.convert("RGB").resize((width, height), Image.Resampling.NEAREST)
        canvas.paste(tile, (left + column * (width + pad), top + row * (height + pad)))
    for row, label in enumerate(row_labels or []):
        draw.text((pad, top + row * (height + pad) + height // 2 - 5), label, fill="black", font=font)
    for column, label in enumerate(column_labels or []):
        draw.text((left + column * (width + pad) + 2, 1), label[: max(4, width // 6)], fill="black", font=font)
    return canvas


def border_colour(image: np.ndarray, skip: int = 1, width: int = 4) -> np.ndarray:
    """Median RGB of the border ring ``skip`` to ``skip + width`` pixels in from the edge.

    The outermost pixel row is skipped (the small VAE draws a thin edge line there); medium and
    large sprites never reach 5 pixels from the edge, so the ring is background in training data.
    """
    h, w = image.shape[:2]
    depth = np.minimum.reduce(
        np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        + np.meshgrid(np.arange(h)[::-1], np.arange(w)[::-1], indexing="ij")
    )  # (H, W)
    ring = image[(depth >= skip) & (depth < skip + width)]  # (P, 3)
    return np.median(ring.astype(np.float32), axis=0)


def nearest_colour(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]] = EMOJI_COLOURS) -> str:
    """The palette's name closest (Euclidean, RGB) to ``rgb``."""
    names = list(palette)
    dists = [np.linalg.norm(rgb - np.asarray(palette[n], dtype=np.float32)) for n in names]
    return names[int(np.argmin(dists))]
