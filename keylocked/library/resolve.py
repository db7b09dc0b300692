"""Library references at keylocked's entry points: ``acme-mug`` / ``acme-mug@3`` -> a verified concept file.

A file path keeps working with no library at all: only a string that is not an existing file, has no
folder separator or ``.safetensors`` suffix, and reads as NAME[@VERSION] is looked up in the library.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .api import API_KEY_ENV, Library, Resolved, VersionInfo, is_reference


def looks_like_reference(value: Any) -> bool:
    if not isinstance(value, str) or os.path.exists(value):
        return False
    if "/" in value or os.sep in value or value.endswith(".safetensors"):
        return False
    return is_reference(value)


def resolve_concept_sources(
    concepts: Sequence[Any],
    *,
    project: str | None = None,
    api_key: str | None = None,
    base_model_fingerprint: str | None = None,
    library: Library | None = None,
) -> tuple[list[Any], list[Resolved]]:
    """Replace each library reference by its verified blob path; files and ``Concept`` objects pass through.

    A reference checks the key (``api_key``, else ``$KEYLOCKED_API_KEY``, else the local owner), the
    project's grant, the version's status and the base-model fingerprint, and leaves an audit row.
    Returns the new list and what was resolved (for provenance: ``NAME@VERSION``, sha256, audit id).
    """
    if not any(looks_like_reference(c) for c in concepts):
        return list(concepts), []
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    owned = library is None
    library = library or Library.open()
    try:
        sources: list[Any] = []
        resolved: list[Resolved] = []
        for concept in concepts:
            if looks_like_reference(concept):
                resolved.append(library.resolve(concept, api_key, project, base_model_fingerprint))
                sources.append(resolved[-1].path)
            else:
                sources.append(concept)
        return sources, resolved
    finally:
        if owned:
            library.close()


def register_version(
    path: str | os.PathLike,
    name: str,
    *,
    project: str | None = None,
    notes: str = "",
    api_key: str | None = None,
    library: Library | None = None,
) -> VersionInfo:
    """Add a freshly trained concept file as a new draft version of ``name`` (``keylocked train --register``)."""
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    owned = library is None
    library = library or Library.open()
    try:
        return library.add(Path(path), name, notes=notes, project=project, api_key=api_key)
    finally:
        if owned:
            library.close()


def provenance(resolved: Sequence[Resolved]) -> list[dict[str, Any]]:
    """What an output records about the library versions it used (never the key)."""
    return [{"reference": r.reference, "sha256": r.sha256, "audit_id": r.audit_id} for r in resolved]


def record_generation(
    resolved: Sequence[Resolved],
    prompt: str,
    outputs: Sequence[str | os.PathLike],
    *,
    project: str | None = None,
    api_key: str | None = None,
    library: Library | None = None,
) -> int | None:
    """Audit a generation that used library versions: the prompt and each output file's sha256."""
    if not resolved:
        return None
    from .store import sha256_file

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    owned = library is None
    library = library or Library.open()
    try:
        return library.record_generation(
            [r.reference for r in resolved],
            prompt,
            [sha256_file(path) for path in outputs],
            project=project,
            api_key=api_key,
        )
    finally:
        if owned:
            library.close()
