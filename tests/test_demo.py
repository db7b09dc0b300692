"""`keylocked demo` stages on a shortened setting, on the shipped emoji-64 model."""

from __future__ import annotations

import json

from PIL import Image

from keylocked.cli import main
from keylocked.concept import Concept
from keylocked.demo import foreground_similarity


def test_demo_writes_grid_concept_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            "--train_batch_size",
            "2",
            "--num_inference_steps",
            "2",
            "--betas",
            "0.6",
            "0.8",
            "--no-progress",
        ]
    )
    assert code == 0
    assert f"wrote {out / 'grid.png'}" in capsys.readouterr().out
    concept = Concept.load(out / "concept.safetensors")
    assert concept.placeholder_token == "<my-emoji>" and concept.superclass_token == "bear"
    assert concept.training["steps"] == 2
    grid = Image.open(out / "grid.png")
    assert grid.width > grid.height  # 6 prompt columns x (concept, super-category) rows
    assert Image.open(out / "beta_sweep.png").width > 2 * 64
    numbers = json.loads((out / "numbers.json").read_text())["numbers"]
    assert set(numbers["beta_sweep_identity_similarity"]) == {"0.6", "0.8"}
    report = (out / "report.md").read_text()
    assert "![grid](grid.png)" in report and str(numbers["concept_bytes"]) in report
    proxy = json.loads((out / "numbers.json").read_text())["proxy"]
    assert [c["label"] for c in proxy["columns"]][0] == "alone" and len(proxy["columns"]) == 6
    assert numbers["columns_above_superclass_baseline"] == proxy["columns_above_baseline"]
    assert "Columns above the super-category baseline" in report
    assert not list(out.glob(".*tmp"))  # nothing half-written left behind


def test_demo_rejects_unknown_concept(tmp_path, capsys):
    assert main(["demo", "--output_dir", str(tmp_path / "d"), "--concept", "unicorn sandwich"]) == 2
    assert "unknown demo concept" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_identity_similarity_helper():
    image = Image.new("RGB", (32, 32), (30, 70, 200))
    image.paste(Image.new("RGB", (10, 10), (220, 30, 30)), (11, 11))  # a red object on blue
    assert foreground_similarity(image, [image]) > 0.999
    assert foreground_similarity(image, [Image.new("RGB", (32, 32), (30, 70, 200))]) < 0.5
