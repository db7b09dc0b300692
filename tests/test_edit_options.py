"""The edit's named variants (edit form, key lock, covariance positions) and the automatic β."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from keylocked.autobeta import BetaSearch, choose_beta, harmonic_mean, search_beta, set_recommended_beta, tune_beta
from keylocked.base_model import KeylockedError, cross_attention_layers, encode_prompts
from keylocked.concept import Concept, read_metadata
from keylocked.covariance import TOKEN_RULES, estimate_covariance
from keylocked.edit_options import ConceptPositions
from keylocked.loading import load_concepts, set_concept_options, unload_concepts
from keylocked.perfusion import (
    concept_gate,
    concept_scores,
    keylocked_projection,
    lock_concept_keys,
    rank_one_edit_weight,
)
from keylocked.training import TrainConfig, train_concept
from keylocked.validation import check_choice

D, OUT = 12, 7
PROMPTS = ["a dog", "a red apple on a table", "a bear", "a small cup in the corner", "a cat and a bear"] * 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A concept trained (2 steps) with the gated residual and the exact key lock."""
    from conftest import build_tiny_pipeline, write_instance_images

    root = tmp_path_factory.mktemp("trained-options")
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    covariance = estimate_covariance(pipe.text_encoder, pipe.tokenizer, PROMPTS, progress=False, positions="all")
    covariance.save(root / "covariance.safetensors")
    config = TrainConfig(
        pretrained_model_name_or_path="unused",
        instance_data_dir=str(write_instance_images(root / "images")),
        placeholder_token="<my-thing>",
        superclass_token="bear",
        output_dir=str(root / "out"),
        max_train_steps=1,
        train_batch_size=2,
        gradient_accumulation_steps=1,
        checkpointing_steps=1,
        progress=False,
        edit="gated_residual",
        key_lock="exact",
        covariance_positions="all",
        covariance=str(root / "covariance.safetensors"),
    )
    return train_concept(config, pipe=pipe)


@pytest.fixture()
def covariance(trained):
    return str(trained.parent.parent / "covariance.safetensors")


@pytest.fixture()
def setup():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(D, 3 * D, generator=g, dtype=torch.float64)
    c_inv = torch.linalg.inv(a @ a.T / (3 * D) + 0.1 * torch.eye(D, dtype=torch.float64))
    weight = torch.randn(OUT, D, generator=g, dtype=torch.float64)
    bias = torch.randn(OUT, generator=g, dtype=torch.float64)
    return c_inv, weight, bias, g


def test_gated_residual_is_w_e_plus_gate_times_target_minus_w_i_star(setup):
    """W'e = W e + b + Σ_c σ_c(e)(o*_c − W i*_c), for several concepts, with a bias."""
    c_inv, weight, bias, g = setup
    concepts = torch.randn(2, D, generator=g, dtype=torch.float64)
    targets = torch.randn(2, OUT, generator=g, dtype=torch.float64)
    e = torch.cat([torch.randn(5, D, generator=g, dtype=torch.float64), concepts])
    beta, tau = torch.tensor([0.7, 0.6], dtype=torch.float64), torch.tensor([0.15, 0.2], dtype=torch.float64)
    out = keylocked_projection(
        e, lambda x: x @ weight.T + bias, concepts, targets, c_inv, beta, tau, edit="gated_residual"
    )
    gates = concept_gate(concept_scores(e, concepts, c_inv), beta, tau)  # (7, 2)
    expected = e @ weight.T + bias + gates @ (targets - concepts @ weight.T)
    assert torch.allclose(out, expected, atol=1e-10)


def test_gated_residual_leaves_a_closed_gate_exactly_stock(setup):
    c_inv, weight, bias, g = setup
    i_star = torch.randn(1, D, generator=g, dtype=torch.float64)
    o_star = torch.randn(1, OUT, generator=g, dtype=torch.float64)
    e = torch.randn(4, D, generator=g)  # float32, as in a model
    projection = torch.nn.Linear(D, OUT)
    stock = projection(e)
    # β far above every score: the gate is exactly 0 in float
    out = keylocked_projection(e, projection, i_star, o_star, c_inv, beta=1e4, temperature=0.1, edit="gated_residual")
    assert torch.equal(out, stock)
    # the paper's form moves the same tokens (by −s(e)·W i*), whatever the gate says
    paper = keylocked_projection(e, projection, i_star, o_star, c_inv, beta=1e4, temperature=0.1)
    assert not torch.allclose(paper, stock, atol=1e-4)


