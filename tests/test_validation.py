"""One validation per rule: file headers, metadata, values, tokens, conditioning, images, disk full, bytes."""

from __future__ import annotations

import errno
import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_clip_pipeline, build_tiny_pipeline
from PIL import Image

import keylocked
from keylocked import KeylockedError
from keylocked import images as data_module
from keylocked.concept import Concept, read_metadata
from keylocked.covariance import Covariance, estimate_covariance
from keylocked.generate import GenerateConfig, generate
from keylocked.io import canonical_safetensors_bytes, read_safetensors_header
from keylocked.layers import KeyLockedLinear
from keylocked.loading import concept_dims, pipeline_fingerprint
from keylocked.tokens import check_new_token
from keylocked.validation import (
    check_concept_inputs,
    check_covariance_inverse,
    check_format_version,
    check_token_text,
)

# ---------------------------------------------------------------------------------------
# Helpers shared with test_fuzz.py: a valid concept for the tiny pipe, made without training.


def make_concept(pipe, token: str = "<my-thing>", seed: int = 0, superclass: str = "bear") -> Concept:
    dims = concept_dims(pipe)
    g = torch.Generator().manual_seed(seed)
    return Concept(
        placeholder_token=token,
        superclass_token=superclass,
        token_embeddings={key: torch.randn(width, generator=g) for key, width in dims.embed_dims.items()},
        concept_input=torch.randn(dims.text_dim, generator=g),
        superclass_input=torch.randn(dims.text_dim, generator=g),
        value_targets={name: torch.randn(width, generator=g) for name, width in dims.value_widths.items()},
        base_model_fingerprint=pipeline_fingerprint(pipe),
        training={"steps": 3},
    )


def identity_covariance(pipe) -> Covariance:
    return Covariance(torch.eye(concept_dims(pipe).text_dim), "")


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def pipe_state(pipe) -> tuple:
    """What a refused load must leave as it was."""
    return (
        len(pipe.tokenizer),
        pipe.text_encoder.get_input_embeddings().weight.shape,
        getattr(pipe.unet, "_keylocked_installation", None),
        sum(isinstance(m, KeyLockedLinear) for m in pipe.unet.modules()),
    )


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def concept_file(pipe, tmp_path) -> Path:
    return make_concept(pipe).save(tmp_path / "concept.safetensors")


# ---------------------------------------------------------------------------------------
# 1. Headers checked before any tensor is read; values after.


def test_a_header_claiming_a_huge_tensor_is_refused_without_allocating_it(pipe, tmp_path):
    """A 4 GB sparse file whose header declares a 10^9-element tensor: refused from the header alone."""
    shapes = {name: list(t.shape) for name, t in make_concept(pipe).tensors().items()}
    shapes["token_embedding"] = [10**9]
    header, position = {"__metadata__": make_concept(pipe).metadata()}, 0
    for name, shape in shapes.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [position, position + 4 * shape[0]]}
        position += 4 * shape[0]
    path = write_raw_safetensors(tmp_path / "huge.safetensors", header, b"")
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size + position)  # sparse: 4 GB that cost no disk
    read_safetensors_header(path)  # a well-formed file: only the shape rule refuses it
    before = peak_rss_bytes()
    with pytest.raises(KeylockedError, match="token_embedding must be a vector of 1 to"):
        Concept.load(path)
    state = pipe_state(pipe)
    with pytest.raises(KeylockedError, match=str(path)):
        keylocked.load_concepts(pipe, path, covariance=identity_covariance(pipe))
    assert pipe_state(pipe) == state
    assert peak_rss_bytes() - before < 100 * 2**20


