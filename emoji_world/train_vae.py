"""Train the emoji-64 VAE (AutoencoderKL, 64×64×3 <-> 16×16×4) on on-the-fly compositions.

    python -m emoji_world.train_vae --data data/emoji-world --output runs/emoji-64/vae --max_minutes 12

Trains on random 32×32 crops of the 64×64 compositions (the model is convolutional).
Loss: L1 + MSE reconstruction + a small KL term.  Checkpoints every few minutes to
``<output>/checkpoint/`` (safetensors + state.json) (``--resume`` continues); at the end the model is saved with
``save_pretrained`` to ``<output>/final`` with ``scaling_factor`` = 1 / std of the latents.

Decoder fine-tuning (the UNet's latent space stays fixed, so it can run during/after UNet training):

    python -m emoji_world.train_vae --init runs/emoji-64/vae/final --decoder_only \
        --output runs/emoji-64/vae_decoder --max_minutes 30
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .common import (
    VAE_CONFIGS,
    BatchSource,
    LossLog,
    autocast,
    config_name_of,
    load_checkpoint,
    model_config,
    parse_config,
    pick_device,
    recover_checkpoint,
    save_checkpoint,
    scheduled_lr,
    seed_everything,
    setup_device,
    training_sprites,
)


@dataclass
class VaeTrainConfig:
    data: Path = Path("data/emoji-world")
    output: Path = Path("runs/emoji-64/vae")
    batch_size: int = 32
    crop: int = 32  # train on random crops (fully convolutional; 4× cheaper than 64×64)
    lr: float = 1e-3
    kl_weight: float = 1e-6
    max_steps: int = 100_000
    max_minutes: float = 12.0
    checkpoint_minutes: float = 3.0
    seed: int = 0
    device: str = "auto"
    threads: int = 1
    resume: bool = False
    init: str = ""  # start from a saved VAE folder (e.g. runs/emoji-64/vae/final)
    decoder_only: bool = False  # fine-tune the decoder only: the latent space (and scaling_factor) stay fixed
    model_config: str = "emoji-64"  # a name in common.VAE_CONFIGS (ignored with --init)
    # anneal the learning rate linearly to 0 over the last minutes of this run's budget
    cooldown_minutes: float = 0.0
    mixed_precision: str = "no"  # "bf16": autocast (weights and optimizer stay fp32)
    compositor: str = "auto"  # "pil" (CPU), "torch" (on the device); auto: torch on CUDA
    prefetch: int = 0  # batches whose layouts a background thread samples ahead
    layout_workers: int = 0  # processes that sample layouts (and tokenize captions); torch compositor only
    compile: bool = False  # torch.compile the training forward
    log_every: int = 100  # steps per row of <output>/losses.csv (and per printed line)
    scale_batches: int = 8  # batches of 32 fresh compositions that measure the latent std (scaling_factor)

    def __post_init__(self):
        if self.decoder_only and not self.init:
            raise ValueError("--decoder_only needs --init <trained VAE folder> (the frozen encoder)")
        if self.batch_size < 1 or self.lr <= 0 or self.max_minutes <= 0:
            raise ValueError(
                f"bad VAE training config: batch_size={self.batch_size}, lr={self.lr}, max_minutes={self.max_minutes}"
            )
        if self.cooldown_minutes < 0 or self.log_every < 1:
            raise ValueError(
                f"bad VAE training config: cooldown_minutes={self.cooldown_minutes}, log_every={self.log_every}"
            )
        model_config(VAE_CONFIGS, self.model_config)
        autocast(torch.device("cpu"), self.mixed_precision)  # validates the name


@torch.no_grad()
def latent_std(vae, sprites, names, device, batches: int = 8, batch_size: int = 32, compositor: str = "auto") -> float:
    """Std of VAE latent samples over fresh compositions (for ``scaling_factor``), in fp32."""
    source = BatchSource(sprites, names, device, batch_size, seed=12345, compositor=compositor)
    values = []
    for i in range(batches):
        pixels, _ = source(i)
        values.append(vae.encode(pixels).latent_dist.sample().flatten())
    return float(torch.cat(values).std())


def train(cfg: VaeTrainConfig) -> Path:
    from diffusers import AutoencoderKL

    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    setup_device(device)
    sprites, names = training_sprites(cfg.data)
    config = model_config(VAE_CONFIGS, cfg.model_config)
    vae = (AutoencoderKL.from_pretrained(cfg.init) if cfg.init else AutoencoderKL(**config)).to(device)
    if cfg.decoder_only:  # frozen encoder: the UNet's latent space does not move
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0, fused=True if device.type == "cuda" else None)
    ckpt_path = recover_checkpoint(cfg.output / "checkpoint")
    step, elapsed = 0, 0.0
    if cfg.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, {"model": vae}, optimizer)
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed from {ckpt_path} at step {step} ({elapsed / 60:.1f} min)")

    def checkpoint():
        save_checkpoint(
            ckpt_path,
            {"model": vae},
            optimizer,
            {
                "format": "emoji-64-vae-train",
                "version": 2,
                "step": step,
                "elapsed": elapsed,
                "config": {k: v for k, v in vae.config.items() if not k.startswith("_")},
                "config_name": config_name_of(VAE_CONFIGS, dict(vae.config)) if cfg.init else cfg.model_config,
            },
        )

    def reconstruct(pixels):
        # encode, sample, decode; the loss in fp32 whatever the autocast dtype
        with torch.set_grad_enabled(not cfg.decoder_only):
            posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample.float()  # (B, 3, crop, crop)
        # reconstruction + small KL
        loss = (recon - pixels).abs().mean() + ((recon - pixels) ** 2).mean()
        if not cfg.decoder_only:
            loss = loss + cfg.kl_weight * posterior.kl().float().mean()
        return loss

    forward = torch.compile(reconstruct) if cfg.compile else reconstruct
    source = BatchSource(
        sprites,
        names,
        device,
        cfg.batch_size,
        cfg.seed,
        compositor=cfg.compositor,
        prefetch=cfg.prefetch,
        workers=cfg.layout_workers,
    )
    log = LossLog(cfg.output, resume=cfg.resume and step > 0, step=step)
    print(
        f"VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params ({cfg.model_config}), device {device}, "
        f"compositor {source.kind}, batch {cfg.batch_size}, crop {cfg.crop}, mixed precision {cfg.mixed_precision}",
        flush=True,
    )
    vae.train()
    start, last_ckpt, smooth = time.time() - elapsed, time.time(), None
    session_start, session_step0 = time.time(), step
    lr = cfg.lr
    bar = tqdm(initial=step, total=cfg.max_steps, mininterval=20, desc="vae")
    while step < cfg.max_steps and (time.time() - start) / 60 < cfg.max_minutes:
        # fresh compositions (captions unused)
        pixels, _ = source(step)
        if cfg.crop < pixels.shape[-1]:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            y, x = torch.randint(0, pixels.shape[-1] - cfg.crop + 1, (2,), generator=gen).tolist()
            pixels = pixels[:, :, y : y + cfg.crop, x : x + cfg.crop]  # (B, 3, crop, crop)
        if cfg.cooldown_minutes > 0:
            lr = scheduled_lr(cfg.lr, step, 0, cfg.max_minutes - (time.time() - start) / 60, cfg.cooldown_minutes)
            for group in optimizer.param_groups:
                group["lr"] = lr
        with autocast(device, cfg.mixed_precision):
            loss = forward(pixels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        log.add(loss)
        step += 1
        elapsed = time.time() - start
        bar.update(1)
        if step % cfg.log_every == 0:
            mean = log.write(step, lr, elapsed / 60)
            smooth = mean if smooth is None else 0.5 * smooth + 0.5 * mean
            rate = (time.time() - session_start) / max(1, step - session_step0)
            bar.set_postfix(loss=f"{smooth:.4f}", min=f"{elapsed / 60:.1f}", refresh=False)
            print(f"step {step} loss {mean:.4f} elapsed {elapsed / 60:.1f} min ({rate:.3f} s/step)", flush=True)
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    bar.close()
    source.close()
    log.write(step, lr, elapsed / 60)
    checkpoint()
    vae.eval()
    if cfg.decoder_only:
        std = 1.0 / vae.config.scaling_factor  # unchanged: the encoder was frozen
    else:
        std = latent_std(vae, sprites, names, device, batches=cfg.scale_batches, compositor=cfg.compositor)
        vae.register_to_config(scaling_factor=1.0 / std)
    final = cfg.output / "final"
    vae.save_pretrained(final)
    print(f"done: {step} steps, {elapsed / 60:.1f} min, latent std {std:.4f}, saved {final}", flush=True)
    return final


def main(argv: list[str] | None = None) -> None:
    train(parse_config(VaeTrainConfig, __doc__, argv))


if __name__ == "__main__":
    main()
