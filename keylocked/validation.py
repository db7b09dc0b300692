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
