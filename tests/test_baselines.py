"""Baselines on the tiny model: train (2 steps) -> save -> load in their ecosystem's loader -> unload exactly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_pipeline, write_instance_images
from safetensors.torch import load_file
from test_keylocking import config, generate

from keylocked.base_model import KeylockedError, cross_attention_layers
from keylocked.personalizations import (
    CD_FILENAME,
    LORA_FILENAME,
    MANIFEST_FILENAME,
    TI_FILENAME,
    DeltaLinear,
    Personalization,
    load_personalizations,
    unload_personalizations,
)
from keylocked.training import BaselineOptions, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every method trained once (2 steps) on one tiny pipeline; returns (pipe, stock image, {method: path})."""
    root = tmp_path_factory.mktemp("baselines")
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    stock = generate(pipe, "a photo of a bear")
    instance = write_instance_images(root / "instance")
    paths = {}
    for method in ("perfusion", "textual-inversion", "custom-diffusion", "lora"):
        paths[method] = train(config(instance, root / method), method=method, pipe=pipe)
        assert (generate(pipe, "a photo of a bear") == stock).all(), f"{method} training left the pipeline changed"
    paths["cd-second"] = train(
        config(instance, root / "cd2", placeholder_token="<cup-thing>", superclass_token="cup"),
        method="custom-diffusion",
        pipe=pipe,
    )
    paths["lora-second"] = train(
        config(instance, root / "lora2", superclass_token="cup"),
        method="lora",
        pipe=pipe,
        options=BaselineOptions(identifier="zq"),
    )
    return pipe, stock, paths


def test_every_method_writes_its_file_and_manifest(trained):
    _, _, paths = trained
    assert paths["perfusion"].name == "concept.safetensors"
    assert paths["textual-inversion"].name == TI_FILENAME
    assert paths["custom-diffusion"].name == CD_FILENAME
    assert paths["lora"].name == LORA_FILENAME
    for method in ("textual-inversion", "custom-diffusion", "lora"):
        manifest = json.loads((paths[method].parent / MANIFEST_FILENAME).read_text())
        assert manifest["method"] == method and manifest["training"]["steps"] == 2
        assert manifest["prompt_phrase"] == ("sks bear" if method == "lora" else "<my-thing>")
        item = Personalization.from_path(paths[method].parent)
        assert item.method == method and item.size_bytes() == paths[method].stat().st_size
    assert Personalization.from_path(paths["perfusion"].parent).method == "perfusion"


def test_textual_inversion_loads_with_diffusers(trained):
    pipe, stock, paths = trained
    saved = load_file(str(paths["textual-inversion"]))
    assert list(saved) == ["<my-thing>"] and saved["<my-thing>"].shape == (1, 32)
    bear = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("bear")]
    assert not torch.allclose(saved["<my-thing>"][0].float(), bear, atol=1e-3)  # it trained
    item = Personalization.from_path(paths["textual-inversion"].parent)
    load_personalizations(pipe, [item])  # goes through pipe.load_textual_inversion(path, token=...)
    token_id = pipe.tokenizer.convert_tokens_to_ids("<my-thing>")
    row = pipe.text_encoder.get_input_embeddings().weight[token_id]
    assert torch.allclose(row, saved["<my-thing>"][0].float())
    assert not (generate(pipe, "a photo of a <my-thing>") == stock).all()
    unload_personalizations(pipe)
    assert "<my-thing>" not in pipe.tokenizer.get_vocab()
    assert (generate(pipe, "a photo of a bear") == stock).all()


def test_textual_inversion_file_is_plain_diffusers_format(trained, tiny_pipe):
    _, _, paths = trained
    tiny_pipe.load_textual_inversion(str(paths["textual-inversion"]), token="<my-thing>")
    assert "<my-thing>" in tiny_pipe.tokenizer.get_vocab()


