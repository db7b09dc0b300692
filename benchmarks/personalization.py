"""The personalization benchmark on the embedded emoji-64 model (the paper's trade-off figure).

    python benchmarks/personalization.py --quick          # minutes on a CPU: checks the machinery
    python benchmarks/personalization.py                  # the full benchmark (GPU hours / CPU days)

For every held-out *benchmark* concept of ``emoji_world/splits.json`` (never seen by the base
model nor by the evaluator, never used for tuning), six augmented example views are the "user's
photos". Each method — Perfusion, Textual Inversion, Custom Diffusion, DreamBooth-LoRA — is
trained on them with the same steps, batch and data pipeline; then every concept × prompt × seed
is generated, Perfusion swept over β with local and global key locking, and scored by the
emoji evaluator (raw cosines; the stock model prompted with the super-category word is the
reference point "base"). Writes to ``--output``: rows/summary (JSON, CSV, Markdown), pareto.png,
sizes and training times (training.json), the multi-concept case (pairs.json/csv), and whether
any baseline point dominates Perfusion's front, with paired noise estimates (front.json,
``keylocked.evaluation.pareto``).

Multi-concept: pairs of concepts trained apart, loaded together, prompted "a <A> and a <B> on a
white background" (Perfusion at every swept β and lock). A concept counts as *present* when its image alignment (mean cosine to its
own example views) exceeds a per-concept threshold, calibrated on real renders: the threshold
that best separates real pair compositions containing the concept from real pair compositions
of two other concepts (balanced accuracy, reported in pairs.json). "Both present" needs both.

Styles are not prompted: emoji-64's captions never name an art style, so the model cannot follow one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from emoji_world.build_dataset import build, load_sprites  # noqa: E402
from emoji_world.catalog import APT_INSTALL_LINE, check_sources, load_splits  # noqa: E402
from emoji_world.compose import Layout, Placed, augmented_view, render_layout, sample_layout  # noqa: E402
from keylocked.edit_options import COVARIANCE_POSITIONS, EDITS, KEY_LOCKS  # noqa: E402
from keylocked.evaluation import EvalConfig, EvalItem, evaluate, evaluate_pairs, separating_threshold, write_results  # noqa: E402
from keylocked.evaluation.evaluate import summarize, summary_table  # noqa: E402
from keylocked.evaluation.metrics import image_alignment  # noqa: E402
from keylocked.evaluation.pareto import front_report, label  # noqa: E402
from keylocked.evaluation.pareto import markdown as front_markdown  # noqa: E402
from keylocked.personalizations import METHODS, Personalization  # noqa: E402
from keylocked.training import (  # noqa: E402
    BaselineOptions,
    TrainConfig,  # noqa: E402
    train,
)

PROMPTS = (
    "a {}",
    "a {} on a blue background",
    "a {} on a pink background",
    "a large {} on a black background",
    "a small {} in the top left corner on a white background",
    "a small {} in the bottom right corner on a green background",
    "a {} and a red apple on a white background",
    "a {} and a rocket on a yellow background",
)
PAIR_TEMPLATE = "a {} and a {} on a white background"
VIEW_BACKGROUNDS = ("white", "white", "white", "yellow", "blue", "pink")  # as emoji-64's demo examples
IDENTIFIERS = (
    "sks",
    "zwx",
    "qtr",
    "xjq",
    "pzk",
    "wqv",
    "kxz",
    "jvq",
    "yxw",
    "vbn",
    "hjx",
    "fzq",
)  # DreamBooth rare words


@dataclass
class Variant:
    """Perfusion's ablation options (docs/method.md, "Edit options") and the one-shot / auto-β rows."""

    edit: str = "paper"
    key_lock: str = "paper"
    covariance_positions: str = "text"
    one_shot: bool = False  # also train Perfusion on 1 example view ("perfusion (1 image)" rows)
    auto_beta: bool = False  # also pick each concept's β on validation prompts ("perfusion (auto β)" rows)

    def training_options(self) -> dict:
        return {"edit": self.edit, "key_lock": self.key_lock, "covariance_positions": self.covariance_positions}


