"""The service's view of the concept library (``keylocked.library.Library``): who is asking,
what they may do, and an audit row for every decision.

A thin adapter: every decision is the library's. What it adds is HTTP's distinctions (401 for
who-are-you, 403 for not-allowed, 404 for no-such-thing) and the audit row of requests that no
library call records (a refused key, a request that fails validation).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base_model import KeylockedError
from ..library import SCOPES, AccessDenied, Caller


class AccessError(Exception):
    """An HTTP refusal with one line of detail; ``audited`` when a row already records it."""

    def __init__(self, status: int, detail: str, audited: bool = True) -> None:
        super().__init__(detail)
        self.status, self.detail, self.audited = status, detail, audited


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the library's ``Caller`` and the key it presented (kept in memory
    only, for the library calls made on its behalf)."""

    caller: Caller
    api_key: str = ""

    @property
    def name(self) -> str:
        return self.caller.principal

    @property
    def key_prefix(self) -> str:
        return self.caller.key_prefix

    @property
    def is_admin(self) -> bool:
        return self.caller.has("admin")

    def has(self, scope: str) -> bool:
        return self.caller.has(scope)


@dataclass(frozen=True)
class ResolvedConcept:
    """A concept version this request may use, as the engine needs it."""

    name: str
    version: int
    sha256: str
    path: Path
    token: str
    super_category: str
    audit_id: int

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.version}"