def test_a_header_claiming_more_data_than_the_file_holds_is_refused(pipe, tmp_path):
    header = {"token_embedding": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}}
    path = write_raw_safetensors(tmp_path / "short.safetensors", header, b"\0" * 64)
    with pytest.raises(KeylockedError, match="not a readable safetensors file"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h: h["concept_input"].update(dtype="I16"), "dtype I16; only"),
        (lambda h: h["token_embedding"].update(dtype="BOOL", shape=[64]), "dtype BOOL"),
        (lambda h: h["concept_input"].update(shape=[4, 8]), "concept_input must be a vector"),
        (lambda h: h.pop("superclass_input"), "leave gaps"),
        (lambda h: h.update(extra=h.pop("concept_input")), r"missing \['concept_input'\]"),
        (lambda h: h["concept_input"].update(dtype="Q7"), "unknown dtype"),
        (lambda h: h["concept_input"].update(shape=[-32]), "malformed shape"),
        (lambda h: h["concept_input"].update(data_offsets=[2, 66]), "offsets"),
        (lambda h: h["__metadata__"].update(beta=1.0), "strings to strings"),
    ],
    ids=["int", "bool", "rank", "gap", "renamed", "dtype-name", "negative", "overlap", "metadata-type"],
)
def test_bad_tensor_headers_are_refused_before_reading(concept_file, mutate, message):
    header, data = split_file(concept_file)
    mutate(header)
    write_raw_safetensors(concept_file, header, data)
    with pytest.raises(KeylockedError, match=message):
        Concept.load(concept_file)


def test_shapes_are_checked_against_the_pipe_from_the_header(pipe, tmp_path):
    other = build_tiny_pipeline(cross_attention_dim=16)
    path = make_concept(other).save(tmp_path / "narrow.safetensors")
    with pytest.raises(KeylockedError, match="text encoder of width 16"):
        Concept.load(path, concept_dims(pipe))
    Concept.load(path)  # consistent in itself


@pytest.mark.parametrize("name", ["concept_input", "token_embedding", "value_targets"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused(pipe, tmp_path, name, bad):
    concept = make_concept(pipe)
    tensor = next(iter(concept.value_targets.values())) if name == "value_targets" else getattr(concept, name)
    tensor[3] = bad
    concept.save(tmp_path / "c.safetensors")
    with pytest.raises(KeylockedError, match="NaN or infinite"):
        Concept.load(tmp_path / "c.safetensors")
    state = pipe_state(pipe)
    with pytest.raises(KeylockedError, match="NaN or infinite"):
        keylocked.load_concepts(pipe, concept, covariance=identity_covariance(pipe))  # the object, too
    assert pipe_state(pipe) == state


def test_a_zero_concept_input_is_refused(pipe, tmp_path):
    concept = make_concept(pipe)
    concept.concept_input.zero_()
    with pytest.raises(KeylockedError, match=r"concept_input \(i\*\) is \(nearly\) zero"):
        Concept.load(concept.save(tmp_path / "zero.safetensors"))


# ---------------------------------------------------------------------------------------
# 2. Metadata.


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("format_version", "1.0", "format_version must be a positive integer"),
        ("format_version", "one", "format_version must be a positive integer"),
        ("format_version", "0", "format_version must be a positive integer"),
        ("format_version", "7", "newer than this keylocked"),
        ("beta", "nan", "beta must be a finite number"),
        ("train_beta", "inf", "train_beta must be a finite number"),
        ("tau", "0", "tau must be positive"),
        ("tau", "-0.1", "tau must be positive"),
        ("train_tau", "nan", "train_tau must be a finite number"),
        ("tau", "abc", "tau must be a number"),
        ("training", "{not json", "training must be a JSON object"),
        ("training", "[1, 2]", "training must be a JSON object"),
        ("placeholder_token", "<a\u200bb>", "invisible or control character U\\+200B"),
        ("placeholder_token", None, "lacks the required key"),
        ("superclass_token", None, "lacks the required key"),
        ("format_version", None, "lacks the required key"),
    ],
)
def test_bad_metadata_names_the_file_and_key(concept_file, key, value, message):
    header, data = split_file(concept_file)
    if value is None:
        del header["__metadata__"][key]
    else:
        header["__metadata__"][key] = value
    write_raw_safetensors(concept_file, header, data)
    for read in (Concept.load, read_metadata):
        with pytest.raises(KeylockedError, match=message) as error:
            read(concept_file)
        assert str(concept_file) in str(error.value)


