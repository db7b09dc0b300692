"""Adding concept tokens to a tokenizer + text encoder, and removing them exactly."""

from __future__ import annotations

import copy
import unicodedata

import torch
from torch import Tensor, nn

from .base_model import KeylockedError
from .validation import check_token_text


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
    """A placeholder must be a visible word that the tokenizer keeps as one new token and whose
    adding changes the tokenization of no existing word.

    Tokenizers normalise text (BERT lowercases, CLIP applies NFC and lowercases) and match added
    tokens inside words, so ``Dog`` would replace every "dog" and ``sks`` would split "tasks".
    Forms compared: the tokenizer's own normalisation and NFKC + casefold.
    """
    check_token_text(token)
    if token in tokenizer.get_vocab():
        raise KeylockedError(
            f"placeholder token {token!r} already exists in the tokenizer's vocabulary; "
            "choose a new word such as '<my-teddy>'"
        )
    backend = getattr(tokenizer, "_tokenizer", None)
    normalizer = getattr(backend, "normalizer", None)
    forms = {_fold(token)} | ({normalizer.normalize_str(token)} if normalizer is not None else set())
    words = _vocabulary_words(tokenizer)
    folded = {_fold(word): word for word in sorted(words)}
    for form in sorted(forms):
        word = folded.get(form, form if form in words else None)
        if word is not None:
            raise KeylockedError(
                f"placeholder token {token!r} already exists in the tokenizer's vocabulary as {word!r} "
                "(the tokenizer ignores case or accents); choose a new word such as '<my-teddy>'"
            )
    for word in sorted(words):
        if any(form in word for form in forms):
            raise KeylockedError(
                f"placeholder token {token!r} occurs inside the existing word {word!r} and would split it; "
                "choose a new word such as '<my-teddy>'"
            )
    if hasattr(backend, "to_str"):
        _check_kept_whole(backend, token)


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def _vocabulary_words(tokenizer) -> set[str]:
    """The vocabulary's entries as text: without BPE end-of-word and WordPiece continuation marks."""
    words = set()
    for entry in tokenizer.get_vocab():
        word = entry[: -len("</w>")] if entry.endswith("</w>") else entry
        word = word[2:] if word.startswith("##") else word
        if word:
            words.add(word)
    return words


def _check_kept_whole(backend, token: str) -> None:
    """Add the token to a copy of the Rust tokenizer, as ``add_tokens`` will, and encode it alone."""
    from tokenizers import AddedToken, Tokenizer

    trial = Tokenizer.from_str(backend.to_str())
    trial.no_padding()
    trial.no_truncation()
    trial.add_tokens([AddedToken(token, normalized=True)])
    new_id = trial.token_to_id(token)
    ids = trial.encode(token, add_special_tokens=False).ids
    if new_id is None or ids != [new_id]:
        raise KeylockedError(
            f"placeholder token {token!r} is not kept as one new token by this tokenizer "
            f"(it becomes {trial.encode(token, add_special_tokens=False).tokens}); choose a plain word such as '<my-teddy>'"
        )


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
