"""CLI smoke runs on the tiny model folder: covariance -> train -> inspect -> generate, and bad inputs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_pipeline, write_instance_images
from PIL import Image
from safetensors.torch import save_file

from keylocked import __version__
from keylocked.base_model import KeylockedError
from keylocked.cli import ExitCode, add_dataclass_arguments, dataclass_from_args, main
from keylocked.concept import Concept
from keylocked.covariance import Covariance
from keylocked.training import TrainConfig

IMAGE_SIZE = 16  # the tiny pipeline: 8x8 latents, VAE factor 2
FAST_TRAIN = ["--train_batch_size", "1", "--gradient_accumulation_steps", "1", "--no-progress"]
FAST_GENERATE = ["--num_inference_steps", "2", "--guidance_scale", "2.0", "--no-progress"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], err


def files_under(folder: Path) -> list[str]:
    """Every file (hidden temporaries included) under ``folder``; [] if it does not exist."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---------------------------------------------------------------------------------------
# Shared runs (module-scoped): one covariance, two concepts trained through the CLI.


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def covariance_run(root, tiny_model_dir) -> tuple[Path, str]:
    captions = root / "captions.txt"
    captions.write_text("a photo of a bear\na cup on a table\n\nthe dog in the corner\na red cube\n")
    output = root / "cov.safetensors"
    code = main(
        [
            "covariance",
            "--pretrained_model_name_or_path",
            str(tiny_model_dir),
            "--captions",
            str(captions),
            "--output",
            str(output),
        ]
    )
    assert code == 0
    return output, captions


@pytest.fixture(scope="module")
def concept_a(root, tiny_model_dir, covariance_run) -> Path:
    """<cube> ~ bear: 3 steps, checkpoints every 2, a validation image at step 2."""
    out = root / "out-a"
    code = main(
        [
            "train",
            "--pretrained_model_name_or_path",
            str(tiny_model_dir),
            "--instance_data_dir",
            str(write_instance_images(root / "images-a")),
            "--placeholder_token",
            "<cube>",
            "--superclass_token",
            "bear",
            "--output_dir",
            str(out),
            "--max_train_steps",
            "3",
            "--checkpointing_steps",
            "2",
            "--covariance",
            str(covariance_run[0]),
            "--validation_prompt",
            "a photo of a <cube>",
            "--validation_steps",
            "2",
            "--num_validation_images",
            "1",
            "--num_inference_steps",
            "2",
            *FAST_TRAIN,
        ]
    )
    assert code == 0
    return out / "concept.safetensors"


@pytest.fixture(scope="module")
def concept_b(root, tiny_model_dir, covariance_run) -> Path:
    """<mug> ~ cup, with non-default settings that must reach the file."""
    out = root / "out-b"
    code = main(
        [
            "train",
            "--pretrained_model_name_or_path",
            str(tiny_model_dir),
            "--instance_data_dir",
            str(write_instance_images(root / "images-b", count=2)),
            "--placeholder_token",
            "<mug>",
            "--superclass_token",
            "cup",
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "2",
            "--covariance",
            str(covariance_run[0]),
            "--mask",
            "none",
            "--seed",
            "7",
            "--learning_rate_values",
            "0.05",
            "--train_beta",
            "0.7",
            "--train_tau",
            "0.2",
            "--inference_beta",
            "0.65",
            "--inference_tau",
            "0.12",
            "--concept_dtype",
            "fp32",
            "--no-random_flip",
            "--prompt_templates",
            "a photo of a {}",
            "a {} on a table",
            *FAST_TRAIN,
        ]
    )
    assert code == 0
    return out / "concept.safetensors"


@pytest.fixture(scope="module")
def other_model_dir(root) -> Path:
    """Same architecture, other weights: a concept trained on the tiny model does not belong here."""
    path = root / "other-model"
    build_tiny_pipeline(seed=1).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------
# The happy path.


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"keylocked {__version__}"


