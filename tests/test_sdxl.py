"""Perfusion on Stable Diffusion XL (two text encoders), on a tiny random SDXL pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_pipeline, write_instance_images
from safetensors.torch import load_file, save_file
from test_keylocking import config
from tiny_sdxl import CLIP_G_WIDTH, CLIP_L_WIDTH, POOLED_WIDTH, build_tiny_sdxl_pipeline

import keylocked
from keylocked.base_model import KeylockedError, cross_attention_layers, text_encoder_fingerprint
from keylocked.concept import Concept, read_metadata
from keylocked.covariance import estimate_covariance, resolve_covariance
from keylocked.text_stack import StableDiffusionTextStack, StableDiffusionXLTextStack, text_stack
from keylocked.training import train_concept

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


# ---------------------------------------------------------------------------------------
# Training, loading and unloading Perfusion concepts on SDXL.


@pytest.fixture(scope="module")
def sdxl_trained(tmp_path_factory):
    """One tiny SDXL pipeline and two concepts trained apart on it (module-scoped: trained once)."""
    root = tmp_path_factory.mktemp("sdxl-trained")
    pipe = build_tiny_sdxl_pipeline(root / "tok")
    stock = sdxl_generate(pipe, "a red bear on the table")
    fast = dict(max_train_steps=1, train_batch_size=1)
    bear = train_concept(
        config(write_instance_images(root / "a"), root / "bear", placeholder_token="<my-bear>", **fast), pipe=pipe
    )
    cup = train_concept(
        config(
            write_instance_images(root / "b", 2),
            root / "cup",
            placeholder_token="<my-cup>",
            superclass_token="cup",
            **fast,
        ),
        pipe=pipe,
    )
    assert (sdxl_generate(pipe, "a red bear on the table") == stock).all()  # training hands the pipeline back stock
    return pipe, stock, bear, cup


def test_sdxl_concept_file_has_one_embedding_per_encoder(sdxl_trained):
    pipe, _, bear, _ = sdxl_trained
    concept = Concept.load(bear)
    assert {k: tuple(v.shape) for k, v in concept.token_embeddings.items()} == {
        "clip_l": (CLIP_L_WIDTH,),
        "clip_g": (CLIP_G_WIDTH,),
    }
    assert concept.concept_input.shape == concept.superclass_input.shape == (CLIP_L_WIDTH + CLIP_G_WIDTH,)
    assert read_metadata(bear)["format_version"] == "2"
    assert set(load_file(str(bear))) >= {"clip_l", "clip_g", "concept_input", "superclass_input"}
    stack = text_stack(pipe)
    assert concept.base_model_fingerprint == stack.base_model_fingerprint(pipe.unet)
    # both embeddings were trained away from the super-category word's rows
    for slot, token_id in zip(stack, stack.single_token_ids("bear")):
        row = slot.text_encoder.get_input_embeddings().weight[token_id]
        assert not torch.allclose(concept.token_embeddings[slot.key], row.half().float())


def test_sdxl_two_concepts_load_generate_unload_bit_identical(sdxl_trained):
    pipe, stock, bear, cup = sdxl_trained
    keylocked.load_concepts(pipe, [bear, cup])
    try:
        ids = [tokenizer("a <my-bear> on a <my-cup>").input_ids for tokenizer in (pipe.tokenizer, pipe.tokenizer_2)]
        assert ids[0] == ids[1] and len(ids[0]) == 7  # one token each, at the same place in both tokenizers
        both = sdxl_generate(pipe, "a <my-bear> on a <my-cup>")
        keylocked.set_concept_options(pipe, beta={"<my-bear>": 5.0}, lock="global")
        closed = sdxl_generate(pipe, "a <my-bear> on a <my-cup>")
        assert both.shape == stock.shape and not (both == closed).all()
    finally:
        keylocked.unload_concepts(pipe)
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == pipe.text_encoder_2.get_input_embeddings().num_embeddings
    assert (sdxl_generate(pipe, "a red bear on the table") == stock).all()


@torch.no_grad()
def test_sdxl_global_lock_re_encodes_with_both_encoders(sdxl_trained):
    pipe, _, bear, _ = sdxl_trained
    keylocked.load_concepts(pipe, bear, lock="global")
    try:
        concept, _, _, _ = pipe.encode_prompt("a red <my-bear> on the table", do_classifier_free_guidance=False)
        twin, _, _, _ = pipe.encode_prompt("a red bear on the table", do_classifier_free_guidance=False)
        context = pipe.unet._keylocked_context
        assert sorted(encoder for encoder, _, _ in context.global_key_pairs) == [0, 1]
        assert torch.equal(context.key_path_encodings(concept), twin)  # (1, T, 32 + 48): both parts swapped
        assert torch.equal(context.key_path_encodings(twin), twin)  # a prompt without the concept: unchanged
    finally:
        keylocked.unload_concepts(pipe)


def test_sdxl_resume_reproduces_an_uninterrupted_run(tmp_path):
    pipe = build_tiny_sdxl_pipeline(tmp_path / "tok")
    images = write_instance_images(tmp_path / "img", count=2)
    kwargs = dict(placeholder_token="<my-bear>", checkpointing_steps=1, train_batch_size=1)
    straight = train_concept(config(images, tmp_path / "straight", max_train_steps=2, **kwargs), pipe=pipe)
    train_concept(config(images, tmp_path / "resumed", max_train_steps=1, **kwargs), pipe=pipe)
    resumed = train_concept(
        config(images, tmp_path / "resumed", max_train_steps=2, resume_from_checkpoint="latest", **kwargs), pipe=pipe
    )
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sdxl_covariance_is_over_the_concatenated_encodings(sdxl_pipe, tmp_path):
    stack = text_stack(sdxl_pipe)
    covariance = estimate_covariance(stack, prompts=["a bear", "the red cup on the table"], progress=False)
    assert covariance.inverse.shape == (CLIP_L_WIDTH + CLIP_G_WIDTH,) * 2
    assert int(covariance.info["count"]) == (2 + 2) + (6 + 2)  # real text only: "!" padding is not counted
    assert covariance.text_encoder_fingerprint == stack.fingerprint()
    one_encoder = estimate_covariance(sdxl_pipe.text_encoder, sdxl_pipe.tokenizer, ["a bear"], progress=False)
    with pytest.raises(KeylockedError, match="32-dimensional"):
        resolve_covariance(stack, path=one_encoder.save(tmp_path / "l.safetensors"))


def test_sd_and_sdxl_concepts_are_refused_by_the_other_family(sdxl_trained, tmp_path, instance_dir):
    pipe, stock, bear, _ = sdxl_trained
    sd_pipe = build_tiny_pipeline()
    layers = cross_attention_layers(sd_pipe.unet)
    sd_concept = Concept(
        "<sd-bear>",
        "bear",
        torch.zeros(32),
        torch.ones(32),
        torch.ones(32),
        {name: torch.zeros(layer.to_v.out_features) for name, layer in layers.items()},
    )
    with pytest.raises(KeylockedError, match="text encoder of width"):
        keylocked.load_concepts(pipe, sd_concept, strict=False)
    with pytest.raises(KeylockedError, match="text encoder of width"):
        keylocked.load_concepts(sd_pipe, bear, strict=False)
    with pytest.raises(KeylockedError, match="is 3 tokens for this tokenizer"):
        train_concept(config(instance_dir, tmp_path / "x", superclass_token="bears"), pipe=pipe)
    stack = text_stack(pipe)
    snapshot = stack.snapshot()
    pipe.tokenizer_2.add_tokens(["<taken>"])  # a token that only the second tokenizer knows
    try:
        with pytest.raises(KeylockedError, match="already exists"):
            train_concept(config(instance_dir, tmp_path / "y", placeholder_token="<taken>"), pipe=pipe)
    finally:
        stack.restore(snapshot)
    assert not hasattr(pipe.unet, "_keylocked_context")
    assert (sdxl_generate(pipe, "a red bear on the table") == stock).all()


def test_a_version_1_concept_file_still_loads(tmp_path):
    pipe = build_tiny_pipeline()
    layers = cross_attention_layers(pipe.unet)
    tensors = {  # exactly what keylocked 0.1 wrote
        "token_embedding": torch.randn(32, dtype=torch.float16),
        "concept_input": torch.randn(32, dtype=torch.float16),
        "superclass_input": torch.randn(32, dtype=torch.float16),
        **{
            f"value_targets.{n}": torch.randn(layer.to_v.out_features, dtype=torch.float16)
            for n, layer in layers.items()
        },
    }
    metadata = {
        "format": "keylocked.perfusion.concept",
        "format_version": "1",
        "placeholder_token": "<old>",
        "superclass_token": "bear",
        "base_model_fingerprint": "",
        "covariance_sha256": "",
        "train_beta": "0.75",
        "train_tau": "0.1",
        "beta": "0.7",
        "tau": "0.15",
        "training": "{}",
    }
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=metadata)
    concept = Concept.load(tmp_path / "v1.safetensors")
    assert torch.equal(concept.token_embedding, tensors["token_embedding"].float())
    pipe.set_progress_bar_config(disable=True)
    keylocked.load_concepts(pipe, tmp_path / "v1.safetensors")
    assert pipe.tokenizer.convert_tokens_to_ids("<old>") == len(pipe.tokenizer) - 1
    keylocked.unload_concepts(pipe)


# ---------------------------------------------------------------------------------------
# The command line and the baselines on an SDXL folder.


def test_sdxl_folder_through_the_command_line(sdxl_dir, tmp_path, capsys):
    from keylocked.cli import main

    fast = ["--train_batch_size", "1", "--gradient_accumulation_steps", "1", "--no-progress"]
    images = write_instance_images(tmp_path / "img", count=2)
    argv = ["covariance", "--pretrained_model_name_or_path", sdxl_dir, "--output", tmp_path / "cov.safetensors"]
    assert main([str(a) for a in argv]) == 0
    argv = ["train", "--pretrained_model_name_or_path", sdxl_dir, "--instance_data_dir", images]
    argv += ["--placeholder_token", "<cli-bear>", "--superclass_token", "bear", "--output_dir", tmp_path / "out"]
    argv += ["--max_train_steps", "1", "--covariance", tmp_path / "cov.safetensors", "--gradient_checkpointing"]
    assert main([str(a) for a in argv + fast]) == 0
    concept = tmp_path / "out" / "concept.safetensors"
    assert Concept.load(concept).training["steps"] == 1
    argv = ["generate", "--pretrained_model_name_or_path", sdxl_dir, "--concept", concept, "--lock", "global"]
    argv += ["--prompt", "a <cli-bear> on the table", "--num_images", "1", "--output_dir", tmp_path / "gen"]
    argv += ["--covariance", tmp_path / "cov.safetensors", "--num_inference_steps", "2", "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    assert (tmp_path / "gen" / "seed-0.png").is_file()
    capsys.readouterr()
    assert main(["inspect", str(concept), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["token embedding width"] == {"clip_l": CLIP_L_WIDTH, "clip_g": CLIP_G_WIDTH}
    assert described["text encoding width"] == CLIP_L_WIDTH + CLIP_G_WIDTH


def test_sdxl_demo_learns_the_bundled_views(sdxl_dir, tmp_path):
    from keylocked.cli import main

    argv = ["demo", "--pretrained_model_name_or_path", str(sdxl_dir), "--output_dir", str(tmp_path / "demo")]
    argv += ["--max_train_steps", "1", "--train_batch_size", "1", "--num_inference_steps", "1", "--no-progress"]
    assert main(argv + ["--betas", "0.7"]) == 0
    assert Concept.load(tmp_path / "demo" / "concept.safetensors").superclass_token == "bear"


@pytest.mark.parametrize("method", ["textual-inversion", "custom-diffusion", "lora"])
def test_sdxl_baselines_in_their_ecosystem_formats(sdxl_trained, method, tmp_path):
    from keylocked.personalizations import load_personalizations, unload_personalizations
    from keylocked.training import train

    pipe, stock, _, _ = sdxl_trained
    path = train(
        config(write_instance_images(tmp_path / "img", count=2), tmp_path / method, placeholder_token="<b>"),
        method=method,
        pipe=pipe,
    )
    if method == "textual-inversion":  # diffusers' SDXL recipe: load_textual_inversion once per encoder
        state = load_file(str(path))
        assert {k: tuple(v.shape) for k, v in state.items()} == {
            "clip_l": (1, CLIP_L_WIDTH),
            "clip_g": (1, CLIP_G_WIDTH),
        }
        pipe.load_textual_inversion(
            state["clip_l"], token="<b>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            state["clip_g"], token="<b>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[-1], state["clip_g"][0].float())
        pipe.unload_textual_inversion("<b>", tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
        pipe.unload_textual_inversion("<b>", tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)
    if method == "lora":  # written by StableDiffusionXLPipeline.save_lora_weights
        state, _ = type(pipe).lora_state_dict(str(path.parent), weight_name=path.name)
        assert state and all(k.startswith("unet.") for k in state)
    load_personalizations(pipe, [path.parent])
    prompt = "a sks bear on the table" if method == "lora" else "a <b> on the table"
    assert sdxl_generate(pipe, prompt).shape == stock.shape
    unload_personalizations(pipe)
    assert (sdxl_generate(pipe, "a red bear on the table") == stock).all()


def test_latent_cache_answers_like_the_vae(tiny_pipe):
    from keylocked.training.data import sample_batch, step_generator
    from keylocked.training.latents import LatentCache, latent_encoder

    instance = torch.rand(3, 3, 16, 16) * 2 - 1
    cache = latent_encoder(tiny_pipe.vae, instance, True, "cpu", torch.float32)
    assert isinstance(cache, LatentCache) and cache.mean.shape == (6, 4, 8, 8)  # 3 images + 3 mirrors
    pixels, _ = sample_batch(instance, 5, step_generator(0, 1))
    cached = cache.encode(pixels).latent_dist
    with torch.no_grad():
        direct = tiny_pipe.vae.encode(pixels).latent_dist
    assert torch.allclose(cached.mean, direct.mean, atol=1e-5) and torch.allclose(cached.std, direct.std, atol=1e-5)
    with pytest.raises(RuntimeError, match="missing from the latent cache"):
        cache.encode(torch.zeros(1, 3, 16, 16))
