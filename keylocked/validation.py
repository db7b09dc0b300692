"""One check per rule, used by the CLI, the Python API and the file readers.

Each function returns the checked value (converted) or raises ``KeylockedError`` quoting the bad
value, so callers write ``beta = check_beta(beta)`` and nothing else.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping

import torch

from .base_model import KeylockedError


def check_finite(name: str, value: object) -> float:
    """A finite real number (bools and non-numbers refused)."""
    if isinstance(value, bool):
        raise KeylockedError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise KeylockedError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise KeylockedError(f"{name} must be a finite number, got {value!r}")
    return number


def check_positive(name: str, value: object) -> float:
    """A finite number > 0."""
    number = check_finite(name, value)
    if not number > 0:
        raise KeylockedError(f"{name} must be positive, got {value!r}")
    return number


def check_non_negative(name: str, value: object) -> float:
    """A finite number >= 0."""
    number = check_finite(name, value)
    if number < 0:
        raise KeylockedError(f"{name} must be non-negative, got {value!r}")
    return number


def check_integer(name: str, value: object, minimum: int | None = None) -> int:
    """An integer (bools and floats refused), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise KeylockedError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise KeylockedError(f"{name} must be at least {minimum}, got {value!r}")
    return value


def check_beta(value: object, name: str = "beta") -> float:
    """The gate bias β: any finite number (lower = stronger concept)."""
    return check_finite(name, value)


def check_tau(value: object, name: str = "tau") -> float:
    """The gate temperature τ: a finite number > 0 (τ ≤ 0 makes the gate a step or flips it)."""
    return check_positive(name, value)


def check_per_concept(
    name: str, value: float | Mapping[str, float] | None, tokens: set[str] | list[str], check
) -> float | dict[str, float] | None:
    """A per-concept option: None, one value for all, or a {token: value} mapping of known tokens only."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(tokens))
        if unknown:
            raise KeylockedError(f"{name} names unknown concept token(s) {unknown}; loaded: {sorted(tokens)}")
        return {token: check(v, f"{name}[{token!r}]") for token, v in value.items()}
    return check(value, name)


def check_choice(name: str, value: object, choices: tuple[str, ...] | list[str]) -> str:
    """One of a fixed set of option names."""
    if not isinstance(value, str) or value not in choices:
        raise KeylockedError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------
# Words and tensors.

# Characters that render as nothing, move the cursor or are unassigned: a token holding one looks
# like another word (or like nothing) to the person typing the prompt.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cn"})


def check_token_text(token: object, name: str = "placeholder token") -> str:
    """One visible word: a non-empty string without whitespace, control, format or unassigned characters."""
    if not isinstance(token, str) or not token:
        raise KeylockedError(f"{name} must be a non-empty word, got {token!r}")
    for char in token:
        category = unicodedata.category(char)
        if char.isspace() or category in INVISIBLE_CATEGORIES:
            raise KeylockedError(
                f"{name} {token!r} contains the invisible or control character U+{ord(char):04X} "
                f"({unicodedata.name(char, 'unnamed')}, category {category}); use visible characters only"
            )
    return token


def check_float_dtype(name: str, dtype: str) -> str:
    """A safetensors dtype name of a floating-point tensor (F16, BF16, F32, F64)."""
    if dtype not in FLOAT_DTYPES:
        raise KeylockedError(f"{name} has dtype {dtype}; only {', '.join(sorted(FLOAT_DTYPES))} are accepted")
    return dtype


FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def check_finite_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor with no NaN or infinite entry."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise KeylockedError(f"{name} has {bad} NaN or infinite value(s)")
    return tensor


def check_nonzero_vector(name: str, vector: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """A vector whose norm is not ~0 (the gate divides by i*ᵀ C⁻¹ i*)."""
    if not float(vector.double().norm()) > tolerance:
        raise KeylockedError(f"{name} is (nearly) zero (norm {float(vector.double().norm()):.3g})")
    return vector


def check_covariance_inverse(name: str, matrix: torch.Tensor) -> torch.Tensor:
    """C⁻¹: a finite, non-zero, symmetric, positive definite square matrix."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise KeylockedError(f"{name} must be a non-empty square matrix, got shape {tuple(matrix.shape)}")
    check_finite_tensor(name, matrix)
    m = matrix.double()  # (d, d)
    scale = float(m.abs().max())
    if scale == 0:
        raise KeylockedError(f"{name} is all zeros")
    if float((m - m.T).abs().max()) > 1e-3 * scale:
        raise KeylockedError(f"{name} is not symmetric")
    _, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:
        raise KeylockedError(f"{name} is not positive definite")
    return matrix


def check_concept_inputs(
    tokens: list[str], correlation: torch.Tensor, max_correlation: float = 0.999, max_condition: float = 1e6
) -> None:
    """The concepts' C⁻¹-Gram matrix, normalised to unit diagonal, must be invertible with margin.

    ``correlation`` is (n, n) G_ab / sqrt(G_aa G_bb); NaN rows mark a zero i*.
    """
    diagonal = torch.diagonal(correlation)
    for token, value in zip(tokens, diagonal.tolist()):
        if not math.isfinite(value):
            raise KeylockedError(f"concept {token!r} has a zero concept input (i*); the file is broken")
    n = len(tokens)
    for a in range(n):
        for b in range(a + 1, n):
            if abs(float(correlation[a, b])) > max_correlation:
                raise KeylockedError(
                    f"concepts {tokens[a]!r} and {tokens[b]!r} have (nearly) the same concept input "
                    f"(C⁻¹-correlation {float(correlation[a, b]):.6f}); they cannot be told apart, load one of them"
                )
    if n > 1:
        eigenvalues = torch.linalg.eigvalsh(correlation.double())  # (n,) ascending
        if not float(eigenvalues[0]) * max_condition > float(eigenvalues[-1]):
            raise KeylockedError(
                f"the concept inputs of {sorted(tokens)} are (nearly) linearly dependent "
                f"(Gram condition number {float(eigenvalues[-1] / eigenvalues[0].clamp_min(1e-300)):.3g}); "
                "load fewer of them together"
            )


def check_format_version(name: str, value: object, supported: int) -> int:
    """A file format version: a decimal integer from 1 to ``supported`` (newer ones ask for an upgrade)."""
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if text is None or not text.isascii() or not text.isdigit() or int(text) < 1:
        raise KeylockedError(f"{name} must be a positive integer, got {value!r}")
    version = int(text)
    if version > supported:
        raise KeylockedError(f"{name} {version} is newer than this keylocked reads ({supported}); upgrade keylocked")
    return version