# Validation prompts for --beta auto: none of them is a benchmark prompt (nothing is tuned on those).
AUTO_BETA_PROMPTS = ("a {} on a red background", "a large {} on a white background", "a {} and a cat face")
ONE_SHOT = "perfusion (1 image)"
AUTO_BETA = "perfusion (auto β)"


@dataclass
class Settings:
    concepts: int
    methods: tuple[str, ...]
    steps: int
    batch: int
    accumulation: int
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    local_betas: tuple[float, ...]
    global_betas: tuple[float, ...]
    lora_scales: tuple[float, ...]
    inference_steps: int
    guidance: float
    pairs: int
    pair_seeds: tuple[int, ...]


FULL = Settings(
    concepts=12,
    methods=METHODS,
    steps=400,
    batch=4,
    accumulation=4,
    prompts=PROMPTS,
    seeds=(0, 1, 2, 3),
    local_betas=(0.5, 0.6, 0.7, 0.8, 0.9),
    global_betas=(0.3, 0.4, 0.5, 0.6, 0.7),
    lora_scales=(0.5, 1.0),
    inference_steps=25,
    guidance=4.0,
    pairs=6,
    pair_seeds=tuple(range(8)),
)
QUICK = Settings(
    concepts=2,
    methods=METHODS,
    steps=8,
    batch=2,
    accumulation=1,
    prompts=PROMPTS[1:2] + PROMPTS[6:7],
    seeds=(0,),
    local_betas=(0.6, 0.8),
    global_betas=(0.5,),
    lora_scales=(1.0,),
    inference_steps=8,
    guidance=4.0,
    pairs=1,
    pair_seeds=(0, 1),
)


def slug(name: str) -> str:
    return name.replace(" ", "-")


def example_views(sprite: np.ndarray, seed: int, count: int = 6) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(augmented_view(sprite, rng, VIEW_BACKGROUNDS[i % len(VIEW_BACKGROUNDS)])) for i in range(count)
    ]


def benchmark_concepts(data: Path, count: int, style: str = "noto") -> dict[str, tuple[str, np.ndarray]]:
    """{name: (super-category word, RGBA sprite)} of the first ``count`` benchmark concepts (sorted)."""
    splits = load_splits()["benchmark"]
    sprites, entries = load_sprites(data, split="benchmark")
    by_name = {}
    for sprite, entry in zip(sprites, entries):
        if entry["name"] not in by_name or entry["style"] == style:
            by_name[entry["name"]] = sprite
    names = sorted(n for n in splits if n in by_name)[:count]
    if len(names) < count:
        raise SystemExit(f"only {len(names)} benchmark concepts in {data}; rebuild the dataset")
    return {name: (splits[name], by_name[name]) for name in names}


def train_all(
    pipe,
    model: str,
    concepts: dict,
    settings: Settings,
    work: Path,
    covariance: str | None,
    log,
    variant: Variant | None = None,
) -> dict:
    """Train (or reuse) every concept × method; returns {(name, method): (Personalization, seconds)}.

    Perfusion trains with ``variant``'s options; with ``variant.one_shot`` it is also trained on the
    first example view alone, as method ``ONE_SHOT``.
    """
    variant = variant or Variant()
    trained = {}
    methods = tuple(settings.methods) + ((ONE_SHOT,) if variant.one_shot else ())
    for index, (name, (superclass, _)) in enumerate(concepts.items()):
        for method in methods:
            instance = work / ("instances-1" if method == ONE_SHOT else "instances") / slug(name)
            output = work / "concepts" / slug(method) / slug(name)
            record = output / "benchmark_training.json"
            options = variant.training_options() if method in ("perfusion", ONE_SHOT) else {}
            wanted = {
                "steps": settings.steps,
                "batch": settings.batch,
                "accumulation": settings.accumulation,
                "model": model,
                **{k: v for k, v in options.items() if v != Variant().training_options()[k]},
            }
            if record.is_file() and json.loads(record.read_text()).get("settings") == wanted:
                item = Personalization.from_path(output)
                trained[(name, method)] = (item, json.loads(record.read_text())["seconds"])
                continue
            config = TrainConfig(
                pretrained_model_name_or_path=model,
                instance_data_dir=str(instance),
                placeholder_token=f"<{slug(name)}>",
                superclass_token=superclass,
                output_dir=str(output),
                max_train_steps=settings.steps,
                train_batch_size=settings.batch,
                gradient_accumulation_steps=settings.accumulation,
                checkpointing_steps=10**6,
                covariance=covariance,
                progress=False,
                seed=index,
                **options,
            )
            started = time.perf_counter()
            train(
                config,
                method="perfusion" if method == ONE_SHOT else method,
                pipe=pipe,
                options=BaselineOptions(identifier=IDENTIFIERS[index % len(IDENTIFIERS)]),
            )
            seconds = time.perf_counter() - started
            record.write_text(json.dumps({"settings": wanted, "seconds": seconds}))
            trained[(name, method)] = (Personalization.from_path(output), seconds)
            log(
                f"trained {method:<18} {name:<16} {seconds:7.1f} s  {trained[(name, method)][0].size_bytes():>9,} bytes"
            )
    return trained


