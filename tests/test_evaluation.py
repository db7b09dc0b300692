"""Alignment metrics on known cosines, the evaluation loop and its files, the embedders' plumbing."""

from __future__ import annotations

import csv
import json
import math
import zlib

import numpy as np
import pytest
import torch
from conftest import build_tiny_pipeline, write_instance_images
from PIL import Image

from keylocked.evaluation import (
    CLIPEmbedder,
    EmojiEvaluator,
    EvalConfig,
    EvalItem,
    ImageTextEmbedder,
    evaluate,
    evaluate_pairs,
    image_alignment,
    plot_pareto,
    separating_threshold,
    summarize,
    superclass_prompt,
    text_alignment,
)
from keylocked.evaluation.embedders import ImageTower
from keylocked.evaluation.metrics import cosine_matrix, present
from keylocked.personalizations import Personalization
from keylocked.training import TrainConfig, train

SQRT_HALF = math.sqrt(0.5)


class ColourEmbedder:
    """Fake embedder: an image is its mean RGB minus 0.5; a text is a fixed vector from its checksum."""

    name = "fake-colour"

    def embed_images(self, images):
        return torch.tensor(
            np.stack([np.asarray(i.convert("RGB"), dtype=np.float32).mean((0, 1)) / 255 - 0.5 for i in images])
        )

    def embed_texts(self, texts):
        return torch.stack(
            [torch.randn(3, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
        )


# -- pure metrics --------------------------------------------------------------------------


def test_cosines_of_known_vectors():
    generated = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    references = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(cosine_matrix(generated, references), torch.tensor([[1.0, SQRT_HALF], [0.0, SQRT_HALF]]))
    assert torch.allclose(image_alignment(generated, references), torch.tensor([(1 + SQRT_HALF) / 2, SQRT_HALF / 2]))
    texts = torch.tensor([[-1.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(text_alignment(generated, texts), torch.tensor([-1.0, SQRT_HALF]))
    assert present(generated, references, threshold=0.5).tolist() == [True, False]


def test_metric_input_errors():
    with pytest.raises(ValueError, match="one text per image"):
        text_alignment(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="at least one reference"):
        image_alignment(torch.ones(2, 3), torch.ones(0, 3))
    with pytest.raises(ValueError, match="does not mention"):
        superclass_prompt("a dog on a blue background", "<my-dog>", "dog")


def test_superclass_prompt_replaces_the_phrase():
    assert superclass_prompt("a <my-dog> on a blue background", "<my-dog>", "dog") == "a dog on a blue background"
    assert superclass_prompt("a photo of sks dog", "sks dog", "dog") == "a photo of dog"


@pytest.mark.parametrize(
    "positives, negatives, accuracy",
    [([0.9, 0.8, 0.7], [0.1, 0.2, 0.3], 1.0), ([0.9, 0.2], [0.1, 0.3], 0.75)],
)
def test_separating_threshold(positives, negatives, accuracy):
    threshold, found = separating_threshold(torch.tensor(positives), torch.tensor(negatives))
    assert found == pytest.approx(accuracy)
    if accuracy == 1.0:
        assert 0.3 < threshold < 0.7


def test_summary_and_pareto_plot(tmp_path):
    rows = [
        {
            "concept": c,
            "method": m,
            "prompt": "a {}",
            "seed": s,
            "beta": b,
            "lock": lock,
            "scale": None,
            "image_alignment": ia,
            "text_alignment": ta,
        }
        for c in ("x", "y")
        for s in (0, 1)
        for m, b, lock, ia, ta in [
            ("perfusion", 0.5, "local", 0.8, 0.2),
            ("perfusion", 0.7, "local", 0.6, 0.3),
            ("textual-inversion", None, None, 0.5, 0.1),
        ]
    ]
    summary = summarize(rows)
    assert [(e["method"], e["beta"], e["n"], e["concepts"]) for e in summary] == [
        ("perfusion", 0.5, 4, 2),
        ("perfusion", 0.7, 4, 2),
        ("textual-inversion", None, 4, 2),
    ]
    assert summary[0]["image_alignment"] == pytest.approx(0.8) and summary[0]["image_alignment_std"] == pytest.approx(
        0.0
    )
    path = plot_pareto(summary, tmp_path / "pareto.png", embedder_name="fake")
    assert path.stat().st_size > 1000 and Image.open(path).format == "PNG"


# -- the evaluation loop on the tiny model -----------------------------------------------------


@pytest.fixture(scope="module")
def perfusion_item(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    instance = write_instance_images(root / "instance")
    config = TrainConfig(
        pretrained_model_name_or_path="unused",
        instance_data_dir=str(instance),
        placeholder_token="<my-thing>",
        superclass_token="bear",
        output_dir=str(root / "concept"),
        max_train_steps=2,
        train_batch_size=2,
        gradient_accumulation_steps=1,
        checkpointing_steps=2,
        progress=False,
    )
    path = train(config, method="perfusion", pipe=pipe)
    references = [Image.open(p).convert("RGB") for p in sorted(instance.iterdir())]
    return pipe, EvalItem("thing", "bear", references, Personalization.from_path(path))


def test_evaluate_writes_every_row_and_scores_match_the_saved_images(perfusion_item, tmp_path):
    pipe, item = perfusion_item
    base = EvalItem("thing", "bear", item.references)
    config = EvalConfig(
        prompts=("a {} on a table", "a photo of a {}"),
        seeds=(0, 1),
        betas=(0.6, 0.8),
        locks=("local", "global"),
        global_betas=(0.5,),
        num_inference_steps=2,
        images_dir=str(tmp_path / "images"),
    )
    embedder = ColourEmbedder()
    assert isinstance(embedder, ImageTextEmbedder)
    rows = evaluate(pipe, [base, item], embedder, config, output_dir=tmp_path / "out", log=lambda *_: None)
    # base: 2 prompts × 2 seeds; perfusion: (2 local + 1 global β) × 2 × 2
    assert len(rows) == 4 + 12
    assert {(r["lock"], r["beta"]) for r in rows if r["method"] == "perfusion"} == {
        ("local", 0.6),
        ("local", 0.8),
        ("global", 0.5),
    }
    assert not hasattr(pipe.unet, "_keylocked_installation")  # unloaded afterwards
    # recompute one row from its saved image with the fake embedder
    row = next(
        r
        for r in rows
        if r["method"] == "perfusion" and r["beta"] == 0.8 and r["seed"] == 1 and r["prompt"] == "a {} on a table"
    )
    image = Image.open(tmp_path / "images" / "thing" / "perfusion-local-β-0-8" / "a-X-on-a-table-s1.png")
    generated = embedder.embed_images([image])
    expected_image = image_alignment(generated, embedder.embed_images(item.references))[0]
    expected_text = text_alignment(generated, embedder.embed_texts(["a bear on a table"]))[0]
    assert row["image_alignment"] == pytest.approx(float(expected_image), abs=2e-3)  # PNG is 8-bit
    assert row["text_alignment"] == pytest.approx(float(expected_text), abs=2e-3)
    # files
    out = tmp_path / "out"
    with (out / "rows.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 16 and list(table[0]) == [
        "concept",
        "method",
        "prompt",
        "seed",
        "beta",
        "lock",
        "scale",
        "image_alignment",
        "text_alignment",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["embedder"] == "fake-colour" and len(summary["summary"]) == 4
    assert "| perfusion | global | 0.5 |" in (out / "summary.md").read_text()
    assert (out / "pareto.png").stat().st_size > 1000


def test_evaluate_pairs_decides_presence_by_threshold(perfusion_item):
    pipe, item = perfusion_item
    other = EvalItem("other", "cup", item.references)
    base_first = EvalItem("thing", "bear", item.references)
    config = EvalConfig(prompts=("a {}",), seeds=(0, 1), num_inference_steps=2)
    rows = evaluate_pairs(
        pipe,
        [(base_first, other)],
        ColourEmbedder(),
        config,
        thresholds={"thing": -2.0, "other": 2.0},
        log=lambda *_: None,
    )
    assert len(rows) == 2
    assert all(r["a_present"] and not r["b_present"] and not r["both_present"] for r in rows)


def test_eval_config_checks_inputs():
    with pytest.raises(ValueError, match="one '\\{\\}'"):
        EvalConfig(prompts=("a photo",))
    with pytest.raises(ValueError, match="locks"):
        EvalConfig(prompts=("a {}",), locks=("sideways",))


# -- embedders --------------------------------------------------------------------------------


def _tiny_clip(folder):
    """A random tiny CLIP + processor saved offline (character-level BPE vocabulary, no merges)."""
    import string

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,'!?-<>")
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    ).save_pretrained(folder)
    return folder


def test_clip_embedder_from_a_local_folder(tmp_path):
    embedder = CLIPEmbedder(_tiny_clip(tmp_path / "clip"), batch_size=2)
    images = [Image.new("RGB", (40, 48), c) for c in ("red", "blue", "red")]
    embedded = embedder.embed_images(images)
    assert embedded.shape == (3, 16)
    assert torch.allclose(embedded[0], embedded[2]) and not torch.allclose(embedded[0], embedded[1])
    texts = embedder.embed_texts(["a dog", "a red dog on a blue background", "a dog"])
    assert texts.shape == (3, 16) and torch.allclose(texts[0], texts[2], atol=1e-6)
    assert isinstance(embedder, ImageTextEmbedder) and embedder.name == "clip:clip"


def test_clip_embedder_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="no CLIP model"):
        CLIPEmbedder(tmp_path / "nothing")


def test_emoji_evaluator_round_trip(tmp_path):
    torch.manual_seed(0)
    evaluator = EmojiEvaluator(ImageTower(widths=(8, 16, 16, 32)), info={"steps": 0})
    images = [Image.new("RGB", (64, 64), "yellow"), Image.new("RGBA", (30, 30), (0, 0, 255, 128))]
    before = evaluator.embed_images(images)
    path = evaluator.save(tmp_path / "evaluator.safetensors")
    loaded = EmojiEvaluator.load(path)
    assert loaded.info == {"steps": 0} and loaded.tower.widths == (8, 16, 16, 32)
    after = loaded.embed_images(images)
    assert after.shape == (2, 384) and torch.allclose(after.norm(dim=-1), torch.ones(2))
    assert torch.allclose(before, after, atol=5e-3)  # fp16 weights on disk
    texts = loaded.embed_texts(["a dog on a blue background", "a cat face"])
    assert texts.shape == (2, 384) and torch.allclose(texts.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="not found"):
        EmojiEvaluator.load(tmp_path / "missing.safetensors")


def test_evaluation_command_with_a_local_clip(perfusion_item, tiny_model_dir, tmp_path, capsys):
    """python -m keylocked.evaluation on the tiny model: base + one concept, CLIP embedder from a folder."""
    from keylocked.evaluation.__main__ import main

    _, item = perfusion_item
    references = tmp_path / "refs"
    references.mkdir()
    for index, image in enumerate(item.references):
        image.save(references / f"{index}.png")
    code = main(
        [
            "--pretrained_model_name_or_path",
            str(tiny_model_dir),
            "--concept",
            str(item.personalization.path),
            "--references",
            str(references),
            "--superclass",
            "bear",
            "--prompt",
            "a {} on a table",
            "--seeds",
            "0",
            "--betas",
            "0.7",
            "--num_inference_steps",
            "2",
            "--embedder",
            str(_tiny_clip(tmp_path / "clip")),
            "--no-stock_rows",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "out" / "rows.json").read_text())
    assert rows["embedder"] == "clip:clip" and len(rows["rows"]) == 1 and rows["rows"][0]["beta"] == 0.7
    assert (
        main(
            [
                "--pretrained_model_name_or_path",
                str(tiny_model_dir),
                "--concept",
                str(tmp_path),
                "--references",
                str(references),
                "--superclass",
                "bear",
                "--prompt",
                "a {}",
            ]
        )
        == 2
    )


def test_evaluate_flags_are_the_dataclass_fields(tmp_path):
    """`keylocked evaluate`'s flags are generated: one per EvaluateInputs/EvalConfig field, and nothing else."""
    import argparse
    import dataclasses

    from keylocked.cli import build_parser, dataclass_from_args
    from keylocked.evaluation.__main__ import EvaluateInputs

    evaluate_parser = build_parser()._subparsers._group_actions[0].choices["evaluate"]
    # --api_key (the concept library key) is deliberately no field: inputs may be written out, a key never.
    dests = {a.dest for a in evaluate_parser._actions if not isinstance(a, argparse._HelpAction)} - {"debug", "api_key"}
    fields = {f.name for cls in (EvaluateInputs, EvalConfig) for f in dataclasses.fields(cls)}
    assert dests == fields
    args = evaluate_parser.parse_args(
        ["--pretrained_model_name_or_path", "m", "--concept", "a", "--references", "r", "--superclass", "dog"]
        + ["--concept", "b", "--references", "s", "--superclass", "cat", "--prompt", "a {}", "--prompt", "the {}"]
        + ["--locks", "local", "global", "--tau", "0.2", "--no-stock_rows", "--batch_size", "3"]
    )
    inputs, config = dataclass_from_args(EvaluateInputs, args), dataclass_from_args(EvalConfig, args)
    assert inputs.concepts == ["a", "b"] and inputs.superclasses == ["dog", "cat"] and not inputs.stock_rows
    assert config.prompts == ("a {}", "the {}") and config.locks == ("local", "global")
    assert (config.tau, config.batch_size) == (0.2, 3)
    assert config.betas == EvalConfig(prompts=("a {}",)).betas  # unset flags keep the dataclass's defaults
    with pytest.raises(ValueError, match="one --references and one --superclass per --concept"):
        EvaluateInputs("m", ("a", "b"), ("r",), ("dog",))
