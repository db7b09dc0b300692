"""A tiny random Stable Diffusion XL pipeline, built offline from configs in seconds.

Shaped like diffusers' own tiny SDXL test components (tests/pipelines/stable_diffusion_xl):
two CLIP text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``) of different
widths, so a mix-up of the two shows as a shape error; a real byte-level BPE ``CLIPTokenizer``
for each (the second pads with "!", as SDXL's ``tokenizer_2`` does); a UNet with
``addition_embed_type="text_time"`` whose cross-attention sees both encoders' hidden states
concatenated, and whose added-embedding input is 6 time ids × ``addition_time_embed_dim`` +
the pooled projection width.
"""

from __future__ import annotations

from pathlib import Path

import torch

CLIP_L_WIDTH = 32  # stands in for CLIP ViT-L/14 (768 on real SDXL)
CLIP_G_WIDTH = 48  # stands in for OpenCLIP ViT-bigG/14 (1280 on real SDXL)
POOLED_WIDTH = 16  # text_encoder_2's projection_dim (1280 on real SDXL)
TIME_EMBED_DIM = 8  # addition_time_embed_dim (256 on real SDXL)


def build_tiny_sdxl_pipeline(folder: Path, seed: int = 0, model_max_length: int = 16):
    """A ``StableDiffusionXLPipeline`` with random weights; ``folder`` receives the tokenizer files."""
    from conftest import build_clip_tokenizer
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from shapes import tiny_vae, unet_config
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = build_clip_tokenizer(Path(folder) / "tokenizer", model_max_length=model_max_length)
    tokenizer_2 = CLIPTokenizer(
        str(Path(folder) / "tokenizer" / "vocab.json"),
        str(Path(folder) / "tokenizer" / "merges.txt"),
        pad_token="!",  # SDXL's tokenizer_2 pads with "!", tokenizer 1 with <|endoftext|>
        model_max_length=model_max_length,
    )

    def clip_config(width: int, **extra) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=model_max_length,
            hidden_act="gelu",
            # SDXL's configs say eos_token_id=2: transformers then pools at the highest token id
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            **extra,
        )

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_config(CLIP_L_WIDTH)).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(CLIP_G_WIDTH, projection_dim=POOLED_WIDTH)).eval()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **unet_config(
            "sdxl-tiny",
            cross_attention_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_WIDTH,
        )
    ).eval()
    vae = tiny_vae().eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
