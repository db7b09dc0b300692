"""Render the emoji-world sprite dataset.

    python -m emoji_world.build_dataset --output data/emoji-world

Writes ``sprites.npz`` (``sprites``: (N, 64, 64, 4) uint8 RGBA, content centred) and
``sprites.json`` (per sprite: caption name, art style, split in train/demo/benchmark).
Needs the Debian packages ``fonts-noto-color-emoji`` and ``ruby-gemojione``.
The held-out splits come from the committed ``emoji_world/splits.json``
(``--write-splits`` regenerates it from the catalogue; do that only on purpose).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .catalog import SPLITS_PATH, STYLES, build_catalog, check_sources, load_splits, write_splits
from .render import render, to_array

SPRITE_SIZE = 64


def split_of(name: str, splits: dict) -> str | None:
    if name in splits["demo"]:
        return "demo"
    if name in splits["benchmark"]:
        return "benchmark"
    if name in set(splits["train"]):
        return "train"
    return None


def build(output: Path, write_new_splits: bool = False, size: int = SPRITE_SIZE) -> dict:
    """Render every catalogue concept in every available style; returns the metadata dict."""
    check_sources()
    concepts = build_catalog()
    rendered = {}
    for concept in concepts:
        for style in concept.styles:
            sprite = render(concept, style, size)
            if sprite is not None:
                rendered[(concept.name, style)] = to_array(sprite)
    available = {name for name, _ in rendered}
    if write_new_splits or not SPLITS_PATH.exists():
        splits = write_splits(concepts, available)
    else:
        splits = load_splits()
    entries, arrays = [], []
    for (name, style), array in sorted(rendered.items()):
        split = split_of(name, splits)
        if split is None:
            continue  # a concept not in the committed splits (newer font) is left out
        entries.append({"name": name, "style": style, "split": split})
        arrays.append(array)
    output.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(output / "sprites.npz", sprites=np.stack(arrays))  # (N, 64, 64, 4)
    meta = {
        "format": "emoji-world-sprites",
        "version": 1,
        "size": size,
        "styles": list(STYLES),
        "entries": entries,
        "splits": {k: splits[k] for k in ("demo", "benchmark")},
    }
    (output / "sprites.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def load_sprites(folder: Path, split: str | None = "train") -> tuple[np.ndarray, list[dict]]:
    """Load sprites (N, 64, 64, 4) uint8 and their entries, optionally of one split only."""
    folder = Path(folder)
    if not (folder / "sprites.npz").exists():
        raise FileNotFoundError(
            f"no sprites in {folder}; build them with: python -m emoji_world.build_dataset --output {folder}"
        )
    sprites = np.load(folder / "sprites.npz")["sprites"]
    entries = json.loads((folder / "sprites.json").read_text())["entries"]
    keep = [i for i, e in enumerate(entries) if split is None or e["split"] == split]
    return sprites[keep], [entries[i] for i in keep]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("data/emoji-world"))
    parser.add_argument("--write-splits", action="store_true", help="regenerate emoji_world/splits.json")
    args = parser.parse_args(argv)
    try:
        meta = build(args.output, args.write_splits)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    counts = {}
    for e in meta["entries"]:
        counts[e["split"]] = counts.get(e["split"], 0) + 1
    names = {e["name"] for e in meta["entries"] if e["split"] == "train"}
    print(f"wrote {len(meta['entries'])} sprites ({len(names)} training concepts) to {args.output}: {counts}")


if __name__ == "__main__":
    main()
