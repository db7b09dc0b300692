"""Per-row concept sets: which loaded concepts (with which β/τ and lock) each batch row uses.

One pipeline call can serve several requests at once when every row of the UNet batch is edited
with exactly its own request's concepts (never the union of the batch: the union changes every
token's e⊥ in rows that did not ask for those concepts). A ``RowPlan`` names one ``RowConcepts``
(or None: the plain base layer) per row, in the pipeline's own row order; the wrapped ``to_k``/
``to_v`` layers read it from their shared ``KeyLockedContext`` and apply the edit per group of
rows with identical concept sets.

Row order of diffusers' ``StableDiffusionPipeline``: ``num_images_per_prompt`` repeats each
prompt's rows in place (``repeat(1, n, 1).view(...)``: p0, p0, p1, p1, ...) and classifier-free
guidance puts the negative half first (``torch.cat([negative, positive])``); ``pipeline_rows``
builds that order. Both halves of guidance use the row's concepts (the edit is applied to both,
as in ``load_concepts``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base_model import KeylockedError
from .validation import check_beta, check_tau

LOCKS = ("local", "global")


@dataclass(frozen=True)
class ConceptOptions:
    """One resident concept as one row uses it."""

    name: str
    beta: float
    temperature: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", check_beta(self.beta, f"beta of {self.name!r}"))
        object.__setattr__(self, "temperature", check_tau(self.temperature, f"tau of {self.name!r}"))


@dataclass(frozen=True)
class RowConcepts:
    """The concept set of one row: concepts sorted by name (a canonical key), and the lock mode."""

    concepts: tuple[ConceptOptions, ...]
    lock: str = "local"

    def __post_init__(self) -> None:
        if self.lock not in LOCKS:
            raise KeylockedError(f"lock must be 'local' or 'global', got {self.lock!r}")
        ordered = tuple(sorted(self.concepts, key=lambda option: option.name))
        names = [option.name for option in ordered]
        if len(set(names)) != len(names):
            raise KeylockedError(f"a row names a concept twice: {names}")
        if not ordered:
            raise KeylockedError("a row's concept set is empty; use None for a row without concepts")
        object.__setattr__(self, "concepts", ordered)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(option.name for option in self.concepts)


RowSpec = RowConcepts | Iterable[str] | None


@dataclass
class RowPlan:
    """One ``RowConcepts`` (or None) per batch row, plus the global-lock twins of its prompts."""

    rows: tuple[RowConcepts | None, ...]
    # Global locking: (concept names, concept-prompt encodings, the same prompt with those
    # concepts' tokens replaced by their super-category words), registered by a text-encoder hook
    # while this plan is in use; they live and die with the plan.
    twins: list[tuple[frozenset[str], Tensor, Tensor]] = field(default_factory=list)

    def groups(self) -> dict[RowConcepts | None, list[int]]:
        """Row indices per distinct concept set, in order of first appearance."""
        groups: dict[RowConcepts | None, list[int]] = {}
        for index, row in enumerate(self.rows):
            groups.setdefault(row, []).append(index)
        return groups

    def global_sets(self) -> list[frozenset[str]]:
        """The distinct concept-name sets of the rows that lock globally."""
        return list(dict.fromkeys(row.names for row in self.rows if row is not None and row.lock == "global"))

    def key_path_encodings(self, names: frozenset[str], encodings: Tensor) -> Tensor:
        """Global lock: each row (T, d) replaced by its super-category twin for ``names`` (or kept
        when its prompt holds none of those tokens: then the twin is the row itself)."""
        rows = list(encodings.unbind(0))  # B x (T, d)
        for b, row in enumerate(rows):
            for twin_names, concept_rows, superclass_rows in reversed(self.twins):
                if twin_names != names or concept_rows.shape[1:] != row.shape:
                    continue
                match = next((i for i in range(concept_rows.shape[0]) if torch.equal(concept_rows[i], row)), None)
                if match is not None:
                    rows[b] = superclass_rows[match].to(row.dtype, copy=False)
                    break
        return torch.stack(rows)  # (B, T, d)

    def register_twins(
        self,
        encoder,
        args: tuple,
        kwargs: dict,
        output,
        token_ids: Mapping[str, int],
        superclass_ids: Mapping[str, int],
    ) -> None:
        """Text-encoder hook body: encode the super-category twin of this call's prompts for each
        global concept set of the plan (only where the prompt holds one of its tokens)."""
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is None:
            return
        for names in self.global_sets():
            swapped = input_ids.clone()
            for name in names:
                swapped[input_ids == token_ids[name]] = superclass_ids[name]
            if torch.equal(swapped, input_ids):
                continue
            twin = encoder(swapped, *args[1:], **kwargs)[0]
            self.twins.append((names, output[0].detach(), twin.detach()))


def resolve_row(spec: RowSpec, slots: Mapping[str, object], default_lock: str = "local") -> RowConcepts | None:
    """A ``RowConcepts`` from a row spec: None, a ``RowConcepts``, or names of loaded concepts
    (each with its current β/τ in ``slots``: name -> ``ConceptSlot``)."""
    if spec is None:
        return None
    if isinstance(spec, RowConcepts):
        row = spec
    else:
        if isinstance(spec, str):
            spec = [spec]
        names = list(spec)
        if not names:
            return None
        unknown = sorted(set(names) - set(slots))
        if unknown:
            raise KeylockedError(f"unknown concept token(s) {unknown}; loaded: {sorted(slots)}")
        options = tuple(ConceptOptions(n, slots[n].beta, slots[n].temperature) for n in names)
        row = RowConcepts(options, default_lock)
    unknown = sorted(row.names - set(slots))
    if unknown:
        raise KeylockedError(f"unknown concept token(s) {unknown}; loaded: {sorted(slots)}")
    return row


def pipeline_rows(per_prompt: Sequence[RowSpec], num_images_per_prompt: int = 1, guidance: bool = True) -> list:
    """Per-prompt specs -> per-row specs in ``StableDiffusionPipeline``'s row order.

    Each prompt's rows are repeated in place (p0 × n, p1 × n, ...); with classifier-free
    guidance the negative half (the same sets, in the same order) comes first.
    """
    if num_images_per_prompt < 1:
        raise KeylockedError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt!r}")
    rows = [spec for spec in per_prompt for _ in range(num_images_per_prompt)]
    return rows + rows if guidance else rows


def _context(pipe):
    context = getattr(pipe.unet, "_keylocked_context", None)
    if context is None:
        raise KeylockedError("no keylocked concepts are loaded in this pipeline")
    return context


@contextmanager
def use_row_plan(pipe, plan: RowPlan) -> Iterator[RowPlan]:
    """Make the wrapped layers of ``pipe`` edit row by row as ``plan`` says, for the with block."""
    context = _context(pipe)
    if context.row_plan is not None:
        raise KeylockedError("a row plan is already in use on this pipeline (one pipeline call at a time)")
    context.row_plan = plan
    try:
        yield plan
    finally:
        context.row_plan = None


@contextmanager
def row_concepts(pipe, rows: Sequence[RowSpec], lock: str = "local") -> Iterator[RowPlan]:
    """Per-row concept sets for the pipeline calls in the with block.

    ``rows`` has one entry per UNet batch row, in the pipeline's row order (see
    ``pipeline_rows``): None (no concepts: the plain base layer), names of loaded concepts
    (with their current β/τ and ``lock``), or a ``RowConcepts`` with its own β/τ and lock.
    """
    context = _context(pipe)
    plan = RowPlan(tuple(resolve_row(spec, context.concepts, lock) for spec in rows))
    with use_row_plan(pipe, plan):
        yield plan
