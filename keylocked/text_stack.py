"""Text stacks: how a model family turns a prompt into what its UNet's cross-attention sees.

One object per family, chosen by ``text_stack(pipe)`` from a registry (a new family is a new
class, not a branch):

    StableDiffusionTextStack   SD 1.x / 2.x (and emoji-64): one tokenizer + encoder, its last
                               hidden state; d_text = the encoder width (768 / 1024).
    StableDiffusionXLTextStack SDXL: two tokenizers + encoders (CLIP ViT-L, OpenCLIP bigG); the
                               penultimate hidden states of both, concatenated per position
                               (768 + 1280 = 2048); the pooled embedding of encoder 2 and the
                               six time ids go to the UNet's added embedding.

A stack encodes prompts exactly as the stock pipeline does, adds a placeholder token to every
tokenizer with one input embedding per encoder (stored under ``embedding_keys``: SDXL's
textual-inversion convention ``clip_l`` / ``clip_g``), removes it exactly, and fingerprints the
encoders. Perfusion's ``i*``, ``i*_super`` and ``C`` live in the concatenated d_text space.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base_model import (
    KeylockedError,
    _hash_tensors,
    cross_attention_layers,
    single_token_id,
    text_encoder_fingerprint,
    tokenize,
)
from .tokens import TokenizerSnapshot, add_tokens, check_new_token, restore_vocabulary


@dataclass
class EncodedPrompts:
    """A batch of prompts as the UNet sees them."""

    encodings: Tensor  # (B, T, d_text) per-token encodings for cross-attention
    input_ids: Tensor  # (B, T) ids of the first tokenizer (every tokenizer puts a word at the same position)
    attention_mask: Tensor  # (B, T) 1 at real text (start, words, end), 0 at padding
    pooled: Tensor | None = None  # (B, d_pooled) SDXL: encoder 2's projected pooled output


@dataclass
class TextEncoderSlot:
    """One tokenizer + text encoder of a stack, and the file key of its token embedding."""

    key: str  # name of this encoder's token embedding in a concept file
    tokenizer: Any
    text_encoder: nn.Module

    @property
    def width(self) -> int:
        """Width of the per-token encodings this encoder contributes."""
        return int(self.text_encoder.config.hidden_size)

    @property
    def embedding_dim(self) -> int:
        return int(self.text_encoder.get_input_embeddings().weight.shape[1])


@dataclass
class StackSnapshot:
    """Every tokenizer's added-token state, so removing tokens restores it exactly."""

    tokenizers: list[TokenizerSnapshot] = field(default_factory=list)

    @property
    def vocab_sizes(self) -> list[int]:
        return [snapshot.vocab_size for snapshot in self.tokenizers]


