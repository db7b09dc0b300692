"""The CUDA paths (fp16 and bf16): run by benchmarks/gpu_check.sh on a GPU machine, skipped elsewhere."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_pipeline, write_instance_images
from test_keylocking import config
from tiny_sdxl import build_tiny_sdxl_pipeline

import keylocked
from keylocked.training import train_concept

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_train_and_generate_in_half_precision_on_cuda(family, precision, tmp_path):
    pipe = build_tiny_pipeline() if family == "sd" else build_tiny_sdxl_pipeline(tmp_path / "tok")
    pipe.set_progress_bar_config(disable=True)
    path = train_concept(
        config(
            write_instance_images(tmp_path / "img"),
            tmp_path / "out",
            mixed_precision=precision,
            gradient_checkpointing=True,
            max_train_steps=2,
        ),
        pipe=pipe,
    )
    assert pipe.unet.device.type == "cuda" and pipe.unet.dtype == PRECISIONS[precision]
    pipe.to("cuda", PRECISIONS[precision])

    def images(prompt):
        generator = torch.Generator("cuda").manual_seed(0)
        return pipe(prompt, num_inference_steps=2, generator=generator, output_type="pt").images

    stock = images("a red bear on the table")
    keylocked.load_concepts(pipe, path, lock="global")
    edited = images("a red <my-thing> on the table")
    assert torch.isfinite(edited).all() and edited.dtype == stock.dtype
    keylocked.unload_concepts(pipe)
    assert torch.equal(images("a red bear on the table"), stock)