def test_train_flags_are_the_config_fields():
    """Flags are generated from TrainConfig, so a new field is a new flag."""
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= {action.dest for action in parser._actions}
    args = parser.parse_args(
        [
            "--pretrained_model_name_or_path",
            "m",
            "--instance_data_dir",
            "d",
            "--placeholder_token",
            "<t>",
            "--superclass_token",
            "bear",
            "--resolution",
            "32",
            "--no-random_flip",
            "--mixed_precision",
            "bf16",
            "--checkpoints_total_limit",
            "2",
            "--prompt_templates",
            "a {}",
            "the {}",
        ]
    )
    config = dataclass_from_args(TrainConfig, args)
    assert (config.resolution, config.random_flip, config.mixed_precision) == (32, False, "bf16")
    assert config.checkpoints_total_limit == 2 and config.prompt_templates == ("a {}", "the {}")
    assert (
        config.max_train_steps == TrainConfig("m", "d", "<t>", "bear").max_train_steps
    )  # unset flags keep the defaults


def test_covariance_prints_and_saves(capsys, tiny_model_dir, root):
    captions = root / "captions-2.txt"
    captions.write_text("a photo of a bear\na cup on a table\n")
    output = root / "cov-2.safetensors"
    code, out, _ = run(
        capsys,
        "covariance",
        "--pretrained_model_name_or_path",
        tiny_model_dir,
        "--captions",
        captions,
        "--output",
        output,
    )
    assert code == 0
    covariance = Covariance.load(output)
    printed = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert printed["sha256"] == covariance.sha256
    assert int(printed["count"]) == int(covariance.info["count"]) == 2 * 7  # [CLS] 5 words [SEP] per caption
    assert float(printed["condition_number"]) > 1 and float(printed["ridge"]) >= 0
    assert covariance.info["corpus"] == str(captions)
    assert not list(root.glob(".cov-2*"))  # no temporary left beside it


def test_train_writes_concept_checkpoints_and_validation(concept_a, covariance_run):
    out = concept_a.parent
    assert files_under(out) == sorted(
        [
            ".keylocked.lock",  # the run's flock file, kept (deleting it would race a second run)
            "concept.safetensors",
            "validation/step-2.png",
            "validation/step-3.png",
            *(f"checkpoint-{s}/{f}" for s in (2, 3) for f in files_under(out / "checkpoint-2")),
        ]
    )
    assert "concept.safetensors" in files_under(out / "checkpoint-2")
    concept = Concept.load(concept_a)
    assert (concept.placeholder_token, concept.superclass_token) == ("<cube>", "bear")
    assert concept.training["steps"] == 3 and concept.training["mask"] == "attention"
    assert len(concept.base_model_fingerprint) == 64
    assert concept.covariance_sha256 == Covariance.load(covariance_run[0]).sha256
    assert len(concept.value_targets) == 7 and concept.token_embedding.shape == (32,)
    assert Concept.load(out / "checkpoint-2" / "concept.safetensors").training["steps"] == 2
    with Image.open(out / "validation" / "step-2.png") as grid:
        assert grid.size == (2 + IMAGE_SIZE + 2, IMAGE_SIZE + 2)  # one image + padding


def test_train_flags_reach_the_concept(concept_b):
    concept = Concept.load(concept_b)
    assert (concept.train_beta, concept.train_temperature, concept.beta, concept.temperature) == (0.7, 0.2, 0.65, 0.12)
    assert concept.training | {"base_model": None} == {
        "steps": 2,
        "effective_batch_size": 1,
        "learning_rate_embedding": 0.006,
        "learning_rate_values": 0.05,
        "mask": "none",
        "seed": 7,
        "resolution": None,
        "base_model": None,
        "covariance_positions": "text",
    }
    from safetensors import safe_open

    with safe_open(str(concept_b), "pt") as handle:
        assert handle.get_slice("concept_input").get_dtype() == "F32"


def test_inspect_concept(capsys, concept_a):
    code, out, _ = run(capsys, "inspect", concept_a)
    assert code == 0
    concept = Concept.load(concept_a)
    rows = {line.split("  ")[0].strip(): line.split("  ", 1)[1].strip() for line in out.splitlines() if "  " in line}
    assert rows["token"] == "<cube>" and rows["super-category"] == "bear"
    assert rows["base model fingerprint"] == concept.base_model_fingerprint
    assert rows["covariance sha256"] == concept.covariance_sha256
    assert rows["file size (bytes)"] == str(concept_a.stat().st_size)
    assert rows["parameters"] == str(concept.num_parameters()) == str(32 * 3 + 16 * 3 + 32 * 4)
    assert rows["dtype"] == "F16" and rows["recommended beta"] == "0.7" and rows["recommended tau"] == "0.15"
    assert json.loads(rows["training"])["steps"] == 3
    assert rows["layers"] == "7"
    assert "  down_blocks.0.attentions.0.transformer_blocks.0.attn2  16" in out
    assert "  mid_block.attentions.0.transformer_blocks.0.attn2      32" in out


