"""The math, tested to the equation."""

from __future__ import annotations

import pytest
import torch

from keylocked.perfusion import (
    concept_correlation,
    concept_gate,
    concept_gram,
    concept_scores,
    invert_covariance,
    keylocked_projection,
    rank_one_edit_weight,
    remove_concept_directions,
    second_moment,
)

D, OUT = 12, 7


def random_spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * d) + 0.1 * torch.eye(d, dtype=torch.float64)


@pytest.fixture()
def setup():
    g = torch.Generator().manual_seed(1)
    c_inv = torch.linalg.inv(random_spd(D))
    weight = torch.randn(OUT, D, generator=g, dtype=torch.float64)
    return c_inv, weight, g


def linear(weight):
    return lambda x: x @ weight.T


def test_scores_are_one_on_the_concept_and_zero_on_metric_orthogonal_inputs(setup):
    c_inv, _, g = setup
    i_star = torch.randn(1, D, generator=g, dtype=torch.float64)
    e = torch.randn(5, D, generator=g, dtype=torch.float64)
    # make e C⁻¹-orthogonal to i*: e − (i*ᵀC⁻¹e / i*ᵀC⁻¹i*) i*
    e_orth = e - ((e @ c_inv @ i_star.T) / (i_star @ c_inv @ i_star.T)) * i_star
    assert concept_scores(i_star, i_star, c_inv).item() == pytest.approx(1.0, abs=1e-12)
    assert concept_scores(e_orth, i_star, c_inv).abs().max() < 1e-10
    assert torch.allclose(concept_scores(2.5 * i_star, i_star, c_inv), torch.tensor([[2.5]], dtype=torch.float64))


def test_edit_with_linear_gate_is_the_rome_closed_form(setup):
    """W e⊥ + s(e)·o* == W' e with W' = W + (o* − W i*)(C⁻¹ i*)ᵀ / (i*ᵀ C⁻¹ i*)."""
    c_inv, weight, g = setup
    i_star = torch.randn(D, generator=g, dtype=torch.float64)
    o_star = torch.randn(OUT, generator=g, dtype=torch.float64)
    e = torch.randn(9, D, generator=g, dtype=torch.float64)
    edited = rank_one_edit_weight(weight, i_star, o_star, c_inv)
    residual = remove_concept_directions(e, i_star[None], c_inv)
    s = concept_scores(e, i_star[None], c_inv)  # (9, 1)
    assert torch.allclose(residual @ weight.T + s * o_star, e @ edited.T, atol=1e-10)
    assert torch.allclose(edited @ i_star, o_star, atol=1e-10)  # W' i* = o*


def test_metric_orthogonal_inputs_are_untouched_and_concept_hits_its_target(setup):
    c_inv, weight, g = setup
    i_star = torch.randn(1, D, generator=g, dtype=torch.float64)
    o_star = torch.randn(1, OUT, generator=g, dtype=torch.float64)
    e = torch.randn(6, D, generator=g, dtype=torch.float64)
    e_orth = e - concept_scores(e, i_star, c_inv) * i_star
    out = keylocked_projection(e_orth, linear(weight), i_star, o_star, c_inv, beta=0.75, temperature=0.1)
    gate0 = concept_gate(torch.tensor(0.0), 0.75, 0.1).item()
    assert torch.allclose(out, e_orth @ weight.T + gate0 * o_star, atol=1e-10)
    # the concept input itself: e⊥ = 0, output = gate(1)·o*
    out_star = keylocked_projection(i_star, linear(weight), i_star, o_star, c_inv, beta=0.75, temperature=0.1)
    assert torch.allclose(out_star, concept_gate(torch.tensor(1.0), 0.75, 0.1).item() * o_star, atol=1e-10)


@pytest.mark.parametrize(
    "score, beta, tau, expected",
    [
        (0.0, 0.75, 0.1, 1 / (1 + torch.exp(torch.tensor(7.5)).item())),
        (1.0, 0.75, 0.1, 1 / (1 + torch.exp(torch.tensor(-2.5)).item())),
        (0.75, 0.75, 0.1, 0.5),
        (1.0, 0.6, 0.15, 1 / (1 + torch.exp(torch.tensor(-0.4 / 0.15)).item())),
    ],
)
def test_gate_values(score, beta, tau, expected):
    assert concept_gate(torch.tensor(score), beta, tau).item() == pytest.approx(expected, rel=1e-6)


def test_gate_is_near_zero_for_unrelated_and_near_one_for_the_concept():
    assert concept_gate(torch.tensor(0.0), 0.75, 0.1) < 1e-3
    assert concept_gate(torch.tensor(1.0), 0.75, 0.1) > 0.9