class TextStack:
    """Base class: what every family shares (token bookkeeping, fingerprints, shapes)."""

    family: ClassVar[str]
    embedding_keys: ClassVar[tuple[str, ...]]

    def __init__(self, slots: list[TextEncoderSlot]):
        if [slot.key for slot in slots] != list(self.embedding_keys):
            raise ValueError(f"{type(self).__name__} needs encoders {self.embedding_keys}")
        self.slots = slots

    # -- which pipelines ------------------------------------------------------------------
    @classmethod
    def matches(cls, pipe) -> bool:
        raise NotImplementedError

    @classmethod
    def from_pipeline(cls, pipe) -> TextStack:
        raise NotImplementedError

    # -- shapes -----------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The first tokenizer: its ids say where each word of a prompt is."""
        return self.slots[0].tokenizer

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [slot.text_encoder for slot in self.slots]

    @property
    def widths(self) -> list[int]:
        return [slot.width for slot in self.slots]

    @property
    def d_text(self) -> int:
        """Width of the per-token encodings the UNet sees (i*, i*_super and C live here)."""
        return sum(self.widths)

    @property
    def device(self) -> torch.device:
        return self.slots[0].text_encoder.device

    def embedding_dims(self) -> dict[str, int]:
        return {slot.key: slot.embedding_dim for slot in self.slots}

    def input_embeddings(self) -> dict[str, nn.Embedding]:
        """Embedding key -> the encoder's input embedding table."""
        return {slot.key: slot.text_encoder.get_input_embeddings() for slot in self.slots}

    # -- encoding -----------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> EncodedPrompts:
        """Encode prompts exactly as the stock pipeline does (gradients flow when enabled)."""
        raise NotImplementedError

    def encoding_from_output(self, output) -> Tensor | None:
        """From one text encoder's forward output, the per-token encodings the UNet sees
        (None when the call did not produce them, e.g. no hidden states requested)."""
        raise NotImplementedError

    def unet_conditioning(
        self, encoded: EncodedPrompts, height: int, width: int, dtype: torch.dtype | None = None
    ) -> dict[str, Any]:
        """Extra keyword arguments of the UNet call for these prompts at this image size."""
        return {}

    # -- tokens ---------------------------------------------------------------------------------
    def check_new_token(self, token: str) -> None:
        for slot in self.slots:
            check_new_token(slot.tokenizer, token)

    def single_token_ids(self, word: str, what: str = "super-category") -> list[int]:
        """The word's id in every tokenizer; it must be one token in each."""
        return [single_token_id(slot.tokenizer, word, what) for slot in self.slots]

    def snapshot(self) -> StackSnapshot:
        return StackSnapshot([TokenizerSnapshot(slot.tokenizer) for slot in self.slots])

    def add_tokens(self, embeddings: dict[str, dict[str, Tensor]]) -> dict[str, list[int]]:
        """Add each token to every tokenizer with its embedding per encoder; token -> ids per tokenizer.

        ``embeddings``: token -> {embedding key -> (embedding_dim,)}.
        """
        for token, per_encoder in embeddings.items():
            self.check_new_token(token)
            if set(per_encoder) != set(self.embedding_keys):
                raise KeylockedError(
                    f"{token}: embeddings for {sorted(per_encoder)}, this model's encoders are {list(self.embedding_keys)}"
                )
        ids: dict[str, list[int]] = {token: [] for token in embeddings}
        for slot in self.slots:
            added = add_tokens(
                slot.tokenizer, slot.text_encoder, {token: e[slot.key] for token, e in embeddings.items()}
            )
            for token, token_id in added.items():
                ids[token].append(token_id)
        return ids

    def restore(self, snapshot: StackSnapshot) -> None:
        """Undo ``add_tokens``: every tokenizer and embedding table as they were."""
        for slot, tokenizer_snapshot in zip(self.slots, snapshot.tokenizers):
            restore_vocabulary(slot.tokenizer, slot.text_encoder, tokenizer_snapshot)

    def base_vocabulary_sizes(self) -> list[int]:
        from .covariance import base_vocabulary_size

        return [base_vocabulary_size(slot.tokenizer) for slot in self.slots]

    # -- identity -------------------------------------------------------------------------------
    def fingerprint(self, vocab_sizes: list[int] | None = None) -> str:
        """sha256 of the weights that shape the encodings (added tokens' rows excluded)."""
        sizes = vocab_sizes or self.base_vocabulary_sizes()
        prints = [text_encoder_fingerprint(slot.text_encoder, size) for slot, size in zip(self.slots, sizes)]
        if len(prints) == 1:
            return prints[0]  # the single-encoder fingerprint of keylocked ≤ 0.1: old files still match
        return hashlib.sha256(":".join(f"{s.key}={p}" for s, p in zip(self.slots, prints)).encode()).hexdigest()

    def base_model_fingerprint(self, unet: nn.Module, vocab_sizes: list[int] | None = None) -> str:
        """sha256 over the text encoder(s) and the cross-attention K/V weights: what a concept depends on."""
        digest = hashlib.sha256(self.fingerprint(vocab_sizes).encode())

        def named() -> Iterator[tuple[str, Tensor]]:
            for name, layer in cross_attention_layers(unet).items():
                for projection in ("to_k", "to_v"):
                    module = getattr(layer, projection)
                    yield f"{name}.{projection}", getattr(module, "base_layer", module).weight

        digest.update(_hash_tensors(named()).encode())
        return digest.hexdigest()

    # -- global locking -------------------------------------------------------------------------
    def register_twin_hooks(
        self,
        swaps: Callable[[int], dict[int, int]],
        on_pair: Callable[[int, Tensor, Tensor], None],
    ) -> list:
        """Forward hooks on every encoder for global locking: when a prompt holds a token that
        ``swaps(slot_index)`` maps (concept token id -> super-category id), encode it again with
        the swap and report ``on_pair(slot_index, encodings, twin_encodings)``. Returns the handles."""
        handles = []
        for index, slot in enumerate(self.slots):
            handles.append(
                slot.text_encoder.register_forward_hook(self._twin_hook(index, swaps, on_pair), with_kwargs=True)
            )
        return handles

    def _twin_hook(self, index: int, swaps, on_pair):
        busy = [False]

        def hook(module, args, kwargs, output):
            table = swaps(index)
            input_ids = args[0] if args else kwargs.get("input_ids")
            if busy[0] or not table or input_ids is None:
                return None
            encodings = self.encoding_from_output(output)
            if encodings is None:
                return None  # e.g. clip_skip read another hidden state: nothing to pair with
            swapped = input_ids.clone()
            for token_id, superclass_id in table.items():
                swapped[input_ids == token_id] = superclass_id
            if torch.equal(swapped, input_ids):
                return None
            busy[0] = True
            try:
                twin = module(swapped, *args[1:], **kwargs)
            finally:
                busy[0] = False
            on_pair(index, encodings, self.encoding_from_output(twin))
            return None

        return hook

    def split(self, encodings: Tensor) -> list[Tensor]:
        """(…, d_text) -> one (…, width) part per encoder."""
        return list(encodings.split(self.widths, dim=-1))

    def __iter__(self) -> Iterator[TextEncoderSlot]:
        return iter(self.slots)


