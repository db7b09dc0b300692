"""API keys ``kl_<prefix>_<secret>``: the prefix is stored for lookup, the secret only as an argon2id hash."""

from __future__ import annotations

import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from ..base_model import KeylockedError

KEY_MARK = "kl"
# OWASP's argon2id minimum (19 MiB, t=2): keys are 256-bit random, so the hash guards a leaked
# database, and a verify stays cheap enough for a per-request check in the service.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


def new_key() -> tuple[str, str, str]:
    """(full key shown once, prefix, secret)."""
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"{KEY_MARK}_{prefix}_{secret}", prefix, secret


def split_key(key: str) -> tuple[str, str]:
    """(prefix, secret) of a key, or KeylockedError for something that is not one."""
    parts = key.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_MARK or not parts[1] or not parts[2]:
        raise KeylockedError("malformed API key (expected kl_<prefix>_<secret>)")
    return parts[1], parts[2]


def hash_secret(secret: str) -> str:
    return _HASHER.hash(secret)


def secret_matches(secret_hash: str, secret: str) -> bool:
    """argon2's verify: recomputes the hash and compares in constant time."""
    try:
        return _HASHER.verify(secret_hash, secret)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