def test_lora_loads_with_diffusers(trained, tiny_pipe):
    pipe, stock, paths = trained
    from peft.tuners.lora import LoraLayer

    saved = load_file(str(paths["lora"]))
    assert saved and all(k.startswith("unet.") and "lora" in k for k in saved)
    tiny_pipe.load_lora_weights(str(paths["lora"].parent))  # the plain diffusers call on a fresh pipeline
    layers = [m for m in tiny_pipe.unet.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 4 * 2 * 7  # q, k, v, out of self- and cross-attention in 7 transformer blocks
    item = Personalization.from_path(paths["lora"].parent)
    load_personalizations(pipe, [item])
    changed = generate(pipe, "a photo of a bear")
    assert not (changed == stock).all()  # LoRA changes the UNet for every prompt
    unload_personalizations(pipe)
    assert (generate(pipe, "a photo of a bear") == stock).all()


def test_custom_diffusion_deltas_apply_and_unload(trained):
    pipe, stock, paths = trained
    saved = load_file(str(paths["custom-diffusion"]))
    layers = cross_attention_layers(pipe.unet)
    assert len([k for k in saved if k.startswith("deltas.")]) == 2 * len(layers)
    assert any(saved[k].abs().max() > 0 for k in saved if k.startswith("deltas."))  # it trained
    load_personalizations(
        pipe, [paths["custom-diffusion"].parent, paths["cd-second"].parent]
    )  # trained apart, used together
    name, layer = next(iter(layers.items()))
    assert isinstance(layer.to_k, DeltaLinear)
    e = torch.randn(1, 3, layer.to_k.in_features)
    weight = (
        layer.to_k.base_layer.weight
        + saved[f"deltas.{name}.to_k"].float()
        + load_file(str(paths["cd-second"]))[f"deltas.{name}.to_k"].float()
    )
    assert torch.allclose(layer.to_k(e), F.linear(e, weight), atol=1e-5)
    unload_personalizations(pipe)
    assert not any(isinstance(m, DeltaLinear) for m in pipe.unet.modules())
    assert (generate(pipe, "a photo of a bear") == stock).all()


def test_two_loras_with_their_own_identifiers(trained):
    pipe, stock, paths = trained
    phrases = load_personalizations(pipe, [paths["lora"].parent, paths["lora-second"].parent], lora_scale=0.5)
    assert phrases == {"sks bear": "bear", "zq cup": "cup"}
    generate(pipe, "a sks bear and a zq cup")
    unload_personalizations(pipe)
    assert (generate(pipe, "a photo of a bear") == stock).all()


def test_mixed_methods_and_bad_inputs_are_refused(trained, tmp_path):
    pipe, _, paths = trained
    with pytest.raises(KeylockedError, match="one method"):
        load_personalizations(pipe, [paths["lora"].parent, paths["custom-diffusion"].parent])
    with pytest.raises(KeylockedError, match="same prompt phrase"):
        load_personalizations(pipe, [paths["lora"].parent, paths["lora"].parent])
    with pytest.raises(KeylockedError, match="unknown method"):
        train(config(tmp_path, tmp_path / "x"), method="dreambooth-full")
    with pytest.raises(KeylockedError):
        Personalization.from_path(tmp_path)
    assert getattr(pipe, "_keylocked_personalizations", None) is None


def test_cli_train_method_flag(tiny_model_dir, tmp_path, capsys):
    from keylocked.cli import main

    instance = write_instance_images(tmp_path / "instance")
    code = main(
        [
            "train",
            "--pretrained_model_name_or_path",
            str(tiny_model_dir),
            "--instance_data_dir",
            str(instance),
            "--placeholder_token",
            "<cli-thing>",
            "--superclass_token",
            "bear",
            "--output_dir",
            str(tmp_path / "out"),
            "--max_train_steps",
            "1",
            "--train_batch_size",
            "1",
            "--gradient_accumulation_steps",
            "1",
            "--no-progress",
            "--method",
            "textual-inversion",
        ]
    )
    assert code == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / TI_FILENAME)
    assert Personalization.from_path(tmp_path / "out").method == "textual-inversion"
