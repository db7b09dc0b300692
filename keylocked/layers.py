"""Wraps a cross-attention ``to_k`` / ``to_v`` projection with the gated key-locked edit.

The edit acts per token on the text encodings, so wrapping the projection (and keeping it as
``base_layer``, like peft) composes with any attention processor: SDPA, xformers,
IP-Adapter. Concept state shared by all layers (C⁻¹, the concept inputs, β/τ, which concepts
are active) lives in one ``KeyLockedContext``; what is per layer (value targets) lives here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base_model import KeylockedError
from .edit_options import ConceptPositions
from .perfusion import keylocked_projection, lock_concept_keys
from .rows import ConceptOptions, RowPlan

Lock = Literal["local", "global"]
Role = Literal["key", "value"]


@dataclass
class ConceptSlot:
    """Runtime state of one loaded concept (shared by every layer)."""

    concept_input: Tensor  # (d,)  i*
    superclass_input: Tensor  # (d,)  i*_super, from which the locked keys are recomputed
    beta: float
    temperature: float


@dataclass
class KeyLockedContext:
    """What every wrapped projection of one UNet shares; the only writer of concept state.

    Loading and training change concepts through ``add_concept``/``remove_concept``/``set_options``
    only, so per-layer value targets, the slots and the active set never disagree.
    """

    input_covariance_inv: Tensor  # (d, d) float32
    concepts: dict[str, ConceptSlot] = field(default_factory=dict)
    active: set[str] = field(default_factory=set)
    lock: Lock = "local"
    # Global locking: per text encoder, pairs (concept-prompt encodings, same prompt with each
    # concept token replaced by its super-category word), registered by text-encoder hooks; the
    # key path splits its input into the encoders' widths and looks each part up here.
    global_key_pairs: list[tuple[int, Tensor, Tensor]] = field(default_factory=list)
    encoder_widths: list[int] = field(default_factory=list)  # per text encoder; empty: one encoder
    revision: int = 0  # bumped on every change, invalidates the per-prompt caches
    row_plan: RowPlan | None = None  # per-row concept sets for the current call (keylocked.rows)
    edit: str = "paper"  # perfusion.EDIT_FORMS: "paper" | "gated_residual"
    key_lock: str = "paper"  # "paper" | "exact" (edit_options.KEY_LOCKS)
    positions: ConceptPositions = field(default_factory=ConceptPositions)  # concept tokens by id, for "exact"
    # layer path -> wrapped to_v, registered by install_keylocked_layers
    value_layers: dict[str, KeyLockedLinear] = field(default_factory=dict)

    def add_concept(
        self,
        token: str,
        concept_input: Tensor,
        superclass_input: Tensor,
        beta: float,
        tau: float,
        value_targets_by_layer: Mapping[str, Tensor],
        active: bool = True,
    ) -> None:
        """Add one concept to every wrapped layer; tensors that are ``nn.Parameter`` stay trainable (shared)."""
        if token in self.concepts:
            raise KeylockedError(f"concept token {token!r} is already loaded")
        if set(value_targets_by_layer) != set(self.value_layers):
            missing = sorted(set(self.value_layers) - set(value_targets_by_layer))[:3]
            extra = sorted(set(value_targets_by_layer) - set(self.value_layers))[:3]
            raise KeylockedError(
                f"{token}: value targets do not match the wrapped layers (missing {missing}, extra {extra})"
            )
        for name, layer in self.value_layers.items():
            target = value_targets_by_layer[name]
            if not isinstance(target, nn.Parameter):
                target = nn.Parameter(target, requires_grad=False)
            layer.value_targets[token] = target
        self.concepts[token] = ConceptSlot(concept_input, superclass_input, float(beta), float(tau))
        if active:
            self.active.add(token)
        self.touch()

    @torch.no_grad()
    def overwrite_concept(
        self,
        token: str,
        concept_input: Tensor,
        superclass_input: Tensor,
        beta: float,
        tau: float,
        value_targets_by_layer: Mapping[str, Tensor],
    ) -> None:
        """Refill a loaded concept in place (same parameters, new values): the serving pool's fast switch."""
        if token not in self.concepts:
            raise KeylockedError(f"concept token {token!r} is not loaded")
        self.concepts[token] = ConceptSlot(concept_input, superclass_input, float(beta), float(tau))
        for name, layer in self.value_layers.items():
            layer.value_targets[token].copy_(value_targets_by_layer[name])
        self.touch()

    def remove_concept(self, token: str) -> None:
        """Remove one concept from every layer (the others stay as they are)."""
        if token not in self.concepts:
            raise KeylockedError(f"concept token {token!r} is not loaded")
        for layer in self.value_layers.values():
            del layer.value_targets[token]
        del self.concepts[token]
        self.active.discard(token)
        self.touch()

    def set_options(
        self,
        beta: Mapping[str, float] | None = None,
        tau: Mapping[str, float] | None = None,
        lock: Lock | None = None,
        active: Iterable[str] | None = None,
        edit: str | None = None,
        key_lock: str | None = None,
    ) -> None:
        """Change per-concept β/τ ({token: value}), the lock mode, the active set, the edit form or the
        key lock (callers validate)."""
        unknown = sorted((set(beta or ()) | set(tau or ()) | set(active or ())) - set(self.concepts))
        if unknown:
            raise KeylockedError(f"unknown concept token(s) {unknown}; loaded: {sorted(self.concepts)}")
        for token, value in (beta or {}).items():
            self.concepts[token].beta = float(value)
        for token, value in (tau or {}).items():
            self.concepts[token].temperature = float(value)
        if lock is not None:
            self.lock = lock
        if active is not None:
            self.active = set(active)
        if edit is not None:
            self.edit = edit
        if key_lock is not None:
            self.key_lock = key_lock
        self.touch()

    def active_names(self) -> list[str]:
        return [name for name in self.concepts if name in self.active]

    def touch(self) -> None:
        self.revision += 1

    def register_global_pair(self, encoder: int, concept_encodings: Tensor, superclass_encodings: Tensor) -> None:
        self.global_key_pairs.append((encoder, concept_encodings.detach(), superclass_encodings.detach()))
        del self.global_key_pairs[: -32 * max(1, len(self.encoder_widths))]  # bounded: only recent prompts matter

    def key_path_encodings(self, encodings: Tensor) -> Tensor:
        """Global lock: swap each row that is a registered concept prompt for its superclass twin.

        With several text encoders (SDXL) a row is the encoders' outputs concatenated: each part
        is matched in its own encoder's pairs, and the row is swapped only when every part is."""
        if not self.global_key_pairs:
            return encodings
        widths = self.encoder_widths or [encodings.shape[-1]]
        rows = list(encodings.unbind(0))  # B x (T, d)
        for b, row in enumerate(rows):
            twins = []
            for encoder, part in enumerate(row.split(widths, dim=-1)):  # (T, width) each
                twin = None
                for index, concept_rows, superclass_rows in reversed(self.global_key_pairs):
                    match = _find_row(concept_rows, part) if index == encoder else None
                    if match is not None:
                        twin = superclass_rows[match].to(part.device, part.dtype, copy=False)
                        break
                twins.append(twin)
            if all(twin is not None for twin in twins):
                rows[b] = torch.cat(twins, dim=-1)
        return torch.stack(rows)


