"""Estimate, store and cache C⁻¹, the inverse second moment of a text encoder's outputs.

Which positions enter C: every position the tokenizer marks as real text (attention mask 1):
the start token, the words and the end token; padding is left out. The edit is applied to
every position, but padding rows are near-copies of the end token whose count depends only
on ``model_max_length``; counting them would weight C by prompt length rather than by
content. ``positions="all"`` counts them too (every position cross-attention sees), an
ablation option (docs/method.md).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .base_model import KeylockedError
from .io import read_safetensors_header, save_safetensors
from .perfusion import SecondMomentAccumulator, invert_covariance
from .text_stack import TextStack, as_text_stack
from .validation import (
    check_choice,
    check_covariance_inverse,
    check_finite_tensor,
    check_float_dtype,
    check_format_version,
)

FORMAT_NAME = "keylocked.covariance"
FORMAT_VERSION = 1
TENSOR_NAME = "input_covariance_inv"
MAX_DIM = 1 << 14  # wider than any text encoder; bounds what a header may make us allocate
TOKEN_RULE = "attention-mask positions (start, words, end; no padding)"
TOKEN_RULES = {"text": TOKEN_RULE, "all": "all positions (start, words, end, padding)"}
VOCAB_TEMPLATES = (
    "a photo of a {}",
    "a {} on a table",
    "a close-up photo of the {}",
    "a painting of a {}",
    "the {} in the corner",
    "a small {} and a big {}",
    "{}",
    "a rendering of a {} on a white background",
)


@dataclass
class Covariance:
    inverse: Tensor  # (d, d) float32, C⁻¹
    text_encoder_fingerprint: str
    info: dict[str, str] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return covariance_sha256(self.inverse)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically, with canonical bytes."""
        metadata = {
            **self.info,
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "text_encoder_fingerprint": self.text_encoder_fingerprint,
            "sha256": self.sha256,
        }
        return save_safetensors({TENSOR_NAME: self.inverse.contiguous()}, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, dim: int | None = None) -> Covariance:
        """Read a covariance file: header checked before the tensor is read (``dim`` when given),
        then C⁻¹ checked to be finite, symmetric and positive definite."""
        header = read_safetensors_header(path, "covariance file")
        metadata = header.metadata
        if metadata.get("format") != FORMAT_NAME or TENSOR_NAME not in header.tensors:
            raise KeylockedError(f"{path}: not a keylocked covariance file (format={metadata.get('format')!r})")
        check_format_version(f"{path}: format_version", metadata.get("format_version"), FORMAT_VERSION)
        if set(header.tensors) != {TENSOR_NAME}:
            raise KeylockedError(f"{path}: unexpected tensors in a covariance file: {sorted(header.tensors)[:3]}")
        info = header.tensors[TENSOR_NAME]
        check_float_dtype(f"{path}: {TENSOR_NAME}", info.dtype)
        shape = info.shape
        if len(shape) != 2 or shape[0] != shape[1] or not 1 <= shape[0] <= MAX_DIM:
            raise KeylockedError(f"{path}: covariance inverse must be square and at most {MAX_DIM} wide, got {shape}")
        if dim is not None and shape[0] != dim:
            raise KeylockedError(f"{path}: covariance is {shape[0]}-dimensional, the text encoder is {dim}")
        try:
            inverse = load_file(str(path))[TENSOR_NAME].float()
        except (SafetensorError, OSError) as error:
            raise KeylockedError(f"{path}: cannot read tensors ({error})") from error
        check_covariance_inverse(f"{path}: {TENSOR_NAME}", inverse)
        info = {
            k: v
            for k, v in metadata.items()
            if k not in ("format", "format_version", "text_encoder_fingerprint", "sha256")
        }
        return cls(inverse, metadata.get("text_encoder_fingerprint", ""), info)


def covariance_sha256(inverse: Tensor) -> str:
    return hashlib.sha256(inverse.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def base_vocabulary_size(tokenizer) -> int:
    """Vocabulary size without tokens added after training (ours or textual inversions)."""
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if not t.special}
    size = len(tokenizer)
    while size - 1 in added:
        size -= 1
    return size


