"""The Perfusion math: gated, key-locked rank-one edits of a linear projection.

Pure torch, no diffusers. Reads against Tewel et al. 2023 ("Key-Locked Rank One Editing
for Text-to-Image Personalization") and ``docs/method.md``.

Legend (paper symbol -> name used here; shapes in comments):
    e        encodings            (..., d)      text-encoder outputs, one per token
    C        input_covariance     (d, d)        uncentered second moment E[e eᵀ]
    C⁻¹      input_covariance_inv (d, d)
    i*       concept_inputs       (n, d)        one target input per concept
    o*       output_targets       (n, out)      one target output per concept and projection
    s(e)     concept_scores       (..., n)      i*ᵀ C⁻¹ e / (i*ᵀ C⁻¹ i*)
    e⊥       residual             (..., d)      e minus its C⁻¹-projection onto span{i*}
    β, τ     beta, temperature    (n,)          the sigmoid gate's bias and temperature

    W'e = W e⊥ + Σ_c σ((s_c(e) − β_c) / τ_c) · o*_c                 edit form "paper"
    W'e = W e  + Σ_c σ((s_c(e) − β_c) / τ_c) · (o*_c − W i*_c)       edit form "gated_residual"

The gated residual leaves every token whose gate is 0 exactly at the stock ``W e`` (the paper's
form moves every token by ``−s(e)·W i*``, whatever its gate). Both forms are one shape,
``W (e − Σ_c a_c(e) i*_c) + Σ_c σ_c(e) o*_c``, differing only in the coefficient ``a_c``:
the C⁻¹-projection coefficient (paper) or the gate itself (gated residual).

With a single concept and the gate replaced by s(e), this is the ROME closed form
``W' = W + (o* − W i*)(C⁻¹ i*)ᵀ / (i*ᵀ C⁻¹ i*)`` (see ``rank_one_edit_weight``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

Projection = Callable[[Tensor], Tensor]


def _metric_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 stays float64; anything lower is promoted to float32 (the metric is never fp16)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def concept_scores(encodings: Tensor, concept_inputs: Tensor, input_covariance_inv: Tensor) -> Tensor:
    """s_c(e) = i_cᵀ C⁻¹ e / (i_cᵀ C⁻¹ i_c): how much each encoding "is" each concept.

    Computed in float32 (or float64) with autocast off, whatever the input dtype.
    """
    dtype = _metric_dtype(encodings, concept_inputs, input_covariance_inv)
    with torch.autocast(encodings.device.type, enabled=False):
        e = encodings.to(dtype)  # (..., d)
        i_star = concept_inputs.to(dtype)  # (n, d)
        metric_inputs = i_star @ input_covariance_inv.to(dtype)  # (n, d)  rows are C⁻¹ i*_c
        norms = (metric_inputs * i_star).sum(-1)  # (n,)  i*_cᵀ C⁻¹ i*_c
        return (e @ metric_inputs.T) / norms  # (..., n)


def concept_gram(concept_inputs: Tensor, input_covariance_inv: Tensor) -> Tensor:
    """G_ab = i*_aᵀ C⁻¹ i*_b, the Gram matrix of the concept inputs under the C⁻¹ metric."""
    dtype = _metric_dtype(concept_inputs, input_covariance_inv)
    i_star = concept_inputs.to(dtype)  # (n, d)
    return i_star @ input_covariance_inv.to(dtype) @ i_star.T  # (n, n)


def concept_correlation(concept_inputs: Tensor, input_covariance_inv: Tensor) -> Tensor:
    """G_ab / sqrt(G_aa G_bb): the scale-free Gram matrix, in float64 (NaN rows/columns for a zero i*)."""
    gram = concept_gram(concept_inputs.double(), input_covariance_inv.double())  # (n, n)
    scale = torch.diagonal(gram).sqrt()  # (n,)
    return gram / (scale[:, None] * scale[None, :])  # (n, n)  unit diagonal


def projection_coefficients(encodings: Tensor, concept_inputs: Tensor, input_covariance_inv: Tensor) -> Tensor:
    """a = G⁻¹ Iᵀ C⁻¹ e: the coefficients of the exact C⁻¹-orthogonal projection of e onto span{i*}.

    For one concept this is s(e). Shapes: encodings (..., d), concept_inputs (n, d) -> (..., n), in the
    metric dtype (float32 or float64).
    """
    dtype = _metric_dtype(encodings, concept_inputs, input_covariance_inv)
    with torch.autocast(encodings.device.type, enabled=False):
        e = encodings.to(dtype)  # (..., d)
        i_star = concept_inputs.to(dtype)  # (n, d)
        metric_inputs = i_star @ input_covariance_inv.to(dtype)  # (n, d)
        gram = metric_inputs @ i_star.T  # (n, n)
        inner = e @ metric_inputs.T  # (..., n)  i*_cᵀ C⁻¹ e
        return torch.linalg.solve(gram, inner.unsqueeze(-1)).squeeze(-1)  # (..., n)


def _subtract_directions(encodings: Tensor, coefficients: Tensor, concept_inputs: Tensor) -> Tensor:
    """e − Σ_c a_c i*_c in the coefficients' dtype, returned in the encodings' dtype."""
    with torch.autocast(encodings.device.type, enabled=False):
        dtype = coefficients.dtype
        residual = encodings.to(dtype) - coefficients @ concept_inputs.to(dtype)  # (..., d)
    return residual.to(encodings.dtype)


def remove_concept_directions(encodings: Tensor, concept_inputs: Tensor, input_covariance_inv: Tensor) -> Tensor:
    """e⊥ = e − I a, with a = G⁻¹ Iᵀ C⁻¹ e the exact C⁻¹-orthogonal projection onto span{i*}.

    For one concept this is e − s(e)·i*. The small Gram system keeps the multi-concept case
    exact even when the concept inputs are not C⁻¹-orthogonal.
    """
    coefficients = projection_coefficients(encodings, concept_inputs, input_covariance_inv)  # (..., n)
    return _subtract_directions(encodings, coefficients, concept_inputs)  # (..., d)


def concept_gate(scores: Tensor, beta: Tensor | float, temperature: Tensor | float) -> Tensor:
    """σ((s − β) / τ): ~0 for encodings unlike the concept, ~1 for the concept token."""
    return torch.sigmoid((scores - beta) / temperature)


def _paper_coefficients(encodings: Tensor, concept_inputs: Tensor, input_covariance_inv: Tensor, gates: Tensor):
    return projection_coefficients(encodings, concept_inputs, input_covariance_inv)  # (..., n)


def _gate_coefficients(encodings: Tensor, concept_inputs: Tensor, input_covariance_inv: Tensor, gates: Tensor):
    return gates  # (..., n)


# Edit form -> how much of each i* is taken out of e before W is applied (see the legend).
EDIT_FORMS: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = {
    "paper": _paper_coefficients,
    "gated_residual": _gate_coefficients,
}


def keylocked_projection(
    encodings: Tensor,
    projection: Projection,
    concept_inputs: Tensor,
    output_targets: Tensor,
    input_covariance_inv: Tensor,
    beta: Tensor | float,
    temperature: Tensor | float,
    edit: str = "paper",
) -> Tensor:
    """W'e = W e⊥ + Σ_c σ_c(e) · o*_c (Eq. 3, multi-concept form; ``edit="paper"``), or the gated
    residual W'e = W e + Σ_c σ_c(e) · (o*_c − W i*_c) (``edit="gated_residual"``).

    ``projection`` is the frozen base layer (``W``, with its bias if any). The bias is applied
    once, so it is not part of ``W i*``: the concept token (gate 1, e = i*) maps to b + o* in both forms.
    Shapes: encodings (..., d), concept_inputs (n, d), output_targets (n, out) -> (..., out).
    """
    if edit not in EDIT_FORMS:
        raise ValueError(f"edit must be one of {sorted(EDIT_FORMS)}, got {edit!r}")
    gates = concept_gate(concept_scores(encodings, concept_inputs, input_covariance_inv), beta, temperature)  # (..., n)
    coefficients = EDIT_FORMS[edit](encodings, concept_inputs, input_covariance_inv, gates)  # (..., n)
    base = projection(_subtract_directions(encodings, coefficients, concept_inputs))  # (..., out)
    return base + (gates.to(output_targets.dtype) @ output_targets).to(base.dtype)  # (..., out)


def lock_concept_keys(keys: Tensor, positions: Tensor, locked_keys: Tensor) -> Tensor:
    """Key lock "exact": at the positions of concept c's token, the key is exactly ``locked_keys[c]``.

    keys (..., out), positions (..., n) bool (one column per concept; at most one true per row),
    locked_keys (n, out) = b + W_K i*_super,c -> (..., out). Other positions are returned unchanged.
    """
    positions = positions.to(keys.device)
    weights = positions.to(keys.dtype)  # (..., n)
    replaced = weights @ locked_keys.to(keys.dtype)  # (..., out)
    return torch.where(positions.any(-1, keepdim=True), replaced, keys)  # (..., out)


def rank_one_edit_weight(
    weight: Tensor, concept_input: Tensor, output_target: Tensor, input_covariance_inv: Tensor
) -> Tensor:
    """ROME's closed form W' = W + (o* − W i*)(C⁻¹ i*)ᵀ / (i*ᵀ C⁻¹ i*), for tests and analysis.

    weight (out, d), concept_input (d,), output_target (out,) -> (out, d).
    """
    metric_input = input_covariance_inv @ concept_input  # (d,)
    return weight + torch.outer(output_target - weight @ concept_input, metric_input) / (concept_input @ metric_input)


# ---------------------------------------------------------------------------------------
# The input covariance C = E[e eᵀ] of the text encoder's outputs.


class SecondMomentAccumulator:
    """Running uncentered second moment of row vectors, accumulated in float64."""

    def __init__(self, dim: int):
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64)  # (d, d)
        self.count = 0

    def update(self, rows: Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).to("cpu", torch.float64)  # (N, d)
        self.sum_outer += rows.T @ rows
        self.count += rows.shape[0]

    def second_moment(self) -> Tensor:
        if self.count == 0:
            raise ValueError("no encodings were accumulated; the covariance corpus is empty")
        return self.sum_outer / self.count  # (d, d)


def second_moment(batches: Iterable[Tensor]) -> tuple[Tensor, int]:
    """C = E[e eᵀ] over all rows of all batches, in float64; returns (C, row count)."""
    accumulator = None
    for rows in batches:
        if accumulator is None:
            accumulator = SecondMomentAccumulator(rows.shape[-1])
        accumulator.update(rows)
    if accumulator is None:
        raise ValueError("no encodings were accumulated; the covariance corpus is empty")
    return accumulator.second_moment(), accumulator.count


def invert_covariance(
    covariance: Tensor, ridge: float = 1e-4, max_condition: float = 1e6
) -> tuple[Tensor, float, float]:
    """Invert C in float64, adding ``ridge · mean eigenvalue · I`` when C is ill-conditioned.

    Returns (C⁻¹, ridge actually added as a fraction of the mean eigenvalue, condition
    number of the matrix that was inverted).
    """
    covariance = covariance.to(torch.float64)
    covariance = (covariance + covariance.T) / 2
    eigenvalues = torch.linalg.eigvalsh(covariance)  # (d,) ascending
    condition = float(eigenvalues[-1] / eigenvalues[0].clamp_min(1e-300))
    added_ridge = 0.0
    if not eigenvalues[0] > 0 or condition > max_condition:
        added_ridge = ridge
        mean_eigenvalue = eigenvalues.mean()
        covariance = covariance + ridge * mean_eigenvalue * torch.eye(covariance.shape[0], dtype=torch.float64)
        eigenvalues = eigenvalues + ridge * mean_eigenvalue
        condition = float(eigenvalues[-1] / eigenvalues[0])
    # contiguous: linalg.inv returns column-major memory, and matmul results depend on layout
    return torch.linalg.inv(covariance).contiguous(), added_ridge, condition
