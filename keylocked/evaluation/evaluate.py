"""Generate and score: concepts × settings (β, lock, LoRA scale) × prompts × seeds -> rows, summary, Pareto plot.

Every row: concept, method, prompt, seed, beta, lock, scale, image_alignment, text_alignment.
Prompts are templates with one ``{}`` for the concept ("a {} on a blue background"); each
method fills in its own phrase (its token, or DreamBooth's "sks dog"), and text alignment is
measured against the template filled with the super-category word.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..base_model import KeylockedError
from ..personalizations import (
    Personalization,
    load_personalizations,
    set_personalization_options,
    unload_personalizations,
)
from .metrics import ImageTextEmbedder, image_alignment, text_alignment

ROW_FIELDS = ("concept", "method", "prompt", "seed", "beta", "lock", "scale", "image_alignment", "text_alignment")
BASE_METHOD = "base"  # the stock model prompted with the super-category word: a reference point


@dataclass
class EvalItem:
    """One trained concept to evaluate (``personalization=None``: the stock model with the super-category word)."""

    concept: str
    superclass: str
    references: list[Image.Image]  # the concept's training images
    personalization: Personalization | None = None

    @property
    def method(self) -> str:
        return self.personalization.method if self.personalization else BASE_METHOD

    @property
    def phrase(self) -> str:
        return self.personalization.prompt_phrase if self.personalization else self.superclass


@dataclass
class EvalConfig:
    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1)
    betas: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8)
    locks: tuple[str, ...] = ("local",)
    global_betas: tuple[float, ...] | None = None  # β values for the global lock (default: betas)
    tau: float | None = None  # None: each concept's recommendation
    lora_scales: tuple[float, ...] = (1.0,)
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    batch_size: int = 32
    images_dir: str | None = None  # save every generated image here when set

    def __post_init__(self) -> None:
        self.prompts, self.seeds, self.betas = tuple(self.prompts), tuple(self.seeds), tuple(self.betas)
        self.locks, self.lora_scales = tuple(self.locks), tuple(self.lora_scales)
        bad = [p for p in self.prompts if p.count("{}") != 1]
        if not self.prompts or bad:
            raise KeylockedError(f"prompts must each contain one '{{}}' for the concept, got {bad or 'none'}")
        if not self.seeds:
            raise KeylockedError("give at least one seed")
        if set(self.locks) - {"local", "global"}:
            raise KeylockedError(f"locks must be 'local' and/or 'global', got {self.locks}")

    def settings(self, method: str) -> list[dict]:
        """The inference knobs swept for ``method``: β × lock (Perfusion), scale (LoRA), none otherwise."""
        if method == "perfusion":
            out = []
            for lock in self.locks:
                betas = self.global_betas if lock == "global" and self.global_betas else self.betas
                out += [{"beta": beta, "lock": lock} for beta in betas]
            return out
        if method == "lora":
            return [{"scale": scale} for scale in self.lora_scales]
        return [{}]


def generate(pipe, prompts: list[str], seeds: list[int], config: EvalConfig) -> list[Image.Image]:
    """One image per (prompt, seed), batched; image i depends only on its own seed."""
    images = []
    for start in range(0, len(prompts), config.batch_size):
        chunk, chunk_seeds = prompts[start : start + config.batch_size], seeds[start : start + config.batch_size]
        generators = [torch.Generator(pipe.unet.device).manual_seed(s) for s in chunk_seeds]
        images += pipe(
            chunk,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            generator=generators,
        ).images
    return images


def evaluate(
    pipe,
    items: Iterable[EvalItem],
    embedder: ImageTextEmbedder,
    config: EvalConfig,
    output_dir: str | os.PathLike | None = None,
    covariance=None,
    log=print,
) -> list[dict]:
    """Generate and score every (item, setting, prompt, seed); writes results to ``output_dir`` when given."""
    rows = []
    for item in items:
        references = embedder.embed_images(item.references)  # (M, D)
        if item.personalization is not None:
            load_personalizations(pipe, [item.personalization], covariance=covariance, tau=config.tau)
        try:
            for setting in config.settings(item.method):
                if setting:
                    set_personalization_options(
                        pipe, beta=setting.get("beta"), lock=setting.get("lock"), lora_scale=setting.get("scale")
                    )
                started = time.perf_counter()
                cases = [(template, seed) for template in config.prompts for seed in config.seeds]
                prompts = [template.format(item.phrase) for template, _ in cases]
                images = generate(pipe, prompts, [seed for _, seed in cases], config)
                generated = embedder.embed_images(images)  # (N, D)
                texts = embedder.embed_texts([template.format(item.superclass) for template, _ in cases])  # (N, D)
                image_scores = image_alignment(generated, references)  # (N,)
                text_scores = text_alignment(generated, texts)  # (N,)
                for index, ((template, seed), image) in enumerate(zip(cases, images)):
                    rows.append(
                        {
                            "concept": item.concept,
                            "method": item.method,
                            "prompt": template,
                            "seed": seed,
                            "beta": setting.get("beta"),
                            "lock": setting.get("lock"),
                            "scale": setting.get("scale"),
                            "image_alignment": round(float(image_scores[index]), 5),
                            "text_alignment": round(float(text_scores[index]), 5),
                        }
                    )
                    if config.images_dir:
                        _save_image(image, Path(config.images_dir), item, setting, template, seed)
                log(
                    f"{item.concept:>16} {item.method:<18} {_setting_label(setting):<16} image {image_scores.mean():.3f} "
                    f"text {text_scores.mean():.3f} ({time.perf_counter() - started:.1f} s)"
                )
        finally:
            if item.personalization is not None:
                unload_personalizations(pipe)
    if output_dir is not None:
        write_results(rows, output_dir, embedder_name=getattr(embedder, "name", type(embedder).__name__))
    return rows


def _setting_label(setting: dict) -> str:
    if "beta" in setting:
        return f"{setting['lock']} β={setting['beta']:g}"
    if "scale" in setting:
        return f"scale={setting['scale']:g}"
    return "-"


def _save_image(image: Image.Image, root: Path, item: EvalItem, setting: dict, template: str, seed: int) -> None:
    slug = lambda text: "".join(c if c.isalnum() else "-" for c in text).strip("-")  # noqa: E731
    folder = root / slug(item.concept) / f"{item.method}{'-' + slug(_setting_label(setting)) if setting else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{slug(template.format('X'))}-s{seed}.png")


# ---------------------------------------------------------------------------------------
# Summaries and files.


def summarize(rows: list[dict]) -> list[dict]:
    """Mean/std of both alignments per (method, lock, beta, scale), over concepts × prompts × seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["lock"], row["beta"], row["scale"]), []).append(row)
    summary = []
    for (method, lock, beta, scale), members in groups.items():
        entry = {
            "method": method,
            "lock": lock,
            "beta": beta,
            "scale": scale,
            "n": len(members),
            "concepts": len({m["concept"] for m in members}),
        }
        for metric in ("image_alignment", "text_alignment"):
            values = torch.tensor([m[metric] for m in members], dtype=torch.float64)
            entry[metric] = round(float(values.mean()), 4)
            entry[metric + "_std"] = round(float(values.std()) if len(values) > 1 else 0.0, 4)
        summary.append(entry)
    order = {"base": 0, "perfusion": 1, "textual-inversion": 2, "custom-diffusion": 3, "lora": 4}
    return sorted(summary, key=lambda e: (order.get(e["method"], 9), e["lock"] or "", e["beta"] or 0, e["scale"] or 0))


