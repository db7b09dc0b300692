"""What a user meets first: every verb's and benchmark's --help, the import graph, the warnings on load."""

from __future__ import annotations

import json
import logging
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from keylocked.cli import build_parser, main
from keylocked.quiet import LOADING_LOGS, LORA_LOGS, LORA_WARNINGS, TEXTUAL_INVERSION_LOGS, quiet

ROOT = Path(__file__).resolve().parents[1]
VERBS = sorted(build_parser()._subparsers._group_actions[0].choices)
BENCHMARKS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(capsys, verb):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: keylocked {verb}") and "--debug" in out


@pytest.mark.parametrize("script", BENCHMARKS)
def test_every_benchmark_has_help(capsys, monkeypatch, script):
    """`python benchmarks/X.py --help` prints usage and exits 0 (run in-process: the imports are shared)."""
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts put the repository root first
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


def test_personalization_benchmark_builds_or_names_its_data(tmp_path, monkeypatch, capsys):
    """A fresh clone has no emoji sprites: the benchmark renders them, or says in one line what to run."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    namespace = runpy.run_path(str(ROOT / "benchmarks" / "personalization.py"))
    ensure_sprites = namespace["ensure_sprites"]
    monkeypatch.setitem(ensure_sprites.__globals__, "check_sources", _missing_sources)
    with pytest.raises(SystemExit) as exit_info:
        ensure_sprites(tmp_path / "data")
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "apt-get install" in message and f"build_dataset --output {tmp_path / 'data'}" in message
    built = []
    monkeypatch.setitem(ensure_sprites.__globals__, "check_sources", lambda: None)
    monkeypatch.setitem(ensure_sprites.__globals__, "build", built.append)
    ensure_sprites(tmp_path / "data")
    assert built == [tmp_path / "data"] and "rendering the emoji sprites" in capsys.readouterr().out


def _missing_sources() -> None:
    raise FileNotFoundError("emoji data files missing")


# ---------------------------------------------------------------------------------------
# One subprocess: import every keylocked module, then load emoji-64 as a user would.

PROBE = """
import importlib, io, json, pkgutil, sys, warnings
import keylocked
names = [m.name for m in pkgutil.walk_packages(keylocked.__path__, "keylocked.")]
for name in names:
    importlib.import_module(name)
imported = sorted(m for m in sys.modules if m == "emoji_world" or m.startswith("emoji_world."))
from keylocked.models import load_pipeline
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    load_pipeline("emoji-64")
print(json.dumps({"modules": names, "emoji_world": imported, "warnings": [str(w.message) for w in caught]}))
"""


@pytest.fixture(scope="module")
def probe() -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_keylocked_does_not_import_emoji_world(probe):
    """emoji_world holds the scripts that build the embedded model; the library must not need them."""
    result, _ = probe
    assert len(result["modules"]) > 20 and "keylocked.demo" in result["modules"]
    assert result["emoji_world"] == []


def test_loading_emoji_64_is_quiet(probe):
    """No "Expected types for text_encoder", float32-cast note, torchvision note or loading bars."""
    result, stderr = probe
    noise = ["Expected types", "should be kept in float32", "requires torchvision", "Loading", "LoRA keys"]
    assert [n for n in noise if n in stderr] == [], stderr
    assert [w for w in result["warnings"] if any(n in w for n in noise)] == []


def test_quiet_drops_only_the_named_messages_and_only_inside():
    logger, records = logging.getLogger("diffusers.loaders.lora_base"), []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # the user's own filter: quiet() still drops its named warning
            with quiet(LORA_LOGS, LORA_WARNINGS):
                logger.warning("No LoRA keys associated to BertModel found with the prefix='text_encoder'.")
                logger.warning("something else")
                warnings.warn("Already found a `peft_config` attribute in the model. This will ...", stacklevel=1)
                warnings.warn("an unrelated warning", stacklevel=1)
        logger.warning("No LoRA keys associated to BertModel found")  # outside the block: shown again
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something else", "No LoRA keys associated to BertModel found"]
    assert [str(w.message) for w in caught] == ["an unrelated warning"]


@pytest.mark.parametrize(
    "logs, name, message",
    [
        (LOADING_LOGS, "diffusers.pipelines.pipeline_utils", "Expected types for text_encoder: (CLIPTextModel,)"),
        (LOADING_LOGS, "diffusers.models.modeling_utils", "There are modules in UNet2DConditionModel that ..."),
        (LORA_LOGS, "diffusers.loaders.peft", "No LoRA keys associated to UNet2DConditionModel found"),
        (
            TEXTUAL_INVERSION_LOGS,
            "transformers.modeling_utils",
            "The new embeddings will be initialized from a multivariate normal distribution",
        ),
    ],
)
def test_each_named_message_is_dropped_at_its_logger(logs, name, message):
    logger, records = logging.getLogger(name), []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        with quiet(logs):
            logger.warning(message)
            logger.warning("an unrelated message")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["an unrelated message"]
