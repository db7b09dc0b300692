"""RGBA sprites of emoji in two art styles (Noto Color Emoji via Pillow, EmojiOne PNGs)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .catalog import GEMOJIONE_PNG_DIR, NOTO_FONT, Concept

NOTO_SIZE = 109  # the only bitmap strike size of NotoColorEmoji.ttf


@lru_cache(maxsize=1)
def _noto_font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(NOTO_FONT), NOTO_SIZE)


def crop_to_alpha(image: Image.Image) -> Image.Image | None:
    """Crop an RGBA image to the bounding box of its non-transparent pixels (None if empty)."""
    bbox = image.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    return image.crop(bbox) if bbox else None


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Resize (keeping aspect) so the longer side is ``size`` and centre on a transparent square."""
    w, h = image.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = image.resize(new, Image.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.paste(resized, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def _render_noto_raw(char: str) -> Image.Image:
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), char, font=_noto_font(), embedded_color=True)
    return canvas


@lru_cache(maxsize=1)
def _missing_glyph_bytes() -> bytes:
    return _render_noto_raw("\ue000").tobytes()  # a private-use code point: the .notdef glyph


def render_noto(concept: Concept, size: int = 64) -> Image.Image | None:
    """Noto Color Emoji sprite (RGBA, size×size, content centred) or None if the font lacks it."""
    raw = _render_noto_raw(concept.char)
    if raw.tobytes() == _missing_glyph_bytes():
        return None
    cropped = crop_to_alpha(raw)
    return fit_square(cropped, size) if cropped else None


def render_emojione(concept: Concept, size: int = 64) -> Image.Image | None:
    """EmojiOne 3 sprite from the gemojione PNG (RGBA, size×size) or None if absent."""
    if concept.emojione_png is None:
        return None
    path = GEMOJIONE_PNG_DIR / concept.emojione_png
    if not path.exists():
        return None
    cropped = crop_to_alpha(Image.open(path).convert("RGBA"))
    return fit_square(cropped, size) if cropped else None


def render(concept: Concept, style: str, size: int = 64) -> Image.Image | None:
    if style == "noto":
        return render_noto(concept, size)
    if style == "emojione":
        return render_emojione(concept, size)
    raise ValueError(f"unknown style {style!r}; expected 'noto' or 'emojione'")


def to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGBA"), dtype=np.uint8)  # (H, W, 4)
