"""The emoji catalogue: curated concepts shared by two art styles, and the held-out splits.

Sources (Debian packages, see README/NOTICE for licences):
  * Noto Color Emoji font (``fonts-noto-color-emoji``), names from ``unicodedata.name``;
  * EmojiOne 3 PNGs shipped in ``ruby-gemojione`` with categories in ``config/index.json``.

A *concept* is one emoji (one code point) with a clean lowercase caption name
("fox face", "teddy bear") and the art styles it is available in.  The curated list keeps
animals, plants, food, vehicles, buildings, objects and sports equipment and skips flags,
keycaps, skin tones, people/family variants and symbols.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
GEMOJIONE_DIR = Path("/usr/share/rubygems-integration/all/gems/gemojione-3.3.0")
GEMOJIONE_PNG_DIR = GEMOJIONE_DIR / "assets" / "png"
GEMOJIONE_INDEX = GEMOJIONE_DIR / "config" / "index.json"
APT_INSTALL_LINE = "sudo apt-get install -y fonts-noto-color-emoji ruby-gemojione"
SPLITS_PATH = Path(__file__).with_name("splits.json")

STYLES = ("noto", "emojione")

# gemojione categories kept (people, symbols, flags, modifiers are skipped entirely).
KEPT_CATEGORIES = ("nature", "food", "travel", "objects", "activity")

# Newer (Unicode 9-13) code point ranges with animals, food and objects; Noto-only concepts.
NOTO_EXTRA_RANGES = (
    (0x1F980, 0x1F9AE),  # animals
    (0x1F950, 0x1F96F),  # food
    (0x1F9C0, 0x1F9CB),  # food / drinks
    (0x1F9EA, 0x1F9FF),  # household objects
    (0x1FA70, 0x1FAFF),  # objects, food (Unicode 12/13)
)

# A caption name containing one of these words/fragments is not kept.
EXCLUDED_NAME_PATTERNS = (
    r"\bsymbol\b",
    r"\bsign\b",
    r"\bflag\b",
    r"\bflags\b",
    r"pointing",
    r"wards\b",
    r"\bman\b",
    r"\bwoman\b",
    r"\bperson\b",
    r"\bpeople\b",
    r"\bbicyclist\b",
    r"\bfencer\b",
    r"\bgolfer\b",
    r"juggling",
    r"\bskier\b",
    r"snowboarder",
    r"\bsurfer\b",
    r"\bswimmer\b",
    r"weight lifter",
    r"wrestlers",
    r"horse racing",
    r"water polo",
    r"handball",
    r"^bath$",
    r"rowboat",
    r"\bmoon\b",
    r"\bface\b.*\bface\b",
    r"hand",
    r"\bear\b$",
    r"\bfoot\b",
    r"\bleg\b$",
    r"tooth",
    r"\bbone\b$",
    r"lungs",
    r"heart",
    r"brain",
    r"\bsmiling\b",
    r"\bkiss",
    r"no-evil",
    r"wind blowing",
    r"japan",
    r"kaaba",
    r"love hotel",
    r"wedding",
    r"banknote",
    r"mailbox",
    r"envelope",
    r"chart with",
    r"\bdisc\b",
    r"minidisc",
    r"\bcard index\b",
    r"lower left",
    r"^compression$",
    r"^moyai$",
    r"^hocho$",
    r"^hole$",
    r"^oden$",
    r"^dango$",
    r"^cooking$",
    r"^dash",
    r"^collision",
    r"^sparkles$",
    r"^high voltage",
    r"^dizzy",
    r"^splashing",
    r"with face",
    r"^smoking",
)
# Noto-extra names containing "face" are smileys, not animals.
EXTRA_EXCLUDED = (
    r"\bface\b",
    r"\bperson\b",
    r"\bpeople\b",
    r"\bbeard",
    r"hair",
    r"\bsuperhero",
    r"\bsupervillain",
    r"\bmage\b",
    r"\bfairy\b",
    r"\bvampire\b",
    r"\bmerperson",
    r"\belf\b",
    r"\bgenie\b",
    r"\bzombie\b",
    r"\bdeaf\b",
    r"\bstanding\b",
    r"\bkneeling\b",
    r"\bdisguised\b",
    r"\bpleading\b",
    r"\bguide dog\b",
    r"\bservice dog\b",
    r"\bmechanical\b",
    r"\bear with\b",
    r"\bprobing\b",
    r"\banatomical\b",
    r"\bbone\b$",
    r"\btooth\b",
    r"\bleg\b$",
    r"\bfoot\b$",
)

# Held-out concepts: never in any training caption or image.  value = super-category word,
# a single BERT token that occurs in held-in training captions.
DEMO_HELD_OUT = {"teddy bear": "bear", "sunflower": "flower", "racing car": "car", "cat face": "cat"}
BENCHMARK_HELD_OUT = {
    "dog face": "dog",
    "rabbit face": "rabbit",
    "mouse face": "mouse",
    "monkey face": "monkey",
    "pig face": "pig",
    "cow face": "cow",
    "spouting whale": "whale",
    "tropical fish": "fish",
    "green apple": "apple",
    "deciduous tree": "tree",
    "sailboat": "boat",
    "wine glass": "glass",
}


@dataclass(frozen=True)
class Concept:
    """One emoji concept: caption name, code point and where each art style comes from."""

    name: str
    codepoint: int
    category: str
    styles: tuple[str, ...] = field(default=("noto",))
    emojione_png: str | None = None

    @property
    def char(self) -> str:
        return chr(self.codepoint)


def clean_name(raw: str) -> str:
    """Lowercase caption name from a Unicode/EmojiOne name ("FOX FACE" -> "fox face")."""
    name = raw.lower().replace("_", " ").replace(":", "")
    name = re.sub(r"\s+", " ", name).strip()
    return name


def _excluded(name: str, patterns) -> bool:
    return any(re.search(p, name) for p in patterns)


def check_sources() -> None:
    """Raise ``FileNotFoundError`` naming the apt-get line when a Debian data file is missing."""
    missing = [str(p) for p in (NOTO_FONT, GEMOJIONE_INDEX, GEMOJIONE_PNG_DIR) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"emoji data files missing: {', '.join(missing)}. Install them with:\n  {APT_INSTALL_LINE}"
        )


def build_catalog() -> list[Concept]:
    """All curated concepts (held-in and held-out), sorted by name, unique names."""
    check_sources()
    index = json.loads(GEMOJIONE_INDEX.read_text())
    by_name: dict[str, Concept] = {}
    for _key, entry in index.items():
        if entry.get("category") not in KEPT_CATEGORIES or "-" in entry["unicode"]:
            continue
        cp = int(entry["unicode"], 16)
        try:
            name = clean_name(unicodedata.name(chr(cp)))
        except ValueError:
            name = clean_name(entry["name"])
        if _excluded(name, EXCLUDED_NAME_PATTERNS):
            continue
        png = f"{entry['unicode'].upper()}.png"
        if not (GEMOJIONE_PNG_DIR / png).exists():
            continue
        by_name.setdefault(name, Concept(name, cp, entry["category"], ("noto", "emojione"), png))
    for lo, hi in NOTO_EXTRA_RANGES:
        for cp in range(lo, hi + 1):
            try:
                name = clean_name(unicodedata.name(chr(cp)))
            except ValueError:
                continue
            if _excluded(name, EXCLUDED_NAME_PATTERNS) or _excluded(name, EXTRA_EXCLUDED):
                continue
            by_name.setdefault(name, Concept(name, cp, "extra", ("noto",), None))
    return sorted(by_name.values(), key=lambda c: c.name)


def load_splits(path: Path = SPLITS_PATH) -> dict:
    """The committed splits: {"demo": {name: word}, "benchmark": {...}, "train": [names]}."""
    return json.loads(Path(path).read_text())


def held_out_names(splits: dict) -> set[str]:
    return set(splits["demo"]) | set(splits["benchmark"])


def write_splits(concepts: list[Concept], available: set[str], path: Path = SPLITS_PATH) -> dict:
    """Write splits.json: held-out sets as declared, train = every other available concept."""
    held = set(DEMO_HELD_OUT) | set(BENCHMARK_HELD_OUT)
    missing = held - available
    if missing:
        raise ValueError(f"held-out emoji not renderable here: {sorted(missing)}")
    splits = {
        "format": "emoji-world-splits",
        "version": 1,
        "demo": dict(sorted(DEMO_HELD_OUT.items())),
        "benchmark": dict(sorted(BENCHMARK_HELD_OUT.items())),
        "train": sorted(c.name for c in concepts if c.name in available and c.name not in held),
    }
    Path(path).write_text(json.dumps(splits, indent=1) + "\n")
    return splits
