"""Key locking, gradients, training, resume, loading and unloading on a tiny SD-shaped model."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_pipeline
from safetensors.torch import load_file

import keylocked
from keylocked.base_model import cross_attention_layers, encode_prompts
from keylocked.concept import Concept
from keylocked.covariance import estimate_covariance
from keylocked.layers import KeyLockedLinear
from keylocked.loading import install_keylocked_layers, uninstall_keylocked_layers
from keylocked.perfusion import concept_gate
from keylocked.training import TrainConfig, train_concept
from keylocked.training.methods import ConceptParameters


def config(instance_dir, output_dir, **overrides) -> TrainConfig:
    values = dict(
        pretrained_model_name_or_path="unused",
        instance_data_dir=str(instance_dir),
        placeholder_token="<my-thing>",
        superclass_token="bear",
        output_dir=str(output_dir),
        max_train_steps=2,
        train_batch_size=2,
        gradient_accumulation_steps=1,
        checkpointing_steps=2,
        progress=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def generate(pipe, prompt, seed=0):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two concepts trained apart on the same tiny model (module-scoped: trained once)."""
    from conftest import write_instance_images

    root = tmp_path_factory.mktemp("trained")
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    first = train_concept(config(write_instance_images(root / "a"), root / "out-a", max_train_steps=3), pipe=pipe)
    second = train_concept(
        config(
            write_instance_images(root / "b", count=2),
            root / "out-b",
            placeholder_token="<other>",
            superclass_token="cup",
        ),
        pipe=pipe,
    )
    return first, second


def test_concept_token_key_is_gated_superclass_key(tiny_pipe):
    """Key lock: for e = i*, to_k(e) = gate(1)·W_K·i*_super (e⊥ = 0), whatever i* is."""
    torch.manual_seed(0)
    d = tiny_pipe.text_encoder.config.hidden_size
    context = install_keylocked_layers(tiny_pipe.unet, torch.eye(d))
    i_star, i_super = torch.randn(d), torch.randn(d)
    targets = {name: torch.randn(layer.out_features) for name, layer in context.value_layers.items()}
    context.add_concept("<c>", i_star, i_super, beta=0.75, tau=0.1, value_targets_by_layer=targets)
    layer = next(iter(cross_attention_layers(tiny_pipe.unet).values()))
    assert isinstance(layer.to_k, KeyLockedLinear)
    with torch.no_grad():
        key = layer.to_k(i_star[None, None])  # (1, 1, out)
    gate = concept_gate(torch.tensor(1.0), 0.75, 0.1)
    expected = gate * (layer.to_k.base_layer.weight @ i_super)
    assert torch.allclose(key[0, 0], expected, atol=1e-5)
    # and with no active concept the wrapper is the stock projection
    context.set_options(active=())
    e = torch.randn(2, 5, d)
    assert torch.equal(layer.to_k(e), layer.to_k.base_layer(e))
    uninstall_keylocked_layers(tiny_pipe.unet)
    assert not any(isinstance(m, KeyLockedLinear) for m in tiny_pipe.unet.modules())


def test_only_embedding_and_value_targets_receive_gradients(tiny_pipe):
    pipe = tiny_pipe
    d = pipe.text_encoder.config.hidden_size
    context = install_keylocked_layers(pipe.unet, torch.eye(d))
    layers = {name: layer.to_v for name, layer in cross_attention_layers(pipe.unet).items()}
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)
    super_id = pipe.tokenizer.convert_tokens_to_ids("bear")
    embedding = pipe.text_encoder.get_input_embeddings()
    params = ConceptParameters(
        embedding.weight[super_id], torch.randn(d), {n: torch.randn(layer.out_features) for n, layer in layers.items()}
    )
    context.add_concept(
        "<c>", params.concept_input, params.superclass_input, 0.75, 0.1, {n: params.value_target(n) for n in layers}
    )
    hook = embedding.register_forward_hook(
        lambda m, i, o: torch.where((i[0] == super_id).unsqueeze(-1), params.token_embedding, o)
    )
    encodings, _ = encode_prompts(pipe.text_encoder, pipe.tokenizer, ["a photo of a bear"])
    hook.remove()
    params.concept_input.copy_(encodings[0, 4].detach())  # the concept token's encoding: gate fires
    out = pipe.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), encodings).sample
    out.square().mean().backward()
    assert params.token_embedding.grad is not None and params.token_embedding.grad.abs().sum() > 0
    for name in layers:
        assert params.value_target(name).grad.abs().sum() > 0
    concept_ids = {id(p) for p in params.parameters()}
    base_parameters = [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if id(p) not in concept_ids]
    assert len(base_parameters) > 100
    assert all(p.grad is None and not p.requires_grad for p in base_parameters)
    uninstall_keylocked_layers(pipe.unet)


