"""Speed, memory and size benchmarks; every ratio is measured within one run, on one machine.

    python benchmarks/speed.py --model emoji-64 --threads 1                 # the embedded model
    python benchmarks/speed.py --config sd15 --resolution 256 --steps 2     # SD 1.5 shapes, random weights

1. Inference: the stock pipeline vs 1 and 3 Perfusion concepts loaded (same prompt length, seed,
   steps), interleaved repeats, median seconds; keylocked's per-prompt K/V cache on (default)
   and off (edited projections recomputed at every denoising step).
2. Training (each in a fresh subprocess, so memory peaks are its own): seconds per optimizer
   step of Perfusion, Textual Inversion, Custom Diffusion and LoRA in the real trainers (median
   interval between optimizer steps, so setup is excluded), and a plain UNet
   forward+backward (all UNet weights trainable, i.e. a full fine-tuning step without the
   optimizer) on the same first batch. Peak memory above the loaded pipeline: sampled RSS on
   CPU (every 2 ms), ``torch.cuda.max_memory_allocated`` on GPU.
3. Sizes: the file each method saves (fp16) for SD 1.5's shapes (meta-device UNet, no weights).

Prints a report and writes ``--output`` (JSON). Speed does not depend on trained weights, so the
embedded model's numbers are valid before its training finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # also when run in-process (runpy): sys.path[0] is then not here

from shapes import build_pipeline, identity_covariance, random_concepts, unet_config  # noqa: E402

METHODS = ("perfusion", "textual-inversion", "custom-diffusion", "lora")


# ---------------------------------------------------------------------------------------
# Models.


def build(args):
    if args.config == "sd15":
        return build_pipeline("sd15", device=args.device, resolution=args.resolution or 512)
    from keylocked.models import load_pipeline

    return load_pipeline(args.model, device=args.device)


def covariance_for(pipe, args):
    """The model's bundled covariance when there is one, else the identity (speed does not depend on it)."""
    from keylocked.covariance import Covariance
    from keylocked.models import EMBEDDED_MODELS

    if args.config != "sd15":  # the SD 1.5 shapes are random weights: nothing is bundled for them
        bundled = EMBEDDED_MODELS.get(args.model, Path(args.model)) / "covariance.safetensors"
        if bundled.is_file():
            return Covariance.load(bundled)
    return identity_covariance(pipe)


# ---------------------------------------------------------------------------------------
# 1. Inference.


def inference(args) -> dict:
    from keylocked import load_concepts, unload_concepts
    from keylocked.layers import KeyLockedLinear

    pipe = build(args)
    covariance = covariance_for(pipe, args)
    concepts = random_concepts(pipe, 3)
    # the same prompt shape for every case: three object words, concept tokens or plain words
    prompts = {
        0: "a photo of a dog and a cat and a car on a table",
        1: "a photo of a <c0> and a cat and a car on a table",
        3: "a photo of a <c0> and a <c1> and a <c2> on a table",
    }
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=7.5, output_type="np")
    if args.resolution:
        kwargs.update(height=args.resolution, width=args.resolution)

    def run(case: str) -> float:
        count = int(case[0])
        if count:
            load_concepts(pipe, concepts[:count], covariance=covariance)
            if case.endswith("nocache"):
                for module in pipe.unet.modules():
                    if isinstance(module, KeyLockedLinear):
                        module.register_forward_pre_hook(lambda m, _: m.clear_cache())
        try:
            if args.device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            pipe(prompts[count], generator=torch.Generator(args.device).manual_seed(0), **kwargs)
            if args.device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - started
        finally:
            if count:
                unload_concepts(pipe)

    cases = ["0", "1", "3", "1-nocache", "3-nocache"]
    run("0")  # warm-up
    times = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case in cases:  # interleaved, so drifting machine load hits every case alike
            times[case].append(run(case))
    median = {case: statistics.median(values) for case, values in times.items()}
    unet = unet_step_times(pipe, prompts, concepts, covariance, args)
    return {
        "unet_step_seconds_min": unet,
        "unet_step_ratio_vs_stock": {k: round(v / unet["0"], 4) for k, v in unet.items() if k != "0"},
        "seconds_median": {k: round(v, 4) for k, v in median.items()},
        "seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "ratio_vs_stock": {k: round(v / median["0"], 4) for k, v in median.items() if k != "0"},
        "steps": args.steps,
        "repeats": args.repeats,
        "cfg": True,
    }