def write_results(
    rows: list[dict], output_dir: str | os.PathLike, embedder_name: str = "", extra: dict | None = None
) -> dict[str, Path]:
    """rows.json/.csv, summary.json/.csv/.md and pareto.png in ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    paths = {
        name: output_dir / name
        for name in ("rows.json", "rows.csv", "summary.json", "summary.csv", "summary.md", "pareto.png")
    }
    meta = {"embedder": embedder_name, **(extra or {})}
    paths["rows.json"].write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    paths["summary.json"].write_text(json.dumps({**meta, "summary": summary}, indent=1) + "\n")
    _write_csv(paths["rows.csv"], rows, ROW_FIELDS)
    _write_csv(paths["summary.csv"], summary, list(summary[0]) if summary else [])
    paths["summary.md"].write_text(summary_table(summary, embedder_name))
    plot_pareto(summary, paths["pareto.png"], embedder_name=embedder_name)
    return paths


def _write_csv(path: Path, rows: list[dict], fields) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in fields})


def summary_table(summary: list[dict], embedder_name: str = "") -> str:
    """Markdown table of the summary (raw cosines)."""
    lines = [
        f"Raw cosines, embedder: {embedder_name or '?'}; mean ± std over concepts × prompts × seeds.",
        "",
        "| method | lock | β | scale | image alignment | text alignment | n |",
        "|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "" if v is None else f"{v:g}"  # noqa: E731
    for e in summary:
        lines.append(
            f"| {e['method']} | {e['lock'] or ''} | {fmt(e['beta'])} | {fmt(e['scale'])} | "
            f"{e['image_alignment']:.4f} ± {e['image_alignment_std']:.4f} | "
            f"{e['text_alignment']:.4f} ± {e['text_alignment_std']:.4f} | {e['n']} |"
        )
    return "\n".join(lines) + "\n"


def plot_pareto(
    summary: list[dict], path: str | os.PathLike, embedder_name: str = "", title: str = "Personalization trade-off"
) -> Path:
    """PNG: text alignment (x) vs image alignment (y); one curve per method (and lock), points labelled by knob."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[dict]] = {}
    for entry in summary:
        label = entry["method"] + (f" ({entry['lock']} lock)" if entry["lock"] else "")
        curves.setdefault(label, []).append(entry)
    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    markers = iter(["o", "s", "^", "D", "v", "P", "X", "*"])
    for label, entries in curves.items():
        entries = sorted(
            entries, key=lambda e: e["beta"] if e["beta"] is not None else e["scale"] if e["scale"] is not None else 0
        )
        xs, ys = [e["text_alignment"] for e in entries], [e["image_alignment"] for e in entries]
        axes.plot(xs, ys, marker=next(markers, "o"), linestyle="-" if len(entries) > 1 else "none", label=label)
        for e, x, y in zip(entries, xs, ys):
            knob = (
                f"β={e['beta']:g}"
                if e["beta"] is not None
                else f"×{e['scale']:g}"
                if e["scale"] is not None and len(entries) > 1
                else ""
            )
            if knob:
                axes.annotate(knob, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    axes.set_xlabel(f"text alignment (cosine{', ' + embedder_name if embedder_name else ''})")
    axes.set_ylabel("image alignment (cosine)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------
# Several concepts trained apart, prompted together.


def evaluate_pairs(
    pipe,
    pairs: list[tuple[EvalItem, EvalItem]],
    embedder: ImageTextEmbedder,
    config: EvalConfig,
    thresholds: dict[str, float],
    template: str = "a {} and a {}",
    setting: dict | None = None,
    covariance=None,
    log=print,
) -> list[dict]:
    """For each pair (same method), load both, prompt them together; a concept counts as present
    when its image alignment exceeds ``thresholds[concept]``. One row per (pair, seed)."""
    rows = []
    for first, second in pairs:
        if first.method != second.method:
            raise KeylockedError(f"a pair must use one method, got {first.method} and {second.method}")
        loaded = [i.personalization for i in (first, second) if i.personalization is not None]
        if loaded:
            load_personalizations(pipe, loaded, covariance=covariance, tau=config.tau)
        try:
            if setting:
                set_personalization_options(
                    pipe, beta=setting.get("beta"), lock=setting.get("lock"), lora_scale=setting.get("scale")
                )
            prompt = template.format(first.phrase, second.phrase)
            images = generate(pipe, [prompt] * len(config.seeds), list(config.seeds), config)
            generated = embedder.embed_images(images)  # (S, D)
            text = embedder.embed_texts([template.format(first.superclass, second.superclass)] * len(images))
            scores = {
                i.concept: image_alignment(generated, embedder.embed_images(i.references)) for i in (first, second)
            }
            text_scores = text_alignment(generated, text)
            for index, seed in enumerate(config.seeds):
                found = {c: bool(s[index] > thresholds[c]) for c, s in scores.items()}
                rows.append(
                    {
                        "method": first.method,
                        "pair": f"{first.concept} + {second.concept}",
                        "seed": seed,
                        "beta": (setting or {}).get("beta"),
                        "lock": (setting or {}).get("lock"),
                        **{
                            f"image_alignment_{k}": round(float(scores[c][index]), 5)
                            for k, c in (("a", first.concept), ("b", second.concept))
                        },
                        "text_alignment": round(float(text_scores[index]), 5),
                        "a_present": found[first.concept],
                        "b_present": found[second.concept],
                        "both_present": all(found.values()),
                    }
                )
            both = sum(r["both_present"] for r in rows[-len(config.seeds) :])
            log(f"pair {first.concept} + {second.concept} [{first.method}]: both present in {both}/{len(config.seeds)}")
        finally:
            if loaded:
                unload_personalizations(pipe)
    return rows
