"""Random-weight pipelines with the real shapes of Stable Diffusion 1.5 and SDXL (no downloads).

Speed, memory and file size depend on shapes, not on trained weights. The UNet, VAE and text
encoder configs are those of runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0; the tokenizers are real ``CLIPTokenizer``s over a
small byte-level BPE built offline (CLIP's 49,408-token files are not available offline), padded
to 77 tokens as CLIP's are. ``tiny`` variants keep every kind of layer at toy sizes for a CPU
smoke run; the tests build their tiny pipelines from the same UNet configs, VAE and tokenizer.

    from shapes import build_pipeline
    pipe = build_pipeline("sdxl", device="cuda", dtype=torch.float16)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

WORDS = ("a", "photo", "of", "dog", "cat", "car", "cup", "tree", "and", "on", "the", "table", "bear", "red")
FAMILIES = ("sd15", "sdxl", "sd15-tiny", "sdxl-tiny")


def clip_tokenizer(
    folder: Path, model_max_length: int = 77, pad_token: str = "<|endoftext|>", words: tuple[str, ...] = WORDS
):
    """A real ``CLIPTokenizer`` over a byte-level BPE in which every word of ``words`` is one token."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    characters = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(characters + [c + "</w>" for c in characters])}
    merges: list[str] = []
    for word in words:  # merge each word into one token, left to right
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1]] + parts[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length, pad_token=pad_token
    )


def tiny_vae():
    """A 16x16 -> 4x4x4 AutoencoderKL: the VAE of every tiny pipeline (here and in the tests)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
    )


def unet_config(family: str, **overrides) -> dict:
    """UNet2DConditionModel kwargs: SD 1.5 (16 cross-attention layers), SDXL base (70 layers, Σ out
    83,200), or their tiny stand-ins (7 and 3 layers; the tests' UNets); ``overrides`` replace keys."""
    return {"in_channels": 4, "out_channels": 4, **_unet_config(family), **overrides}


def _unet_config(family: str) -> dict:
    if family == "sd15":
        return dict(
            sample_size=64,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
    if family == "sdxl":
        return dict(
            sample_size=128,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 6 time ids × 256 + pooled 1280
        )
    if family == "sd15-tiny":
        return dict(
            sample_size=8,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
    if family == "sdxl-tiny":
        return dict(
            sample_size=8,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=32 + 48,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 16,
            norm_num_groups=8,
        )
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def _text_config(vocab_size: int, width: int, layers: int, heads: int, intermediate: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=extra.pop("hidden_act", "quick_gelu"),
        bos_token_id=0,
        eos_token_id=2,  # as the released configs: pooled at the highest token id
        pad_token_id=1,
        **extra,
    )


def build_pipeline(
    family: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, resolution: int | None = None
):
    """A ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` of ``family``'s shapes, random weights.

    ``resolution``: the images' side in pixels (default: the family's own, 512 / 1024 / 64).
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tiny = family.endswith("-tiny")
    xl = family.startswith("sdxl")
    max_length = 16 if tiny else 77
    with tempfile.TemporaryDirectory(prefix="keylocked-shapes-") as folder:  # read at construction
        tokenizer = clip_tokenizer(Path(folder) / "tokenizer", max_length)
        tokenizer_2 = clip_tokenizer(Path(folder) / "tokenizer_2", max_length, pad_token="!")
    torch.manual_seed(seed)
    # building on the target device skips a slow CPU initialisation of billions of weights
    config = unet_config(family)
    if resolution:
        config["sample_size"] = resolution // 8  # latents are 8x smaller
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
        if tiny:
            vae = tiny_vae()
        else:
            vae = AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4,
                sample_size=resolution or (1024 if xl else 512),
                scaling_factor=0.13025 if xl else 0.18215,
            )
        n = len(tokenizer)
        if xl:
            l_config = (n, 32, 2, 2, 64) if tiny else (n, 768, 12, 12, 3072)
            g_config = (n, 48, 2, 2, 96) if tiny else (n, 1280, 32, 20, 5120)
            text_encoder = CLIPTextModel(_text_config(*l_config))
            text_encoder_2 = CLIPTextModelWithProjection(
                _text_config(*g_config, projection_dim=16 if tiny else 1280, hidden_act="gelu")
            )
        else:
            text_encoder = CLIPTextModel(_text_config(*((n, 32, 2, 2, 64) if tiny else (n, 768, 12, 12, 3072))))
    for module in (unet, vae, text_encoder) + ((text_encoder_2,) if xl else ()):
        module.eval()
        if dtype != torch.float32:
            module.to(dtype)
    if xl:
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=EulerDiscreteScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                steps_offset=1,
                timestep_spacing="leading",
            ),
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDIMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
            ),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_concepts(pipe, count: int) -> list:
    """``count`` concepts with this model's shapes (both token embeddings on SDXL), random values."""
    from keylocked.base_model import cross_attention_layers
    from keylocked.concept import Concept
    from keylocked.text_stack import text_stack

    generator = torch.Generator().manual_seed(0)
    stack = text_stack(pipe)
    words = ["dog", "cat", "car", "cup", "tree"]
    return [
        Concept(
            placeholder_token=f"<c{i}>",
            superclass_token=words[i % len(words)],
            token_embeddings={
                key: torch.randn(dim, generator=generator) for key, dim in stack.embedding_dims().items()
            },
            concept_input=torch.randn(stack.d_text, generator=generator),
            superclass_input=torch.randn(stack.d_text, generator=generator),
            value_targets={
                name: torch.randn(getattr(layer.to_v, "base_layer", layer.to_v).out_features, generator=generator)
                for name, layer in cross_attention_layers(pipe.unet).items()
            },
        )
        for i in range(count)
    ]


def identity_covariance(pipe):
    """C = I: speed and memory do not depend on the covariance's values."""
    from keylocked.covariance import Covariance
    from keylocked.text_stack import text_stack

    return Covariance(torch.eye(text_stack(pipe).d_text), "", {"corpus": "identity (benchmark)"})


def main(argv: list[str] | None = None) -> None:
    """Print each family's cross-attention shapes (meta device: no weights are allocated)."""
    import argparse

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from keylocked.base_model import cross_attention_layers

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    for family in FAMILIES:
        with init_empty_weights():
            unet = UNet2DConditionModel(**unet_config(family))
        layers = cross_attention_layers(unet)
        out = sum(layer.to_v.out_features for layer in layers.values())
        print(
            f"{family:<10} {len(layers):>3} cross-attention layers, Σ out {out:>6,}, d_text {unet.config.cross_attention_dim}"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