@torch.no_grad()
def unet_step_times(pipe, prompts: dict, concepts: list, covariance, args, calls: int = 5) -> dict:
    """Min seconds of one denoising UNet call (CFG batch of 2) with 0/1/3 concepts, the K/V cache warm."""
    from keylocked import load_concepts, unload_concepts
    from keylocked.base_model import encode_prompts

    size = (args.resolution or 8 * pipe.unet.config.sample_size) // (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    latents = torch.randn(2, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0)).to(
        args.device
    )
    timestep = torch.tensor(500, device=args.device)
    best = {}
    for _ in range(args.repeats):
        for count in (0, 1, 3):
            if count:
                load_concepts(pipe, concepts[:count], covariance=covariance)
            try:
                encodings, _ = encode_prompts(pipe.text_encoder, pipe.tokenizer, ["", prompts[count]])  # (2, T, d)
                pipe.unet(latents, timestep, encodings)  # fills the per-prompt cache, as the first denoising step does
                for _ in range(calls):
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                    pipe.unet(latents, timestep, encodings)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    best[str(count)] = min(best.get(str(count), float("inf")), time.perf_counter() - started)
            finally:
                if count:
                    unload_concepts(pipe)
    return {k: round(v, 5) for k, v in best.items()}


# ---------------------------------------------------------------------------------------
# 2. Training (subprocess workers).


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def current(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def _instance_images(folder: Path, size: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(4):
        image = Image.new("RGB", (size, size), "white")
        image.paste(
            Image.new("RGB", (size // 2, size // 2), (200, 40 + 50 * index, 40)), (size // 4 + index, size // 4)
        )
        image.save(folder / f"{index}.png")
    return folder


def worker(args) -> dict:
    """One measurement in this (fresh) process: --worker METHOD|plain, --train_steps S."""
    from keylocked.training import TrainConfig, train

    torch.set_num_threads(args.threads)
    pipe = build(args)
    covariance = covariance_for(pipe, args)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        cov_path = covariance.save(folder / "covariance.safetensors")
        config = TrainConfig(
            pretrained_model_name_or_path=args.model,
            instance_data_dir=str(_instance_images(folder / "images", 64)),
            placeholder_token="<bench>",
            superclass_token="dog",
            output_dir=str(folder / "out"),
            resolution=args.resolution,
            train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            max_train_steps=args.train_steps,
            checkpointing_steps=10**6,
            covariance=str(cov_path),
            progress=False,
        )
        cuda = args.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        stamps = []  # a timestamp after every optimizer step: per-step time without the setup
        original_step = torch.optim.AdamW.step

        def stamped_step(self, *a, **k):
            result = original_step(self, *a, **k)
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return result

        torch.optim.AdamW.step = stamped_step
        with PeakRSS() as rss:
            if args.worker == "plain":
                seconds = plain_steps(pipe, config, args)
            else:
                train(config, method=args.worker, pipe=pipe)
                seconds = statistics.median(b - a for a, b in zip(stamps[:-1], stamps[1:]))
        torch.optim.AdamW.step = original_step
        peak = (torch.cuda.max_memory_allocated() - base) if cuda else (rss.peak - rss.start)
        return {
            "worker": args.worker,
            "train_steps": args.train_steps,
            "seconds": seconds,
            "peak_bytes": peak,
            "memory": "cuda max_memory_allocated" if cuda else "sampled RSS above the loaded pipeline",
        }


def plain_steps(pipe, config, args) -> float:
    """Median seconds of a plain UNet forward + MSE + backward (all UNet weights trainable) on the first batch."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from keylocked.base_model import encode_prompts
    from keylocked.training.data import images_to_tensor, load_instance_images, prompts_for, step_generator
    from keylocked.training.trainer import _resolution, noised_batch

    instance = images_to_tensor(load_instance_images(config.instance_data_dir, _resolution(config, pipe)))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    device = torch.device(args.device)
    _, noisy, timesteps, target, templates, _ = noised_batch(
        config, instance, step_generator(config.seed, 1), pipe.vae, scheduler, device, torch.float32
    )
    with torch.no_grad():
        encodings, _ = encode_prompts(
            pipe.text_encoder, pipe.tokenizer, prompts_for(templates, config.superclass_token, config.templates)
        )
    pipe.unet.requires_grad_(True).train()
    times = []
    for _ in range(max(2, args.train_steps)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = F.mse_loss(pipe.unet(noisy, timesteps, encodings).sample, target)
        loss.backward()
        pipe.unet.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def training(args) -> dict:
    def spawn(name: str, steps: int) -> dict:
        command = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--train_steps",
            str(steps),
            "--model",
            args.model,
            "--config",
            args.config,
            "--device",
            args.device,
            "--threads",
            str(args.threads),
            "--batch",
            str(args.batch),
        ]
        if args.resolution:
            command += ["--resolution", str(args.resolution)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"worker {name} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    result = {
        "batch": args.batch,
        "steps": args.train_steps_measured,
        "rounds": args.rounds,
        "methods": {},
        "timing": "min over rounds of the median interval between optimizer steps (min: least disturbed by other load)",
    }
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):  # rounds alternate the methods, so drifting machine load hits them alike
        for name in METHODS + ("plain",):
            runs.setdefault(name, []).append(spawn(name, args.train_steps_measured))
    for name, measured in runs.items():
        entry = {
            "seconds_per_step": round(min(r["seconds"] for r in measured), 4),
            "seconds_per_step_all": [round(r["seconds"], 4) for r in measured],
            "peak_mib": round(max(r["peak_bytes"] for r in measured) / 2**20, 1),
        }
        if name == "plain":
            result["plain_unet_forward_backward"] = entry
        else:
            result["methods"][name] = entry
    result["memory"] = runs["plain"][0]["memory"]
    base = result["plain_unet_forward_backward"]["seconds_per_step"]
    for entry in result["methods"].values():
        entry["ratio_vs_plain_unet_step"] = round(entry["seconds_per_step"] / base, 3)
    return result


# ---------------------------------------------------------------------------------------
# 3. Sizes for SD 1.5 shapes.


def sizes(lora_rank: int = 4) -> dict:
    """Bytes of each method's saved file (fp16) for SD 1.5's UNet (meta device) and CLIP ViT-L/14 width."""
    from accelerate import init_empty_weights
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file

    from keylocked.base_model import cross_attention_layers
    from keylocked.concept import Concept

    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config("sd15"))
    layers = cross_attention_layers(unet)
    half = lambda *shape: torch.zeros(*shape, dtype=torch.float16)  # noqa: E731
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        concept = Concept(
            "<c>",
            "dog",
            torch.zeros(768),
            torch.zeros(768),
            torch.zeros(768),
            {n: torch.zeros(layer.to_v.out_features) for n, layer in layers.items()},
        )
        out["perfusion"] = concept.save(folder / "perfusion.safetensors").stat().st_size
        save_file({"<c>": half(1, 768)}, str(folder / "ti.safetensors"))
        out["textual-inversion"] = (folder / "ti.safetensors").stat().st_size
        deltas = {"token_embedding": half(768)}
        for name, layer in layers.items():
            for projection in ("to_k", "to_v"):
                linear = getattr(layer, projection)
                deltas[f"deltas.{name}.{projection}"] = half(linear.out_features, linear.in_features)
        save_file(deltas, str(folder / "cd.safetensors"))
        out["custom-diffusion"] = (folder / "cd.safetensors").stat().st_size
        lora = {}
        for name, module in unet.named_modules():
            if hasattr(module, "to_q") and hasattr(module, "to_out"):  # every attention
                for projection in ("to_q", "to_k", "to_v", "to_out.0"):
                    linear = module.get_submodule(projection)
                    lora[f"{name}.{projection}.lora_A.weight"] = half(lora_rank, linear.in_features)
                    lora[f"{name}.{projection}.lora_B.weight"] = half(linear.out_features, lora_rank)
        StableDiffusionPipeline.save_lora_weights(str(folder / "lora"), unet_lora_layers=lora, safe_serialization=True)
        out[f"lora (rank {lora_rank})"] = (folder / "lora" / "pytorch_lora_weights.safetensors").stat().st_size
        out["full UNet fine-tune (DreamBooth)"] = sum(p.numel() for p in unet.parameters()) * 2
    return {"fp16_bytes": out, "shapes": "SD 1.5 UNet, text width 768"}


# ---------------------------------------------------------------------------------------


def machine(args) -> str:
    if args.device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores visible, {args.threads} torch thread(s)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="emoji-64", help="embedded model name or local diffusers folder")
    parser.add_argument(
        "--config", choices=("model", "sd15"), default="model", help="sd15: SD 1.5 shapes, random weights"
    )
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="training micro-batch")
    parser.add_argument(
        "--train_steps_measured", type=int, default=6, help="optimizer steps per method (median interval)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="training measurements per method")
    parser.add_argument("--skip", nargs="*", default=[], choices=("inference", "training", "sizes"))
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train_steps", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    report = {
        "machine": machine(args),
        "model": "sd15 (random weights)" if args.config == "sd15" else args.model,
        "resolution": args.resolution,
        "torch": torch.__version__,
    }
    if "inference" not in args.skip:
        report["inference"] = inference(args)
        print(
            json.dumps(
                {
                    k: report["inference"][k]
                    for k in ("seconds_median", "ratio_vs_stock", "unet_step_seconds_min", "unet_step_ratio_vs_stock")
                }
            ),
            flush=True,
        )
    if "training" not in args.skip:
        report["training"] = training(args)
        print(json.dumps(report["training"], indent=1), flush=True)
    if "sizes" not in args.skip:
        report["sizes"] = sizes()
        print(json.dumps(report["sizes"], indent=1))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("machine", "model")}))


if __name__ == "__main__":
    main()