def test_inspect_covariance_json(capsys, covariance_run):
    code, out, _ = run(capsys, "inspect", covariance_run[0], "--json")
    assert code == 0
    description = json.loads(out)
    assert description["format"] == "keylocked.covariance" and description["dimension"] == 32
    assert description["sha256"] == Covariance.load(covariance_run[0]).sha256
    assert description["count"] == "26" and description["dtype"] == "F32"


def test_generate_one_concept(capsys, tiny_model_dir, concept_a, covariance_run, root):
    def generate(out, num_images, seed):
        return run(
            capsys,
            "generate",
            "--pretrained_model_name_or_path",
            tiny_model_dir,
            "--concept",
            concept_a,
            "--prompt",
            "a photo of a <cube>",
            "--num_images",
            num_images,
            "--seed",
            seed,
            "--output_dir",
            out,
            "--covariance",
            covariance_run[0],
            *FAST_GENERATE,
        )

    out = root / "gen-1"
    code, printed, err = generate(out, 3, 5)
    assert code == 0 and "warning" not in err
    assert printed.split() == [str(out / name) for name in ("seed-5.png", "seed-6.png", "seed-7.png", "grid.png")]
    assert files_under(out) == ["grid.png", "seed-5.png", "seed-6.png", "seed-7.png"]
    for seed in (5, 6, 7):
        with Image.open(out / f"seed-{seed}.png") as image:
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
            settings = json.loads(image.text["keylocked"])
        assert settings["seed"] == seed and settings["concept_tokens"] == ["<cube>"] and settings["beta"] is None
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 + 3 * (IMAGE_SIZE + 2), IMAGE_SIZE + 2)
    # image i is a function of seed + i alone
    assert generate(root / "gen-1b", 1, 6)[0] == 0
    with Image.open(out / "seed-6.png") as first, Image.open(root / "gen-1b" / "seed-6.png") as again:
        assert first.tobytes() == again.tobytes()


def test_generate_two_concepts_per_concept_beta_global_lock(
    capsys, tiny_model_dir, concept_a, concept_b, covariance_run, root
):
    out = root / "gen-2"
    code, _, err = run(
        capsys,
        "generate",
        "--pretrained_model_name_or_path",
        tiny_model_dir,
        "--concept",
        concept_a,
        "--concept",
        concept_b,
        "--prompt",
        "a <cube> next to a <mug>",
        "--beta",
        "0.6",
        "0.8",
        "--tau",
        "0.15",
        "--lock",
        "global",
        "--num_images",
        "2",
        "--output_dir",
        out,
        "--covariance",
        covariance_run[0],
        *FAST_GENERATE,
    )
    assert code == 0, err
    assert files_under(out) == ["grid.png", "seed-0.png", "seed-1.png"]
    with Image.open(out / "seed-1.png") as image:
        settings = json.loads(image.text["keylocked"])
    assert settings["beta"] == [0.6, 0.8] and settings["tau"] == 0.15 and settings["lock"] == "global"
    assert settings["concept_tokens"] == ["<cube>", "<mug>"]


def test_generate_warns_when_prompt_has_no_concept_token(capsys, tiny_model_dir, concept_a, covariance_run, root):
    code, _, err = run(
        capsys,
        "generate",
        "--pretrained_model_name_or_path",
        tiny_model_dir,
        "--concept",
        concept_a,
        "--prompt",
        "a photo of a bear",
        "--num_images",
        "1",
        "--output_dir",
        root / "gen-warn",
        "--covariance",
        covariance_run[0],
        *FAST_GENERATE,
    )
    assert code == 0
    assert "warning: " in err and "none of the concept tokens <cube>" in err


# ---------------------------------------------------------------------------------------
# Bad inputs: exit code 2, one 'error:' line, nothing (half-)written.


