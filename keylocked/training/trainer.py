"""Perfusion concept training: learn a token embedding and one value target per layer."""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import DDPMScheduler
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..base_model import (
    KeylockedError,
    base_model_fingerprint,
    encode_prompts,
    single_token_id,
)
from ..concept import Concept
from ..covariance import pipeline_folder, resolve_covariance
from ..io import atomic_path, atomic_write_text
from ..layers import ConceptSlot
from ..loading import install_keylocked_layers, uninstall_keylocked_layers, value_layers
from ..quiet import LOADING_LOGS, quiet
from ..tokens import TokenizerSnapshot, add_tokens, check_new_token, restore_vocabulary
from .config import TrainConfig
from .data import images_to_tensor, load_instance_images, prompts_for, sample_batch, step_generator
from .masks import AttentionMapProbe, load_user_masks, probing_cross_attention

logger = logging.getLogger(__name__)
CONCEPT_FILENAME = "concept.safetensors"


class ConceptParameters(nn.Module):
    """What training learns (embedding, value targets) and tracks (i* EMA, i*_super)."""

    def __init__(self, token_embedding: Tensor, superclass_input: Tensor, value_targets: dict[str, Tensor]):
        super().__init__()
        self.token_embedding = nn.Parameter(token_embedding.detach().clone().float())  # (d_embed,)
        self.value_targets = nn.ParameterDict(
            {name.replace(".", "/"): nn.Parameter(t.detach().clone().float()) for name, t in value_targets.items()}
        )  # layer path -> (out,)
        self.register_buffer("concept_input", superclass_input.detach().clone().float())  # (d_text,) i*
        self.register_buffer("superclass_input", superclass_input.detach().clone().float())  # (d_text,)

    def value_target(self, layer_name: str) -> nn.Parameter:
        return self.value_targets[layer_name.replace(".", "/")]


def _resolution(config: TrainConfig, pipe) -> int:
    if config.resolution is not None:
        return config.resolution
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 1
    return int(pipe.unet.config.sample_size) * scale


def freeze_and_place(pipe, device: torch.device, mixed_precision: str) -> torch.dtype:
    """Freeze every base model and move it to ``device``; UNet/VAE in the mixed-precision dtype (returned).

    The text encoder stays fp32: gradients flow through it into the new token's embedding.
    """
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    for module in (pipe.text_encoder, pipe.unet, pipe.vae):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    pipe.text_encoder.to(device)
    with quiet(LOADING_LOGS):  # diffusers' "modules that should be kept in float32: []" note
        pipe.unet.to(device, weight_dtype)
        if pipe.vae is not None:
            pipe.vae.to(device, weight_dtype)
    return weight_dtype


def _latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1])) if checkpoints else None


def _masked_mse(prediction: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """Noise-prediction MSE, weighted per image by a soft object mask (normalised per image)."""
    error = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(1, keepdim=True)  # (B, 1, h, w)
    if mask is None:
        return error.mean()
    weights = mask / mask.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)  # (B, 1, h, w), sums to 1 per image
    return (error * weights).sum(dim=(1, 2, 3)).mean()