def presence_thresholds(
    embedder, concepts: dict, references: dict, data: Path, samples: int = 24, seed: int = 7
) -> dict:
    """Per concept: the image-alignment threshold separating real pair renders with it from pairs without it."""
    held_in, _ = load_sprites(data, split="train")
    rng = np.random.default_rng(seed)
    names = list(concepts)
    thresholds = {}

    def pair(first: np.ndarray, second: np.ndarray) -> Image.Image:
        layout = sample_layout(rng, [0, 1])
        layout = Layout("white", tuple(Placed(i, p.size, p.x, p.y, p.flip) for i, p in enumerate(layout.objects)))
        return Image.fromarray(render_layout(layout, [first, second]))

    for name in names:
        others = [concepts[n][1] for n in names if n != name] or [held_in[0]]
        positives, negatives = [], []
        for k in range(samples):
            partner = held_in[int(rng.integers(len(held_in)))]
            images = [concepts[name][1], partner] if k % 2 == 0 else [partner, concepts[name][1]]
            positives.append(pair(*images))
            a, b = held_in[int(rng.integers(len(held_in)))], others[k % len(others)]
            negatives.append(pair(a, b))
        scores_pos = image_alignment(embedder.embed_images(positives), references[name])
        scores_neg = image_alignment(embedder.embed_images(negatives), references[name])
        threshold, accuracy = separating_threshold(scores_pos, scores_neg)
        thresholds[name] = {
            "threshold": round(threshold, 5),
            "calibration_balanced_accuracy": round(accuracy, 4),
            "positives_mean": round(float(scores_pos.mean()), 4),
            "negatives_mean": round(float(scores_neg.mean()), 4),
        }
    return thresholds