def test_training_changes_only_the_concept(tiny_pipe, instance_dir, tmp_path):
    before_unet = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    before_text = {k: v.clone() for k, v in tiny_pipe.text_encoder.state_dict().items()}
    vocab = len(tiny_pipe.tokenizer)
    path = train_concept(config(instance_dir, tmp_path / "out"), pipe=tiny_pipe)
    # the pipeline is handed back stock: same weights, same vocabulary, no wrappers
    assert len(tiny_pipe.tokenizer) == vocab
    for k, v in tiny_pipe.unet.state_dict().items():
        assert torch.equal(v, before_unet[k]), k
    for k, v in tiny_pipe.text_encoder.state_dict().items():
        assert torch.equal(v, before_text[k]), k
    concept = Concept.load(path)
    bear = before_text["embeddings.word_embeddings.weight"][tiny_pipe.tokenizer.convert_tokens_to_ids("bear")]
    assert not torch.allclose(concept.token_embedding, bear.half().float())  # trained
    assert set(concept.value_targets) == set(cross_attention_layers(tiny_pipe.unet))
    assert concept.training["steps"] == 2
    assert (tmp_path / "out" / "checkpoint-2" / "concept.safetensors").is_file()


def test_resume_reproduces_an_uninterrupted_run(instance_dir, tmp_path):
    pipe = build_tiny_pipeline()
    straight = train_concept(
        config(instance_dir, tmp_path / "straight", max_train_steps=4, gradient_accumulation_steps=2), pipe=pipe
    )
    interrupted = config(instance_dir, tmp_path / "resumed", max_train_steps=2, gradient_accumulation_steps=2)
    train_concept(interrupted, pipe=pipe)
    resumed = train_concept(
        config(
            instance_dir,
            tmp_path / "resumed",
            max_train_steps=4,
            gradient_accumulation_steps=2,
            resume_from_checkpoint="latest",
        ),
        pipe=pipe,
    )
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert Concept.load(resumed).training["steps"] == 4