def vocabulary_prompts(tokenizer, num_words: int = 2048) -> list[str]:
    """A caption corpus made offline from the tokenizer's own whole-word vocabulary."""
    added = set(tokenizer.get_added_vocab())
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if token in added or token.startswith("##"):
            continue
        word = token[: -len("</w>")] if token.endswith("</w>") else token
        if word.isascii() and word.isalpha() and len(word) > 2:
            words.append(word.lower())
    words = sorted(set(words))
    if not words:
        raise KeylockedError("the tokenizer has no whole-word vocabulary to build a covariance corpus from")
    stride = max(1, len(words) // num_words)
    chosen = words[::stride][:num_words]
    prompts = []
    for index, word in enumerate(chosen):
        template = VOCAB_TEMPLATES[index % len(VOCAB_TEMPLATES)]
        other = chosen[(index * 7 + 3) % len(chosen)]
        prompts.append(template.format(word, other))
    return prompts


def read_captions(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise KeylockedError(f"captions file not found: {path}")
    captions = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    captions = [c for c in captions if c]
    if not captions:
        raise KeylockedError(f"captions file {path} has no non-empty lines")
    return captions


@torch.no_grad()
def estimate_covariance(
    text: TextStack | nn.Module,
    tokenizer=None,
    prompts: Iterable[str] | None = None,
    batch_size: int = 64,
    ridge: float = 1e-4,
    corpus_name: str | None = None,
    progress: bool = True,
    positions: str = "text",
) -> Covariance:
    """C = E[e eᵀ] over the real-text positions (``positions="all"``: every position) of a
    caption corpus (float64), then C⁻¹.

    ``text``: the model's text stack (SDXL: the two encoders' concatenated encodings, 2048-d),
    or one text encoder and its ``tokenizer``.
    """
    check_choice("covariance positions", positions, tuple(TOKEN_RULES))
    stack = as_text_stack(text, tokenizer)
    prompts = list(prompts) if prompts is not None else vocabulary_prompts(stack.tokenizer)
    corpus_name = corpus_name or ("tokenizer-vocabulary-templates" if prompts else "empty")
    accumulator = SecondMomentAccumulator(stack.d_text)
    for start in tqdm(range(0, len(prompts), batch_size), desc="covariance", disable=not progress, unit="batch"):
        encoded = stack.encode(prompts[start : start + batch_size])
        encodings = encoded.encodings  # (B, T, d_text)
        rows = encodings[encoded.attention_mask.bool()] if positions == "text" else encodings.reshape(-1, stack.d_text)
        accumulator.update(rows)  # (N, d_text)
    if accumulator.count == 0:
        raise KeylockedError("the covariance corpus is empty: no text positions were encoded")
    moment = check_finite_tensor("the text encoder's outputs (covariance)", accumulator.second_moment())
    if not float(torch.diagonal(moment).sum()) > 0:
        raise KeylockedError("the text encoder's outputs are all zero; cannot estimate a covariance")
    inverse, added_ridge, condition = invert_covariance(moment, ridge=ridge)
    check_covariance_inverse("the estimated covariance inverse", inverse.float())
    fingerprint = stack.fingerprint()
    info = {
        "corpus": corpus_name,
        "num_prompts": str(len(prompts)),
        "token_rule": TOKEN_RULES[positions],
        "count": str(accumulator.count),
        "ridge": repr(added_ridge),
        "condition_number": f"{condition:.6g}",
    }
    return Covariance(inverse.float().contiguous(), fingerprint, info)


def cache_dir() -> Path:
    root = os.environ.get("KEYLOCKED_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "keylocked"
    )
    return Path(root) / "covariance"


BUNDLED_FILENAME = "covariance.safetensors"  # a model folder may ship its covariance under this name


def pipeline_folder(pipe) -> Path | None:
    """The local folder a pipeline was loaded from, if any (where a bundled covariance may be)."""
    name = getattr(pipe, "name_or_path", None)
    return Path(name) if name and Path(name).is_dir() else None


def _bundled_covariances() -> list[Path]:
    from .models import EMBEDDED_MODELS

    return [folder / BUNDLED_FILENAME for folder in EMBEDDED_MODELS.values()]


def default_covariance(
    text: TextStack | nn.Module,
    tokenizer=None,
    progress: bool = True,
    model_dir: str | os.PathLike | None = None,
    positions: str = "text",
) -> Covariance:
    """The text stack's covariance: one bundled with the model (``model_dir`` or an embedded
    model) if its fingerprint and position rule match, else the vocabulary-corpus one, computed
    once and cached."""
    stack = as_text_stack(text, tokenizer)
    fingerprint = stack.fingerprint()
    suffix = "" if positions == "text" else f"-{positions}"
    path = cache_dir() / f"{fingerprint[:32]}-vocab{suffix}-v{FORMAT_VERSION}.safetensors"
    candidates = ([Path(model_dir) / BUNDLED_FILENAME] if model_dir else []) + _bundled_covariances() + [path]
    for candidate in candidates:
        if candidate.is_file():
            try:
                covariance = Covariance.load(candidate)
            except KeylockedError:
                continue  # a corrupt cache entry is recomputed
            rule = covariance.info.get("token_rule", TOKEN_RULE)
            if covariance.text_encoder_fingerprint == fingerprint and rule == TOKEN_RULES[positions]:
                return covariance
    covariance = estimate_covariance(stack, progress=progress, positions=positions)
    try:
        covariance.save(path)
    except (OSError, KeylockedError):
        pass  # a read-only or full cache is not an error
    return covariance


def resolve_covariance(
    text: TextStack | nn.Module,
    tokenizer=None,
    path: str | os.PathLike | None = None,
    progress: bool = True,
    model_dir: str | os.PathLike | None = None,
    positions: str = "text",
) -> Covariance:
    """The covariance at ``path`` (checked against the text stack), or the default one over ``positions``."""
    stack = as_text_stack(text, tokenizer)
    if path is None:
        return default_covariance(stack, progress=progress, model_dir=model_dir, positions=positions)
    covariance = Covariance.load(path, dim=stack.d_text)
    fingerprint = stack.fingerprint()
    if covariance.text_encoder_fingerprint and covariance.text_encoder_fingerprint != fingerprint:
        raise KeylockedError(f"{path}: covariance was estimated for another text encoder")
    return covariance
