"""Adding concept tokens to a tokenizer + text encoder, and removing them exactly."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .base_model import KeylockedError


class TokenizerSnapshot:
    """The tokenizer's added-token state, so unloading restores it exactly."""

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "_tokenizer", None)
        # Fast (Rust-backed) tokenizers keep added tokens in the backend; slow ones in dicts.
        self.backend_json = backend.to_str() if hasattr(backend, "to_str") else None
        slow = self.backend_json is None
        self.added_decoder = copy.copy(getattr(tokenizer, "_added_tokens_decoder", None)) if slow else None
        self.added_encoder = copy.copy(getattr(tokenizer, "_added_tokens_encoder", None)) if slow else None
        self.vocab_size = len(tokenizer)

    def restore(self, tokenizer) -> None:
        if self.backend_json is not None:
            from tokenizers import Tokenizer

            tokenizer._tokenizer = Tokenizer.from_str(self.backend_json)
        if self.added_decoder is not None:
            tokenizer._added_tokens_decoder = copy.copy(self.added_decoder)
        if self.added_encoder is not None:
            tokenizer._added_tokens_encoder = copy.copy(self.added_encoder)
        for refresh in ("_update_trie", "_update_total_vocab_size"):
            if hasattr(tokenizer, refresh):
                getattr(tokenizer, refresh)()


def check_new_token(tokenizer, token: str) -> None:
    if token in tokenizer.get_vocab():
        raise KeylockedError(
            f"placeholder token {token!r} already exists in the tokenizer's vocabulary; "
            "choose a new word such as '<my-teddy>'"
        )
    if not token or any(c.isspace() for c in token):
        raise KeylockedError(f"placeholder token must be a single word without spaces, got {token!r}")


def add_tokens(tokenizer, text_encoder: nn.Module, embeddings: dict[str, Tensor]) -> dict[str, int]:
    """Add each token with its input embedding; returns token -> id."""
    for token in embeddings:
        check_new_token(tokenizer, token)
    tokenizer.add_tokens(list(embeddings))
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are overwritten below
    table = text_encoder.get_input_embeddings().weight
    ids = {}
    with torch.no_grad():
        for token, embedding in embeddings.items():
            ids[token] = tokenizer.convert_tokens_to_ids(token)
            table[ids[token]] = embedding.to(table.device, table.dtype)
    return ids


def restore_vocabulary(tokenizer, text_encoder: nn.Module, snapshot: TokenizerSnapshot) -> None:
    """Undo ``add_tokens``: the tokenizer and the embedding table as they were."""
    snapshot.restore(tokenizer)
    if len(tokenizer) != snapshot.vocab_size:
        raise RuntimeError(f"tokenizer restore failed: {len(tokenizer)} tokens, expected {snapshot.vocab_size}")
    if text_encoder.get_input_embeddings().weight.shape[0] != snapshot.vocab_size:
        text_encoder.resize_token_embeddings(snapshot.vocab_size)