def test_v_prediction_model_trains_against_the_velocity(tmp_path, instance_dir, monkeypatch):
    """A v-prediction model's loss is the MSE against get_velocity(x0, ε, t), not against ε."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from keylocked.training import trainer
    from keylocked.training.data import images_to_tensor, load_instance_images

    pipe = build_tiny_pipeline(prediction_type="v_prediction")
    seen = []
    original = trainer.masked_mse
    monkeypatch.setattr(trainer, "masked_mse", lambda p, t, m: seen.append((p.detach(), t, m)) or original(p, t, m))
    cfg = config(instance_dir, tmp_path / "v", max_train_steps=1, mask="none")
    path = train_concept(cfg, pipe=pipe)
    assert Concept.load(path).training["mask"] == "none"
    prediction, target, mask = seen[0]
    assert mask is None
    # the same micro-batch drawn for an epsilon model: its target is the noise ε itself
    epsilon = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    instance = images_to_tensor(load_instance_images(cfg.instance_data_dir, trainer._resolution(cfg, pipe)))
    latents, _, timesteps, noise, _, _ = trainer.noised_batch(
        cfg, instance, trainer.step_generator_for(cfg, 0, 0), pipe.vae, epsilon, torch.device("cpu"), torch.float32
    )
    velocity = epsilon.get_velocity(latents, noise, timesteps)
    assert torch.allclose(target, velocity, atol=1e-6)
    loss = original(prediction, target, None)
    assert torch.allclose(loss, F.mse_loss(prediction, velocity), atol=1e-6)
    assert not torch.allclose(loss, F.mse_loss(prediction, noise), rtol=1e-3)


def test_load_generate_unload_is_bit_identical(trained, tiny_pipe):
    first, second = trained
    stock = generate(tiny_pipe, "a bear and a cup")
    tokens = keylocked.load_concepts(tiny_pipe, [first, second], beta=0.7, tau=0.15)
    assert tokens == ["<my-thing>", "<other>"]
    both = generate(tiny_pipe, "a <my-thing> and a <other>")
    assert both.shape == stock.shape and not (both == stock).all()
    keylocked.set_concept_options(tiny_pipe, lock="global", beta={"<my-thing>": 0.5})
    assert keylocked.loaded_concepts(tiny_pipe).keys() == {"<my-thing>", "<other>"}
    glob = generate(tiny_pipe, "a <my-thing> and a <other>")
    assert not (glob == both).all()
    keylocked.unload_concepts(tiny_pipe)
    assert (generate(tiny_pipe, "a bear and a cup") == stock).all()
    assert "<my-thing>" not in tiny_pipe.tokenizer.get_vocab()
    assert not any(isinstance(m, KeyLockedLinear) for m in tiny_pipe.unet.modules())


def test_global_lock_feeds_keys_the_superclass_prompt(trained, tiny_pipe):
    first, _ = trained
    keylocked.load_concepts(tiny_pipe, first, lock="global")
    context = tiny_pipe.unet._keylocked_context
    with torch.no_grad():
        concept_embeds = tiny_pipe.encode_prompt("a <my-thing> on a table", "cpu", 1, False)[0]
        superclass_embeds = tiny_pipe.encode_prompt("a bear on a table", "cpu", 1, False)[0]
    assert torch.allclose(context.key_path_encodings(concept_embeds), superclass_embeds)
    unrelated = torch.randn_like(concept_embeds)
    assert torch.equal(context.key_path_encodings(unrelated), unrelated)
    keylocked.unload_concepts(tiny_pipe)


def test_edited_projections_are_computed_once_per_prompt(trained, tiny_pipe, monkeypatch):
    """Text encodings do not change across denoising steps: the edit is cached per prompt."""
    import keylocked.layers as layers_module

    calls = []
    original = layers_module.keylocked_projection
    monkeypatch.setattr(layers_module, "keylocked_projection", lambda *a, **k: calls.append(1) or original(*a, **k))
    keylocked.load_concepts(tiny_pipe, trained[0])
    tiny_pipe("a <my-thing>", num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    num_layers = len(cross_attention_layers(tiny_pipe.unet))
    assert len(calls) == 2 * num_layers  # K and V once each, not once per step
    calls.clear()
    tiny_pipe("a <my-thing> on a table", num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2 * num_layers  # a new prompt is recomputed, not served stale
    keylocked.unload_concepts(tiny_pipe)


def test_covariance_uses_real_text_positions_only(tiny_pipe):
    prompts = ["a bear", "a photo of a red cup on a table"]
    covariance = estimate_covariance(tiny_pipe.text_encoder, tiny_pipe.tokenizer, prompts, progress=False)
    tokens = tiny_pipe.tokenizer(
        prompts, padding="max_length", max_length=tiny_pipe.tokenizer.model_max_length, return_tensors="pt"
    )
    with torch.no_grad():
        encodings = tiny_pipe.text_encoder(tokens.input_ids)[0].double()
    rows = encodings[tokens.attention_mask.bool()]  # BOS, words, EOS; no padding
    assert int(covariance.info["count"]) == rows.shape[0] == (2 + 2) + (9 + 2)  # words + [CLS] and [SEP]
    expected = rows.T @ rows / rows.shape[0]
    inverse = covariance.inverse.double()
    ridge = float(covariance.info["ridge"])
    if ridge:
        expected = expected + ridge * torch.linalg.eigvalsh(expected).mean() * torch.eye(
            expected.shape[0], dtype=torch.float64
        )
    assert torch.allclose(inverse @ expected, torch.eye(expected.shape[0], dtype=torch.float64), atol=1e-3)


def test_a_failed_load_leaves_the_pipeline_untouched(trained, tiny_pipe, tmp_path):
    good = Concept.load(trained[0])
    bad = Concept.load(trained[1])
    layer = next(iter(bad.value_targets))
    bad.value_targets[layer] = torch.zeros(3)  # wrong width
    vocab = len(tiny_pipe.tokenizer)
    with pytest.raises(keylocked.KeylockedError, match="features"):
        keylocked.load_concepts(tiny_pipe, [good, bad])
    other = Concept.load(trained[1])
    other.base_model_fingerprint = "0" * 64
    with pytest.raises(keylocked.KeylockedError, match="another base model"):
        keylocked.load_concepts(tiny_pipe, [good, other])
    clash = Concept.load(trained[0])
    clash.placeholder_token = "bear"
    with pytest.raises(keylocked.KeylockedError, match="already exists"):
        keylocked.load_concepts(tiny_pipe, clash)
    assert len(tiny_pipe.tokenizer) == vocab
    assert keylocked.loaded_concepts(tiny_pipe) == {}
    assert not any(isinstance(m, KeyLockedLinear) for m in tiny_pipe.unet.modules())
    keylocked.load_concepts(tiny_pipe, [good, other], strict=False)  # the documented override
    with pytest.raises(keylocked.KeylockedError, match="loaded twice"):
        keylocked.load_concepts(tiny_pipe, good)
    keylocked.unload_concepts(tiny_pipe)


def test_validation_images_are_written(tiny_pipe, instance_dir, tmp_path):
    train_concept(
        config(
            instance_dir,
            tmp_path / "val",
            max_train_steps=2,
            validation_prompt="a <my-thing>",
            validation_steps=1,
            num_validation_images=2,
            num_inference_steps=2,
        ),
        pipe=tiny_pipe,
    )
    assert sorted(p.name for p in (tmp_path / "val" / "validation").iterdir()) == ["step-1.png", "step-2.png"]


def test_a_covariance_bundled_with_the_model_folder_is_preferred(tiny_model_dir, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from keylocked.covariance import default_covariance, pipeline_folder

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    bundled = estimate_covariance(
        pipe.text_encoder, pipe.tokenizer, ["a bear", "a red cup", "the table"], progress=False
    )
    bundled.save(tiny_model_dir / "covariance.safetensors")
    try:
        monkeypatch.setenv("KEYLOCKED_CACHE", str(tmp_path / "empty-cache"))
        found = default_covariance(pipe.text_encoder, pipe.tokenizer, model_dir=pipeline_folder(pipe))
        assert found.sha256 == bundled.sha256 and found.info["num_prompts"] == "3"
        other = build_tiny_pipeline(seed=1)  # another text encoder: the bundled file does not fit it
        assert (
            default_covariance(other.text_encoder, other.tokenizer, model_dir=tiny_model_dir, progress=False).sha256
            != bundled.sha256
        )
    finally:
        (tiny_model_dir / "covariance.safetensors").unlink()