def test_generate_refuses_a_concept_missing_metadata_before_loading_a_model(concept_file, tmp_path):
    header, data = split_file(concept_file)
    del header["__metadata__"]["placeholder_token"]
    write_raw_safetensors(concept_file, header, data)
    config = GenerateConfig("no-such-model", [str(concept_file)], "a <my-thing>", output_dir=str(tmp_path / "o"))
    with pytest.raises(KeylockedError, match="placeholder_token"):
        generate(config)  # would fail differently if it got as far as loading "no-such-model"


# ---------------------------------------------------------------------------------------
# 3. The Python API follows the CLI's rules.


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(tau=0.0), "tau must be positive"),
        (dict(tau=-1.0), "tau must be positive"),
        (dict(tau=float("nan")), "tau must be a finite number"),
        (dict(beta=float("nan")), "beta must be a finite number"),
        (dict(beta=float("inf")), "beta must be a finite number"),
        (dict(beta={"<unknown>": 0.5}), r"beta names unknown concept token\(s\) \['<unknown>'\]"),
        (dict(tau={"<my-thing>": 0.0}), r"tau\['<my-thing>'\] must be positive"),
    ],
)
def test_load_concepts_and_set_concept_options_check_beta_and_tau(pipe, options, message):
    state = pipe_state(pipe)
    with pytest.raises(KeylockedError, match=message):
        keylocked.load_concepts(pipe, make_concept(pipe), covariance=identity_covariance(pipe), **options)
    assert pipe_state(pipe) == state
    keylocked.load_concepts(pipe, make_concept(pipe), covariance=identity_covariance(pipe))
    try:
        slot = pipe.unet._keylocked_installation.context.concepts["<my-thing>"]
        before = (slot.beta, slot.temperature)
        with pytest.raises(KeylockedError, match=message):
            keylocked.set_concept_options(pipe, **options)
        assert (slot.beta, slot.temperature) == before
    finally:
        keylocked.unload_concepts(pipe)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(tau=0.0), "tau must be positive"),
        (dict(tau=[-1.0]), "tau must be positive"),
        (dict(beta=[0.5, float("nan")], concepts=["a", "b"]), "beta must be a finite number"),
        (dict(tau=float("inf")), "tau must be a finite number"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    ],
)
def test_generate_config_uses_the_same_rules(options, message):
    values = dict(pretrained_model_name_or_path="m", concepts=["a"], prompt="p") | options
    with pytest.raises(KeylockedError, match=message):
        GenerateConfig(**values)


# ---------------------------------------------------------------------------------------
# 4. Tokens.


@pytest.mark.parametrize("char", ["\u200b", "\u200d", "\x07", "\u00a0", "\u2028", "\u2029", "\ue000", "\u0378", "\t"])
def test_invisible_and_control_characters_are_refused(char):
    with pytest.raises(KeylockedError, match="invisible or control character"):
        check_token_text(f"<my{char}thing>")


@pytest.mark.parametrize(
    "token, message",
    [
        ("dog", "already exists in the tokenizer's vocabulary"),
        ("Dog", "vocabulary as 'dog'"),  # BERT lowercases: it would replace every "dog"
        ("DOG", "vocabulary as 'dog'"),
        ("\uff44\uff4f\uff47", "vocabulary as 'dog'"),  # fullwidth: NFKC folds it to "dog"
        ("D\u00f6g", "vocabulary as 'dog'"),  # BERT strips accents when it lowercases
        ("sks", "inside the existing word"),  # would split "asks" and "tasks"
        ("<a\u200bb>", "invisible"),
    ],
)
def test_bert_placeholder_must_not_change_existing_words(pipe, token, message):
    with pytest.raises(KeylockedError, match=message):
        check_new_token(pipe.tokenizer, token)


def test_a_case_variant_placeholder_is_refused_at_load(pipe):
    concept = make_concept(pipe, token="Dog", superclass="dog")
    state = pipe_state(pipe)
    before = pipe.tokenizer("a dog").input_ids
    with pytest.raises(KeylockedError, match="vocabulary as 'dog'"):
        keylocked.load_concepts(pipe, concept, covariance=identity_covariance(pipe))
    assert pipe_state(pipe) == state and pipe.tokenizer("a dog").input_ids == before


