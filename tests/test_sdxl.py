"""Perfusion on Stable Diffusion XL (two text encoders), on a tiny random SDXL pipeline."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_pipeline
from tiny_sdxl import CLIP_G_WIDTH, CLIP_L_WIDTH, POOLED_WIDTH, build_tiny_sdxl_pipeline

from keylocked.base_model import KeylockedError, text_encoder_fingerprint
from keylocked.text_stack import StableDiffusionTextStack, StableDiffusionXLTextStack, text_stack

PROMPTS = ["a red bear on the table", "a small cup"]


def sdxl_generate(pipe, prompt, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    """The tiny SDXL pipeline saved as a ``StableDiffusionXLPipeline`` folder."""
    root = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl_pipeline(root / "build").save_pretrained(root / "model")
    return root / "model"


@pytest.fixture()
def sdxl_pipe(tmp_path):
    return build_tiny_sdxl_pipeline(tmp_path / "tok")


def test_tiny_sdxl_folder_generates_with_the_stock_pipeline(sdxl_dir):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    pipe = DiffusionPipeline.from_pretrained(sdxl_dir, local_files_only=True)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    pipe.set_progress_bar_config(disable=True)
    images = sdxl_generate(pipe, "a red bear on the table")
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_stack_is_chosen_by_family(sdxl_pipe):
    assert isinstance(text_stack(sdxl_pipe), StableDiffusionXLTextStack)
    assert isinstance(text_stack(build_tiny_pipeline()), StableDiffusionTextStack)
    stack = text_stack(sdxl_pipe)
    assert stack.d_text == CLIP_L_WIDTH + CLIP_G_WIDTH == sdxl_pipe.unet.config.cross_attention_dim
    assert stack.embedding_dims() == {"clip_l": CLIP_L_WIDTH, "clip_g": CLIP_G_WIDTH}


def test_unsupported_pipeline_is_refused():
    class NoText:
        text_encoder = None

    with pytest.raises(KeylockedError, match="not a supported text-to-image pipeline"):
        text_stack(NoText())


@torch.no_grad()
def test_sdxl_stack_encodes_as_the_stock_pipeline(sdxl_pipe):
    stock, _, pooled, _ = sdxl_pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    encoded = text_stack(sdxl_pipe).encode(PROMPTS)
    assert torch.equal(encoded.encodings, stock)  # (B, T, 32 + 48): penultimate states, concatenated
    assert torch.equal(encoded.pooled, pooled) and pooled.shape == (2, POOLED_WIDTH)
    assert encoded.input_ids.shape == encoded.attention_mask.shape == stock.shape[:2]
    # 6 real positions in "a red bear on the table" + start + end; padding is not real text
    assert encoded.attention_mask[0].sum() == 8


@torch.no_grad()
def test_sd_stack_encodes_as_the_stock_pipeline():
    pipe = build_tiny_pipeline()
    stock, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert torch.equal(text_stack(pipe).encode(PROMPTS).encodings, stock)


@torch.no_grad()
def test_token_added_to_both_encoders_and_removed_exactly(sdxl_pipe):
    stack = text_stack(sdxl_pipe)
    fingerprint, stock = stack.fingerprint(), stack.encode(PROMPTS).encodings
    snapshot = stack.snapshot()
    embeddings = {"clip_l": torch.full((CLIP_L_WIDTH,), 0.5), "clip_g": torch.full((CLIP_G_WIDTH,), -0.5)}
    ids = stack.add_tokens({"<my-bear>": embeddings})["<my-bear>"]
    assert len(ids) == 2
    for slot, token_id in zip(stack, ids):
        assert slot.tokenizer.convert_tokens_to_ids("<my-bear>") == token_id
        assert torch.equal(slot.text_encoder.get_input_embeddings().weight[token_id], embeddings[slot.key])
    encoded = stack.encode(["a <my-bear> on the table"])
    assert (encoded.input_ids[0] == ids[0]).sum() == 1  # one token, at the same place in both tokenizers
    assert stack.fingerprint(snapshot.vocab_sizes) == fingerprint  # added rows do not change the identity
    with pytest.raises(KeylockedError, match="already exists"):
        stack.add_tokens({"<my-bear>": embeddings})
    stack.restore(snapshot)
    assert [len(slot.tokenizer) for slot in stack] == snapshot.vocab_sizes
    assert torch.equal(stack.encode(PROMPTS).encodings, stock)


def test_embeddings_must_cover_every_encoder(sdxl_pipe):
    stack = text_stack(sdxl_pipe)
    with pytest.raises(KeylockedError, match="encoders are"):
        stack.add_tokens({"<my-bear>": {"clip_l": torch.zeros(CLIP_L_WIDTH)}})
    assert len(sdxl_pipe.tokenizer) == len(sdxl_pipe.tokenizer_2) == stack.snapshot().vocab_sizes[0]


def test_fingerprints_single_encoder_as_before_and_both_for_sdxl(sdxl_pipe):
    pipe = build_tiny_pipeline()
    assert text_stack(pipe).fingerprint() == text_encoder_fingerprint(pipe.text_encoder, len(pipe.tokenizer))
    stack = text_stack(sdxl_pipe)
    before = stack.fingerprint()
    with torch.no_grad():
        sdxl_pipe.text_encoder_2.text_model.final_layer_norm.weight.mul_(2)  # shapes the pooled output only
    assert stack.fingerprint() != before


def test_unet_conditioning_is_sdxl_time_ids(sdxl_pipe):
    stack = text_stack(sdxl_pipe)
    with torch.no_grad():
        encoded = stack.encode(PROMPTS)
    added = stack.unet_conditioning(encoded, 16, 24)["added_cond_kwargs"]
    assert added["time_ids"].tolist() == [[16, 24, 0, 0, 16, 24]] * 2
    latents = torch.zeros(2, 4, 2, 3)
    out = sdxl_pipe.unet(latents, torch.tensor([10, 10]), encoded.encodings, added_cond_kwargs=added).sample
    assert out.shape == latents.shape
