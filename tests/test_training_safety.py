"""Training safety: resume never unpickles, run identity checks, the output folder, disk full,
finite flags, one owner of concept state, LoRA and concepts in either order, the attention probe."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_pipeline, write_instance_images
from test_keylocking import config, generate

import keylocked
from keylocked.base_model import KeylockedError, cross_attention_layers, encode_prompts
from keylocked.layers import KeyLockedLinear
from keylocked.loading import install_keylocked_layers, uninstall_keylocked_layers
from keylocked.training import BaselineOptions, TrainConfig, train, train_concept
from keylocked.training import trainer as trainer_module
from keylocked.training.masks import AttentionMapProbe, probing_cross_attention


class _Marker:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One pipeline, its instance images, and a 2-step Perfusion run with checkpoint-1 and checkpoint-2."""
    root = tmp_path_factory.mktemp("safety")
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    instance = write_instance_images(root / "instance")
    out = root / "run"
    train_concept(config(instance, out, checkpointing_steps=1), pipe=pipe)
    return pipe, instance, out


def _copy(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy


def test_checkpoint_holds_json_and_safetensors_only(run):
    _, _, out = run
    files = sorted(p.name for p in (out / "checkpoint-2").iterdir())
    assert files == ["concept.safetensors", "optimizer.safetensors", "trainable.safetensors", "trainer_state.json"]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["identity"]["method"] == "perfusion"
    assert state["identity"]["token"] == "<my-thing>" and len(state["identity"]["base_model_fingerprint"]) == 64
    assert state["trainables"]["token_embedding"] == [32]
    assert [group["lr"] for group in state["param_groups"]] == [0.006, 0.03]


def test_resume_never_unpickles(run, tmp_path):
    pipe, instance, out = run
    out = _copy(out, tmp_path)
    marker = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "pytorch_model.bin", "optimizer.bin", "random_states_0.pkl"):
        (out / "checkpoint-2" / name).write_bytes(pickle.dumps(_Marker(marker)))
    train_concept(config(instance, out, max_train_steps=3, resume_from_checkpoint="latest"), pipe=pipe)
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    # an accelerate-style checkpoint (pickles only) is refused, and still nothing is unpickled
    (out / "checkpoint-9").mkdir()
    (out / "checkpoint-9" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(KeylockedError, match="not a keylocked checkpoint"):
        train_concept(config(instance, out, max_train_steps=12, resume_from_checkpoint="latest"), pipe=pipe)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(placeholder_token="<other-thing>"), "another run .*token"),
        (dict(method="textual-inversion"), "another run .*method"),
        (dict(pipe_seed=1), "another run .*base_model_fingerprint"),
        (dict(shapes=True), "do not match this run"),
    ],
)
def test_resume_of_another_run_is_refused(run, tmp_path, change, match):
    pipe, instance, out = run
    out = _copy(out, tmp_path)
    if change.pop("shapes", False):
        state_path = out / "checkpoint-2" / "trainer_state.json"
        state = json.loads(state_path.read_text())
        state["trainables"]["token_embedding"] = [31]
        state_path.write_text(json.dumps(state))
    method = change.pop("method", "perfusion")
    if "pipe_seed" in change:
        pipe = build_tiny_pipeline(seed=change.pop("pipe_seed"))
    vocab = len(pipe.tokenizer)
    with pytest.raises(KeylockedError, match=match):
        train(config(instance, out, max_train_steps=3, resume_from_checkpoint="latest", **change), method, pipe=pipe)
    assert len(pipe.tokenizer) == vocab
    assert not any(isinstance(m, KeyLockedLinear) for m in pipe.unet.modules())
    assert not (out / "checkpoint-3").exists()


