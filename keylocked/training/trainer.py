"""One training loop for every method, resumable from checkpoints that hold only JSON and safetensors.

Stages: check the output folder and lock it -> check every input -> place the frozen model ->
the method installs what it trains -> the loop (the same batches for every method) -> save.
``checkpoint-N/`` holds ``trainer_state.json`` (step, config, run identity, optimizer
hyperparameters), ``trainable.safetensors``, ``optimizer.safetensors`` and the method's usable
output; resuming reads nothing else, so a checkpoint folder can never run code.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..base_model import KeylockedError
from ..io import atomic_path, atomic_write_text, read_safetensors_header, save_safetensors
from ..loading import pipeline_fingerprint
from ..personalizations import CONCEPT_FILENAME, OUTPUT_FILENAMES
from ..quiet import LOADING_LOGS, quiet
from ..text_stack import text_stack
from .config import TrainConfig
from .data import images_to_tensor, load_instance_images, prompts_for, sample_batch, step_generator
from .latents import latent_encoder
from .masks import AttentionMapProbe, load_user_masks, probing_cross_attention
from .methods import METHODS, BaselineOptions, Setup, TrainingMethod
from .optimizer_state import load_optimizer_state, optimizer_state_tensors

logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "keylocked.checkpoint"
CHECKPOINT_VERSION = 1
STATE_FILENAME = "trainer_state.json"
TRAINABLE_FILENAME = "trainable.safetensors"
OPTIMIZER_FILENAME = "optimizer.safetensors"
LOCK_FILENAME = ".keylocked.lock"


def train(config: TrainConfig, method: str = "perfusion", pipe=None, options: BaselineOptions | None = None) -> Path:
    """Train one concept with ``method``; returns the saved file (a concept file or a baseline's weights).

    ``pipe`` may be given to reuse a loaded pipeline; it is handed back as it was (concepts the
    user had loaded stay loaded).
    """
    if method not in METHODS:
        raise KeylockedError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    runner = METHODS[method](config, options or BaselineOptions())
    output_dir = Path(config.output_dir)
    with locked_output_dir(output_dir):
        previous = previous_outputs(output_dir)
        if previous and not (config.overwrite or config.resume_from_checkpoint):
            names = ", ".join(p.name for p in previous[:4]) + (", ..." if len(previous) > 4 else "")
            raise KeylockedError(
                f"{output_dir} holds another run's outputs ({names}); pass --overwrite to replace them, "
                "--resume_from_checkpoint latest to continue that run, or choose another --output_dir"
            )
        resume_dir = _resume_dir(config, output_dir)
        if previous and config.resume_from_checkpoint and resume_dir is None:
            raise KeylockedError(
                f"{output_dir} holds another run's outputs but no checkpoint to resume; use --overwrite"
            )
        if pipe is None:
            from ..models import load_pipeline

            pipe = load_pipeline(config.pretrained_model_name_or_path)
        return _train(config, runner, pipe, output_dir, resume_dir, previous)


def train_concept(config: TrainConfig, pipe=None) -> Path:
    """Train one Perfusion concept; returns the path of the saved concept file."""
    return train(config, "perfusion", pipe=pipe)


# ---------------------------------------------------------------------------------------
# The output folder: checked, locked, and never mixed between runs.


@contextlib.contextmanager
def locked_output_dir(output_dir: Path) -> Iterator[None]:
    """Create and lock ``output_dir`` for one run (a second concurrent run fails at once)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise KeylockedError(f"output_dir {output_dir} is a file; give a folder")
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(output_dir / LOCK_FILENAME, "a")  # noqa: SIM115 (held for the whole run)
    except OSError as error:
        raise KeylockedError(f"output_dir {output_dir} is not writable ({error.strerror or error})") from error
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KeylockedError(
                f"output_dir {output_dir} is in use by another keylocked run; wait for it or choose another folder"
            ) from None
        with _writing(output_dir):  # a folder we may create files in, but not write to (read-only mount)
            probe = output_dir / f".keylocked-write-test-{id(handle)}"
            probe.write_bytes(b"")
            probe.unlink()
        yield
    except BaseException:
        if created:  # a run that failed before writing anything leaves no folder behind
            (output_dir / LOCK_FILENAME).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                output_dir.rmdir()  # only if empty
        raise
    finally:
        handle.close()  # releases the lock


def previous_outputs(output_dir: Path) -> list[Path]:
    """What an earlier run left in ``output_dir``: its outputs, checkpoints and validation images."""
    return sorted(
        p
        for p in output_dir.iterdir()
        if p.name in OUTPUT_FILENAMES
        or p.name == "validation"
        or (p.name.startswith(("checkpoint-", ".checkpoint-")) and p.is_dir())
    )


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _writing(where: Path) -> Iterator[None]:
    """A write that fails (disk full, read-only) becomes one clear error; callers clean up partial files."""
    try:
        yield
    except OSError as error:
        if isinstance(error, KeylockedError):
            raise
        reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise KeylockedError(f"cannot write to {where}: {reason}; nothing partial was kept") from error


# ---------------------------------------------------------------------------------------
# Checkpoints: JSON + safetensors only.


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _resume_dir(config: TrainConfig, output_dir: Path) -> Path | None:
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        checkpoints = _checkpoints(output_dir)
        if not checkpoints:
            logger.info("no checkpoint in %s; starting from step 0", output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(config.resume_from_checkpoint)
    if not path.is_dir():
        raise KeylockedError(f"checkpoint not found: {path}")
    return path


def _run_identity(runner: TrainingMethod, fingerprint: str) -> dict[str, str]:
    """What makes a checkpoint resumable by this run (shapes are compared once the trainables exist)."""
    return {
        "method": runner.name,
        "token": runner.prompt_phrase,
        "base_model_fingerprint": fingerprint,
        "covariance_sha256": runner.covariance_sha256,
    }


def read_checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint, checked for format; never executes anything."""
    path = checkpoint / STATE_FILENAME
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeylockedError(f"{checkpoint}: not a keylocked checkpoint ({STATE_FILENAME} missing)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KeylockedError(f"{path}: unreadable checkpoint state ({error})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise KeylockedError(f"{checkpoint}: not a keylocked checkpoint (written by another version or tool)")
    if state.get("format_version") != CHECKPOINT_VERSION:
        raise KeylockedError(
            f"{checkpoint}: checkpoint format version {state.get('format_version')!r} is not supported"
        )
    for key, kind in (("global_step", int), ("identity", dict), ("trainables", dict), ("param_groups", list)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise KeylockedError(f"{checkpoint}: checkpoint state lacks a valid {key!r}")
    return state


def _check_same_run(checkpoint: Path, state: dict[str, Any], identity: dict[str, str]) -> None:
    for key, expected in identity.items():
        recorded = state["identity"].get(key)
        if recorded != expected:
            raise KeylockedError(
                f"{checkpoint} is of another run ({key} {str(recorded)[:24]!r}, this run {str(expected)[:24]!r}); "
                "resume it with its own settings, or start fresh with --overwrite"
            )


def _check_shapes(checkpoint: Path, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    expected = {name: list(t.shape) for name, t in tensors.items()}
    if state["trainables"] != expected:
        raise KeylockedError(f"{checkpoint}: its trainable tensors do not match this run's (names or shapes differ)")
    header = read_safetensors_header(checkpoint / TRAINABLE_FILENAME, "checkpoint trainables")
    if {name: list(info.shape) for name, info in header.tensors.items()} != expected:
        raise KeylockedError(f"{checkpoint}: {TRAINABLE_FILENAME} does not hold this run's trainables")
    read_safetensors_header(checkpoint / OPTIMIZER_FILENAME, "checkpoint optimizer state")


def _load_optimizer_state(checkpoint: Path, optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    try:
        load_optimizer_state(optimizer, load_file(str(checkpoint / OPTIMIZER_FILENAME)), groups)
    except ValueError as error:
        raise KeylockedError(f"{checkpoint}: {error} (this run's optimizer)") from error


def _save_checkpoint(
    output_dir: Path,
    step: int,
    runner: TrainingMethod,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    config: TrainConfig,
    identity: dict[str, str],
    info: dict[str, Any],
) -> None:
    """checkpoint-N/: resumable state + the usable output (early checkpoints are often best)."""
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with _writing(output_dir):
            partial.mkdir()
            tensors = runner.state()
            trainables = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
            save_safetensors(trainables, partial / TRAINABLE_FILENAME, {})
            optimizer_tensors, groups = optimizer_state_tensors(optimizer)
            save_safetensors(optimizer_tensors, partial / OPTIMIZER_FILENAME, {})
            runner.save(partial, step, info)
            state = {
                "format": CHECKPOINT_FORMAT,
                "format_version": CHECKPOINT_VERSION,
                "global_step": step,
                "identity": identity,
                "config": config.to_dict(),
                "trainables": {name: list(t.shape) for name, t in tensors.items()},
                "param_groups": groups,
                "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            }
            atomic_write_text(partial / STATE_FILENAME, json.dumps(state, indent=2, sort_keys=True))
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if config.checkpoints_total_limit:
        for old in _checkpoints(output_dir)[: -config.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# The loop.


def _resolution(config: TrainConfig, pipe) -> int:
    if config.resolution is not None:
        return config.resolution
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 1
    return int(pipe.unet.config.sample_size) * scale


def freeze_and_place(pipe, device: torch.device, mixed_precision: str) -> torch.dtype:
    """Freeze every base model and move it to ``device``; UNet/VAE in the mixed-precision dtype (returned).

    The text encoder(s) stay fp32: gradients flow through them into the new token's embeddings.
    """
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    text_encoders = text_stack(pipe).text_encoders
    for module in (*text_encoders, pipe.unet, pipe.vae):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    for text_encoder in text_encoders:
        text_encoder.to(device)
    with quiet(LOADING_LOGS):  # diffusers' "modules that should be kept in float32: []" note
        pipe.unet.to(device, weight_dtype)
        if pipe.vae is not None:
            pipe.vae.to(device, weight_dtype)
    return weight_dtype


def _optimizer(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(groups, weight_decay=config.adam_weight_decay)
    except ValueError as error:  # torch's own range checks, should a value slip past the config's
        raise KeylockedError(f"invalid optimizer setting: {error}") from error


def _train(
    config: TrainConfig,
    runner: TrainingMethod,
    pipe,
    output_dir: Path,
    resume_dir: Path | None,
    previous: list[Path],
) -> Path:
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
    )
    stack = text_stack(pipe)

    # -- validate every input before touching the model -------------------------------------
    runner.check(pipe)
    resolution = _resolution(config, pipe)
    instance = images_to_tensor(load_instance_images(config.instance_data_dir, resolution))  # (N, 3, R, R)
    if runner.uses_mask and config.mask not in ("attention", "none"):
        masks = load_user_masks(config.mask, instance.shape[0], resolution)
        instance = torch.cat([instance, masks], dim=1)  # (N, 4, R, R)
    elif not runner.uses_mask and config.mask != "attention":
        logger.info("%s trains with the plain (unmasked) loss; mask=%r is ignored", runner.name, config.mask)
    fingerprint = pipeline_fingerprint(pipe)
    identity = _run_identity(runner, fingerprint)
    resume_state = None
    if resume_dir is not None:
        resume_state = read_checkpoint_state(resume_dir)
        _check_same_run(resume_dir, resume_state, identity)
    if resume_state is not None or config.resume_from_checkpoint:
        for checkpoint in _checkpoints(output_dir):  # the folder must hold this run only
            _check_same_run(checkpoint, read_checkpoint_state(checkpoint), identity)
    if config.overwrite:
        _remove(previous)
    snapshot = stack.snapshot()
    device = accelerator.device
    weight_dtype = freeze_and_place(pipe, device, config.mixed_precision)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    hooks = []
    try:
        # -- the new token in every tokenizer, hooked so that only its embedding rows are trained
        token_embeddings, placeholder_id = None, None
        if runner.uses_token:
            tables = stack.input_embeddings()  # text encoder key -> input embedding table
            init = {key: tables[key].weight[i].detach().clone() for key, i in zip(tables, runner.superclass_ids)}
            token = config.placeholder_token
            placeholder_ids = stack.add_tokens({token: init})[token]  # one per tokenizer
            placeholder_id = placeholder_ids[0]  # where the token is, in tokenizer 1's ids
            token_embeddings = {key: nn.Parameter(e.float().to(device)) for key, e in init.items()}  # (d_embed,) each
            for (key, table), token_id in zip(stack.input_embeddings().items(), placeholder_ids):
                hooks.append(table.register_forward_hook(_substitute_row(token_id, token_embeddings[key])))
        if config.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        # -- what this method trains --------------------------------------------------------
        groups = runner.setup(Setup(pipe, device, instance, token_embeddings))
        optimizer = accelerator.prepare(_optimizer(groups, config))
        global_step = 0
        if resume_state is not None:
            tensors = runner.state()
            _check_shapes(resume_dir, resume_state, tensors)
            with torch.no_grad():
                for name, value in load_file(str(resume_dir / TRAINABLE_FILENAME)).items():
                    tensors[name].copy_(value)
            _load_optimizer_state(resume_dir, optimizer, resume_state["param_groups"])
            if accelerator.scaler is not None and isinstance(resume_state.get("grad_scaler"), dict):
                accelerator.scaler.load_state_dict(resume_state["grad_scaler"])
            global_step = resume_state["global_step"]
            logger.info("resumed from %s at step %d", resume_dir, global_step)

        # -- the loop: the same batches for every method (seeded by step) ---------------------
        probe = AttentionMapProbe()
        use_attention_mask = runner.uses_mask and config.mask == "attention"
        encoder = latent_encoder(pipe.vae, instance, config.random_flip, device, weight_dtype)  # VAE or its cache
        info = {
            "base_model_fingerprint": fingerprint,
            "effective_batch_size": config.effective_batch_size,
            "seed": config.seed,
            "resolution": resolution,
            "base_model": str(config.pretrained_model_name_or_path),
            "learning_rates": [g["lr"] for g in groups],
        }
        progress = tqdm(
            total=config.max_train_steps, initial=global_step, desc="train", disable=not config.progress, unit="step"
        )
        started, start_step = time.perf_counter(), global_step
        while global_step < config.max_train_steps:
            for micro in range(config.gradient_accumulation_steps):
                generator = step_generator_for(config, global_step, micro)
                # the probe stays installed through backward: gradient checkpointing recomputes attention
                probing = probing_cross_attention(pipe.unet, probe) if use_attention_mask else nullcontext()
                with accelerator.accumulate(), accelerator.autocast(), probing:
                    loss = training_loss(
                        config,
                        runner,
                        pipe,
                        instance,
                        generator,
                        noise_scheduler,
                        placeholder_id,
                        probe,
                        weight_dtype,
                        encoder,
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
                _save_checkpoint(output_dir, global_step, runner, optimizer, accelerator, config, identity, info)
            if config.validation_prompt and (
                global_step % config.validation_steps == 0 or global_step == config.max_train_steps
            ):
                _validate(config, runner, pipe, output_dir, global_step)
        progress.close()
        with _writing(output_dir):
            path = runner.save(output_dir, global_step, info)
        logger.info("saved %s (%d bytes)", path, path.stat().st_size)
        return path
    finally:
        for hook in hooks:
            hook.remove()
        if config.gradient_checkpointing:
            pipe.unet.disable_gradient_checkpointing()
        runner.teardown(pipe)
        stack.restore(snapshot)


def _substitute_row(token_id: int, embedding: Tensor):
    """Forward hook on an input embedding table: the trainable vector wherever ``token_id`` is."""

    def hook(module, inputs, output):
        is_token = (inputs[0] == token_id).unsqueeze(-1)  # (B, T, 1)
        return torch.where(is_token, embedding.to(output.dtype), output)

    return hook


def step_generator_for(config: TrainConfig, step: int, micro: int) -> torch.Generator:
    """The generator of one micro-batch: a function of (seed, step, micro) only, so resume is exact."""
    return step_generator(config.seed, step * config.gradient_accumulation_steps + micro + 1)


def noised_batch(config, instance, generator, vae, noise_scheduler, device, weight_dtype):
    """Draw a micro-batch and noise it; every method sees the same batches.

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


def masked_mse(prediction: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """Noise-prediction MSE, weighted per image by a soft object mask (normalised per image)."""
    error = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(1, keepdim=True)  # (B, 1, h, w)
    if mask is None:
        return error.mean()
    weights = mask / mask.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)  # (B, 1, h, w), sums to 1 per image
    return (error * weights).sum(dim=(1, 2, 3)).mean()


def training_loss(
    config: TrainConfig,
    runner: TrainingMethod,
    pipe,
    instance: Tensor,
    generator: torch.Generator,
    noise_scheduler,
    placeholder_id: int | None,
    probe: AttentionMapProbe,
    weight_dtype: torch.dtype,
    encoder=None,
) -> Tensor:
    """One micro-batch: noise, encode the prompts with the method's phrase, predict, (masked) loss.

    ``encoder``: the VAE or its ``LatentCache`` (default: the pipeline's VAE). With the attention
    mask, the caller has installed ``probe`` (``probing_cross_attention``)."""
    device = pipe.unet.device
    latents, noisy_latents, timesteps, target, templates, user_mask = noised_batch(
        config, instance, generator, encoder or pipe.vae, noise_scheduler, device, weight_dtype
    )
    prompts = prompts_for(templates, runner.prompt_phrase, config.templates)
    stack = text_stack(pipe)
    # text: gradients flow into the token embeddings only for the methods that train them
    with torch.enable_grad() if runner.uses_token else torch.no_grad():
        encoded = stack.encode(prompts)  # (B, T, d_text): SDXL's two encoders concatenated
    encodings = encoded.encodings
    is_placeholder = encoded.input_ids == placeholder_id if placeholder_id is not None else None  # (B, T)
    runner.observe(encodings, is_placeholder)
    # UNet prediction, reading the concept token's attention map on the way when masking
    use_attention_mask = runner.uses_mask and config.mask == "attention"
    probe.reset(is_placeholder)
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 1
    height, width = (size * scale for size in latents.shape[-2:])
    conditioning = stack.unet_conditioning(encoded, height, width, weight_dtype)  # SDXL: pooled text + time ids
    prediction = pipe.unet(noisy_latents, timesteps, encodings.to(weight_dtype), **conditioning).sample
    mask = None
    if use_attention_mask:
        mask = probe.object_mask(*latents.shape[-2:])
    elif runner.uses_mask and user_mask is not None:
        mask = F.interpolate(
            user_mask.to(device, torch.float32), size=latents.shape[-2:], mode="bilinear", align_corners=False
        )
    return masked_mse(prediction, target, mask)


@torch.no_grad()
def _validate(config: TrainConfig, runner: TrainingMethod, pipe, output_dir: Path, step: int) -> None:
    """Generate validation images with the method's inference settings; saves validation/step-N.png."""
    from ..visual import image_grid

    with runner.inference_settings():
        generator = torch.Generator(pipe.unet.device).manual_seed(config.seed)
        images = pipe(
            [config.validation_prompt] * config.num_validation_images,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            generator=generator,
        ).images
    with _writing(output_dir), atomic_path(output_dir / "validation" / f"step-{step}.png") as tmp:
        image_grid(images, columns=min(4, len(images))).save(tmp, format="PNG")


__all__ = ["CONCEPT_FILENAME", "freeze_and_place", "noised_batch", "train", "train_concept"]
