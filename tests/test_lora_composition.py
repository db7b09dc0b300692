"""A LoRA loaded with diffusers' own API after keylocked concepts: the same pipeline as loading it first."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_pipeline
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from serve_support import make_concept

import keylocked
from keylocked.base_model import cross_attention_layers
from keylocked.covariance import estimate_covariance
from keylocked.layers import KeyLockedLinear
from keylocked.loading import PEFT_VERBS

PROMPTS = ["a bear", "a red cup on the table", "a photo of a dog", "the small bear"]


def lora_folder(folder, cross_attention_dim: int = 32):
    """A UNet LoRA file as diffusers writes it (random, non-zero B: it really changes W_K and W_V)."""
    from diffusers import StableDiffusionPipeline

    donor = build_tiny_pipeline(seed=1, cross_attention_dim=cross_attention_dim)
    donor.unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(donor.unet))
    return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    pipe = build_tiny_pipeline()
    covariance = estimate_covariance(pipe.text_encoder, pipe.tokenizer, PROMPTS, progress=False)
    return lora_folder(root / "lora"), make_concept(pipe, "<alpha>", "bear", seed=1), covariance


def fresh_pipe():
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt="a <alpha> on a table"):
    return pipe(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images


def count(pipe, kind) -> int:
    return sum(isinstance(module, kind) for module in pipe.unet.modules())


def test_lora_after_concepts_equals_lora_before_them(parts):
    lora, concept, covariance = parts
    first = fresh_pipe()
    first.load_lora_weights(str(lora))
    keylocked.load_concepts(first, [concept], covariance=covariance)
    lora_first = generate(first)

    pipe = fresh_pipe()
    stock = generate(pipe, "a bear on a table")
    keylocked.load_concepts(pipe, [concept], covariance=covariance)
    concept_only = generate(pipe)
    pipe.load_lora_weights(str(lora))  # diffusers' own call, after the concepts
    assert count(pipe, KeyLockedLinear) == 2 * len(cross_attention_layers(pipe.unet)) > 0
    layer = next(iter(cross_attention_layers(pipe.unet).values()))
    assert isinstance(layer.to_k, KeyLockedLinear) and isinstance(layer.to_k.base_layer, LoraLayer)
    with torch.no_grad():  # the locked key is (W_K + ΔW_K) i*_super, as when the LoRA came first
        i_super = concept.superclass_input[None]
        assert torch.allclose(layer.to_k.output_targets(["<alpha>"]), layer.to_k.base_layer(i_super), atol=1e-6)
    concept_first = generate(pipe)
    assert (concept_first == lora_first).all()  # the order does not matter
    assert not (concept_first == concept_only).all()  # and the LoRA is in force

    pipe.unload_lora_weights()  # diffusers' unload with the concepts still loaded
    assert count(pipe, LoraLayer) == 0 and count(pipe, KeyLockedLinear) > 0
    assert (generate(pipe) == concept_only).all()
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_k"]))
    assert isinstance(layer.to_k, KeyLockedLinear) and isinstance(layer.to_k.base_layer, LoraLayer)  # peft's API
    pipe.unload_lora_weights()
    keylocked.unload_concepts(pipe)
    assert not set(PEFT_VERBS) & set(vars(pipe.unet))  # diffusers' own verbs again
    assert (generate(pipe, "a bear on a table") == stock).all()


def test_a_lora_that_does_not_fit_leaves_the_concepts_working(parts, tmp_path):
    _, concept, covariance = parts
    pipe = fresh_pipe()
    keylocked.load_concepts(pipe, [concept], covariance=covariance)
    before = generate(pipe)
    with pytest.raises(RuntimeError, match="size mismatch"):  # diffusers' own refusal
        pipe.load_lora_weights(str(lora_folder(tmp_path / "wide", cross_attention_dim=48)))
    assert all(
        isinstance(getattr(layer, projection), KeyLockedLinear)
        for layer in cross_attention_layers(pipe.unet).values()
        for projection in ("to_k", "to_v")
    )
    assert (generate(pipe) == before).all()
    keylocked.unload_concepts(pipe)
