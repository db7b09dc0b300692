"""Fast tests of the emoji-world data/caption logic and the shipped emoji-64 pipeline."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from emoji_world.catalog import load_splits
from emoji_world.compose import (
    COLOURS,
    IMAGE_SIZE,
    MARGIN,
    PLACEMENTS,
    SIZE_RANGES,
    augmented_view,
    compose,
    make_caption,
)

SPRITE_COLOURS = [(255, 0, 255), (0, 255, 255), (10, 200, 120), (120, 60, 20)]


def solid_sprite(rgb, inset: int = 0) -> np.ndarray:
    """A 64×64 RGBA sprite: an opaque square of ``rgb`` (inset pixels transparent around it)."""
    sprite = np.zeros((64, 64, 4), dtype=np.uint8)
    sprite[inset : 64 - inset, inset : 64 - inset] = (*rgb, 255)
    return sprite


@pytest.fixture(scope="module")
def sprites():
    return [solid_sprite(c) for c in SPRITE_COLOURS], ["fox face", "apple", "racing car", "owl"]


@pytest.mark.parametrize(
    "names, colour, size, placement, expected",
    [
        (["fox face"], None, "", "", "a fox face"),
        (["apple"], "blue", "", "", "an apple on a blue background"),
        (
            ["cactus"],
            "orange",
            "small",
            "in the top left corner",
            "a small cactus in the top left corner on an orange background",
        ),
        (["owl"], None, "large", "", "a large owl"),
        (["cat face", "red apple"], "white", "", "", "a cat face and a red apple on a white background"),
    ],
)
def test_make_caption(names, colour, size, placement, expected):
    assert make_caption(names, colour, size, placement) == expected


def test_make_caption_rejects_empty():
    with pytest.raises(ValueError):
        make_caption([])


@pytest.mark.parametrize("seed", range(40))
def test_compose_caption_matches_image(sprites, seed):
    images, names = sprites
    image, caption, layout = compose(images, names, np.random.default_rng(seed), p_pair=0.3)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    # the border ring (MARGIN pixels wide) is exactly the layout's named colour
    border = np.concatenate(
        [
            image[:MARGIN].reshape(-1, 3),
            image[-MARGIN:].reshape(-1, 3),
            image[:, :MARGIN].reshape(-1, 3),
            image[:, -MARGIN:].reshape(-1, 3),
        ]
    )
    assert (border == np.array(COLOURS[layout.colour])).all()
    # caption mentions the colour iff the layout says so, and then the right one
    mentioned = re.findall(r"on an? (\w+) background", caption)
    assert mentioned == ([layout.colour] if layout.mention_colour else [])
    # every object's name appears, in order
    assert caption.startswith(("a ", "an "))
    positions = [caption.index(names[p.index]) for p in layout.objects]
    assert positions == sorted(positions)
    # size words and placement phrases match the sprite geometry
    for placed in layout.objects:
        assert MARGIN <= placed.x and placed.x + placed.size <= IMAGE_SIZE - MARGIN
        assert MARGIN <= placed.y and placed.y + placed.size <= IMAGE_SIZE - MARGIN
    if len(layout.objects) == 1:
        (placed,) = layout.objects
        lo, hi = SIZE_RANGES[layout.size_word]
        assert lo <= placed.size <= hi
        assert (f"a {layout.size_word} " in caption) == bool(layout.size_word)
        if layout.placement:
            assert layout.placement in caption and layout.size_word == "small"
            fx, fy = PLACEMENTS[layout.placement]
            cx, cy = placed.x + placed.size / 2, placed.y + placed.size / 2
            for frac, centre in ((fx, cx), (fy, cy)):
                if frac == 0.0:
                    assert centre < IMAGE_SIZE / 2
                elif frac == 1.0:
                    assert centre > IMAGE_SIZE / 2
        # the sprite's own colour is drawn where the layout put it
        cy, cx = placed.y + placed.size // 2, placed.x + placed.size // 2
        assert tuple(image[cy, cx]) == SPRITE_COLOURS[placed.index]
    else:
        left, right = layout.objects
        assert left.x + left.size <= IMAGE_SIZE // 2 <= right.x
        assert " and " in caption


def test_compose_is_deterministic(sprites):
    images, names = sprites
    a = compose(images, names, np.random.default_rng(7))
    b = compose(images, names, np.random.default_rng(7))
    assert (a[0] == b[0]).all() and a[1] == b[1]


def test_augmented_view_shape_and_background():
    view = augmented_view(solid_sprite((255, 0, 255), inset=16), np.random.default_rng(0), "yellow")
    assert view.shape == (64, 64, 3)
    assert tuple(view[0, 0]) == COLOURS["yellow"]


# ---- held-out splits -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits():
    return load_splits()


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import BertTokenizer

    from emoji_world.common import text_model_dir

    return BertTokenizer.from_pretrained(text_model_dir(), model_max_length=32)


def test_held_out_sets_are_disjoint(splits):
    demo, bench, train = set(splits["demo"]), set(splits["benchmark"]), set(splits["train"])
    assert 3 <= len(demo) <= 4 and len(bench) >= 10
    assert not demo & bench and not demo & train and not bench & train


def test_super_categories_are_single_tokens_seen_in_training(splits, bert_tokenizer):
    train_words = {w for name in splits["train"] for w in name.split()}
    for name, word in {**splits["demo"], **splits["benchmark"]}.items():
        assert bert_tokenizer.tokenize(word) == [word], (name, word)
        assert word in train_words, (name, word)


def test_colour_words_are_single_tokens(bert_tokenizer):
    for colour in COLOURS:
        assert bert_tokenizer.tokenize(colour) == [colour]


def test_catalogue_holds_held_out_and_excludes_flags(splits):
    from emoji_world.catalog import GEMOJIONE_INDEX, NOTO_FONT, build_catalog

    if not (NOTO_FONT.exists() and GEMOJIONE_INDEX.exists()):
        pytest.skip("Debian emoji packages not installed")
    names = {c.name for c in build_catalog()}
    assert set(splits["demo"]) | set(splits["benchmark"]) <= names
    assert not any(re.search(r"\bflag\b|\bsymbol\b|\btone\b", n) for n in names)


# ---- the shipped pipeline --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    from keylocked.models import load_pipeline

    return load_pipeline("emoji-64")


def test_pipeline_loads_offline_and_is_deterministic(pipe, monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run():
        return pipe(
            "a fox face on a blue background",
            num_inference_steps=2,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images

    a, b = run(), run()
    assert a.shape == (1, 64, 64, 3)
    assert np.array_equal(a, b)
    assert pipe.tokenizer.model_max_length == 32
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 384


def test_shipped_weights_are_small():
    from keylocked.models import EMBEDDED_MODELS

    folder = EMBEDDED_MODELS["emoji-64"]
    total = sum((folder / sub / "diffusion_pytorch_model.safetensors").stat().st_size for sub in ("unet", "vae"))
    assert total < 40 * 2**20
    assert not (folder / "text_encoder").exists()


def test_demo_concept_images():
    from keylocked.models import demo_concept_images, demo_concepts, demo_super_category

    concepts = demo_concepts()
    assert concepts == load_splits()["demo"]
    for name in concepts:
        paths = demo_concept_images(name)
        assert 4 <= len(paths) <= 6
        for path in paths:
            with Image.open(path) as image:
                assert image.size == (64, 64)
    assert demo_super_category("teddy bear") == "bear"
    with pytest.raises(ValueError):
        demo_concept_images("unicorn face")


def test_resolve_model_errors(tmp_path):
    from keylocked.models import resolve_model

    with pytest.raises(ValueError):
        resolve_model("no-such-model")
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError):
        resolve_model(tmp_path)  # a folder without model_index.json
    (tmp_path / "model_index.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path


# ---- training scripts: 2-step smoke runs on synthetic sprites --------------------------------


def test_train_vae_unet_export_smoke(tmp_path):
    import json

    import torch

    from emoji_world import train_unet, train_vae
    from emoji_world.common import read_checkpoint_state
    from emoji_world.export import export
    from keylocked.models import load_pipeline

    data = tmp_path / "data"
    data.mkdir()
    names = ["fox face", "apple", "owl"]
    np.savez_compressed(data / "sprites.npz", sprites=np.stack([solid_sprite(c, 8) for c in SPRITE_COLOURS[:3]]))
    (data / "sprites.json").write_text(
        json.dumps({"entries": [{"name": n, "style": "noto", "split": "train"} for n in names]})
    )
    runs = tmp_path / "runs"
    train_vae.main(["--data", str(data), "--output", str(runs / "vae"), "--max_steps", "2", "--batch_size", "2"])
    assert (runs / "vae" / "final" / "config.json").exists() and (
        runs / "vae" / "checkpoint" / "model.safetensors"
    ).exists()
    args = [
        "--data",
        str(data),
        "--vae",
        str(runs / "vae" / "final"),
        "--output",
        str(runs / "unet"),
        "--batch_size",
        "2",
    ]
    train_unet.main(args + ["--max_steps", "2"])
    train_unet.main(args + ["--max_steps", "3", "--resume"])
    state = read_checkpoint_state(runs / "unet" / "checkpoint")
    assert state["step"] == 3 and state["format"] == "emoji-64-unet-train"
    assert not list(runs.rglob("*.pt")) and not list(runs.rglob("*.partial"))  # safetensors + JSON only
    info = export(tmp_path / "pipe", runs / "unet" / "checkpoint", runs / "vae" / "final", examples=False)
    assert info["trained"] and info["unet_steps"] == 3
    assert not (tmp_path / "pipe" / "text_encoder").exists()
    image = load_pipeline(tmp_path / "pipe")(
        "an owl", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert image.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("colour", list(COLOURS))
def test_evaluate_border_colour_ignores_edge_line_and_object(sprites, colour):
    from emoji_world.compose import Layout, Placed, render_layout
    from emoji_world.evaluate_base import border_colour, embed, nearest_colour

    images, _ = sprites
    image = render_layout(Layout(colour, (Placed(0, 40, 12, 12, False),)), images)
    image[0, :] = 255 - image[0, :]  # a decoder edge artefact on the outermost row
    assert nearest_colour(border_colour(image)) == colour
    vec = embed(image)
    assert vec.shape == (768,) and abs(np.linalg.norm(vec) - 1) < 1e-4


def test_unet_learning_rate_warmup_and_cooldown():
    from emoji_world.train_unet import UnetTrainConfig, learning_rate

    cfg = UnetTrainConfig(lr=1e-3, warmup_steps=10, max_minutes=100, cooldown_minutes=20)
    assert learning_rate(cfg, 0, 100) == pytest.approx(1e-4)  # warm-up
    assert learning_rate(cfg, 500, 50) == pytest.approx(1e-3)  # peak
    assert learning_rate(cfg, 500, 10) == pytest.approx(5e-4)  # half-way through the cool-down
    assert learning_rate(cfg, 500, -1) == 0.0  # budget spent
    no_cooldown = UnetTrainConfig(lr=1e-3, warmup_steps=10)
    assert learning_rate(no_cooldown, 500, 0.5) == pytest.approx(1e-3)


def test_unet_train_config_rejects_bad_cooldown_and_init_from(tmp_path):
    from emoji_world.train_unet import UnetTrainConfig, main

    with pytest.raises(ValueError, match="cooldown_minutes"):
        UnetTrainConfig(cooldown_minutes=-1)
    with pytest.raises(SystemExit):  # argparse error, no traceback, nothing written
        main(["--init_from", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_vae_train_flags_refused_by_the_config_are_an_argparse_error(tmp_path, capsys):
    from emoji_world.train_vae import main

    with pytest.raises(SystemExit) as exit_info:  # was a ValueError traceback
        main(["--decoder_only", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "--decoder_only needs --init" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_crash_between_the_checkpoint_renames_keeps_the_previous_checkpoint(tmp_path):
    """save_checkpoint moves the old folder aside, then the new one in: a crash in between must not lose both."""
    import torch

    from emoji_world.common import load_checkpoint, recover_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, {"model": model}, optimizer, {"step": 7})
    folder.rename(tmp_path / "checkpoint.old")  # as if the process died after the first rename
    assert recover_checkpoint(folder) == folder and folder.is_dir()
    restored = torch.nn.Linear(3, 2)
    assert load_checkpoint(folder, {"model": restored}, torch.optim.AdamW(restored.parameters()))["step"] == 7
    assert torch.equal(restored.weight, model.weight)
    save_checkpoint(folder, {"model": model}, optimizer, {"step": 8})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no .old / .partial left behind