class StableDiffusionTextStack(TextStack):
    """SD 1.x / 2.x: one encoder, its last hidden state (as ``StableDiffusionPipeline.encode_prompt``)."""

    family = "stable-diffusion"
    embedding_keys = ("token_embedding",)

    @classmethod
    def matches(cls, pipe) -> bool:
        return getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "text_encoder_2", None) is None

    @classmethod
    def from_pipeline(cls, pipe) -> StableDiffusionTextStack:
        return cls([TextEncoderSlot("token_embedding", pipe.tokenizer, pipe.text_encoder)])

    def encode(self, prompts: list[str]) -> EncodedPrompts:
        slot = self.slots[0]
        tokens = tokenize(slot.tokenizer, prompts)
        device = slot.text_encoder.device
        input_ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        use_mask = getattr(slot.text_encoder.config, "use_attention_mask", False)
        encodings = slot.text_encoder(input_ids, attention_mask=mask if use_mask else None)[0]  # (B, T, d)
        return EncodedPrompts(encodings, input_ids, mask)

    def encoding_from_output(self, output) -> Tensor | None:
        return output[0]


class StableDiffusionXLTextStack(TextStack):
    """SDXL: penultimate hidden states of both encoders concatenated; pooled from encoder 2.

    As ``StableDiffusionXLPipeline.encode_prompt`` with ``clip_skip=None``. The pooled output is
    what transformers' CLIP pools (with SDXL's configs, ``eos_token_id=2``, the position of the
    highest token id: the placeholder's when the prompt holds one) through encoder 2's
    projection; keylocked leaves it as the stock pipeline computes it (docs/method.md).
    """

    family = "stable-diffusion-xl"
    embedding_keys = ("clip_l", "clip_g")

    @classmethod
    def matches(cls, pipe) -> bool:
        return getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "text_encoder_2", None) is not None

    @classmethod
    def from_pipeline(cls, pipe) -> StableDiffusionXLTextStack:
        return cls(
            [
                TextEncoderSlot("clip_l", pipe.tokenizer, pipe.text_encoder),
                TextEncoderSlot("clip_g", pipe.tokenizer_2, pipe.text_encoder_2),
            ]
        )

    def encode(self, prompts: list[str]) -> EncodedPrompts:
        parts, pooled, first = [], None, None
        for slot in self.slots:
            tokens = tokenize(slot.tokenizer, prompts)
            input_ids = tokens.input_ids.to(slot.text_encoder.device)
            output = slot.text_encoder(input_ids, output_hidden_states=True)
            parts.append(output.hidden_states[-2])  # (B, T, width)
            if output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds, (B, d_pooled)
                pooled = output[0]
            first = first or (input_ids, tokens.attention_mask.to(input_ids.device))
        encodings = torch.cat([p.to(parts[-1].device) for p in parts], dim=-1)  # (B, T, d_text)
        return EncodedPrompts(encodings, first[0].to(encodings.device), first[1].to(encodings.device), pooled)

    def encoding_from_output(self, output) -> Tensor | None:
        hidden_states = getattr(output, "hidden_states", None)
        return None if hidden_states is None else hidden_states[-2]

    def unet_conditioning(
        self, encoded: EncodedPrompts, height: int, width: int, dtype: torch.dtype | None = None
    ) -> dict[str, Any]:
        """SDXL's added conditions: pooled text embeds + (original size, crop top-left, target size).

        Training images are resized and center-cropped to the target size, so the time ids are
        (R, R, 0, 0, R, R), as the stock pipeline uses by default at inference.
        """
        if encoded.pooled is None:
            raise KeylockedError(
                "SDXL's second text encoder gave no pooled output (not a CLIPTextModelWithProjection?)"
            )
        pooled = encoded.pooled.to(dtype or encoded.pooled.dtype)  # (B, d_pooled)
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=pooled.dtype, device=pooled.device)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], 6)}}


# Most specific first: the first family whose ``matches`` accepts the pipeline is used.
TEXT_STACKS: list[type[TextStack]] = [StableDiffusionXLTextStack, StableDiffusionTextStack]


def text_stack(pipe) -> TextStack:
    """The text stack of a diffusers text-to-image pipeline."""
    for family in TEXT_STACKS:
        if family.matches(pipe):
            return family.from_pipeline(pipe)
    raise KeylockedError(
        f"{type(pipe).__name__} is not a supported text-to-image pipeline "
        f"(supported: {', '.join(f.family for f in TEXT_STACKS)})"
    )


def as_text_stack(text: TextStack | nn.Module, tokenizer=None) -> TextStack:
    """A text stack as given, or the one-encoder stack of a text encoder and its tokenizer."""
    if isinstance(text, TextStack):
        return text
    if tokenizer is None:
        raise TypeError("a text encoder needs its tokenizer")
    return StableDiffusionTextStack([TextEncoderSlot("token_embedding", tokenizer, text)])