def test_output_dir_checks_happen_before_the_model_loads(tmp_path, instance_dir):
    # pretrained_model_name_or_path is "unused": any of these reaching the model load would fail differently
    (tmp_path / "file").write_text("x")
    with pytest.raises(KeylockedError, match="is a file"):
        train_concept(config(instance_dir, tmp_path / "file"))
    with pytest.raises(KeylockedError, match="not writable"):
        train_concept(config(instance_dir, tmp_path / "file" / "below"))
    busy = tmp_path / "busy"
    busy.mkdir()
    with open(busy / ".keylocked.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds the folder
        with pytest.raises(KeylockedError, match="in use by another keylocked run"):
            train_concept(config(instance_dir, busy))


def test_another_runs_outputs_are_refused_unless_overwrite(run, tmp_path):
    pipe, instance, out = run
    out = _copy(out, tmp_path)
    with pytest.raises(KeylockedError, match="holds another run's outputs .*--overwrite"):
        train_concept(config(instance, out, placeholder_token="<new-thing>"), pipe=pipe)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    train_concept(config(instance, out, placeholder_token="<new-thing>", max_train_steps=1, overwrite=True), pipe=pipe)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["identity"]["token"] == "<new-thing>"
    assert keylocked.Concept.load(out / "concept.safetensors").placeholder_token == "<new-thing>"


@pytest.mark.parametrize("target", ["trainer", "fsync"])
def test_disk_full_leaves_no_partial_file(run, tmp_path, monkeypatch, target):
    pipe, instance, _ = run

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if target == "trainer":  # a raw OSError from any checkpoint write
        monkeypatch.setattr(trainer_module, "save_safetensors", full)
    else:  # the disk fills at the flush of whichever file is written first
        monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "full"
    out.mkdir()  # an existing folder: the run's lock file stays, nothing else may
    vocab = len(pipe.tokenizer)
    with pytest.raises(KeylockedError, match="disk is full|No space left on device"):
        train_concept(config(instance, out, max_train_steps=1), pipe=pipe)
    assert sorted(p.name for p in out.iterdir()) == [".keylocked.lock"]  # no checkpoint, .partial or temp file
    assert len(pipe.tokenizer) == vocab and not any(isinstance(m, KeyLockedLinear) for m in pipe.unet.modules())


NUMERIC_FIELDS = [
    "learning_rate_embedding",
    "learning_rate_values",
    "adam_weight_decay",
    "train_beta",
    "train_tau",
    "inference_beta",
    "inference_tau",
    "ema_decay",
    "guidance_scale",
]


@pytest.mark.parametrize("field", NUMERIC_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numeric_flags_are_refused(field, value, tmp_path):
    with pytest.raises(KeylockedError, match=field):
        config(tmp_path, tmp_path / "out", **{field: value})


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (dict(adam_weight_decay=-0.1), "adam_weight_decay must be non-negative"),
        (dict(learning_rate_values=-1.0), "learning_rate_values must be non-negative"),
        (dict(train_tau=0.0), "train_tau must be positive"),
        (dict(train_batch_size=2.5), "train_batch_size must be an integer"),
        (dict(max_train_steps=0), "max_train_steps must be positive"),
        (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
        (dict(overwrite=True, resume_from_checkpoint="latest"), "exclude each other"),
    ],
)
def test_invalid_optimizer_and_loop_flags_are_refused(values, match, tmp_path):
    with pytest.raises(KeylockedError, match=match):
        config(tmp_path, tmp_path / "out", **values)


def test_invalid_baseline_options_are_refused():
    with pytest.raises(KeylockedError, match="learning_rate_lora"):
        BaselineOptions(learning_rate_lora=math.nan)
    with pytest.raises(KeylockedError, match="lora_rank"):
        BaselineOptions(lora_rank=0)


def test_cli_reports_a_nan_flag_as_an_error_line(tmp_path, capsys):
    from keylocked.cli import main

    args = ["train", "--pretrained_model_name_or_path", "unused", "--instance_data_dir", str(tmp_path)]
    args += ["--placeholder_token", "<x>", "--superclass_token", "bear", "--learning_rate_values", "nan"]
    assert main(args) != 0
    assert "learning_rate_values must be a finite number" in capsys.readouterr().err


def test_training_over_loaded_concepts_keeps_them(run, tmp_path):
    """Load a concept, train another with the same pipe: the loaded one is untouched and still generates."""
    pipe, instance, out = run
    keylocked.load_concepts(pipe, out / "concept.safetensors")
    try:
        wrappers = sum(isinstance(m, KeyLockedLinear) for m in pipe.unet.modules())
        before = generate(pipe, "a <my-thing> on a table")
        train_concept(config(instance, tmp_path / "second", placeholder_token="<second>", max_train_steps=1), pipe=pipe)
        assert sum(isinstance(m, KeyLockedLinear) for m in pipe.unet.modules()) == wrappers > 0
        context = pipe.unet._keylocked_context
        assert keylocked.loaded_concepts(pipe).keys() == context.concepts.keys() == context.active == {"<my-thing>"}
        assert all(set(layer.value_targets) == {"<my-thing>"} for layer in context.value_layers.values())
        assert "<second>" not in pipe.tokenizer.get_vocab()
        assert (generate(pipe, "a <my-thing> on a table") == before).all()
    finally:
        keylocked.unload_concepts(pipe)


def test_installing_over_another_covariance_is_refused(tiny_pipe):
    d = tiny_pipe.text_encoder.config.hidden_size
    context = install_keylocked_layers(tiny_pipe.unet, torch.eye(d))
    assert install_keylocked_layers(tiny_pipe.unet, torch.eye(d)) is context  # stacks
    with pytest.raises(KeylockedError, match="another covariance"):
        install_keylocked_layers(tiny_pipe.unet, 2 * torch.eye(d))
    uninstall_keylocked_layers(tiny_pipe.unet)


def _add_lora(unet) -> None:
    from peft import LoraConfig

    # init_lora_weights=False: random, non-zero B, so the LoRA really changes W_K
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_k", "to_v"]))


def test_lora_then_concept_locks_the_key_to_the_effective_weight(run):
    pipe, _, out = run
    stock = generate(pipe, "a photo of a bear")
    _add_lora(pipe.unet)
    try:
        keylocked.load_concepts(pipe, out / "concept.safetensors")
        layer = next(iter(cross_attention_layers(pipe.unet).values()))
        i_super = pipe.unet._keylocked_context.concepts["<my-thing>"].superclass_input
        lora_k = layer.to_k.base_layer  # peft's lora.Linear around the original projection
        with torch.no_grad():
            key = layer.to_k.output_targets(["<my-thing>"])[0]
            assert torch.allclose(key, lora_k(i_super[None])[0], atol=1e-6)  # (W + ΔW) i*_super
            assert not torch.allclose(key, lora_k.base_layer(i_super[None])[0], atol=1e-3)  # not W alone
        generate(pipe, "a <my-thing>")
        keylocked.unload_concepts(pipe)
        assert not any(isinstance(m, KeyLockedLinear) for m in pipe.unet.modules())
    finally:
        keylocked.unload_concepts(pipe)
        pipe.unet.unload_lora()
    assert (generate(pipe, "a photo of a bear") == stock).all()


def test_concept_then_lora_loads_and_lora_training_is_refused(run, tmp_path):
    from keylocked.personalizations import load_personalizations, unload_personalizations

    pipe, instance, out = run
    lora_dir = tmp_path / "lora"
    train(config(instance, lora_dir, max_train_steps=1), "lora", pipe=pipe)
    keylocked.load_concepts(pipe, out / "concept.safetensors")
    try:
        before = generate(pipe, "a <my-thing>")
        with pytest.raises(KeylockedError, match="without loaded concepts"):
            train(config(instance, tmp_path / "lora2", max_train_steps=1), "lora", pipe=pipe)
        assert not getattr(pipe.unet, "peft_config", None)
        assert (generate(pipe, "a <my-thing>") == before).all()
        # Loading a trained LoRA over the concepts works (tests/test_lora_composition.py: as if loaded first).
        load_personalizations(pipe, [lora_dir])
        layer = next(iter(cross_attention_layers(pipe.unet).values()))
        assert isinstance(layer.to_k, KeyLockedLinear) and pipe.unet.peft_config
        unload_personalizations(pipe)
        assert (generate(pipe, "a <my-thing>") == before).all()
    finally:
        keylocked.unload_concepts(pipe)


def test_attention_probe_records_the_softmax_of_diffusers_processor(tiny_pipe):
    """The probe runs diffusers' AttnProcessor unchanged and records softmax(QKᵀ·scale) on the token."""
    pipe = tiny_pipe
    encodings, ids = encode_prompts(pipe.text_encoder, pipe.tokenizer, ["a photo of a bear", "a bear"])
    token_mask = ids == pipe.tokenizer.convert_tokens_to_ids("bear")  # (B, T)
    latents, timesteps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    first_name, first = next(iter(cross_attention_layers(pipe.unet).items()))
    seen = {}
    hook = first.register_forward_pre_hook(lambda m, a, k: seen.update(hidden=a[0], **k), with_kwargs=True)
    with torch.no_grad():
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
        stock = pipe.unet(latents, timesteps, encodings).sample
        probe = AttentionMapProbe()
        with probing_cross_attention(pipe.unet, probe):
            probe.reset(token_mask)
            probed = pipe.unet(latents, timesteps, encodings).sample
    hook.remove()
    assert torch.equal(probed, stock)  # the attention itself is diffusers' code, unchanged
    assert len(probe.maps) == len(cross_attention_layers(pipe.unet))
    # first layer's map, recomputed by hand
    query = first.to_q(seen["hidden"])  # (B, Q, inner)
    key = first.to_k(seen["encoder_hidden_states"])  # (B, T, inner)
    heads = first.heads
    q = query.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, h, Q, dh)
    k = key.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, h, T, dh)
    probabilities = (q @ k.transpose(-1, -2) * first.scale).softmax(-1)  # (B, h, Q, T)
    expected = (probabilities * token_mask[:, None, None, :]).sum(-1).mean(1)  # (B, Q)
    assert torch.allclose(probe.maps[0], expected, atol=1e-5), first_name
    mask = probe.object_mask(8, 8)
    assert mask.shape == (2, 1, 8, 8) and torch.allclose(mask.amax(dim=(1, 2, 3)), torch.ones(2))


