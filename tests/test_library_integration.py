"""Library references at keylocked's entry points: train --register, generate --concept NAME, load_concepts."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import build_tiny_pipeline, write_instance_images
from PIL import Image

import keylocked
from keylocked import KeylockedError
from keylocked.cli import main
from keylocked.library import Library
from keylocked.library.resolve import looks_like_reference, resolve_concept_sources


def test_what_counts_as_a_reference(tmp_path):
    existing = tmp_path / "acme-mug"
    existing.write_text("x")
    assert looks_like_reference("acme-mug") and looks_like_reference("acme-mug@3")
    for path_like in (str(existing), "out/acme-mug", "acme-mug.safetensors", "a b", "acme@mug@2", 3):
        assert not looks_like_reference(path_like), path_like
    assert resolve_concept_sources([str(existing)]) == ([str(existing)], [])  # no library needed for files


def test_train_register_then_generate_and_load_by_reference(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("KEYLOCKED_LIBRARY", str(tmp_path / "lib"))
    monkeypatch.delenv("KEYLOCKED_API_KEY", raising=False)
    library = Library.init()
    code = main(
        [str(a) for a in ["train", "--pretrained_model_name_or_path", tiny_model_dir, "--instance_data_dir",
         write_instance_images(tmp_path / "images"), "--placeholder_token", "<cube>", "--superclass_token", "bear",
         "--output_dir", tmp_path / "out", "--max_train_steps", "1", "--train_batch_size", "1",
         "--gradient_accumulation_steps", "1", "--no-progress", "--register", "tiny-cube", "--project", "client-a"]]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "registered tiny-cube@1 (draft)" in capsys.readouterr().out
    [version] = library.show("tiny-cube").versions
    assert (
        version.status == "draft"
        and version.sha256 == hashlib.sha256((tmp_path / "out" / "concept.safetensors").read_bytes()).hexdigest()
    )
    library.approve("tiny-cube@1")
    library.grant("client-a", "tiny-cube")
    service = library.create_key("render-service", ["use"]).key

    monkeypatch.setenv("KEYLOCKED_API_KEY", service)
    argv = ["generate", "--pretrained_model_name_or_path", tiny_model_dir, "--concept", "tiny-cube",
            "--prompt", "a photo of a <cube>", "--num_images", "2", "--num_inference_steps", "2", "--no-progress",
            "--output_dir", tmp_path / "images-out"]  # fmt: skip
    assert main([*map(str, argv), "--project", "client-a"]) == 0
    pngs = sorted((tmp_path / "images-out").glob("seed-*.png"))
    provenance = json.loads(Image.open(pngs[0]).text["keylocked"])
    assert provenance["library"][0]["reference"] == "tiny-cube@1" and service not in json.dumps(provenance)
    entries = library.audit()
    use, generation = [e for e in entries if e.action in ("concept.use", "generate")][-2:]
    assert (use.actor, use.concept, use.version, use.outcome) == ("render-service", "tiny-cube", 1, "allowed")
    assert generation.details["prompt"] == "a photo of a <cube>"
    assert generation.details["images"] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in pngs]

    # The Python API: a reference loads like a file; another base model is a refusal with an audit row.
    pipe = build_tiny_pipeline()
    assert keylocked.load_concepts(pipe, ["tiny-cube"], project="client-a", api_key=service) == ["<cube>"]
    keylocked.unload_concepts(pipe)
    with pytest.raises(KeylockedError, match="project 'client-b' has no grant for 'tiny-cube'"):
        keylocked.load_concepts(pipe, ["tiny-cube"], project="client-b", api_key=service)
    other = build_tiny_pipeline(seed=1)
    with pytest.raises(KeylockedError, match="for another base model"):
        keylocked.load_concepts(other, ["tiny-cube@1"], project="client-a", api_key=service)
    assert library.audit()[-1].outcome == "denied"
