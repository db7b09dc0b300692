"""PNG output with its provenance in text chunks (prompt, concept versions, β, τ, seed, audit id).

The audit row records the sha256 of the decoded RGB pixels, not of the PNG file: the file
carries the audit id, so its bytes are only known after the row is written, and the pixels
survive metadata stripping and re-encoding to PNG by other tools.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PROVENANCE_KEY = "keylocked"


def pixel_sha256(image: Image.Image) -> str:
    """sha256 over the mode, size and RGB bytes of an image."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"RGB:{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def png_with_provenance(image: Image.Image, provenance: dict[str, Any]) -> bytes:
    """PNG bytes with one JSON text chunk ``keylocked`` plus readable ``Prompt``/``Seed`` chunks."""
    info = PngInfo()
    info.add_text(PROVENANCE_KEY, json.dumps(provenance, sort_keys=True))
    if "prompt" in provenance:
        info.add_itxt("Prompt", str(provenance["prompt"]))
    if "seed" in provenance:
        info.add_text("Seed", str(provenance["seed"]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_provenance(png: bytes) -> dict[str, Any]:
    """The ``keylocked`` text chunk of a PNG written by ``png_with_provenance``."""
    with Image.open(io.BytesIO(png)) as image:
        return json.loads(image.text[PROVENANCE_KEY])
