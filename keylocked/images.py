"""Reading the user's images: any mode to RGB, decompression bombs and damaged files refused.

Used by training, evaluation and the service alike, so it lives outside ``keylocked.training``.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .base_model import KeylockedError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """EXIF-rotate, then convert any mode to RGB (transparency composited on ``background``)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if image.mode == "CMYK":
        return image.convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        span = array.max() - array.min()
        array = (array - array.min()) / (span if span > 0 else 1.0) * 255.0
        image = Image.fromarray(array.astype(np.uint8))
    return image.convert("RGB")


MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 64 MP: any real photo; a decompression bomb claims far more


def read_image(path: Path) -> Image.Image:
    """Decode one image file to RGB, refusing decompression bombs (over ``MAX_IMAGE_PIXELS``)."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        # Pillow checks its module-wide limit while opening: warns above it, raises above twice it.
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as handle:
                handle.load()
                return to_rgb(handle)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise KeylockedError(f"image too large to decode safely (limit {MAX_IMAGE_PIXELS} pixels): {error}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error) as error:
        # what Pillow's decoders raise on damaged or hostile files
        raise KeylockedError(f"unreadable image ({error.__class__.__name__}: {error})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def load_instance_images(
    data_dir: str | os.PathLike, resolution: int, min_size: int | None = None
) -> list[Image.Image]:
    """Read, validate and square-crop the user's images to ``resolution``."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise KeylockedError(f"instance data directory not found: {data_dir}")
    paths = (
        [data_dir]
        if data_dir.is_file()
        else sorted(p for p in data_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    )
    min_size = min_size if min_size is not None else max(8, resolution // 2)
    images, problems = [], []
    for path in paths:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            image = read_image(path)
        except KeylockedError as error:
            problems.append(f"{path.name}: {error}")
            continue
        if min(image.size) < min_size:
            problems.append(f"{path.name}: {image.size[0]}x{image.size[1]} is smaller than {min_size}px")
            continue
        images.append(ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC))
    if problems:
        raise KeylockedError("bad instance images in " + str(data_dir) + ":\n  " + "\n  ".join(problems))
    if not images:
        raise KeylockedError(f"no images found in {data_dir} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def images_to_tensor(images: list[Image.Image]) -> Tensor:
    """(N, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])  # (N, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0
