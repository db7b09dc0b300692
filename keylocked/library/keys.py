"""API keys ``kl_<prefix>_<secret>``: the prefix is stored for lookup, the secret only as an argon2id hash."""

from __future__ import annotations

import hashlib
import hmac
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


# secret_hash -> sha256 of the secret argon2 accepted for it, in this process only: a service
# verifies each key once, not on every request (argon2 costs ~50-150 ms of CPU by design). The
# key's row (revoked? scopes?) is still read on every call.
_VERIFIED: dict[str, bytes] = {}


def secret_matches(secret_hash: str, secret: str) -> bool:
    """argon2's verify (constant time), remembered per process for a secret it accepted."""
    digest = hashlib.sha256(secret.encode()).digest()
    known = _VERIFIED.get(secret_hash)
    if known is not None and hmac.compare_digest(known, digest):
        return True
    try:
        matches = _HASHER.verify(secret_hash, secret)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    if matches:
        if len(_VERIFIED) > 10_000:  # bounded: forget everything rather than grow without end
            _VERIFIED.clear()
        _VERIFIED[secret_hash] = digest
    return matches