def test_multi_concept_projection_equals_metric_least_squares(setup):
    """e⊥ = e − I a with a = argmin ||e − I a||_{C⁻¹}, solved independently via Cholesky whitening."""
    c_inv, _, g = setup
    concepts = torch.randn(3, D, generator=g, dtype=torch.float64)  # not C⁻¹-orthogonal
    e = torch.randn(4, D, generator=g, dtype=torch.float64)
    residual = remove_concept_directions(e, concepts, c_inv)
    chol = torch.linalg.cholesky(c_inv)  # C⁻¹ = L Lᵀ, ||x||_{C⁻¹} = ||Lᵀ x||
    a = torch.linalg.lstsq((chol.T @ concepts.T).expand(4, D, 3), (e @ chol).unsqueeze(-1)).solution.squeeze(-1)
    assert torch.allclose(residual, e - a @ concepts, atol=1e-9)
    # the residual is C⁻¹-orthogonal to every concept input
    assert (residual @ c_inv @ concepts.T).abs().max() < 1e-9


def test_cheap_per_concept_subtraction_is_wrong_for_non_orthogonal_concepts(setup):
    """Guards against the pitfall of subtracting s_c(e) i*_c per concept (or forgetting C⁻¹)."""
    c_inv, _, g = setup
    concepts = torch.randn(2, D, generator=g, dtype=torch.float64)
    e = torch.randn(3, D, generator=g, dtype=torch.float64)
    cheap = e - concept_scores(e, concepts, c_inv) @ concepts
    euclidean = remove_concept_directions(e, concepts, torch.eye(D, dtype=torch.float64))
    exact = remove_concept_directions(e, concepts, c_inv)
    assert not torch.allclose(cheap, exact, atol=1e-6)
    assert not torch.allclose(euclidean, exact, atol=1e-6)


def test_multi_concept_output_sums_each_concepts_gate(setup):
    c_inv, weight, g = setup
    concepts = torch.randn(2, D, generator=g, dtype=torch.float64)
    targets = torch.randn(2, OUT, generator=g, dtype=torch.float64)
    e = torch.randn(5, D, generator=g, dtype=torch.float64)
    beta, tau = torch.tensor([0.7, 0.6], dtype=torch.float64), torch.tensor([0.15, 0.2], dtype=torch.float64)
    out = keylocked_projection(e, linear(weight), concepts, targets, c_inv, beta, tau)
    gates = torch.sigmoid((concept_scores(e, concepts, c_inv) - beta) / tau)
    expected = remove_concept_directions(e, concepts, c_inv) @ weight.T + gates @ targets
    assert torch.allclose(out, expected, atol=1e-10)
    assert concept_gram(concepts, c_inv).shape == (2, 2)


def test_metric_stays_float32_under_autocast_and_fp16_inputs():
    torch.manual_seed(0)
    c_inv = torch.linalg.inv(random_spd(16)).float()
    i_star = torch.randn(1, 16)
    e = (i_star + 1e-3 * torch.randn(4, 16)).half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = concept_scores(e, i_star.half(), c_inv.half())
        residual = remove_concept_directions(e, i_star, c_inv)
    assert scores.dtype == torch.float32
    assert residual.dtype == torch.float16  # returned in the caller's dtype, computed in fp32
    reference = concept_scores(e.double(), i_star.half().double(), c_inv.half().double())
    assert torch.allclose(scores.double(), reference, atol=1e-4)


def test_second_moment_and_ridge():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(200, 5, generator=g, dtype=torch.float64)
    c, count = second_moment(rows.split(37))
    assert count == 200
    assert torch.allclose(c, rows.T @ rows / 200)
    inverse, ridge, condition = invert_covariance(c)
    assert ridge == 0.0 and condition < 1e6
    assert torch.allclose(inverse @ c, torch.eye(5, dtype=torch.float64), atol=1e-9)
    singular = torch.ones(4, 4, dtype=torch.float64)  # rank one
    inverse, ridge, condition = invert_covariance(singular, ridge=1e-3)
    assert ridge == 1e-3 and torch.isfinite(inverse).all() and condition < 1e6
    with pytest.raises(ValueError):
        second_moment([])


def test_concept_correlation_is_the_scale_free_gram_matrix(setup):
    c_inv, _, g = setup
    i_star = torch.randn(3, D, generator=g, dtype=torch.float64)
    scaled = i_star * torch.tensor([[2.0], [1e-3], [50.0]], dtype=torch.float64)
    correlation = concept_correlation(scaled, c_inv)
    gram = concept_gram(i_star, c_inv)
    expected = gram / torch.sqrt(torch.diagonal(gram)[:, None] * torch.diagonal(gram)[None, :])
    assert torch.allclose(correlation, expected, atol=1e-12)
    assert torch.allclose(torch.diagonal(correlation), torch.ones(3, dtype=torch.float64))
    zero = concept_correlation(torch.cat([i_star[:1], torch.zeros(1, D, dtype=torch.float64)]), c_inv)
    assert torch.isnan(zero[1]).all() and zero[0, 0] == pytest.approx(1.0)  # a zero i* shows as NaN
