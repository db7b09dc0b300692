"""Image-text embedders for the alignment metrics.

``CLIPEmbedder``   a transformers CLIP model from a local folder (ViT-B/32, ViT-L/14: the field's
                   choices for real Stable Diffusion models).
``EmojiEvaluator`` our own LiT-style judge for the embedded emoji-64 world: a small CNN image tower
                   trained contrastively against the *frozen* all-MiniLM-L6-v2 sentence tower
                   (mean-pooled, L2-normalised) on emoji-world compositions, never on generated
                   images. Weights ship in ``keylocked/models/evaluator/``; trained by
                   ``python -m emoji_world.train_evaluator``; model card next to the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from ..base_model import KeylockedError
from ..io import atomic_path

EVALUATOR_DIR = Path(__file__).resolve().parent.parent / "models" / "evaluator"
EVALUATOR_FILENAME = "evaluator.safetensors"
EVALUATOR_FORMAT = "keylocked.emoji_evaluator"
EVALUATOR_VERSION = 1
IMAGE_SIZE = 64


class CLIPEmbedder:
    """transformers ``CLIPModel`` + ``CLIPProcessor`` loaded offline from ``local_dir``."""

    def __init__(self, local_dir: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import CLIPModel, CLIPProcessor

        local_dir = Path(local_dir)
        if not (local_dir / "config.json").is_file():
            raise KeylockedError(f"no CLIP model in {local_dir} (expected config.json, weights and processor files)")
        self.model = CLIPModel.from_pretrained(local_dir, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(local_dir, local_files_only=True)
        self.device, self.batch_size = torch.device(device), batch_size
        self.name = f"clip:{local_dir.name}"

    @staticmethod
    def _features(output) -> Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected feature
        return output if isinstance(output, Tensor) else output.pooler_output

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            inputs = self.processor(images=batch, return_tensors="pt").to(self.device)
            chunks.append(self._features(self.model.get_image_features(**inputs)).float().cpu())
        return torch.cat(chunks)  # (N, D)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.processor(
                text=texts[start : start + self.batch_size], padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            chunks.append(self._features(self.model.get_text_features(**inputs)).float().cpu())
        return torch.cat(chunks)  # (N, D)


# ---------------------------------------------------------------------------------------
# The emoji-world evaluator.


class ImageTower(nn.Module):
    """Small CNN: (B, 3, 64, 64) in [-1, 1] -> (B, embed_dim) unnormalised."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), embed_dim: int = 384):
        super().__init__()
        self.widths, self.embed_dim = tuple(widths), embed_dim
        # stem 64 -> 32, then each stage halves the resolution: 32 -> 16 -> 8 -> 4
        layers: list[nn.Module] = [
            nn.Conv2d(3, widths[0], 4, stride=2, padding=1),
            nn.GroupNorm(8, widths[0]),
            nn.SiLU(),
        ]
        for before, after in zip(widths[:-1], widths[1:]):
            layers += [
                nn.Conv2d(before, after, 3, stride=2, padding=1),
                nn.GroupNorm(8, after),
                nn.SiLU(),
                nn.Conv2d(after, after, 3, padding=1),
                nn.GroupNorm(8, after),
                nn.SiLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1] * 2, embed_dim)  # mean- and max-pooled features

    def forward(self, pixels: Tensor) -> Tensor:
        features = self.features(pixels)  # (B, C, 4, 4)
        pooled = torch.cat([features.mean((2, 3)), features.amax((2, 3))], dim=1)  # (B, 2C)
        return self.head(pooled)  # (B, embed_dim)


def images_to_pixels(images: list[Image.Image], size: int = IMAGE_SIZE) -> Tensor:
    """(N, 3, size, size) in [-1, 1]; any mode/size in (transparency on white)."""
    arrays = []
    for image in images:
        if image.mode in ("RGBA", "LA", "P"):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            canvas.alpha_composite(rgba)
            image = canvas
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


class MiniLMTextTower:
    """Frozen all-MiniLM-L6-v2 sentence embeddings: attention-masked mean of the last hidden states."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, device: str | torch.device = "cpu"):
        from transformers import BertModel, BertTokenizer

        from ..models import text_encoder_dir

        folder = text_encoder_dir()
        self.tokenizer = BertTokenizer.from_pretrained(folder)
        self.model = BertModel.from_pretrained(folder).to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, texts: list[str], batch_size: int = 256) -> Tensor:
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**tokens).last_hidden_state  # (B, T, d)
            mask = tokens.attention_mask.unsqueeze(-1).float()  # (B, T, 1)
            chunks.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).float().cpu())  # (B, d)
        return F.normalize(torch.cat(chunks), dim=-1)  # (N, d)


class EmojiEvaluator:
    """LiT-style judge for the emoji world: trained CNN image tower, frozen MiniLM text tower."""

    def __init__(
        self,
        tower: ImageTower,
        info: dict | None = None,
        device: str | torch.device = "cpu",
        text_tower: MiniLMTextTower | None = None,
    ):
        self.device = torch.device(device)
        self.tower = tower.to(self.device).eval()
        self.info = info or {}
        self._text_tower = text_tower
        self.name = f"emoji-evaluator-v{EVALUATOR_VERSION} (LiT CNN / frozen all-MiniLM-L6-v2)"

    @property
    def text_tower(self) -> MiniLMTextTower:
        if self._text_tower is None:
            self._text_tower = MiniLMTextTower(self.device)
        return self._text_tower

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> EmojiEvaluator:
        """The shipped evaluator (``keylocked/models/evaluator/``) or a file written by ``save``."""
        path = Path(path) if path is not None else EVALUATOR_DIR / EVALUATOR_FILENAME
        if path.is_dir():
            path = path / EVALUATOR_FILENAME
        if not path.is_file():
            raise KeylockedError(
                f"evaluator weights not found: {path} (train them: python -m emoji_world.train_evaluator)"
            )
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != EVALUATOR_FORMAT:
            raise KeylockedError(f"{path}: not an emoji evaluator file (format={metadata.get('format')!r})")
        info = json.loads(metadata.get("info", "{}"))
        tower = ImageTower(tuple(json.loads(metadata["widths"])), int(metadata["embed_dim"]))
        tower.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        return cls(tower, info, device)

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
        path = Path(path)
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.tower.state_dict().items()}
        metadata = {
            "format": EVALUATOR_FORMAT,
            "format_version": str(EVALUATOR_VERSION),
            "widths": json.dumps(list(self.tower.widths)),
            "embed_dim": str(self.tower.embed_dim),
            "text_tower": MiniLMTextTower.name,
            "info": json.dumps(self.info, sort_keys=True),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image], batch_size: int = 256) -> Tensor:
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = images_to_pixels(images[start : start + batch_size]).to(self.device)
            chunks.append(F.normalize(self.tower(pixels).float(), dim=-1).cpu())
        return torch.cat(chunks)  # (N, D)

    def embed_texts(self, texts: list[str]) -> Tensor:
        return self.text_tower(texts)  # (N, D)