def corrupt_image_dir(root: Path) -> Path:
    folder = write_instance_images(root / "corrupt-images")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return folder


TRAIN_ERRORS = {
    "missing instance dir": (lambda root: root / "no-such-folder", "<x1>", "bear", "instance data directory not found"),
    "corrupt image": (corrupt_image_dir, "<x2>", "bear", "broken.png: unreadable image"),
    "multi-token super-category": (
        lambda root: write_instance_images(root / "img-h"),
        "<x3>",
        "hedgehog",
        "'hedgehog' is 2 tokens",
    ),
    "placeholder in vocabulary": (
        lambda root: write_instance_images(root / "img-v"),
        "bear",
        "dog",
        "'bear' already exists",
    ),
}


@pytest.mark.parametrize("case", TRAIN_ERRORS, ids=list(TRAIN_ERRORS))
def test_train_bad_inputs(capsys, tmp_path, tiny_model_dir, covariance_run, case):
    make_images, token, superclass, message = TRAIN_ERRORS[case]
    out = tmp_path / "out"
    code, _, err = run(
        capsys,
        "train",
        "--pretrained_model_name_or_path",
        tiny_model_dir,
        "--instance_data_dir",
        make_images(tmp_path),
        "--placeholder_token",
        token,
        "--superclass_token",
        superclass,
        "--output_dir",
        out,
        "--max_train_steps",
        "1",
        "--covariance",
        covariance_run[0],
        *FAST_TRAIN,
    )
    assert_user_error(code, err, message)
    assert files_under(out) == []


def test_train_config_error_quotes_value(capsys, tmp_path):
    code, _, err = run(
        capsys,
        "train",
        "--pretrained_model_name_or_path",
        tmp_path,
        "--instance_data_dir",
        tmp_path,
        "--placeholder_token",
        "<x>",
        "--superclass_token",
        "bear",
        "--max_train_steps",
        "0",
    )
    assert_user_error(code, err, "max_train_steps must be positive, got 0")


def test_generate_concept_from_other_base_model(capsys, other_model_dir, concept_a, root):
    out = root / "gen-other"
    argv = [
        "generate",
        "--pretrained_model_name_or_path",
        other_model_dir,
        "--concept",
        concept_a,
        "--prompt",
        "a <cube>",
        "--num_images",
        "1",
        "--output_dir",
        out,
        *FAST_GENERATE,
    ]
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, "trained on another base model", "--allow_other_base_model")
    assert files_under(out) == []
    code, _, err = run(capsys, *argv, "--allow_other_base_model")
    assert code == 0, err
    assert files_under(out) == ["grid.png", "seed-0.png"]


def bad_files(root: Path) -> dict[str, tuple[Path, str]]:
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    foreign = root / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign), metadata={"format": "pt"})
    return {
        "corrupt": (garbage, "not a readable safetensors file"),
        "not keylocked": (foreign, "not a keylocked concept file (format='pt')"),
        "missing": (root / "nowhere.safetensors", "concept file not found"),
    }


@pytest.mark.parametrize("case", ["corrupt", "not keylocked", "missing"])
def test_generate_bad_concept_file(capsys, tmp_path, tiny_model_dir, case):
    path, message = bad_files(tmp_path)[case]
    out = tmp_path / "gen"
    code, _, err = run(
        capsys,
        "generate",
        "--pretrained_model_name_or_path",
        tiny_model_dir,
        "--concept",
        path,
        "--prompt",
        "a <x>",
        "--output_dir",
        out,
        *FAST_GENERATE,
    )
    assert_user_error(code, err, message)
    assert files_under(out) == []


def test_generate_beta_count_must_match_concepts(capsys, tmp_path, concept_a):
    code, _, err = run(
        capsys,
        "generate",
        "--pretrained_model_name_or_path",
        tmp_path,
        "--concept",
        concept_a,
        "--prompt",
        "a <cube>",
        "--beta",
        "0.5",
        "0.6",
        "0.7",
        "--output_dir",
        tmp_path / "gen",
    )
    assert_user_error(code, err, "beta has 3 values [0.5, 0.6, 0.7] for 1 concept(s)")
    assert files_under(tmp_path / "gen") == []