def _find_row(candidates: Tensor, row: Tensor) -> int | None:
    if candidates.shape[1:] != row.shape:
        return None
    candidates = candidates.to(row.device, row.dtype)
    for index in range(candidates.shape[0]):
        if torch.equal(candidates[index], row):
            return index
    return None


class WrappedLinear(nn.Module):
    """A module that stands in for a ``nn.Linear`` and keeps it as ``base_layer`` (peft-style)."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias


def effective_linear(projection: nn.Module, inputs: Tensor) -> Tensor:
    """W_eff x without bias: the weight the projection really applies, incl. any wrapper's delta (a LoRA).

    The locked key o*_K = W_K i*_super must come from the effective weight, else a LoRA under the
    concept would be left out of the key. inputs (n, d) -> (n, out).
    """
    weight = projection.weight
    inputs = inputs.to(weight.device, weight.dtype)
    if type(projection) is nn.Linear:
        return F.linear(inputs, weight)
    return projection(inputs) - projection(torch.zeros_like(inputs[:1]))  # affine map minus its offset


class KeyLockedLinear(WrappedLinear):
    """``to_k`` or ``to_v`` of a cross-attention layer, edited for the active concepts.

    key:   o*_K = W_K i*_super, recomputed from the base weight (the key lock, never trained).
    value: o*_V is a per-concept parameter in ``value_targets``.
    """

    def __init__(self, base_layer: nn.Linear, role: Role, context: KeyLockedContext):
        super().__init__(base_layer)
        if role not in ("key", "value"):
            raise ValueError(f"role must be 'key' or 'value', got {role!r}")
        self.role = role
        self.context = context
        self.value_targets = nn.ParameterDict()  # concept name -> (out,)
        self._cache: tuple[Tensor, RowPlan | None, tuple[int, int, int], Tensor] | None = None

    def output_targets(self, names: list[str]) -> Tensor:
        """o* for the named concepts, (n, out)."""
        if self.role == "value":
            return torch.stack([self.value_targets[name] for name in names])
        superclass_inputs = torch.stack([self.context.concepts[name].superclass_input for name in names])  # (n, d)
        return effective_linear(self.base_layer, superclass_inputs)  # (n, out)

    def forward(self, encodings: Tensor) -> Tensor:
        context = self.context
        plan = context.row_plan
        if plan is None:
            names = context.active_names()
            if not names:
                return self.base_layer(encodings)
        elif all(row is None for row in plan.rows):
            return self.base_layer(encodings)
        # Text encodings are fixed across denoising steps: reuse the last result for the same
        # input tensor (held here, so its memory cannot be recycled under another prompt), the
        # same concept state (revision) and the same row plan (held: its rows carry each row's
        # concept set, β/τ and lock; its twins the global-lock key inputs).
        cacheable = not torch.is_grad_enabled()
        key = (encodings._version, context.revision, len(plan.twins) if plan is not None else -1)
        if cacheable and self._cache is not None:
            cached_input, cached_plan, cached_key, cached_output = self._cache
            if cached_input is encodings and cached_plan is plan and cached_key == key:
                return cached_output
        if plan is None:
            global_lock = self.role == "key" and context.lock == "global"
            projected_input = context.key_path_encodings(encodings) if global_lock else encodings
            slots = [context.concepts[name] for name in names]
            options = [ConceptOptions(name, slot.beta, slot.temperature) for name, slot in zip(names, slots)]
            output = self._edit(projected_input, options)
        else:
            output = self._edit_rows(encodings, plan)
        self._cache = (encodings, plan, key, output) if cacheable else None
        return output

    def _edit(self, encodings: Tensor, options: list[ConceptOptions] | tuple[ConceptOptions, ...]) -> Tensor:
        """The gated key-locked edit of ``encodings`` (..., d) for the given concepts."""
        context = self.context
        names = [option.name for option in options]
        device = encodings.device
        output = keylocked_projection(
            encodings,
            self.base_layer,
            concept_inputs=torch.stack([context.concepts[name].concept_input for name in names]).to(device),
            output_targets=self.output_targets(names).to(device),
            input_covariance_inv=context.input_covariance_inv.to(device),
            beta=torch.tensor([option.beta for option in options], device=device),
            temperature=torch.tensor([option.temperature for option in options], device=device),
            edit=context.edit,
        )
        if self.role == "key" and context.key_lock == "exact":
            superclass = torch.stack([context.concepts[name].superclass_input for name in names])  # (n, d)
            locked_keys = self.base_layer(superclass.to(output))  # (n, out) b + W_K i*_super
            output = lock_concept_keys(output, context.positions.lookup(encodings, names), locked_keys)
        return output

    def _edit_rows(self, encodings: Tensor, plan: RowPlan) -> Tensor:
        """Each group of rows with one concept set edited with exactly that set (None: base layer)."""
        batch = encodings.shape[0]
        if batch != len(plan.rows):
            raise KeylockedError(
                f"the row plan has {len(plan.rows)} rows but the UNet batch has {batch}; build it in the "
                "pipeline's row order (keylocked.rows.pipeline_rows)"
            )
        output = None
        for row, indices in plan.groups().items():
            whole = len(indices) == batch
            index = torch.tensor(indices, device=encodings.device)
            rows_in = encodings if whole else encodings.index_select(0, index)  # (k, T, d)
            if row is None:
                rows_out = self.base_layer(rows_in)
            else:
                if self.role == "key" and row.lock == "global":
                    rows_in = plan.key_path_encodings(row.names, rows_in)
                rows_out = self._edit(rows_in, row.concepts)  # (k, T, out)
            if whole:
                return rows_out
            if output is None:
                output = rows_out.new_empty((batch, *rows_out.shape[1:]))  # (B, T, out)
            output.index_copy_(0, index, rows_out)
        return output

    def clear_cache(self) -> None:
        self._cache = None

    def extra_repr(self) -> str:
        return f"role={self.role}, concepts={list(self.value_targets) or self.context.active_names()}"