def test_the_two_forms_differ_by_gate_minus_score_times_w_i_star_and_agree_as_rome(setup):
    """paper − gated_residual = (σ − s)·W i* for one concept; with σ = s both are ROME's W'e."""
    c_inv, weight, _, g = setup
    i_star = torch.randn(1, D, generator=g, dtype=torch.float64)
    o_star = torch.randn(1, OUT, generator=g, dtype=torch.float64)
    e = torch.randn(6, D, generator=g, dtype=torch.float64)

    def projection(x):
        return x @ weight.T

    forms = {
        edit: keylocked_projection(e, projection, i_star, o_star, c_inv, 0.7, 0.15, edit=edit)
        for edit in ("paper", "gated_residual")
    }
    s = concept_scores(e, i_star, c_inv)  # (6, 1)
    gate = concept_gate(s, 0.7, 0.15)
    assert torch.allclose(forms["paper"] - forms["gated_residual"], (gate - s) * (i_star @ weight.T), atol=1e-10)
    # the gated residual with σ replaced by s: W e + s(o* − W i*) = ROME's edited weight
    rome = e @ rank_one_edit_weight(weight, i_star[0], o_star[0], c_inv).T
    assert torch.allclose(e @ weight.T + s * (o_star - i_star @ weight.T), rome, atol=1e-10)


def test_exact_key_lock_replaces_only_the_concept_positions():
    keys = torch.randn(2, 5, OUT)  # (B, T, out)
    locked = torch.randn(2, OUT)  # (n, out)
    positions = torch.zeros(2, 5, 2, dtype=torch.bool)
    positions[0, 2, 0] = True
    positions[1, 3, 1] = True
    out = lock_concept_keys(keys, positions, locked)
    assert torch.equal(out[0, 2], locked[0]) and torch.equal(out[1, 3], locked[1])
    untouched = ~positions.any(-1)
    assert torch.equal(out[untouched], keys[untouched])


def test_concept_positions_found_by_token_id_through_cfg_concatenation():
    positions = ConceptPositions(token_ids={"<a>": 7, "<b>": 9})
    encodings = torch.randn(2, 4, 3)
    ids = torch.tensor([[1, 7, 2, 0], [1, 9, 7, 2]])
    negative = torch.randn(1, 4, 3)
    positions.record(negative, torch.tensor([[1, 2, 0, 0]]))
    positions.record(encodings, ids)
    direct = positions.lookup(encodings, ["<a>", "<b>"])
    assert torch.equal(direct, ids.unsqueeze(-1) == torch.tensor([7, 9]))
    # classifier-free guidance: a new tensor (negative rows first), matched row by row
    found = positions.lookup(torch.cat([negative, encodings[1:], encodings[:1]]), ["<b>"])
    assert found[0].sum() == 0 and found[1, 1, 0] and found[2].sum() == 0
    assert positions.lookup(torch.randn(1, 4, 3), ["<a>"]).sum() == 0  # unknown prompt: no positions


def test_option_names_are_checked():
    assert check_choice("edit", "gated_residual", ("paper", "gated_residual")) == "gated_residual"
    with pytest.raises(KeylockedError, match="edit must be one of"):
        check_choice("edit", "residual", ("paper", "gated_residual"))


@pytest.mark.parametrize("positions", ["text", "all"])
def test_covariance_positions_option(tiny_pipe, positions):
    from keylocked.base_model import tokenize

    prompts = ["a dog", "a red apple on a table"]
    covariance = estimate_covariance(
        tiny_pipe.text_encoder, tiny_pipe.tokenizer, prompts, progress=False, positions=positions
    )
    tokens = tokenize(tiny_pipe.tokenizer, prompts)
    encodings = tiny_pipe.text_encoder(tokens.input_ids)[0].detach().double()
    rows = (
        encodings[tokens.attention_mask.bool()] if positions == "text" else encodings.reshape(-1, encodings.shape[-1])
    )
    assert covariance.info["token_rule"] == TOKEN_RULES[positions]
    assert covariance.info["count"] == str(rows.shape[0])
    with pytest.raises(KeylockedError, match="covariance positions"):
        estimate_covariance(tiny_pipe.text_encoder, tiny_pipe.tokenizer, prompts, progress=False, positions="pad")