class LibraryAccess:
    """Authentication, authorization and audit for one replica, over one library."""

    def __init__(self, library, base_model_fingerprint: str, replica: str = "") -> None:
        self.library = library  # keylocked.library.Library
        self.fingerprint = base_model_fingerprint
        self.replica = replica

    # -- audit rows the library's verbs do not write ------------------------------------------
    def audit_request(
        self, who: Principal | None, action: str, allowed: bool, reason: str = "", concept: str | None = None, **details
    ) -> int:
        return self.library.record_event(
            action,
            allowed=allowed,
            caller=who.caller if who else None,
            reason=reason,
            concept=concept or "",
            details={"replica": self.replica, **details},
        )

    # -- who is asking ------------------------------------------------------------------------
    def authenticate(self, api_key: str | None, what: str) -> Principal:
        """The caller behind a bearer key, or 401 (with a ``denied`` audit row)."""
        if not api_key:  # the library would take no key for its local owner; HTTP never does
            self.audit_request(None, "http.auth", False, "no API key", request=what)
            raise AccessError(401, "an API key is required: send 'Authorization: Bearer kl_<prefix>_<secret>'")
        try:
            caller = self.library.authenticate(
                api_key, action="http.auth", details={"request": what, "replica": self.replica}
            )
        except AccessDenied as refusal:  # bad, unknown or revoked key: the library wrote the row
            raise AccessError(401, f"invalid API key: {refusal.reason}") from None
        return Principal(caller, api_key)

    def require(self, who: Principal, scope: str, what: str) -> None:
        if not who.has(scope):
            reason = f"key kl_{who.key_prefix} lacks the {scope!r} scope"
            self.audit_request(who, "http.scope", False, reason, request=what)
            raise AccessError(403, reason)

    def project_for(self, who: Principal, project: str | None) -> str | None:
        """The project a request acts in: the one named, else the key's only project."""
        allowed = sorted(who.caller.projects)
        if project:
            if allowed and project not in allowed:
                reason = f"key kl_{who.key_prefix} may not act in project {project!r}"
                self.audit_request(who, "http.project", False, reason)
                raise AccessError(403, reason)
            return project
        if len(allowed) == 1:
            return allowed[0]
        if who.is_admin:
            return None
        raise AccessError(422, f"name the project to act in (this key may act in {allowed or 'any project'})", False)

    def whoami(self, who: Principal, project: str | None) -> dict[str, Any]:
        """The key's principal, scopes, projects and the grants it may see (the library lists them,
        per project the key may act in, so a key never sees another project's grants)."""
        if project:
            self.project_for(who, project)  # 403 (audited) for a project the key may not act in
        projects = sorted(who.caller.projects)
        acting = project or (projects[0] if len(projects) == 1 else None)
        grants = []
        if who.has("use"):
            for name in [acting] if acting else projects or [None]:
                grants += self._call(self.library.grants, project=name, api_key=who.api_key)
        scopes = sorted(who.caller.scopes)
        return {
            "principal": who.name,
            "key_prefix": f"kl_{who.key_prefix}",
            "role": "admin" if who.is_admin else "+".join(s for s in SCOPES if s in scopes),
            "scopes": scopes,
            "projects": projects,
            "project": acting,
            "grants": [
                {"project": g.project, "concept": g.concept, "pinned_version": g.pinned_version} for g in grants
            ],
        }

    # -- library verbs, with HTTP's distinctions -------------------------------------------------
    def _call(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except KeylockedError as error:
            message = str(error).splitlines()[0]
            refused = isinstance(error, AccessDenied)  # the library wrote the denied row
            if "unknown concept" in message or "unknown version" in message:
                raise AccessError(404, message, audited=refused) from None
            if refused:
                raise AccessError(403, message) from None
            raise

    def usable_concepts(self, who: Principal, project: str | None) -> list[dict[str, Any]]:
        project = self.project_for(who, project)
        concepts = self._call(self.library.list, api_key=who.api_key)
        grants = self._call(self.library.grants, project=project, api_key=who.api_key) if project else None
        pinned = {g.concept: g.pinned_version for g in grants} if grants is not None else None
        rows = []
        for concept in concepts:
            if concept.base_model_fingerprint != self.fingerprint:
                continue
            if pinned is not None and concept.name not in pinned:
                continue
            rows.append(self._concept_row(concept, pinned.get(concept.name) if pinned is not None else None))
        return [row for row in rows if row["usable_versions"]]

    def concept(self, who: Principal, project: str | None, name: str) -> dict[str, Any]:
        project = self.project_for(who, project)
        concept = self._call(self.library.show, name, api_key=who.api_key)
        grant = next((g for g in concept.grants if g.project == project), None) if project else None
        if project and grant is None:
            reason = f"project {project!r} has no grant for {name!r}"
            self.audit_request(who, "concept.show", False, reason, concept=name)
            raise AccessError(403, reason)
        return self._concept_row(concept, grant.pinned_version if grant else None)

    @staticmethod
    def _concept_row(concept, pinned: int | None) -> dict[str, Any]:
        usable = [v.number for v in concept.versions if v.status == "approved" and pinned in (None, v.number)]
        return {
            "name": concept.name,
            "token": concept.placeholder_token,
            "super_category": concept.superclass_token,
            "base_model_fingerprint": concept.base_model_fingerprint,
            "usable_versions": usable,
            "versions": [
                {
                    "version": v.number,
                    "status": v.status,
                    "sha256": v.sha256,
                    "bytes": v.size,
                    "created_by": v.created_by,
                    "created_at": v.created_at,
                    "notes": v.notes,
                    "training": _training_metadata(v.metadata),
                }
                for v in concept.versions
            ],
        }

    def resolve_all(
        self, who: Principal, project: str | None, references: list[tuple[str, int | None]]
    ) -> list[ResolvedConcept]:
        """Each ``(name, version or None)`` checked by the library (key, scope, grant, status, base
        model, blob sha256), each leaving its audit row."""
        project = self.project_for(who, project)
        resolved = []
        for name, version in references:
            reference = name if version is None else f"{name}@{version}"
            item = self._call(
                self.library.resolve,
                reference,
                api_key=who.api_key,
                project=project,
                base_model_fingerprint=self.fingerprint,
            )
            resolved.append(
                ResolvedConcept(
                    name=item.concept,
                    version=item.version,
                    sha256=item.sha256,
                    path=Path(item.path),
                    token=item.placeholder_token,
                    super_category=item.superclass_token,
                    audit_id=item.audit_id,
                )
            )
        return resolved

    def record_generation(
        self,
        who: Principal,
        project: str | None,
        prompt: str,
        resolved: list[ResolvedConcept],
        image_sha256s: list[str],
        details: dict[str, Any],
    ) -> int:
        return self.library.record_generation(
            [item.reference for item in resolved],
            prompt,
            image_sha256s,
            project=self.project_for(who, project),
            api_key=who.api_key,
            details={"replica": self.replica, "sha256_of": "rgb pixels", **details},
        )

    def add_version(self, who: Principal, name: str, data: bytes, notes: str | None) -> dict:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "upload.safetensors"
            path.write_bytes(data)
            version = self._call(self.library.add, path, name, notes=notes or "", api_key=who.api_key)
        return _version_row(version)

    def approve(self, who: Principal, name: str, version: int) -> dict:
        return _version_row(self._call(self.library.approve, f"{name}@{version}", api_key=who.api_key))

    def audit_rows(self, who: Principal, limit: int, concept: str | None, project: str | None) -> list[dict]:
        from dataclasses import asdict

        entries = self._call(self.library.audit, limit=limit, concept=concept, project=project, api_key=who.api_key)
        return [asdict(entry) for entry in entries]

    def register_training(self, who: Principal, name: str, concept_file: Path, job_id: str) -> int:
        version = self._call(
            self.library.add, concept_file, name, notes=f"trained by keylocked serve, job {job_id}", api_key=who.api_key
        )
        return version.number


def _version_row(version) -> dict[str, Any]:
    return {
        "concept": version.concept,
        "version": version.number,
        "status": version.status,
        "sha256": version.sha256,
        "bytes": version.size,
        "created_by": version.created_by,
        "created_at": version.created_at.isoformat() if version.created_at else None,
        "notes": version.notes,
    }


def _training_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The file header's recommended β/τ and training settings, JSON-decoded where they are JSON."""
    import json

    out: dict[str, Any] = {}
    for key in ("beta", "tau", "train_beta", "train_tau", "superclass_token", "placeholder_token"):
        if key in metadata:
            out[key] = metadata[key]
    try:
        out["training"] = json.loads(metadata.get("training", "{}"))
    except (TypeError, ValueError):
        pass
    return out
