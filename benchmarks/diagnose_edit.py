"""Where does the edit act? Per token class and layer: how far the edited K/V rows move from stock.

    python benchmarks/diagnose_edit.py                                  # shipped emoji-64 + docs/demo concept
    python benchmarks/diagnose_edit.py --concept path/to/concept.safetensors --beta 0.7

For prompts as the demo writes them (and the empty negative prompt of classifier-free guidance),
every position is put in one class: the concept token, the other words, start/end ([CLS]/[SEP]
or BOS/EOS), padding, and every position of the negative prompt "". For each class and each
cross-attention layer it reports

- the concept score ``s(e)`` and the gate ``σ((s − β)/τ)``,
- how far the edited key and value rows move from the stock ``W e``: ``‖W'e − W e‖ / ‖W e‖``,
- for the concept token: how far its key lands from the locked key ``b + W_K i*_super``
  (relative to the locked key's norm),

for each edit variant (edit form × key lock, docs/method.md "Edit options"). Prints a table and
writes JSON to ``benchmarks/results/diagnose-edit.json``. No generation, seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keylocked.base_model import cross_attention_layers, tokenize  # noqa: E402
from keylocked.concept import Concept  # noqa: E402
from keylocked.edit_options import EDITS, KEY_LOCKS  # noqa: E402
from keylocked.loading import load_concepts, set_concept_options, unload_concepts  # noqa: E402
from keylocked.perfusion import concept_gate, concept_scores  # noqa: E402

PROMPTS = (
    "a {}",
    "a {} on a red background",
    "a {} on a blue background",
    "a {} on a green background",
    "a {} on a yellow background",
    "a {} and an apple",
    "a large {} in the center",
)
CLASSES = ("concept token", "other words", "start/end", "padding", 'negative prompt ""')


def position_classes(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_id: int, negative_rows: int):
    """{class: (B, T) bool}; the first ``negative_rows`` rows are the negative prompt, whole."""
    real = attention_mask.bool()  # (B, T)
    positions = torch.arange(input_ids.shape[1])  # (T,)
    last = real.sum(1, keepdim=True) - 1  # (B, 1) index of the end token
    start_end = real & ((positions == 0) | (positions == last))  # (B, T)
    concept = input_ids == token_id
    negative = torch.zeros_like(real)
    negative[:negative_rows] = True
    prompt = ~negative
    return {
        "concept token": concept & prompt,
        "other words": real & ~start_end & ~concept & prompt,
        "start/end": start_end & prompt,
        "padding": ~real & prompt,
        'negative prompt ""': negative,
    }


def _stats(values: torch.Tensor) -> dict:
    return {
        "mean": round(float(values.mean()), 4),
        "min": round(float(values.min()), 4),
        "max": round(float(values.max()), 4),
        "n": int(values.numel()),
    }


@torch.no_grad()
def diagnose(pipe, concept_path: Path, beta: float | None, tau: float | None, covariance: str | None) -> dict:
    concept = Concept.load(concept_path)
    load_concepts(pipe, concept_path, beta=beta, tau=tau, covariance=covariance)
    try:
        installation = pipe.unet._keylocked_installation
        context = installation.context
        slot = context.concepts[concept.placeholder_token]
        token_id = installation.token_ids[concept.placeholder_token]
        prompts = [""] + [p.format(concept.placeholder_token) for p in PROMPTS]
        tokens = tokenize(pipe.tokenizer, prompts)
        encodings = pipe.text_encoder(tokens.input_ids)[0]  # (B, T, d); the hook records the token ids
        classes = position_classes(tokens.input_ids, tokens.attention_mask, token_id, negative_rows=1)
        c_inv = context.input_covariance_inv
        scores = concept_scores(encodings, slot.concept_input[None], c_inv)[..., 0]  # (B, T)
        gates = concept_gate(scores, slot.beta, slot.temperature)  # (B, T)
        result = {
            "concept": str(concept_path),
            "token": concept.placeholder_token,
            "superclass": concept.superclass_token,
            "beta": slot.beta,
            "tau": slot.temperature,
            "prompts": prompts,
            "score": {name: _stats(scores[mask]) for name, mask in classes.items()},
            "gate": {name: _stats(gates[mask]) for name, mask in classes.items()},
            "variants": {},
        }
        layers = cross_attention_layers(pipe.unet)
        for edit in EDITS:
            for key_lock in KEY_LOCKS:
                set_concept_options(pipe, edit=edit, key_lock=key_lock)
                per_layer = {}
                for name, layer in layers.items():
                    entry = {}
                    for role, module in (("key", layer.to_k), ("value", layer.to_v)):
                        stock = module.base_layer(encodings)  # (B, T, out)
                        moved = (module(encodings) - stock).norm(dim=-1) / stock.norm(dim=-1).clamp_min(1e-12)
                        entry[role] = {cls: _stats(moved[mask]) for cls, mask in classes.items()}
                    keys = layer.to_k(encodings)[classes["concept token"]]  # (N, out)
                    locked = layer.to_k.base_layer(slot.superclass_input[None].to(keys))  # (1, out)
                    entry["concept_key_from_locked"] = _stats((keys - locked).norm(dim=-1) / locked.norm())
                    per_layer[name] = entry
                result["variants"][f"{edit} / {key_lock}"] = {"edit": edit, "key_lock": key_lock, "layers": per_layer}
        return result
    finally:
        unload_concepts(pipe)


def _across_layers(layers: dict, role: str, cls: str) -> tuple[float, float, float]:
    means = [entry[role][cls]["mean"] for entry in layers.values()]
    return sum(means) / len(means), min(means), max(means)


def table(result: dict) -> str:
    lines = [
        f"concept {result['token']} (super-category {result['superclass']!r}), β={result['beta']:g}, τ={result['tau']:g}",
        "",
        "| position class | score s mean [min, max] | gate mean [max] |",
        "|---|---|---|",
    ]
    for cls in CLASSES:
        s, g = result["score"][cls], result["gate"][cls]
        lines.append(f"| {cls} | {s['mean']:.3f} [{s['min']:.3f}, {s['max']:.3f}] | {g['mean']:.3f} [{g['max']:.3f}] |")
    lines += [
        "",
        "Relative move of the edited rows from stock, ‖W'e − W e‖/‖W e‖: mean over the class and the "
        "layers [lowest, highest layer mean].",
        "",
        "| variant (edit / key lock) | class | K moves | V moves |",
        "|---|---|---|---|",
    ]
    for variant, data in result["variants"].items():
        for cls in CLASSES:
            k, v = _across_layers(data["layers"], "key", cls), _across_layers(data["layers"], "value", cls)
            lines.append(
                f"| {variant} | {cls} | {k[0]:.1%} [{k[1]:.1%}, {k[2]:.1%}] | {v[0]:.1%} [{v[1]:.1%}, {v[2]:.1%}] |"
            )
    lines += ["", "| variant | concept token's key from b + W_K i*_super: mean [lowest, highest layer] |", "|---|---|"]
    for variant, data in result["variants"].items():
        means = [entry["concept_key_from_locked"]["mean"] for entry in data["layers"].values()]
        lines.append(f"| {variant} | {sum(means) / len(means):.1%} [{min(means):.1%}, {max(means):.1%}] |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="emoji-64")
    parser.add_argument("--concept", type=Path, default=ROOT / "docs" / "demo" / "concept.safetensors")
    parser.add_argument("--beta", type=float, default=None, help="default: the concept's recommended β")
    parser.add_argument("--tau", type=float, default=None, help="default: the concept's recommended τ")
    parser.add_argument("--covariance", default=None, help="default: the model's bundled covariance")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "diagnose-edit.json")
    args = parser.parse_args(argv)
    from keylocked.models import load_pipeline

    pipe = load_pipeline(args.model)
    result = diagnose(pipe, args.concept, args.beta, args.tau, args.covariance)
    result["model"] = args.model
    text = table(result)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    args.output.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