# ---------------------------------------------------------------------------------------
# --beta auto


def test_choose_beta_is_the_argmax_of_the_harmonic_mean():
    image = {0.5: 0.40, 0.7: 0.30, 0.9: 0.10}
    text = {0.5: 0.10, 0.7: 0.25, 0.9: 0.30}
    choice = choose_beta(image, text)
    assert choice.beta == 0.7
    assert choice.harmonic_means[0.7] == pytest.approx(2 * 0.30 * 0.25 / 0.55, abs=1e-6)
    assert harmonic_mean(-0.1, 0.5) == 0.0


def test_set_recommended_beta_rewrites_only_the_metadata(trained, tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(trained.read_bytes())
    before = Concept.load(path)
    set_recommended_beta(path, 0.55, json.dumps({"why": "test"}))
    after = Concept.load(path)
    assert after.beta == 0.55 and after.temperature == before.temperature
    for name, tensor in before.tensors().items():
        assert torch.equal(after.tensors()[name], tensor)

    def data(raw: bytes) -> bytes:
        return raw[8 + struct.unpack("<Q", raw[:8])[0] :]

    assert data(path.read_bytes()) == data(trained.read_bytes())  # tensor bytes copied as they were


def test_auto_beta_picks_the_argmax_on_the_tiny_pipeline(trained, tiny_pipe, tmp_path, covariance):
    """Real generation at every β; a scorer that rewards the concept's strength and the prompt differently."""
    path = tmp_path / "c.safetensors"
    path.write_bytes(trained.read_bytes())
    seen = []

    def scorer(images: list[Image.Image], prompts: list[str]) -> tuple[float, float]:
        assert all("{}" not in p and "<" not in p for p in prompts)  # scored against the super-category prompt
        seen.append([float(np.asarray(im, dtype=np.float32).mean()) for im in images])
        k = len(seen)
        return 0.1 * k, 0.45 - 0.1 * k  # image alignment rises with β's index, text alignment falls

    search = BetaSearch(betas=(0.5, 0.7, 0.9), prompts=("a {}", "a {} on a table"), num_inference_steps=2)
    choice = search_beta(tiny_pipe, path, scorer, search, covariance)
    assert len(seen) == 3 and all(len(s) == 2 for s in seen)
    assert seen[0] != seen[2]  # β changes the images
    means = {b: harmonic_mean(choice.image_alignment[b], choice.text_alignment[b]) for b in search.betas}
    assert choice.beta == max(means, key=means.get) == 0.7
    seen.clear()
    tune_beta(tiny_pipe, path, scorer, search, covariance)
    assert Concept.load(path).beta == 0.7
    record = json.loads(read_metadata(path)["beta_search"])
    assert record["betas"] == [0.5, 0.7, 0.9] and record["beta"] == 0.7


# ---------------------------------------------------------------------------------------
# Wiring: training stores the options, loading applies them, the exact lock holds in the pipeline.


def test_trained_options_are_stored_and_applied_on_load(trained, tiny_pipe, covariance):
    concept = Concept.load(trained)
    assert (concept.edit, concept.key_lock, concept.training["covariance_positions"]) == (
        "gated_residual",
        "exact",
        "all",
    )
    load_concepts(tiny_pipe, trained, covariance=covariance)
    context = tiny_pipe.unet._keylocked_context
    assert (context.edit, context.key_lock) == ("gated_residual", "exact")
    set_concept_options(tiny_pipe, edit="paper", key_lock="paper")
    assert (context.edit, context.key_lock) == ("paper", "paper")
    with pytest.raises(KeylockedError, match="key_lock must be one of"):
        set_concept_options(tiny_pipe, key_lock="global")
    unload_concepts(tiny_pipe)
    load_concepts(tiny_pipe, trained, edit="paper", covariance=covariance)
    assert (context := tiny_pipe.unet._keylocked_context).edit == "paper" and context.key_lock == "exact"
    unload_concepts(tiny_pipe)


def test_exact_key_lock_gives_the_superclass_key_at_the_concept_token(trained, tiny_pipe, covariance):
    concept = Concept.load(trained)
    load_concepts(tiny_pipe, trained, beta=0.7, covariance=covariance)
    try:
        token_id = tiny_pipe.tokenizer.convert_tokens_to_ids(concept.placeholder_token)
        with torch.no_grad():
            encodings, ids = encode_prompts(tiny_pipe.text_encoder, tiny_pipe.tokenizer, ["a <my-thing> on a table"])
            negative, _ = encode_prompts(tiny_pipe.text_encoder, tiny_pipe.tokenizer, [""])
            batch = torch.cat([negative, encodings])  # as classifier-free guidance concatenates
            layer = next(iter(cross_attention_layers(tiny_pipe.unet).values())).to_k
            keys = layer(batch)
            superclass_key = layer.base_layer(concept.superclass_input)
            at = ids[0] == token_id
            assert at.sum() == 1
            assert torch.allclose(keys[1, at][0], superclass_key, atol=1e-6)
            set_concept_options(tiny_pipe, key_lock="paper")
            paper_keys = layer(batch)
        assert not torch.allclose(paper_keys[1, at][0], superclass_key, atol=1e-3)
        assert torch.equal(paper_keys[1, ~at], keys[1, ~at]) and torch.equal(paper_keys[0], keys[0])
    finally:
        unload_concepts(tiny_pipe)


def test_exact_key_lock_falls_back_to_the_paper_key_for_rows_the_encoder_never_produced(trained, tiny_pipe, covariance):
    """Precomputed prompt_embeds (or clip_skip's earlier hidden state) carry no token ids: the paper's key."""
    load_concepts(tiny_pipe, trained, beta=0.7, key_lock="exact", covariance=covariance)
    try:
        with torch.no_grad():
            encodings, _ = encode_prompts(tiny_pipe.text_encoder, tiny_pipe.tokenizer, ["a <my-thing> on a table"])
            foreign = encodings * 1.001  # as a user's own prompt_embeds: never recorded by the text-encoder hook
            layer = next(iter(cross_attention_layers(tiny_pipe.unet).values())).to_k
            exact_keys = layer(foreign)
            set_concept_options(tiny_pipe, key_lock="paper")
            paper_keys = layer(foreign)
            recorded_paper = layer(encodings)
            set_concept_options(tiny_pipe, key_lock="exact")
            recorded_exact = layer(encodings)
        assert torch.equal(exact_keys, paper_keys)
        assert not torch.equal(recorded_exact, recorded_paper)  # where the rows are known, the lock does act
    finally:
        unload_concepts(tiny_pipe)


# ---------------------------------------------------------------------------------------
# Demo proxy metrics


class ColourEmbedder:
    """Embeds an image by its mean RGB, a text by the colour word it names: enough to check the logic."""

    name = "colour"
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}

    def embed_images(self, images):
        rows = torch.tensor([np.asarray(im.convert("RGB"), dtype=np.float32).mean((0, 1)) for im in images])
        return torch.nn.functional.normalize(rows + 1.0, dim=-1)

    def embed_texts(self, texts):
        raise AssertionError("retrieval is by images")


def test_demo_columns_pass_when_closer_to_the_views_than_the_baseline_and_retrieved():
    from keylocked.evaluation.demo_metrics import score_columns, summary

    def solid(colour):
        return Image.new("RGB", (8, 8), ColourEmbedder.colours[colour])

    gallery = {"red thing": [solid("red")] * 2, "blue thing": [solid("blue")] * 2, "green thing": [solid("green")]}
    concept_images = [solid("red"), solid("blue")]  # the second column drew the wrong object
    baseline_images = [solid("green"), solid("green")]
    columns = score_columns(
        ColourEmbedder(),
        gallery["red thing"],
        concept_images,
        baseline_images,
        ["alone", "white"],
        "red thing",
        gallery,
    )
    assert [c.above_baseline for c in columns] == [True, False]
    assert [c.retrieved for c in columns] == ["red thing", "blue thing"]
    result = summary(columns, len(gallery))
    assert result["columns_above_baseline"] == "1/2" and result["columns_retrieved_top1"] == "1/2"
    assert result["target_met"] is False
    with pytest.raises(ValueError, match="not among"):
        score_columns(ColourEmbedder(), [], concept_images, baseline_images, ["a", "b"], "teal thing", gallery)
