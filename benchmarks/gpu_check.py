"""The GPU check's Python parts (run by ``benchmarks/gpu_check.sh``); each part writes its own JSON.

    python benchmarks/gpu_check.py inference  --output benchmarks/results/gpu   # SD 1.5 + SDXL shapes, 0/1/3 concepts
    python benchmarks/gpu_check.py train-step --output benchmarks/results/gpu   # Perfusion step vs plain UNet fwd+bwd
    python benchmarks/gpu_check.py long-run   --output benchmarks/results/gpu   # 400 steps × batch 16, SD 1.5 shapes
    python benchmarks/gpu_check.py all --smoke --output /tmp/x                  # toy shapes, CPU, seconds

Random weights of the real shapes (``shapes.py``); speed and memory depend on shapes only.
Every ratio is measured within one run, on one machine, with interleaved repeats. On CUDA the
models run in fp16 (inference) and training uses ``--mixed_precision bf16``; peak memory is
``torch.cuda.max_memory_allocated`` above what was allocated before the part started.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shapes import build_pipeline, identity_covariance, random_concepts  # noqa: E402

PARTS = ("inference", "train-step", "long-run")
PROMPTS = {  # the same prompt shape in every case: three object words, concept tokens or plain words
    0: "a photo of a dog and a cat and a car on a table",
    1: "a photo of a <c0> and a cat and a car on a table",
    3: "a photo of a <c0> and a <c1> and a <c2> on a table",
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _now(device: str) -> float:
    _sync(device)
    return time.perf_counter()


# ---------------------------------------------------------------------------------------
# Inference: stock vs 1 and 3 concepts, interleaved repeats, median seconds.


def inference(args) -> dict:
    result = {}
    for family, resolution in (("sd15", 512), ("sdxl", 1024)):
        family = f"{family}-tiny" if args.smoke else family
        result[family] = inference_one(args, family, 16 if args.smoke else resolution)
        print(json.dumps({family: result[family]["ratio_vs_stock"]}), flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return result


@torch.no_grad()
def inference_one(args, family: str, resolution: int) -> dict:
    from keylocked import load_concepts, unload_concepts

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = build_pipeline(family, device=args.device, dtype=dtype)
    covariance, concepts = identity_covariance(pipe), random_concepts(pipe, 3)
    kwargs = dict(num_inference_steps=args.steps, height=resolution, width=resolution, output_type="latent")

    def latents(count: int):
        return pipe(PROMPTS[count], generator=torch.Generator(args.device).manual_seed(0), **kwargs).images

    def run(count: int) -> float:
        if count:
            load_concepts(pipe, concepts[:count], covariance=covariance)
        try:
            started = _now(args.device)
            latents(count)
            return _now(args.device) - started
        finally:
            if count:
                unload_concepts(pipe)

    warm_up = run(0)
    stock = latents(0)
    times = {count: [] for count in (0, 1, 3)}
    for _ in range(args.repeats):
        for count in times:  # interleaved, so drifting load hits every case alike
            times[count].append(run(count))
    median = {count: statistics.median(values) for count, values in times.items()}
    return {
        "resolution": resolution,
        "steps": args.steps,
        "dtype": str(dtype),
        "warm_up_seconds": round(warm_up, 4),
        "seconds_median": {str(k): round(v, 4) for k, v in median.items()},
        "seconds_all": {str(k): [round(x, 4) for x in v] for k, v in times.items()},
        "ratio_vs_stock": {str(k): round(v / median[0], 4) for k, v in median.items() if k},
        "unload_bit_identical": bool(torch.equal(stock, latents(0))),
        "cross_attention_layers": len(concepts[0].value_targets),
    }


# ---------------------------------------------------------------------------------------
# Training: a Perfusion optimizer step vs a plain UNet forward+backward on the same batch.


def _instance_images(folder: Path, size: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(4):
        image = Image.new("RGB", (size, size), "white")
        image.paste(Image.new("RGB", (size // 2, size // 2), (200, 40 + 50 * index, 40)), (size // 4, size // 4))
        image.save(folder / f"{index}.png")
    return folder


def _train_config(folder: Path, pipe, resolution: int, **overrides):
    from keylocked.training import TrainConfig

    covariance = identity_covariance(pipe).save(folder / "covariance.safetensors")
    values = dict(
        pretrained_model_name_or_path="random-weights",
        instance_data_dir=str(_instance_images(folder / "images", resolution)),
        placeholder_token="<bench>",
        superclass_token="dog",
        output_dir=str(folder / "out"),
        resolution=resolution,
        checkpointing_steps=10**6,
        covariance=str(covariance),
        progress=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


class StepClock:
    """Timestamps after every optimizer step (per-step time without the setup)."""

    def __init__(self, device: str):
        self.device, self.stamps = device, []

    def __enter__(self) -> StepClock:
        self._original = original = torch.optim.AdamW.step
        clock = self

        def stamped(optimizer, *a, **k):
            out = original(optimizer, *a, **k)
            clock.stamps.append(_now(clock.device))
            return out

        torch.optim.AdamW.step = stamped
        return self

    def __exit__(self, *exc) -> None:
        torch.optim.AdamW.step = self._original

    def median_interval(self) -> float:
        return statistics.median(b - a for a, b in zip(self.stamps[:-1], self.stamps[1:]))


def _peak(device: str, base: int) -> int | None:
    return (torch.cuda.max_memory_allocated() - base) if device == "cuda" else None


def _reset_peak(device: str) -> int:
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def plain_unet_step(pipe, batch: int, resolution: int, device: str, repeats: int, dtype) -> float:
    """Median seconds of a plain UNet forward + MSE + backward, every UNet weight trainable, autocast."""
    import torch.nn.functional as F

    from keylocked.text_stack import text_stack

    stack = text_stack(pipe)
    size = resolution // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, size, size, generator=generator).to(device)
    with torch.no_grad():
        encoded = stack.encode([PROMPTS[0]] * batch)
    extra = stack.unet_conditioning(encoded, resolution, resolution)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    unet = pipe.unet.to(device, torch.float32).requires_grad_(True).train()
    times = []
    for _ in range(repeats + 1):
        started = _now(device)
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = F.mse_loss(unet(latents, timesteps, encoded.encodings, **extra).sample.float(), latents)
        loss.backward()
        unet.zero_grad(set_to_none=True)
        times.append(_now(device) - started)
    unet.requires_grad_(False).eval()
    return statistics.median(times[1:])


def train_step(args) -> dict:
    from keylocked.training import train_concept

    result = {}
    cases = (("sd15", 512, 4), ("sdxl", 1024, 1))
    for family, resolution, batch in cases[1:] if args.smoke else cases:  # smoke: the SD 1.5 path is long-run's
        family = f"{family}-tiny" if args.smoke else family
        resolution = 16 if args.smoke else resolution
        precision = "bf16" if args.device == "cuda" else "no"
        steps = 2 if args.smoke else 8
        with tempfile.TemporaryDirectory() as folder:
            pipe = build_pipeline(family, device=args.device)
            config = _train_config(
                Path(folder),
                pipe,
                resolution,
                train_batch_size=batch,
                gradient_accumulation_steps=1,
                max_train_steps=steps,
                mixed_precision=precision,
                mask="attention",
            )
            base = _reset_peak(args.device)
            with StepClock(args.device) as clock:
                train_concept(config, pipe=pipe)
            perfusion, perfusion_peak = clock.median_interval(), _peak(args.device, base)
            base = _reset_peak(args.device)
            plain = plain_unet_step(pipe, batch, resolution, args.device, steps, torch.bfloat16)
            plain_peak = _peak(args.device, base)
        result[family] = {
            "resolution": resolution,
            "batch": batch,
            "mixed_precision": precision,
            "perfusion_seconds_per_step": round(perfusion, 4),
            "plain_unet_forward_backward_seconds": round(plain, 4),
            "ratio": round(perfusion / plain, 3),
            "perfusion_peak_mib": None if perfusion_peak is None else round(perfusion_peak / 2**20, 1),
            "plain_peak_mib": None if plain_peak is None else round(plain_peak / 2**20, 1),
        }
        print(json.dumps({family: result[family]}), flush=True)
        del pipe
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return result


def long_run(args) -> dict:
    """The paper's budget on SD 1.5 shapes: 400 optimizer steps × effective batch 16 (4 × 4 accumulation)."""
    from keylocked.training import train_concept

    family, resolution = ("sd15-tiny", 16) if args.smoke else ("sd15", 512)
    steps, batch, accumulation = (1, 1, 2) if args.smoke else (400, 4, 4)
    precision = "bf16" if args.device == "cuda" else "no"
    with tempfile.TemporaryDirectory() as folder:
        pipe = build_pipeline(family, device=args.device)
        config = _train_config(
            Path(folder),
            pipe,
            resolution,
            train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_train_steps=steps,
            mixed_precision=precision,
        )
        base = _reset_peak(args.device)
        started = _now(args.device)
        path = train_concept(config, pipe=pipe)
        seconds = _now(args.device) - started
        peak = _peak(args.device, base)
        size = path.stat().st_size
    return {
        "family": family,
        "resolution": resolution,
        "steps": steps,
        "effective_batch": batch * accumulation,
        "micro_batch": batch,
        "mixed_precision": precision,
        "seconds": round(seconds, 2),
        "peak_mib_above_pipeline": None if peak is None else round(peak / 2**20, 1),
        "peak_mib_total": round(torch.cuda.max_memory_allocated() / 2**20, 1) if args.device == "cuda" else None,
        "concept_bytes": size,
    }


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=PARTS + ("all",))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/gpu"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="toy shapes and 1–3 steps: checks the script, on CPU")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 10; smoke 2)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved inference repeats (default 3)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (1 if args.smoke else 10)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    functions = {"inference": inference, "train-step": train_step, "long-run": long_run}
    reports = {}
    for part in PARTS if args.part == "all" else (args.part,):
        started = time.perf_counter()
        report = {"part": part, "smoke": args.smoke, "machine": machine(args.device), "result": functions[part](args)}
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        args.output.mkdir(parents=True, exist_ok=True)
        path = args.output / f"gpu-check-{part}{'-smoke' if args.smoke else ''}.json"
        path.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path} ({report['wall_seconds']} s)", flush=True)
        reports[part] = report
    return reports


if __name__ == "__main__":
    main()
