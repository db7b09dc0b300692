"""The concept library: versions, approvals, projects, API keys, a hash-chained audit log, signed bundles.

``Library`` is the whole API (see docs/library.md); ``resolve_concepts`` turns library references
(``acme-mug``, ``acme-mug@3``) into verified concept files at keylocked's entry points.
"""

from .api import (
    API_KEY_ENV,
    LIBRARY_ENV,
    AccessDenied,
    Caller,
    ConceptInfo,
    GcReport,
    GrantInfo,
    KeyInfo,
    Library,
    NewKey,
    Resolved,
    SignerInfo,
    VerifyReport,
    VersionInfo,
    is_reference,
    parse_reference,
)
from .audit import AuditEntry, ChainReport
from .db import SCOPES

__all__ = [
    "API_KEY_ENV",
    "LIBRARY_ENV",
    "SCOPES",
    "AccessDenied",
    "AuditEntry",
    "Caller",
    "ChainReport",
    "ConceptInfo",
    "GcReport",
    "GrantInfo",
    "KeyInfo",
    "Library",
    "NewKey",
    "Resolved",
    "SignerInfo",
    "VerifyReport",
    "VersionInfo",
    "is_reference",
    "parse_reference",
]
