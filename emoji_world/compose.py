"""Pure composition and caption logic: sprites + a seeded RNG -> (64×64 RGB image, caption).

Every composition is a solid named-colour background with one emoji (optionally small and
placed in a corner, or large) or a pair side by side.  A margin of ``MARGIN`` pixels is
always left free, so the image border is exactly the background colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from keylocked.visual import EMOJI_COLOURS

IMAGE_SIZE = 64
MARGIN = 2

# Named background colours (caption word -> RGB), single BERT tokens; the palette lives in
# keylocked.visual so that the demo scores colours without importing emoji_world.
COLOURS = EMOJI_COLOURS

# Sprite side lengths (pixels) per size word; "" is the unmentioned medium size.
SIZE_RANGES: dict[str, tuple[int, int]] = {"small": (18, 24), "": (32, 42), "large": (50, 58)}
PAIR_SIZE_RANGE = (24, 29)

# Placement phrase -> anchor as fractions of the free range (x, y); used for small sprites.
PLACEMENTS: dict[str, tuple[float, float]] = {
    "in the top left corner": (0.0, 0.0),
    "in the top right corner": (1.0, 0.0),
    "in the bottom left corner": (0.0, 1.0),
    "in the bottom right corner": (1.0, 1.0),
    "in the center": (0.5, 0.5),
}


@dataclass(frozen=True)
class Placed:
    """One sprite in a composition: which sprite, its side length, top-left corner, flip."""

    index: int
    size: int
    x: int
    y: int
    flip: bool


@dataclass(frozen=True)
class Layout:
    """A sampled composition: background colour, placed sprites and the caption's wording."""

    colour: str
    objects: tuple[Placed, ...]
    size_word: str = ""
    placement: str = ""
    mention_colour: bool = True


def article(name: str) -> str:
    """Indefinite article for a caption noun phrase ("an apple", "a fox face")."""
    return "an" if name[:1] in "aeiou" else "a"


def make_caption(names: list[str], colour: str | None = None, size_word: str = "", placement: str = "") -> str:
    """Caption text: 'a small fox face in the top left corner on a blue background', 'a X and a Y'."""
    if not names:
        raise ValueError("make_caption needs at least one name")
    first = f"{size_word} {names[0]}".strip()
    phrase = f"{article(first)} {first}"
    for other in names[1:]:
        phrase += f" and {article(other)} {other}"
    if placement:
        phrase += f" {placement}"
    if colour:
        phrase += f" on {article(colour)} {colour} background"
    return phrase


