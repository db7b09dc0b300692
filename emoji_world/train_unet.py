"""Train the emoji-64 UNet (latent diffusion, epsilon prediction) on on-the-fly compositions.

    python -m emoji_world.train_unet --data data/emoji-world --vae runs/emoji-64/vae/final \
        --output runs/emoji-64/unet --max_minutes 110 --threads 1

Each step: fresh compositions -> VAE latents (×scaling_factor) -> DDPM noise at a uniform
timestep -> UNet predicts the noise, conditioned on MiniLM encodings of the captions
(10% dropped to "" for classifier-free guidance).  An EMA of the weights is kept and is what
``emoji_world.export`` ships.  Checkpoints every few minutes; ``--resume`` continues.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .common import (
    SCHEDULER_CONFIG,
    UNET_CONFIGS,
    BatchSource,
    CaptionEncoder,
    LossLog,
    autocast,
    config_name_of,
    load_checkpoint,
    load_text_encoder,
    model_config,
    parse_config,
    pick_device,
    read_checkpoint_state,
    recover_checkpoint,
    save_checkpoint,
    scheduled_lr,
    seed_everything,
    setup_device,
    training_sprites,
)


@dataclass
class UnetTrainConfig:
    data: Path = Path("data/emoji-world")
    vae: Path = Path("runs/emoji-64/vae/final")
    output: Path = Path("runs/emoji-64/unet")
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    p_drop_caption: float = 0.1
    p_pair: float = 0.15
    max_steps: int = 1_000_000
    max_minutes: float = 110.0
    # anneal the learning rate linearly to 0 over the last minutes of this run's budget: a short
    # cool-down buys a lower loss than the same minutes at the peak rate
    cooldown_minutes: float = 0.0
    checkpoint_minutes: float = 5.0
    seed: int = 0
    device: str = "auto"
    threads: int = 1
    resume: bool = False
    # warm start from a shipped pipeline folder (fp16 EMA weights; fresh optimizer) when no
    # checkpoint is at hand, e.g. on a new machine: keylocked/models/emoji-64
    init_from: Path | None = None
    model_config: str = "emoji-64"  # a name in common.UNET_CONFIGS (a resumed checkpoint keeps its own)
    mixed_precision: str = "no"  # "bf16": autocast (weights, optimizer and EMA stay fp32)
    compositor: str = "auto"  # "pil" (CPU), "torch" (on the device); auto: torch on CUDA
    prefetch: int = 0  # batches whose layouts a background thread samples ahead
    layout_workers: int = 0  # processes that sample layouts (and tokenize captions); torch compositor only
    compile: bool = False  # torch.compile the UNet's training forward
    log_every: int = 100  # steps per row of <output>/losses.csv (and per printed line)

    def __post_init__(self):
        if self.batch_size < 1 or self.lr <= 0 or not 0 <= self.p_drop_caption < 1 or not 0 < self.ema_decay < 1:
            raise ValueError(
                f"bad UNet training config: batch_size={self.batch_size}, lr={self.lr}, "
                f"p_drop_caption={self.p_drop_caption}, ema_decay={self.ema_decay}"
            )
        if self.cooldown_minutes < 0:
            raise ValueError(f"cooldown_minutes must be >= 0, got {self.cooldown_minutes}")
        if self.init_from is not None and not (Path(self.init_from) / "unet").is_dir():
            raise ValueError(f"--init_from {self.init_from}: not an exported emoji-64 folder (no unet/ inside)")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        model_config(UNET_CONFIGS, self.model_config)
        autocast(torch.device("cpu"), self.mixed_precision)  # validates the name


def learning_rate(cfg: UnetTrainConfig, step: int, minutes_left: float) -> float:
    """Linear warm-up over ``warmup_steps``, then constant, then (with ``cooldown_minutes``)
    linear decay to 0 as this run's time budget runs out."""
    return scheduled_lr(cfg.lr, step, cfg.warmup_steps, minutes_left, cfg.cooldown_minutes)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # one multi-tensor kernel instead of one per parameter
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def train(cfg: UnetTrainConfig) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    setup_device(device)
    sprites, names = training_sprites(cfg.data)
    tokenizer, text_encoder = load_text_encoder()
    encode = CaptionEncoder(tokenizer, text_encoder.to(device))
    vae = AutoencoderKL.from_pretrained(cfg.vae).to(device).eval().requires_grad_(False)
    scaling = vae.config.scaling_factor
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    ckpt_path = recover_checkpoint(cfg.output / "checkpoint")
    resuming = cfg.resume and ckpt_path.exists()
    config_name = cfg.model_config
    if resuming:  # the checkpoint's own architecture, whatever --model_config says
        saved = read_checkpoint_state(ckpt_path)
        config, config_name = saved["config"], saved.get("config_name", "emoji-64")
    elif cfg.init_from is not None:
        config = dict(UNet2DConditionModel.load_config(Path(cfg.init_from) / "unet"))
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        config_name = config_name_of(UNET_CONFIGS, config)
    else:
        config = model_config(UNET_CONFIGS, cfg.model_config)
    unet = UNet2DConditionModel(**config).to(device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=cfg.lr, weight_decay=1e-2, fused=True if device.type == "cuda" else None
    )
    step, elapsed = 0, 0.0
    if resuming:
        state = load_checkpoint(ckpt_path, {"model": unet, "ema": ema}, optimizer)
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed from {ckpt_path} at step {step} ({elapsed / 60:.1f} min)", flush=True)
    elif cfg.init_from is not None:
        shipped = UNet2DConditionModel.from_pretrained(Path(cfg.init_from) / "unet", torch_dtype=torch.float32)
        unet.load_state_dict(shipped.state_dict())
        ema.load_state_dict(shipped.state_dict())
        info_path = Path(cfg.init_from) / "export_info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        step, elapsed = int(info.get("unet_steps", 0)), 60.0 * float(info.get("unet_train_minutes", 0.0))
        print(f"warm start from {cfg.init_from} (step {step}; fresh optimizer)", flush=True)
    print(
        f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, {len(set(names))} concepts, "
        f"{len(sprites)} sprites, device {device}, threads {cfg.threads}, config {config_name}, "
        f"batch {cfg.batch_size}, mixed precision {cfg.mixed_precision}",
        flush=True,
    )

    def checkpoint():
        save_checkpoint(
            ckpt_path,
            {"model": unet, "ema": ema},
            optimizer,
            {
                "format": "emoji-64-unet-train",
                "version": 2,
                "step": step,
                "elapsed": elapsed,
                "config": config,
                "config_name": config_name,
                "vae": str(cfg.vae),
            },
        )

    source = BatchSource(
        sprites,
        names,
        device,
        cfg.batch_size,
        cfg.seed,
        cfg.p_drop_caption,
        cfg.p_pair,
        compositor=cfg.compositor,
        prefetch=cfg.prefetch,
        workers=cfg.layout_workers,
    )
    log = LossLog(cfg.output, resume=resuming, step=step)
    forward = torch.compile(unet) if cfg.compile else unet  # same parameters; state dicts from ``unet``
    unet.train()
    start, last_ckpt, smooth = time.time() - elapsed, time.time(), None
    session_start, session_step0 = time.time(), step
    lr = learning_rate(cfg, step, cfg.max_minutes)
    bar = tqdm(initial=step, total=cfg.max_steps, mininterval=30, desc="unet")
    while step < cfg.max_steps and (time.time() - session_start) / 60 < cfg.max_minutes:
        # fresh compositions and their caption encodings (10% dropped to "")
        pixels, captions = source(step)
        cond = encode(captions, source.token_ids).to(device)  # (B, 32, 384), fp32 as at inference
        with torch.no_grad(), autocast(device, cfg.mixed_precision):
            latents = vae.encode(pixels).latent_dist.sample().float() * scaling  # (B, 4, 16, 16)
        # forward diffusion at uniform timesteps
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        # epsilon prediction loss (in fp32)
        with autocast(device, cfg.mixed_precision):
            prediction = forward(noisy, t, cond).sample
        loss = F.mse_loss(prediction.float(), noise)
        minutes_left = cfg.max_minutes - (time.time() - session_start) / 60
        lr = learning_rate(cfg, step, minutes_left)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, unet, min(cfg.ema_decay, (1 + step) / (10 + step)))
        log.add(loss)
        step += 1
        elapsed = time.time() - start
        bar.update(1)
        if step % cfg.log_every == 0:
            mean = log.write(step, lr, elapsed / 60)
            smooth = mean if smooth is None else 0.5 * smooth + 0.5 * mean
            bar.set_postfix(loss=f"{smooth:.4f}", min=f"{elapsed / 60:.1f}", refresh=False)
            rate = (time.time() - session_start) / max(1, step - session_step0)
            print(
                f"step {step} loss {mean:.4f} elapsed {elapsed / 60:.1f} min ({rate:.3f} s/step, "
                f"{len(encode.cache)} cached captions)",
                flush=True,
            )
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    bar.close()
    source.close()
    log.write(step, lr, elapsed / 60)
    checkpoint()
    print(f"done: {step} steps, {elapsed / 60:.1f} min total", flush=True)


def main(argv: list[str] | None = None) -> None:
    train(parse_config(UnetTrainConfig, __doc__, argv))


if __name__ == "__main__":
    main()