def test_a_good_placeholder_is_kept_whole_and_changes_no_word(pipe):
    words = "a photo of the dog on a table with tasks and asks"
    before = pipe.tokenizer(words).input_ids
    check_new_token(pipe.tokenizer, "<my-thing>")
    keylocked.load_concepts(pipe, make_concept(pipe), covariance=identity_covariance(pipe))
    try:
        assert pipe.tokenizer(words).input_ids == before
        assert pipe.tokenizer("<my-thing>", add_special_tokens=False).input_ids == [len(pipe.tokenizer) - 1]
    finally:
        keylocked.unload_concepts(pipe)


def test_clip_placeholder_rules(tmp_path):
    tokenizer = build_tiny_clip_pipeline(tmp_path / "tok").tokenizer
    for token, message in [("Bear", "vocabulary as 'bear'"), ("BEAR", "vocabulary"), ("<a\u2060b>", "invisible")]:
        with pytest.raises(KeylockedError, match=message):
            check_new_token(tokenizer, token)
    check_new_token(tokenizer, "<my-bear>")


# ---------------------------------------------------------------------------------------
# 5. Conditioning: the concepts' Gram matrix and the covariance.


def test_two_concepts_with_the_same_input_are_refused_naming_both(pipe):
    first, second = make_concept(pipe, "<a-thing>", seed=1), make_concept(pipe, "<b-thing>", seed=2)
    second.concept_input = first.concept_input * 2 + 1e-6 * torch.randn(first.concept_input.shape)
    state = pipe_state(pipe)
    with pytest.raises(KeylockedError, match="'<a-thing>' and '<b-thing>' have \\(nearly\\) the same"):
        keylocked.load_concepts(pipe, [first, second], covariance=identity_covariance(pipe))
    assert pipe_state(pipe) == state
    keylocked.load_concepts(pipe, first, covariance=identity_covariance(pipe))
    try:  # against the concepts already loaded, too
        with pytest.raises(KeylockedError, match="the same concept input"):
            keylocked.load_concepts(pipe, second)
        assert list(keylocked.loaded_concepts(pipe)) == ["<a-thing>"]
    finally:
        keylocked.unload_concepts(pipe)


def test_gram_check_refuses_dependent_and_zero_inputs():
    inputs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1e-9]], dtype=torch.float64)
    correlation = inputs @ inputs.T / (inputs.norm(dim=1)[:, None] * inputs.norm(dim=1)[None, :])
    with pytest.raises(KeylockedError, match="linearly dependent"):
        check_concept_inputs(["a", "b", "c"], correlation)
    check_concept_inputs(["a", "b"], correlation[:2, :2])
    with pytest.raises(KeylockedError, match="'z' has a zero concept input"):
        check_concept_inputs(["a", "z"], torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")]]))


@pytest.mark.parametrize(
    "matrix, message",
    [
        (torch.zeros(4, 4), "all zeros"),
        (torch.eye(4).index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(float("nan"))), "NaN"),
        (torch.eye(4) + torch.triu(torch.ones(4, 4), 1), "not symmetric"),
        (torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0])), "not positive definite"),
        (torch.ones(3, 4), "square"),
    ],
    ids=["zero", "nan", "asymmetric", "indefinite", "not-square"],
)
def test_bad_covariances_are_refused_at_load(pipe, tmp_path, matrix, message):
    with pytest.raises(KeylockedError, match=message):
        check_covariance_inverse("C", matrix)
    path = tmp_path / "cov.safetensors"
    Covariance(torch.eye(4), "").save(path)
    header, _ = split_file(path)
    header["input_covariance_inv"]["shape"] = list(matrix.shape)
    header["input_covariance_inv"]["data_offsets"] = [0, matrix.numel() * 4]
    write_raw_safetensors(path, header, matrix.float().contiguous().numpy().tobytes())
    with pytest.raises(KeylockedError, match=message):
        Covariance.load(path)
    state = pipe_state(pipe)
    with pytest.raises(KeylockedError):
        keylocked.load_concepts(pipe, make_concept(pipe), covariance=path)
    assert pipe_state(pipe) == state


def test_estimate_covariance_refuses_a_zero_encoder(pipe):
    encoder = build_tiny_pipeline().text_encoder
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.zero_()
    with pytest.raises(KeylockedError, match="all zero"):
        estimate_covariance(encoder, pipe.tokenizer, ["a dog", "a cup"], progress=False)