def ensure_sprites(data: Path) -> None:
    """Render the emoji sprites into ``data`` on first use (seconds), so a fresh clone runs as written."""
    if (data / "sprites.npz").exists():
        return
    try:
        check_sources()
    except FileNotFoundError:
        raise SystemExit(
            f"error: no emoji sprites in {data}, and their sources are not installed: run `{APT_INSTALL_LINE}`, "
            f"then `python -m emoji_world.build_dataset --output {data}` (or rerun this benchmark)"
        ) from None
    print(f"rendering the emoji sprites into {data} (once; python -m emoji_world.build_dataset)", flush=True)
    build(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="2 concepts, 8 steps, few prompts: checks the machinery in minutes"
    )
    parser.add_argument("--model", default="emoji-64")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "emoji-world")
    parser.add_argument("--output", type=Path, default=None, help="default: benchmarks/results/personalization[-quick]")
    parser.add_argument(
        "--work", type=Path, default=None, help="trained concepts and instance images (default: OUTPUT/work)"
    )
    parser.add_argument(
        "--evaluator", default=None, help="emoji evaluator weights (default: the shipped one) or clip:DIR"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    parser.add_argument("--concepts", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--accumulation", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds per prompt")
    parser.add_argument("--betas", type=float, nargs="+", default=None, help="Perfusion β sweep, local lock")
    parser.add_argument(
        "--global_betas", type=float, nargs="*", default=None, help="β sweep, global lock (none given: skip global)"
    )
    parser.add_argument("--inference_steps", type=int, default=None, help="denoising steps per image")
    parser.add_argument("--pairs", type=int, default=None, help="number of two-concept pairs")
    parser.add_argument("--pair_seeds", type=int, default=None, help="seeds per pair")
    parser.add_argument("--edit", choices=EDITS, default="paper", help="Perfusion's edit form (docs/method.md)")
    parser.add_argument("--key_lock", choices=KEY_LOCKS, default="paper", help="Perfusion's key lock")
    parser.add_argument(
        "--covariance_positions", choices=COVARIANCE_POSITIONS, default="text", help="positions C is estimated over"
    )
    parser.add_argument("--one_shot", action="store_true", help="add a row: Perfusion trained on 1 example view")
    parser.add_argument(
        "--beta",
        choices=("sweep", "auto"),
        default="sweep",
        help="auto: also pick each concept's β on validation prompts (harmonic mean of the alignments)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    ensure_sprites(args.data)  # before the model loads: fail or build in seconds
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    overrides = {
        k: getattr(args, k) for k in ("methods", "concepts", "steps", "batch", "accumulation") if getattr(args, k)
    }
    if args.seeds:
        overrides["seeds"] = tuple(range(args.seeds))
    if args.pair_seeds:
        overrides["pair_seeds"] = tuple(range(args.pair_seeds))
    if args.inference_steps:
        overrides["inference_steps"] = args.inference_steps
    if args.pairs is not None:
        overrides["pairs"] = args.pairs
    if args.betas:
        overrides["local_betas"] = tuple(args.betas)
    if args.global_betas is not None:
        overrides["global_betas"] = tuple(args.global_betas)
    variant = Variant(args.edit, args.key_lock, args.covariance_positions, args.one_shot, args.beta == "auto")
    settings = Settings(
        **{**settings.__dict__, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}}
    )
    output = args.output or ROOT / "benchmarks" / "results" / (
        "personalization-quick" if args.quick else "personalization"
    )
    work = args.work or output / "work"
    output.mkdir(parents=True, exist_ok=True)
    log_lines = []

    def log(message: str) -> None:
        print(message, flush=True)
        log_lines.append(message)

    from keylocked.evaluation import CLIPEmbedder, EmojiEvaluator
    from keylocked.models import EMBEDDED_MODELS, load_pipeline
    from keylocked.quiet import no_loading_bars

    started = time.time()
    pipe = load_pipeline(args.model, device=args.device)
    model_dir = EMBEDDED_MODELS.get(args.model, Path(args.model))
    covariance = model_dir / "covariance.safetensors"
    covariance = str(covariance) if covariance.is_file() else None
    if variant.covariance_positions != "text":
        from keylocked.covariance import estimate_covariance

        covariance_path = work / f"covariance-{variant.covariance_positions}.safetensors"
        if not covariance_path.is_file():
            estimate_covariance(
                pipe.text_encoder, pipe.tokenizer, positions=variant.covariance_positions, progress=False
            ).save(covariance_path)
        covariance = str(covariance_path)
    trained_flag = (
        json.loads((model_dir / "export_info.json").read_text()).get("trained")
        if (model_dir / "export_info.json").is_file()
        else None
    )
    if trained_flag is False:
        log(
            f"WARNING: {args.model} is the untrained placeholder (export_info.json trained=false): numbers check the machinery only"
        )
    with no_loading_bars():
        embedder = (
            CLIPEmbedder(args.evaluator[5:], device=args.device)
            if args.evaluator and args.evaluator.startswith("clip:")
            else EmojiEvaluator.load(args.evaluator, device=args.device)
        )

    # -- the user's photos: augmented views of each held-out benchmark concept ----------------
    concepts = benchmark_concepts(args.data, settings.concepts)
    references = {}
    for index, (name, (_, sprite)) in enumerate(concepts.items()):
        folder = work / "instances" / slug(name)
        folder.mkdir(parents=True, exist_ok=True)
        views = example_views(sprite, seed=index)
        for i, view in enumerate(views):
            view.save(folder / f"{i:02d}.png")
        references[name] = views
        if variant.one_shot:
            one = work / "instances-1" / slug(name)
            one.mkdir(parents=True, exist_ok=True)
            views[0].save(one / "00.png")

    # -- train every method on every concept (same steps, batch, data) -----------------------
    trained = train_all(pipe, args.model, concepts, settings, work, covariance, log, variant)
    auto_betas = {}
    if variant.auto_beta and "perfusion" in settings.methods:
        from keylocked.autobeta import BetaSearch, embedder_scorer, tune_beta

        search = BetaSearch(
            betas=settings.local_betas,
            prompts=AUTO_BETA_PROMPTS,
            num_inference_steps=settings.inference_steps,
            guidance_scale=settings.guidance,
        )
        for name in concepts:
            item = trained[(name, "perfusion")][0]
            result = tune_beta(pipe, item.path, embedder_scorer(embedder, references[name]), search, covariance)
            auto_betas[name] = result.beta
            log(f"auto β {name:<16} {result.beta:g}  (harmonic means {result.harmonic_means})")

    # -- generate and score ------------------------------------------------------------------
    config = EvalConfig(
        prompts=settings.prompts,
        seeds=settings.seeds,
        betas=settings.local_betas,
        locks=("local", "global") if settings.global_betas else ("local",),
        global_betas=settings.global_betas,
        lora_scales=settings.lora_scales,
        num_inference_steps=settings.inference_steps,
        guidance_scale=settings.guidance,
    )
    items = [EvalItem(name, superclass, references[name]) for name, (superclass, _) in concepts.items()]
    items += [
        EvalItem(name, concepts[name][0], references[name], trained[(name, method)][0])
        for method in settings.methods
        for name in concepts
    ]
    rows = evaluate(pipe, items, embedder, config, covariance=covariance, log=log)
    # the extra Perfusion rows: evaluated as Perfusion, then labelled apart in the summary
    if variant.one_shot:
        one_shot = [EvalItem(n, concepts[n][0], references[n], trained[(n, ONE_SHOT)][0]) for n in concepts]
        one_shot_config = EvalConfig(**{**config.__dict__, "locks": ("local",)})
        rows += [
            {**r, "method": ONE_SHOT}
            for r in evaluate(pipe, one_shot, embedder, one_shot_config, covariance=covariance, log=log)
        ]
    for name, beta in auto_betas.items():
        auto_config = EvalConfig(**{**config.__dict__, "betas": (beta,), "locks": ("local",)})
        item = EvalItem(name, concepts[name][0], references[name], trained[(name, "perfusion")][0])
        rows += [
            {**r, "method": AUTO_BETA, "beta": None}
            for r in evaluate(pipe, [item], embedder, auto_config, covariance=covariance, log=log)
        ]

    # -- several concepts trained apart, prompted together ------------------------------------
    thresholds = presence_thresholds(
        embedder, concepts, {n: embedder.embed_images(r) for n, r in references.items()}, args.data
    )
    names = list(concepts)
    pair_names = [(names[2 * i], names[2 * i + 1]) for i in range(min(settings.pairs, len(names) // 2))]
    pair_config = EvalConfig(
        prompts=("{}",),
        seeds=settings.pair_seeds,
        num_inference_steps=settings.inference_steps,
        guidance_scale=settings.guidance,
    )
    pair_rows = []
    for method in ("base",) + tuple(settings.methods):

        def item(name, method=method):
            return EvalItem(
                name, concepts[name][0], references[name], None if method == "base" else trained[(name, method)][0]
            )

        # Perfusion: every swept setting (the inference knob is the point of the method); the others have one
        setting_list = [None]
        if method == "perfusion":
            setting_list = [{"beta": b, "lock": "local"} for b in settings.local_betas]
            setting_list += [{"beta": b, "lock": "global"} for b in settings.global_betas]
        for setting in setting_list:
            pair_rows += evaluate_pairs(
                pipe,
                [(item(a), item(b)) for a, b in pair_names],
                embedder,
                pair_config,
                {n: t["threshold"] for n, t in thresholds.items()},
                template=PAIR_TEMPLATE,
                setting=setting,
                covariance=covariance,
                log=log,
            )

    # -- files ---------------------------------------------------------------------------------
    trained_methods = list(dict.fromkeys(method for _, method in trained))
    sizes = {method: {name: trained[(name, method)][0].size_bytes() for name in concepts} for method in trained_methods}
    times = {method: {name: round(trained[(name, method)][1], 2) for name in concepts} for method in trained_methods}
    extra = {
        "model": args.model,
        "model_trained": trained_flag,
        "settings": {k: v for k, v in settings.__dict__.items()},
        "device": args.device,
        "threads": torch.get_num_threads(),
        "concepts": {n: s for n, (s, _) in concepts.items()},
        "variant": variant.__dict__,
        "auto_betas": auto_betas,
    }
    write_results(rows, output, embedder_name=embedder.name, extra=extra)
    (output / "training.json").write_text(
        json.dumps({"size_bytes": sizes, "training_seconds": times, **extra}, indent=1) + "\n"
    )
    pair_summary = {}
    for row in pair_rows:
        key = label({"method": row["method"], "lock": row.get("lock"), "beta": row.get("beta")})
        entry = pair_summary.setdefault(key, {"images": 0, "both_present": 0, "a_present": 0, "b_present": 0})
        entry["images"] += 1
        for key in ("both_present", "a_present", "b_present"):
            entry[key] += int(row[key])
    (output / "pairs.json").write_text(
        json.dumps(
            {"template": PAIR_TEMPLATE, "thresholds": thresholds, "summary": pair_summary, "rows": pair_rows, **extra},
            indent=1,
        )
        + "\n"
    )
    report = front_report(summarize(rows), rows)
    (output / "front.json").write_text(json.dumps(report, indent=1) + "\n")
    _markdown(output, summarize(rows), embedder.name, sizes, times, pair_summary, thresholds, extra, report)
    (output / "log.txt").write_text("\n".join(log_lines) + "\n")
    log(f"done in {(time.time() - started) / 60:.1f} min; results in {output}")


def _markdown(output: Path, summary, embedder_name, sizes, times, pair_summary, thresholds, extra, report) -> None:
    lines = [
        f"# Personalization benchmark ({extra['model']}{'' if extra['model_trained'] is not False else ', UNTRAINED placeholder'})",
        "",
        f"Device {extra['device']}, {extra['threads']} thread(s). Settings: `{json.dumps(extra['settings'])}`",
        "",
        "![pareto](pareto.png)",
        "",
        summary_table(summary, embedder_name),
        "## Is Perfusion's front dominated? (front.json)",
        "",
        front_markdown(report),
        "## Size and training time per concept",
        "",
        "| method | mean bytes | mean training seconds |",
        "|---|---|---|",
    ]
    for method in sizes:
        lines.append(
            f"| {method} | {np.mean(list(sizes[method].values())):,.0f} | {np.mean(list(times[method].values())):.1f} |"
        )
    lines += [
        "",
        f'## Two concepts trained apart, prompted together ("{PAIR_TEMPLATE}")',
        "",
        "| method (setting) | images | A present | B present | both present |",
        "|---|---|---|---|---|",
    ]
    for method, entry in pair_summary.items():
        n = entry["images"]
        lines.append(
            f"| {method} | {n} | {entry['a_present'] / n:.0%} | {entry['b_present'] / n:.0%} | {entry['both_present'] / n:.0%} |"
        )
    lines += [
        "",
        "Presence thresholds (image alignment; balanced accuracy on real renders): "
        + ", ".join(
            f"{n}: {t['threshold']:.3f} ({t['calibration_balanced_accuracy']:.0%})" for n, t in thresholds.items()
        ),
        "",
    ]
    (output / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
