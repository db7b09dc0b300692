"""The named variants of the edit (docs/method.md, "Edit options"), and where concept tokens sit.

- ``edit``: ``"paper"`` = ``W e⊥ + σ·o*`` (Eq. 3, the default) or ``"gated_residual"`` =
  ``W e + σ·(o* − W i*)``, which leaves every token whose gate is closed exactly stock.
- ``key_lock``: ``"paper"`` (the concept token's key is whatever Eq. 3 gives: ``W_K e⊥ + σ·W_K i*_super``)
  or ``"exact"`` (at the concept token's positions, found by token id, the key is exactly
  ``b + W_K i*_super``: the super-category's key).
- ``covariance_positions``: ``"text"`` (C over start, words and end; the default) or ``"all"``
  (also the padding positions, which cross-attention sees too).

The exact key lock needs to know which positions hold a concept token; the projection only sees
encodings. ``ConceptPositions`` is fed by a text-encoder hook (``track_concept_positions``) with
(encodings, input_ids) pairs and answers, for the encodings a key projection receives (possibly
concatenated for classifier-free guidance or repeated per image), where each concept's token is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .perfusion import EDIT_FORMS

EDITS = tuple(EDIT_FORMS)  # ("paper", "gated_residual")
KEY_LOCKS = ("paper", "exact")
COVARIANCE_POSITIONS = ("text", "all")
MAX_RECORDS = 32  # only recent prompts matter


@dataclass
class ConceptPositions:
    """Recently encoded prompts and their token ids, for finding concept tokens by id."""

    token_ids: dict[str, int] = field(default_factory=dict)  # concept token -> tokenizer id
    records: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (encodings (B, T, d), input_ids (B, T))

    def record(self, encodings: Tensor, input_ids: Tensor) -> None:
        self.records.append((encodings.detach(), input_ids.detach()))
        del self.records[:-MAX_RECORDS]

    def lookup(self, encodings: Tensor, names: list[str]) -> Tensor:
        """(B, T, n) bool: where concept ``names[c]``'s token is in each row of ``encodings`` (B, T, d).

        Rows are matched to recorded prompts by identity, then by content; a row found nowhere
        (e.g. precomputed ``prompt_embeds``) has no concept positions.
        """
        batch, length = encodings.shape[:2]
        ids = torch.tensor([self.token_ids.get(name, -1) for name in names], device=encodings.device)  # (n,)
        for recorded, input_ids in reversed(self.records):
            if recorded is encodings or _same_memory(recorded, encodings):
                return input_ids.to(encodings.device).unsqueeze(-1) == ids  # (B, T, n)
        positions = torch.zeros(batch, length, len(names), dtype=torch.bool, device=encodings.device)
        for b in range(batch):
            row = encodings[b].detach()  # (T, d)
            for recorded, input_ids in reversed(self.records):
                match = _matching_row(recorded, row)
                if match is not None:
                    positions[b] = input_ids[match].to(row.device).unsqueeze(-1) == ids  # (T, n)
                    break
        return positions


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """``a`` is a detached alias of ``b`` (recorded references keep the memory from being reused)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride() and a.data_ptr() == b.data_ptr()


def _matching_row(candidates: Tensor, row: Tensor) -> int | None:
    if candidates.shape[1:] != row.shape:
        return None
    candidates = candidates.to(row.device, row.dtype)
    for index in range(candidates.shape[0]):
        if torch.equal(candidates[index], row):
            return index
    return None


def track_concept_positions(text_encoder: nn.Module, positions: ConceptPositions):
    """Record every prompt the text encoder encodes (its output and input ids); returns the hook handle."""

    def hook(module, args, kwargs, output):
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is not None:
            positions.record(output[0], input_ids)
        return None

    return text_encoder.register_forward_hook(hook, with_kwargs=True)