def test_train_config_overwrite_defaults_off():
    assert TrainConfig("m", "d", "<t>", "bear").overwrite is False


def test_evaluation_and_personalizations_do_not_import_training():
    import subprocess
    import sys

    code = (
        "import sys, keylocked.evaluation, keylocked.evaluation.evaluate, keylocked.personalizations; "
        "print(sorted(m for m in sys.modules if m.startswith('keylocked.training')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_baseline_resumes_exactly_too(run, tmp_path):
    """The checkpoint format is the loop's, not Perfusion's: Textual Inversion resumes bit-exact."""
    from safetensors.torch import load_file

    pipe, instance, _ = run
    straight = train(config(instance, tmp_path / "straight", max_train_steps=2), "textual-inversion", pipe=pipe)
    train(config(instance, tmp_path / "resumed", max_train_steps=1), "textual-inversion", pipe=pipe)
    resumed = train(
        config(instance, tmp_path / "resumed", max_train_steps=2, resume_from_checkpoint="latest"),
        "textual-inversion",
        pipe=pipe,
    )
    assert torch.equal(load_file(str(straight))["<my-thing>"], load_file(str(resumed))["<my-thing>"])
    assert (tmp_path / "resumed" / "checkpoint-1" / "learned_embeds.safetensors").is_file()