def train_concept(config: TrainConfig, pipe=None) -> Path:
    """Train one Perfusion concept; returns the path of the saved concept file.

    ``pipe`` may be given to reuse a loaded pipeline; it is restored to stock afterwards.
    """
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
    )
    if pipe is None:
        from ..models import load_pipeline

        pipe = load_pipeline(config.pretrained_model_name_or_path)
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae

    # -- validate every input before touching the model -------------------------------------
    check_new_token(tokenizer, config.placeholder_token)
    superclass_id = single_token_id(tokenizer, config.superclass_token)
    resolution = _resolution(config, pipe)
    images = load_instance_images(config.instance_data_dir, resolution)
    instance = images_to_tensor(images)  # (N, 3, R, R)
    if config.mask not in ("attention", "none"):
        instance = torch.cat([instance, load_user_masks(config.mask, len(images), resolution)], dim=1)  # (N, 4, R, R)
    resume_dir = None
    if config.resume_from_checkpoint:
        resume_dir = (
            _latest_checkpoint(output_dir)
            if config.resume_from_checkpoint == "latest"
            else Path(config.resume_from_checkpoint)
        )
        if config.resume_from_checkpoint != "latest" and not (resume_dir and resume_dir.is_dir()):
            raise KeylockedError(f"checkpoint not found: {config.resume_from_checkpoint}")
    covariance = resolve_covariance(
        text_encoder, tokenizer, config.covariance, progress=config.progress, model_dir=pipeline_folder(pipe)
    )
    snapshot = TokenizerSnapshot(tokenizer)
    fingerprint = base_model_fingerprint(text_encoder, unet, snapshot.vocab_size)

    device = accelerator.device
    weight_dtype = freeze_and_place(pipe, device, config.mixed_precision)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # -- the new token, hooked so that only its embedding row is trained ---------------------
    embedding_table = text_encoder.get_input_embeddings()
    superclass_embedding = embedding_table.weight[superclass_id].detach().clone()
    placeholder_id = add_tokens(tokenizer, text_encoder, {config.placeholder_token: superclass_embedding})[
        config.placeholder_token
    ]
    embedding_table = text_encoder.get_input_embeddings()
    hooks = []
    context = None
    try:
        # i*_super: mean encoding of the super-category word in the first batch's prompts
        first = step_generator(config.seed, 0)
        _, templates = sample_batch(instance, config.effective_batch_size, first, num_templates=len(config.templates))
        with torch.no_grad():
            encodings, ids = encode_prompts(
                text_encoder, tokenizer, prompts_for(templates, config.superclass_token, config.templates)
            )
            superclass_input = encodings[ids == superclass_id].float().mean(0)  # (d_text,)
        context = install_keylocked_layers(unet, covariance.inverse.to(device))
        layers = value_layers(unet)
        initial_values = {
            name: F.linear(superclass_input.to(layer.weight), layer.weight).float() for name, layer in layers.items()
        }
        params = ConceptParameters(superclass_embedding, superclass_input, initial_values).to(device)
        token = config.placeholder_token
        context.concepts[token] = ConceptSlot(
            params.concept_input, params.superclass_input, config.train_beta, config.train_tau
        )
        context.active = {token}
        for name, layer in layers.items():
            layer.value_targets[token] = params.value_target(name)

        def replace_placeholder(module, inputs, output):
            is_placeholder = (inputs[0] == placeholder_id).unsqueeze(-1)  # (B, T, 1)
            return torch.where(is_placeholder, params.token_embedding.to(output.dtype), output)

        hooks.append(embedding_table.register_forward_hook(replace_placeholder))

        optimizer = torch.optim.AdamW(
            [
                {"params": [params.token_embedding], "lr": config.learning_rate_embedding},
                {"params": list(params.value_targets.parameters()), "lr": config.learning_rate_values},
            ],
            weight_decay=config.adam_weight_decay,
        )
        optimizer = accelerator.prepare(optimizer)
        accelerator.register_for_checkpointing(params)

        global_step = 0
        if resume_dir is not None:
            accelerator.load_state(str(resume_dir))
            global_step = int(json.loads((resume_dir / "trainer_state.json").read_text())["global_step"])
            logger.info("resumed from %s at step %d", resume_dir, global_step)

        probe = AttentionMapProbe()
        use_attention_mask = config.mask == "attention"
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        progress = tqdm(
            total=config.max_train_steps, initial=global_step, desc="train", disable=not config.progress, unit="step"
        )
        started, start_step = time.perf_counter(), global_step
        while global_step < config.max_train_steps:
            for micro in range(config.gradient_accumulation_steps):
                generator = step_generator(config.seed, global_step * config.gradient_accumulation_steps + micro + 1)
                with accelerator.accumulate(params), accelerator.autocast():
                    loss = _training_step(
                        config,
                        instance,
                        generator,
                        tokenizer,
                        text_encoder,
                        unet,
                        vae,
                        noise_scheduler,
                        params,
                        context,
                        placeholder_id,
                        probe,
                        use_attention_mask,
                        vae_scale,
                        device,
                        weight_dtype,
                    )
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            global_step += 1
            progress.update(1)
            progress.set_postfix(
                loss=f"{loss.item():.4f}",
                s_per_step=f"{(time.perf_counter() - started) / (global_step - start_step):.2f}",
            )
            if global_step % config.checkpointing_steps == 0 or global_step == config.max_train_steps:
                _save_checkpoint(
                    accelerator,
                    config,
                    output_dir,
                    global_step,
                    params,
                    layers,
                    fingerprint,
                    covariance.sha256,
                    superclass_id,
                )
            if config.validation_prompt and (
                global_step % config.validation_steps == 0 or global_step == config.max_train_steps
            ):
                _validate(config, pipe, context, token, output_dir, global_step)
        progress.close()
        concept = _concept_from(params, config, layers, fingerprint, covariance.sha256, global_step)
        path = concept.save(output_dir / CONCEPT_FILENAME, dtype=_concept_dtype(config))
        logger.info("saved %s (%d bytes)", path, path.stat().st_size)
        return path
    finally:
        for hook in hooks:
            hook.remove()
        uninstall_keylocked_layers(unet)
        restore_vocabulary(tokenizer, text_encoder, snapshot)