def test_inspect_non_keylocked_file(capsys, tmp_path):
    path, _ = bad_files(tmp_path)["not keylocked"]
    code, _, err = run(capsys, "inspect", path)
    assert_user_error(code, err, "not a keylocked concept or covariance file")


def test_missing_model_folder(capsys, tmp_path):
    code, _, err = run(
        capsys,
        "covariance",
        "--pretrained_model_name_or_path",
        tmp_path / "no" / "model",
        "--output",
        tmp_path / "cov.safetensors",
    )
    assert_user_error(code, err, "not found")
    assert files_under(tmp_path) == []


def test_demo_flags_come_from_its_config(capsys):
    """`keylocked demo` is an ordinary verb: its flags are DemoConfig's fields."""
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    for flag in ("--concept", "--max_train_steps", "--betas", "--output_dir"):
        assert flag in out


# ---------------------------------------------------------------------------------------
# Every failure: one `error:` line and a documented exit code.


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_exit_codes_are_documented():
    text = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    for code in ExitCode:
        assert f"| {code.value} |" in text, f"docs/cli.md does not document exit code {code.value} ({code.name})"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train"], "the following arguments are required: --pretrained_model_name_or_path"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["generate", "--concept", "c", "--prompt", "p", "--pretrained_model_name_or_path", "m", "--beta", "x"], "x"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == ExitCode.USAGE_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert needle in line and "--help" in line


def _failing_describe(monkeypatch, error: BaseException) -> None:
    def describe(path):
        raise error

    monkeypatch.setattr("keylocked.describe.describe", describe)


@pytest.mark.parametrize(
    "error, code, message",
    [
        (KeylockedError("bad concept\nsecond line"), ExitCode.USAGE_ERROR, "error: bad concept second line"),
        (FileNotFoundError(2, "No such file", "x.safetensors"), ExitCode.USAGE_ERROR, "No such file"),
        (OSError(28, "No space left on device"), ExitCode.SYSTEM_ERROR, "No space left on device"),
        (PermissionError(13, "Permission denied"), ExitCode.SYSTEM_ERROR, "Permission denied"),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED, "error: interrupted"),
        (
            RuntimeError("singular matrix\nat layer 3"),
            ExitCode.INTERNAL_ERROR,
            "error: internal error: RuntimeError: singular matrix at layer 3 (rerun with --debug for the traceback)",
        ),
        (AssertionError(), ExitCode.INTERNAL_ERROR, "error: internal error: AssertionError (rerun with --debug"),
    ],
)
def test_failures_are_one_line_with_their_exit_code(capsys, monkeypatch, error, code, message):
    _failing_describe(monkeypatch, error)
    returned, _, err = run(capsys, "inspect", "x.safetensors")
    assert returned == code
    assert message in one_error_line(err)


@pytest.mark.parametrize("argv", [["--debug", "inspect", "x"], ["inspect", "x", "--debug"]])
def test_debug_shows_the_traceback(capsys, monkeypatch, argv):
    _failing_describe(monkeypatch, RuntimeError("boom"))
    code, _, err = run(capsys, *argv)
    assert code == ExitCode.INTERNAL_ERROR
    assert "Traceback (most recent call last)" in err and "raise error" in err
    assert err.strip().splitlines()[-1] == "error: internal error: RuntimeError: boom"


def test_real_process_prints_one_line(tmp_path):
    """As a user sees it, in a real process: one line, code 2, nothing on stdout (the other classes: above)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    missing = subprocess.run(
        [sys.executable, "-m", "keylocked", "inspect", str(tmp_path / "missing.safetensors")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert missing.returncode == ExitCode.USAGE_ERROR and missing.stdout == ""
    assert "missing.safetensors" in one_error_line(missing.stderr)


def test_python_warnings_are_one_line(capsys, monkeypatch):
    import warnings

    def describe(path):
        warnings.warn("something odd\nin two lines", UserWarning, stacklevel=1)
        return {"format": "x"}

    monkeypatch.setattr("keylocked.describe.describe", describe)
    code, _, err = run(capsys, "inspect", "x", "--json")
    assert code == ExitCode.OK
    assert err.strip().splitlines() == ["warning: something odd in two lines (UserWarning)"]
    assert warnings.showwarning.__name__ != "_warning_line"  # restored after main()