def _uniform_int(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


def sample_layout(
    rng: np.random.Generator, indices: list[int], p_pair_ok: bool = True, p_mention_colour: float = 0.8
) -> Layout:
    """Sample background colour, sizes, placement and flips for one or two sprites."""
    colour = str(rng.choice(list(COLOURS)))
    mention = bool(rng.random() < p_mention_colour)
    free = IMAGE_SIZE - 2 * MARGIN
    if len(indices) == 2:
        placed = []
        for slot, index in enumerate(indices):
            size = _uniform_int(rng, *PAIR_SIZE_RANGE)
            half = IMAGE_SIZE // 2
            x_lo = MARGIN if slot == 0 else half
            x_hi = half - size if slot == 0 else IMAGE_SIZE - MARGIN - size
            x = _uniform_int(rng, x_lo, max(x_lo, x_hi))
            y = _uniform_int(rng, MARGIN + 6, IMAGE_SIZE - MARGIN - size - 6)
            placed.append(Placed(index, size, x, y, bool(rng.random() < 0.5)))
        return Layout(colour, tuple(placed), mention_colour=mention)
    if len(indices) != 1:
        raise ValueError(f"a layout has one or two sprites, got {len(indices)}")
    size_word = str(rng.choice(["small", "", "", "large"]))
    size = _uniform_int(rng, *SIZE_RANGES[size_word])
    slack = free - size  # free range of the top-left corner
    if size_word == "small":
        placement = str(rng.choice(list(PLACEMENTS)))
        fx, fy = PLACEMENTS[placement]

        def jitter(f):
            return int(round(f * slack)) + (
                _uniform_int(rng, 0, 3) if f == 0 else -_uniform_int(rng, 0, 3) if f == 1 else _uniform_int(rng, -3, 3)
            )

        x, y = jitter(fx), jitter(fy)
    else:
        placement = ""
        x = slack // 2 + _uniform_int(rng, -min(4, slack // 2), min(4, slack // 2))
        y = slack // 2 + _uniform_int(rng, -min(4, slack // 2), min(4, slack // 2))
    x, y = min(max(x, 0), slack) + MARGIN, min(max(y, 0), slack) + MARGIN
    return Layout(
        colour,
        (Placed(indices[0], size, x, y, bool(rng.random() < 0.5)),),
        size_word=size_word,
        placement=placement,
        mention_colour=mention,
    )


def layout_caption(layout: Layout, names: list[str]) -> str:
    """Caption of a layout; ``names[i]`` is the caption name of sprite index i."""
    return make_caption(
        [names[p.index] for p in layout.objects],
        layout.colour if layout.mention_colour else None,
        layout.size_word,
        layout.placement,
    )


def paste_sprite(canvas: np.ndarray, sprite: np.ndarray, placed: Placed) -> None:
    """Alpha-composite an RGBA uint8 sprite, resized to ``placed.size``, into a float canvas in place."""
    image = Image.fromarray(sprite, "RGBA")
    if placed.flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = image.resize((placed.size, placed.size), Image.BILINEAR)
    rgba = np.asarray(image, dtype=np.float32) / 255.0  # (s, s, 4)
    alpha = rgba[..., 3:4]
    region = canvas[placed.y : placed.y + placed.size, placed.x : placed.x + placed.size]
    region[...] = region * (1.0 - alpha) + rgba[..., :3] * alpha


def render_layout(layout: Layout, sprites: list[np.ndarray]) -> np.ndarray:
    """Render a layout: returns (64, 64, 3) uint8 RGB."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    canvas[...] = np.asarray(COLOURS[layout.colour], dtype=np.float32) / 255.0
    for placed in layout.objects:
        paste_sprite(canvas, sprites[placed.index], placed)
    return np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8)


def compose(
    sprites: list[np.ndarray], names: list[str], rng: np.random.Generator, p_pair: float = 0.2
) -> tuple[np.ndarray, str, Layout]:
    """One random composition of one (or, with probability ``p_pair``, two) of ``sprites``."""
    if len(sprites) != len(names) or not sprites:
        raise ValueError(f"need as many names as sprites, got {len(sprites)} and {len(names)}")
    layout = sample_composition(names, rng, p_pair)
    return render_layout(layout, sprites), layout_caption(layout, names), layout


def sample_composition(names: list[str], rng: np.random.Generator, p_pair: float = 0.2) -> Layout:
    """The layout of one random composition of sprites ``0..len(names)-1`` (pixels not rendered):
    one sprite, or with probability ``p_pair`` two of different names.  :func:`compose` renders it
    with PIL, :class:`emoji_world.compose_torch.TorchCompositor` with torch."""
    if not names:
        raise ValueError("need at least one sprite name")
    if len(names) >= 2 and rng.random() < p_pair:
        i, j = rng.choice(len(names), size=2, replace=False)
        indices = [int(i), int(j)]
        if names[indices[0]] == names[indices[1]]:
            indices = indices[:1]
    else:
        indices = [int(rng.integers(len(names)))]
    return sample_layout(rng, indices)


def augmented_view(sprite: np.ndarray, rng: np.random.Generator, colour: str = "white") -> np.ndarray:
    """A 64×64 RGB example photo of one sprite: scale, shift, flip, small rotation, background."""
    image = Image.fromarray(sprite, "RGBA")
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = image.rotate(float(rng.uniform(-15, 15)), resample=Image.BICUBIC, expand=True)
    size = _uniform_int(rng, 36, 52)
    image = image.resize((size, size), Image.BICUBIC)
    slack = IMAGE_SIZE - size
    x = _uniform_int(rng, max(0, slack // 2 - 5), min(slack, slack // 2 + 5))
    y = _uniform_int(rng, max(0, slack // 2 - 5), min(slack, slack // 2 + 5))
    canvas = Image.new("RGBA", (IMAGE_SIZE, IMAGE_SIZE), COLOURS[colour] + (255,))
    canvas.alpha_composite(image, (x, y))
    return np.asarray(canvas.convert("RGB"), dtype=np.uint8)