def noised_batch(config, instance, generator, vae, noise_scheduler, device, weight_dtype):
    """Draw a micro-batch and noise it; shared with the baselines so every method sees the same batches.

    Returns (latents, noisy_latents, timesteps, target, template indices, user mask or None).
    """
    batch, templates = sample_batch(
        instance, config.train_batch_size, generator, flip=config.random_flip, num_templates=len(config.templates)
    )
    pixels, user_mask = batch[:, :3], (batch[:, 3:] if batch.shape[1] == 4 else None)
    # latents and noise
    with torch.no_grad():
        pixels = pixels.to(device, weight_dtype)
        if vae is not None:
            posterior = vae.encode(pixels).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(
                posterior.mean
            )
            latents = latents * vae.config.scaling_factor
        else:
            latents = pixels
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
    ).to(device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise KeylockedError(f"unsupported prediction_type {noise_scheduler.config.prediction_type!r}")
    return latents, noisy_latents, timesteps, target, templates, user_mask


def _training_step(
    config,
    instance,
    generator,
    tokenizer,
    text_encoder,
    unet,
    vae,
    noise_scheduler,
    params,
    context,
    placeholder_id,
    probe,
    use_attention_mask,
    vae_scale,
    device,
    weight_dtype,
) -> Tensor:
    """One micro-batch: encode, noise, predict, masked loss; updates the i* EMA."""
    latents, noisy_latents, timesteps, target, templates, user_mask = noised_batch(
        config, instance, generator, vae, noise_scheduler, device, weight_dtype
    )
    # text: the concept token's encodings drive the i* EMA (the gate's anchor)
    encodings, ids = encode_prompts(
        text_encoder, tokenizer, prompts_for(templates, config.placeholder_token, config.templates)
    )
    is_placeholder = ids == placeholder_id  # (B, T)
    with torch.no_grad():
        observed = encodings[is_placeholder].float().mean(0)  # (d_text,)
        params.concept_input.mul_(config.ema_decay).add_(observed, alpha=1 - config.ema_decay)
    context.touch()
    # UNet prediction, reading the concept token's attention map on the way when masking
    with probing_cross_attention(unet, probe) if use_attention_mask else nullcontext():
        probe.reset(is_placeholder)
        prediction = unet(noisy_latents, timesteps, encodings.to(weight_dtype)).sample
    mask = None
    if use_attention_mask:
        mask = probe.object_mask(*latents.shape[-2:])
    elif user_mask is not None:
        mask = F.interpolate(
            user_mask.to(device, torch.float32), size=latents.shape[-2:], mode="bilinear", align_corners=False
        )
    return _masked_mse(prediction, target, mask)


def _concept_dtype(config: TrainConfig) -> torch.dtype:
    return torch.float16 if config.concept_dtype == "fp16" else torch.float32


def _concept_from(
    params: ConceptParameters, config: TrainConfig, layers, fingerprint: str, covariance_sha: str, step: int
) -> Concept:
    return Concept(
        placeholder_token=config.placeholder_token,
        superclass_token=config.superclass_token,
        token_embedding=params.token_embedding.detach().cpu(),
        concept_input=params.concept_input.detach().cpu(),
        superclass_input=params.superclass_input.detach().cpu(),
        value_targets={name: params.value_target(name).detach().cpu() for name in layers},
        base_model_fingerprint=fingerprint,
        covariance_sha256=covariance_sha,
        train_beta=config.train_beta,
        train_temperature=config.train_tau,
        beta=config.inference_beta,
        temperature=config.inference_tau,
        training={
            "steps": step,
            "effective_batch_size": config.effective_batch_size,
            "learning_rate_embedding": config.learning_rate_embedding,
            "learning_rate_values": config.learning_rate_values,
            "mask": config.mask if config.mask in ("attention", "none") else "user",
            "seed": config.seed,
            "resolution": config.resolution,
            "base_model": str(config.pretrained_model_name_or_path),
        },
    )


def _save_checkpoint(
    accelerator, config, output_dir, step, params, layers, fingerprint, covariance_sha, superclass_id
) -> None:
    """checkpoint-N/: accelerate state (resume) + a usable concept file (early checkpoints are often best)."""
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    accelerator.save_state(str(partial))
    atomic_write_text(
        partial / "trainer_state.json",
        json.dumps({"global_step": step, "config": config.to_dict()}, indent=2, sort_keys=True),
    )
    _concept_from(params, config, layers, fingerprint, covariance_sha, step).save(
        partial / CONCEPT_FILENAME, dtype=_concept_dtype(config)
    )
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    if config.checkpoints_total_limit:
        checkpoints = sorted(
            (p for p in output_dir.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[-1])
        )
        for old in checkpoints[: -config.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def _validate(config: TrainConfig, pipe, context, token: str, output_dir: Path, step: int) -> None:
    """Generate validation images with the inference gate settings; saves validation/step-N.png."""
    from ..visual import image_grid

    slot = context.concepts[token]
    training_gate = (slot.beta, slot.temperature)
    slot.beta, slot.temperature = config.inference_beta, config.inference_tau
    context.touch()
    try:
        generator = torch.Generator(pipe.unet.device).manual_seed(config.seed)
        images = pipe(
            [config.validation_prompt] * config.num_validation_images,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            generator=generator,
        ).images
    finally:
        slot.beta, slot.temperature = training_gate
        context.touch()
    with atomic_path(output_dir / "validation" / f"step-{step}.png") as tmp:
        image_grid(images, columns=min(4, len(images))).save(tmp, format="PNG")
