"""One check per rule, used by the CLI, the Python API and the file readers.

Each function returns the checked value (converted) or raises ``KeylockedError`` quoting the bad
value, so callers write ``beta = check_beta(beta)`` and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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
