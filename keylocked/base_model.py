"""What keylocked needs to know about a base model: its cross-attention layers, how it
encodes prompts, its tokens, and a fingerprint that ties concept files to it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class KeylockedError(ValueError):
    """A user-facing problem with an input (file, token, image, model)."""


def cross_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Module path -> every cross-attention ``Attention`` module (SD's ``attn2``), in order."""
    layers = {
        name: module
        for name, module in unet.named_modules()
        if getattr(module, "is_cross_attention", False) and hasattr(module, "to_k")
    }
    if not layers:
        raise KeylockedError("the UNet has no cross-attention layers to edit")
    for name, module in layers.items():
        if getattr(module, "fused_projections", False) or hasattr(module, "to_kv"):
            raise KeylockedError(
                f"cross-attention layer {name!r} has fused K/V projections (fuse_projections()); "
                "keylocked edits to_k/to_v separately. Call unet.unfuse_qkv_projections() first."
            )
    return layers


def encode_prompts(text_encoder: nn.Module, tokenizer, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """Encode prompts exactly as diffusers' ``StableDiffusionPipeline.encode_prompt`` does.

    Returns (encodings (B, T, d), input_ids (B, T)).
    """
    tokens = tokenize(tokenizer, prompts)
    input_ids = tokens.input_ids.to(text_encoder.device)
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = tokens.attention_mask.to(text_encoder.device)
    encodings = text_encoder(input_ids, attention_mask=attention_mask)[0]  # (B, T, d)
    return encodings, input_ids


def tokenize(tokenizer, prompts: list[str]):
    """Pad/truncate to the model length, as the pipeline does (input_ids, attention_mask)."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


def single_token_id(tokenizer, word: str, what: str = "super-category") -> int:
    """The id of a word that must tokenize to exactly one token."""
    pieces = tokenizer.tokenize(word)
    if len(pieces) != 1:
        raise KeylockedError(
            f"the {what} {word!r} is {len(pieces)} tokens for this tokenizer ({pieces}); "
            "choose a word that is a single token (e.g. 'bear' rather than 'hedgehog')"
        )
    return tokenizer.convert_tokens_to_ids(pieces[0])


def text_dim(text_encoder: nn.Module) -> int:
    return int(text_encoder.config.hidden_size)


def _hash_tensors(named: Iterator[tuple[str, Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in named:
        # fp16 bytes: the same weights loaded in fp32 or fp16 give the same fingerprint.
        values = tensor.detach().to("cpu", torch.float16).contiguous()
        digest.update(f"{name}:{tuple(values.shape)}".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes() if values.numel() else b"")
    return digest.hexdigest()


def text_encoder_fingerprint(text_encoder: nn.Module, base_vocab_size: int | None = None) -> str:
    """sha256 of the weights that shape the token encodings (only the first ``base_vocab_size``
    rows of the input embedding table, so tokens added later do not change it)."""
    embedding = text_encoder.get_input_embeddings().weight

    def named() -> Iterator[tuple[str, Tensor]]:
        for name, parameter in text_encoder.named_parameters():
            if name.startswith("pooler."):
                continue  # BERT's pooler does not touch the token encodings (and may be randomly filled)
            if parameter is embedding:
                yield name, parameter[:base_vocab_size] if base_vocab_size else parameter
            else:
                yield name, parameter

    return _hash_tensors(named())


def base_model_fingerprint(text_encoder: nn.Module, unet: nn.Module, base_vocab_size: int | None = None) -> str:
    """sha256 over the text encoder and the cross-attention K/V weights: what a concept depends on."""
    digest = hashlib.sha256(text_encoder_fingerprint(text_encoder, base_vocab_size).encode())

    def named() -> Iterator[tuple[str, Tensor]]:
        for name, layer in cross_attention_layers(unet).items():
            for projection in ("to_k", "to_v"):
                module = getattr(layer, projection)
                yield f"{name}.{projection}", getattr(module, "base_layer", module).weight

    digest.update(_hash_tensors(named()).encode())
    return digest.hexdigest()