def test_format_version_rule():
    assert check_format_version("v", "1", 1) == 1
    for bad in ("1.0", "", " ", "-1", "0x1", "١", True, None):
        with pytest.raises(KeylockedError, match="positive integer"):
            check_format_version("v", bad, 1)


# ---------------------------------------------------------------------------------------
# 6. Images.


def test_decompression_bombs_and_broken_images_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "MAX_IMAGE_PIXELS", 1000)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (40, 40)).save(folder / "warned.png")  # 1600 px: over the limit (Pillow warns)
    Image.new("RGB", (64, 64)).save(folder / "bomb.png")  # 4096 px: over twice the limit (Pillow raises)
    good = Image.new("RGB", (64, 64)).tobytes()
    (folder / "truncated.png").write_bytes(good[:10])
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(KeylockedError) as error:
        data_module.load_instance_images(folder, resolution=16)
    message = str(error.value)
    assert "bomb.png: image too large" in message and "warned.png: image too large" in message
    assert "truncated.png: unreadable" in message
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's global limit restored


# ---------------------------------------------------------------------------------------
# 7. Disk full.


def test_disk_full_leaves_no_partial_file(pipe, tmp_path, monkeypatch):
    concept = make_concept(pipe)
    target = concept.save(tmp_path / "concept.safetensors")
    original = target.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    concept.beta = 0.5
    with pytest.raises(KeylockedError, match="No space left on device"):
        concept.save(target)
    with pytest.raises(KeylockedError, match="No space left on device"):
        Covariance(torch.eye(4), "").save(tmp_path / "cov.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concept.safetensors"]  # no temporary left
    assert target.read_bytes() == original  # the previous file untouched


def test_disk_full_in_keylocked_covariance_is_one_error_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from keylocked.cli import main

    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of a bear\na cup on a table\n")
    output = tmp_path / "out" / "cov.safetensors"
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    argv = ["covariance", "--pretrained_model_name_or_path", str(tiny_model_dir), "--captions", str(captions)]
    code = main([*argv, "--output", str(output)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: ") and "No space left on device" in err
    assert list(output.parent.iterdir()) == []  # no partial or temporary file


# ---------------------------------------------------------------------------------------
# 8. Byte-identical files.

_SAVE_SCRIPT = """
import sys, torch
from keylocked.concept import Concept
from keylocked.covariance import Covariance
g = torch.Generator().manual_seed(0)
Concept("<t>", "bear", torch.randn(8, generator=g), torch.randn(4, generator=g), torch.randn(4, generator=g),
        {f"layer.{i}": torch.randn(3, generator=g) for i in range(5)}, "f" * 64, "c" * 64,
        training={"b": 1, "a": [1, 2]}).save(sys.argv[1] + "/concept.safetensors")
Covariance(torch.eye(4), "f" * 64, {"corpus": "x", "count": "3", "ridge": "0.0"}).save(sys.argv[1] + "/cov.safetensors")
"""


def test_identical_saves_give_identical_bytes(tmp_path):
    outputs = []
    for seed in ("1", "2", "3"):
        folder = tmp_path / seed
        folder.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(Path(__file__).parents[1])}
        subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, str(folder)], check=True, env=env)
        outputs.append([(folder / name).read_bytes() for name in ("concept.safetensors", "cov.safetensors")])
    assert outputs[0] == outputs[1] == outputs[2]
    concept = Concept.load(tmp_path / "1" / "concept.safetensors")  # still a valid file
    assert concept.training == {"a": [1, 2], "b": 1}
    header, _ = split_file(tmp_path / "1" / "concept.safetensors")
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_canonical_bytes_do_not_depend_on_insertion_order():
    tensors = {"b": torch.ones(3), "a": torch.zeros(2, dtype=torch.float16)}
    one = canonical_safetensors_bytes(tensors, {"x": "1", "y": "2", "é": "ü"})
    two = canonical_safetensors_bytes(dict(reversed(tensors.items())), {"é": "ü", "y": "2", "x": "1"})
    assert one == two and (struct.unpack("<Q", one[:8])[0]) % 8 == 0
