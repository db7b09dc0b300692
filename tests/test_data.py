"""Instance images: every odd input either works sensibly or fails with a clear message."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from keylocked.base_model import KeylockedError
from keylocked.training.config import TrainConfig
from keylocked.training.data import (
    OBJECT_TEMPLATES,
    images_to_tensor,
    load_instance_images,
    prompts_for,
    sample_batch,
    step_generator,
)


def test_modes_are_converted_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (10, 10), (255, 0, 0, 255)), (5, 5))
    rgba.save(tmp_path / "a_rgba.png")
    Image.new("L", (20, 20), 90).save(tmp_path / "b_gray.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "c_cmyk.jpg")
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(tmp_path / "d_16bit.png")
    Image.new("P", (20, 20), 3).save(tmp_path / "e_palette.gif")
    images = load_instance_images(tmp_path, resolution=16)
    assert [im.mode for im in images] == ["RGB"] * 5 and all(im.size == (16, 16) for im in images)
    rgba_out = np.asarray(images[0])
    assert tuple(rgba_out[0, 0]) == (255, 255, 255)  # transparency composited on white
    assert tuple(rgba_out[8, 8]) == (255, 0, 0)
    assert tuple(np.asarray(images[1])[0, 0]) == (90, 90, 90)
    cmyk = np.asarray(images[2])[8, 8]
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # CMYK red stays red


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "white")
    image.paste(Image.new("RGB", (20, 20), (0, 0, 255)), (0, 0))  # blue on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90° clockwise turn
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    (loaded,) = load_instance_images(tmp_path, resolution=20)
    array = np.asarray(loaded).astype(int)
    top_is_blue = array[2, 10, 2] > 150 and array[2, 10, 0] < 100
    assert top_is_blue and array[18, 10, 0] > 200  # after rotation the blue half is on top, white below


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "not found"),
        (lambda d: d.mkdir(), "no images found"),
        (lambda d: (d.mkdir(), (d / "notes.txt").write_text("hi")), "no images found"),
        (
            lambda d: (d.mkdir(), (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")),
            "broken.png: unreadable",
        ),
        (lambda d: (d.mkdir(), Image.new("RGB", (4, 4)).save(d / "tiny.png")), "tiny.png: 4x4 is smaller"),
    ],
    ids=["missing", "empty", "no-images", "corrupt", "too-small"],
)
def test_bad_folders_fail_clearly(tmp_path, setup, message):
    folder = tmp_path / "imgs"
    setup(folder)
    with pytest.raises(KeylockedError, match=message):
        load_instance_images(folder, resolution=16)


def test_batches_depend_only_on_seed_and_step():
    pixels = torch.randn(5, 3, 8, 8)
    a = sample_batch(pixels, 4, step_generator(0, 7))
    b = sample_batch(pixels, 4, step_generator(0, 7))
    c = sample_batch(pixels, 4, step_generator(0, 8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    prompts = prompts_for(a[1], "<x>")
    assert all("<x>" in p for p in prompts) and all(p.replace("<x>", "{}") in OBJECT_TEMPLATES for p in prompts)
    assert images_to_tensor([Image.new("RGB", (4, 4), "white")]).max() == 1.0


@pytest.mark.parametrize(
    "field, value",
    [
        ("train_batch_size", 0),
        ("max_train_steps", -1),
        ("train_tau", 0.0),
        ("ema_decay", 1.0),
        ("mixed_precision", "fp8"),
        ("placeholder_token", "my teddy"),
        ("prompt_templates", ("a photo",)),
    ],
)
def test_config_rejects_bad_values(field, value):
    values = dict(
        pretrained_model_name_or_path="m", instance_data_dir="d", placeholder_token="<t>", superclass_token="bear"
    )
    values[field] = value
    with pytest.raises(KeylockedError, match=str(value)[:4] if field != "prompt_templates" else "prompt_templates"):
        TrainConfig(**values)
