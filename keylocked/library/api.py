"""``Library``: the concept library's Python API. The CLI (cli.py) and the generation service call only this.

Every method takes ``api_key`` (None: the local owner of a SQLite library, who is admin), checks
the key's scope, does its work in one serialized transaction, and leaves an audit row: ``allowed``
with the change, or ``denied`` with the reason when access is refused.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, func, select
from sqlalchemy.orm import Session

from ..base_model import KeylockedError
from ..concept import Concept
from . import audit
from .audit import AuditEntry, ChainReport
from .bundles import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    CONCEPT_MEMBER,
    generate_signing_key,
    load_private_key,
    load_public_key,
    raw_hex,
    read_bundle,
    signature_status,
    write_bundle,
)
from .db import (
    SCOPES,
    ApiKeyRow,
    AuditRow,
    Base,
    BaseModelRow,
    ConceptRow,
    GrantRow,
    PrincipalRow,
    ProjectRow,
    SignerRow,
    VersionRow,
    current_revision,
    head_revision,
    make_engine,
    upgrade_schema,
    utcnow,
    write_session,
)
from .keys import hash_secret, new_key, secret_matches, split_key
from .store import BlobStore, sha256_bytes

LIBRARY_ENV = "KEYLOCKED_LIBRARY"
BLOBS_ENV = "KEYLOCKED_LIBRARY_BLOBS"
API_KEY_ENV = "KEYLOCKED_API_KEY"
DB_FILE = "library.sqlite"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
REFERENCE_PATTERN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,199})(?:@(?P<version>[0-9]+))?$")
GC_MIN_AGE_SECONDS = 3600.0  # a younger orphan may be a blob whose row is being inserted right now


# ---------------------------------------------------------------------------------------
# What the API returns.


@dataclass(frozen=True)
class Caller:
    """Who is asking: the local owner (admin, no key) or a key's principal with its scopes."""

    principal: str
    key_prefix: str = ""
    scopes: frozenset[str] = frozenset(SCOPES)
    projects: frozenset[str] = frozenset()  # empty: any project
    owner: bool = False

    def has(self, scope: str) -> bool:
        return self.owner or "admin" in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class VersionInfo:
    concept: str
    number: int
    sha256: str
    size: int
    status: str
    created_by: str
    created_at: datetime
    notes: str = ""
    status_by: str = ""
    status_at: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def reference(self) -> str:
        return f"{self.concept}@{self.number}"


@dataclass(frozen=True)
class ConceptInfo:
    name: str
    placeholder_token: str
    superclass_token: str
    base_model_fingerprint: str
    base_model_name: str
    created_by: str
    created_at: datetime
    versions: list[VersionInfo]
    grants: list[GrantInfo] = field(default_factory=list)

    @property
    def latest_approved(self) -> VersionInfo | None:
        approved = [v for v in self.versions if v.status == "approved"]
        return approved[-1] if approved else None


@dataclass(frozen=True)
class GrantInfo:
    project: str
    concept: str
    pinned_version: int | None
    created_by: str
    created_at: datetime


@dataclass(frozen=True)
class KeyInfo:
    prefix: str
    principal: str
    scopes: tuple[str, ...]
    projects: tuple[str, ...]
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class NewKey:
    """A created key: ``key`` is shown this once and never stored."""

    key: str
    info: KeyInfo


@dataclass(frozen=True)
class SignerInfo:
    name: str
    public_key: str
    created_by: str
    created_at: datetime


@dataclass(frozen=True)
class Resolved:
    """A library reference resolved for use: a verified concept file and the audit row that allowed it."""

    concept: str
    version: int
    sha256: str
    path: Path  # the content-addressed, read-only blob (verified just now)
    placeholder_token: str
    superclass_token: str
    base_model_fingerprint: str
    project: str
    audit_id: int

    @property
    def reference(self) -> str:
        return f"{self.concept}@{self.version}"


@dataclass
class VerifyReport:
    blobs_checked: int
    missing: list[str]  # referenced by a version, absent from the store
    mismatched: list[str]  # present, but the bytes no longer match the sha256
    orphans: list[str]  # in the store, referenced by no version (gc removes them)
    audit: ChainReport

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched) and self.audit.ok


@dataclass
class GcReport:
    removed: list[str]
    kept_young: list[str]  # orphans younger than the grace period (maybe mid-insert)


class AccessDenied(KeylockedError):
    """The library refused access: a ``denied`` audit row already records it (one line, ``reason``)."""

    def __init__(self, action: str, reason: str, key_prefix: str = "") -> None:
        super().__init__(f"{action} denied: {reason}")
        self.action, self.reason, self.key_prefix = action, reason, key_prefix


class _Refusal(Exception):
    """Access refused: becomes a ``denied`` audit row and a KeylockedError."""

    def __init__(self, reason: str, caller: Caller | None = None, **context: Any) -> None:
        super().__init__(reason)
        self.reason, self.caller, self.context = reason, caller, context


def parse_reference(reference: str) -> tuple[str, int | None]:
    """``acme-mug`` -> ('acme-mug', None); ``acme-mug@3`` -> ('acme-mug', 3)."""
    match = REFERENCE_PATTERN.match(reference.strip()) if isinstance(reference, str) else None
    if not match:
        raise KeylockedError(f"not a library reference (NAME or NAME@VERSION): {reference!r}")
    version = match.group("version")
    return match.group("name"), int(version) if version is not None else None


def is_reference(value: object) -> bool:
    """True for something that reads as NAME or NAME@VERSION (a caller checks files first)."""
    return isinstance(value, str) and bool(REFERENCE_PATTERN.match(value.strip()))


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise KeylockedError(f"{kind} name must be letters, digits, '.', '_' or '-' (no '@' or spaces), got {name!r}")
    return name


def _split_csv(value: str) -> tuple[str, ...]:
    return tuple(part for part in value.split(",") if part)


# ---------------------------------------------------------------------------------------
# Where a library lives.


@dataclass(frozen=True)
class Location:
    url: str
    blobs: Path
    sqlite_file: Path | None  # None: a server database

    @property
    def display(self) -> str:
        return str(self.sqlite_file) if self.sqlite_file else self.url.split("@")[-1]


def default_location() -> str:
    import platformdirs

    return os.environ.get(LIBRARY_ENV) or str(Path(platformdirs.user_data_dir("keylocked")) / "library")


def locate(location: str | os.PathLike | None = None, blobs: str | os.PathLike | None = None) -> Location:
    """A folder (``library.sqlite`` + ``blobs/``) or a database URL; default ``$KEYLOCKED_LIBRARY``, else per-user."""
    location = str(location or default_location())
    blobs = blobs or os.environ.get(BLOBS_ENV)
    if "://" not in location:
        folder = Path(location).expanduser().resolve()
        return Location(f"sqlite:///{folder / DB_FILE}", Path(blobs or folder / "blobs"), folder / DB_FILE)
    if location.startswith("sqlite:///"):
        database = Path(location[len("sqlite:///") :]).expanduser().resolve()
        return Location(f"sqlite:///{database}", Path(blobs or database.parent / "blobs"), database)
    if not blobs:
        raise KeylockedError(
            f"a server library needs a shared blob folder: set {BLOBS_ENV} or pass --blobs (concept files live there)"
        )
    return Location(location, Path(blobs), None)


# ---------------------------------------------------------------------------------------
# The library.


class Library:
    """A concept library: open with ``Library.open(location)``, create with ``Library.init(location)``."""

    def __init__(self, location: Location, *, create: bool = False, upgrade: bool = False) -> None:
        self.location = location
        if location.sqlite_file is not None:
            if not location.sqlite_file.exists() and not create:
                raise KeylockedError(
                    f"no concept library at {location.sqlite_file.parent} "
                    f"(create one with `keylocked library init`, or set {LIBRARY_ENV})"
                )
            location.sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(location.url)
        self.store = BlobStore(location.blobs)
        self._check_schema(create or upgrade)

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def open(
        cls, location: str | os.PathLike | None = None, *, blobs: str | os.PathLike | None = None, upgrade: bool = False
    ) -> Library:
        """Open an existing library; ``upgrade=True`` migrates an older schema first (SQLite always does)."""
        return cls(locate(location, blobs), upgrade=upgrade)

    @classmethod
    def init(cls, location: str | os.PathLike | None = None, *, blobs: str | os.PathLike | None = None) -> Library:
        """Create (or bring up to date) a library: schema, blob folder, a first audit row."""
        library = cls(locate(location, blobs), create=True)
        library.store.root.mkdir(parents=True, exist_ok=True)
        with write_session(library.engine) as session:
            if session.scalar(select(func.count()).select_from(AuditRow)) == 0:
                audit.append(session, actor=_owner_name(), action="library.init", outcome="allowed")
        return library

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def _check_schema(self, migrate: bool) -> None:
        current, head = current_revision(self.engine), head_revision()
        if current == head:
            return
        if migrate or self.is_sqlite:  # one local file, one user: upgrading on open is safe
            upgrade_schema(self.engine)
            return
        if current is None:
            raise KeylockedError(f"{self.location.display}: not a concept library yet; run `keylocked library init`")
        raise KeylockedError(
            f"{self.location.display}: schema revision {current}, this keylocked needs {head}; "
            "run `keylocked library upgrade`"
        )

    def upgrade(self) -> str:
        """Bring the schema to the latest revision; the revision reached."""
        revision = upgrade_schema(self.engine)
        with write_session(self.engine) as session:
            audit.append(
                session,
                actor=_owner_name(),
                action="library.upgrade",
                outcome="allowed",
                details={"revision": revision},
            )
        return revision

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- who is asking -----------------------------------------------------------------

    def authenticate(self, api_key: str | None, *, action: str = "key.check", details: dict | None = None) -> Caller:
        """Who ``api_key`` belongs to (None: the local owner of a SQLite library), without acting.

        A malformed, unknown or revoked key raises ``AccessDenied`` after a ``denied`` row
        (``action``, with ``details``); an accepted key writes no row: the verbs it then calls do.
        """
        try:
            with Session(self.engine) as session, session.begin():
                return self._authenticate(session, api_key, action)
        except _Refusal as refusal:
            raise self._denied(action, refusal, details=details or {}) from None

    def record_event(
        self,
        action: str,
        *,
        allowed: bool,
        caller: Caller | None = None,
        reason: str = "",
        concept: str = "",
        version: int | None = None,
        project: str = "",
        details: dict[str, Any] | None = None,
    ) -> int:
        """Append an audit row for a decision no verb here records (a service's refused request, a
        submitted job); ``caller`` from ``authenticate``, None: anonymous. The new row's id."""
        if not isinstance(action, str) or not action.strip():
            raise KeylockedError(f"an audit action is a non-empty string, got {action!r}")
        with write_session(self.engine) as session:
            row = audit.append(
                session,
                actor=caller.principal if caller else "anonymous",
                key_prefix=caller.key_prefix if caller else "",
                action=action,
                outcome="allowed" if allowed else "denied",
                concept=concept,
                version=version,
                project=project,
                reason=reason,
                details=details,
            )
            return row.id

    def create_tables(self, metadata: MetaData) -> None:
        """Create a companion's own tables (the service's training jobs) in this library's database,
        under its write lock (replicas may start at once). Library table names are refused."""
        clash = sorted(set(metadata.tables) & set(Base.metadata.tables))
        if clash:
            raise KeylockedError(f"tables {clash} belong to the concept library; name companion tables otherwise")
        with write_session(self.engine) as session:
            metadata.create_all(session.connection())

    def _denied(self, action: str, refusal: _Refusal, **context: Any) -> AccessDenied:
        """Write the ``denied`` row of a refusal (in its own transaction) and return the error to raise."""
        who = refusal.caller
        with write_session(self.engine) as session:
            audit.append(
                session,
                actor=who.principal if who else "anonymous",
                key_prefix=who.key_prefix if who else "",
                action=action,
                outcome="denied",
                reason=refusal.reason,
                **{**context, **refusal.context},
            )
        return AccessDenied(action, refusal.reason, who.key_prefix if who else "")

    def _authenticate(self, session: Session, api_key: str | None, action: str) -> Caller:
        if api_key is None:
            if self.is_sqlite:
                return Caller(principal=_owner_name(), owner=True)
            if action == "key.create" and not self._active_admin_keys(session):
                return Caller(principal=_owner_name(), owner=True)  # bootstrap: the first admin key
            raise _Refusal("an API key is required (KEYLOCKED_API_KEY or --api_key)")
        try:
            prefix, secret = split_key(api_key)
        except KeylockedError:
            raise _Refusal("malformed API key") from None
        row = session.scalars(select(ApiKeyRow).where(ApiKeyRow.prefix == prefix)).first()
        if row is None or not secret_matches(row.secret_hash, secret):
            raise _Refusal(f"unknown or wrong API key kl_{prefix}", Caller(principal="unknown", key_prefix=prefix))
        caller = Caller(
            principal=row.principal.name,
            key_prefix=prefix,
            scopes=frozenset(_split_csv(row.scopes)),
            projects=frozenset(_split_csv(row.projects)),
        )
        if row.revoked_at is not None:
            raise _Refusal(f"API key kl_{prefix} was revoked", caller)
        return caller

    def _active_admin_keys(self, session: Session) -> int:
        rows = session.scalars(select(ApiKeyRow.scopes).where(ApiKeyRow.revoked_at.is_(None))).all()
        return sum("admin" in _split_csv(scopes) for scopes in rows)

    @contextlib.contextmanager
    def _operation(
        self,
        action: str,
        api_key: str | None,
        scope: str,
        *,
        concept: str = "",
        version: int | None = None,
        project: str | None = None,
    ) -> Iterator[tuple[Session, Caller]]:
        """Authenticate, authorize ``scope``, run the body in one transaction; audit a refusal."""
        try:
            with write_session(self.engine) as session:
                caller = self._authenticate(session, api_key, action)
                if not caller.has(scope):
                    raise _Refusal(f"key kl_{caller.key_prefix} lacks the {scope!r} scope", caller)
                if project and caller.projects and project not in caller.projects:
                    raise _Refusal(f"key kl_{caller.key_prefix} may not act in project {project!r}", caller)
                yield session, caller
        except _Refusal as refusal:
            # The body's transaction rolled back (nothing half-written); the refusal is its own row.
            raise self._denied(action, refusal, concept=concept, version=version, project=project or "") from None

    @staticmethod
    def _allowed(session: Session, caller: Caller, action: str, **fields: Any) -> AuditRow:
        return audit.append(
            session, actor=caller.principal, key_prefix=caller.key_prefix, action=action, outcome="allowed", **fields
        )

    # -- concepts and versions ---------------------------------------------------------

    def add(
        self,
        path: str | os.PathLike,
        name: str,
        *,
        notes: str = "",
        base_model_name: str = "",
        project: str | None = None,
        api_key: str | None = None,
    ) -> VersionInfo:
        """Register a concept file as the next draft version of ``name`` (the concept is created if new).

        ``project``: the project it was trained for (checked against the key, recorded in the audit row).
        """
        _check_name("concept", name)
        if project:
            _check_name("project", project)
        data = _read_file(path)
        with self._operation("version.add", api_key, "publish", concept=name, project=project) as (session, caller):
            details = {"project": project} if project else None
            return self._add_version(session, caller, data, name, notes, base_model_name, str(path), details)

    def _add_version(
        self,
        session: Session,
        caller: Caller,
        data: bytes,
        name: str,
        notes: str,
        base_model_name: str,
        source: str,
        details: dict[str, Any] | None = None,
    ) -> VersionInfo:
        concept_file = _parse_concept(data, source)
        fingerprint = concept_file.base_model_fingerprint
        if not fingerprint:
            raise KeylockedError(f"{source}: the concept file records no base-model fingerprint; retrain it")
        base = session.scalars(select(BaseModelRow).where(BaseModelRow.fingerprint == fingerprint)).first()
        if base is None:
            base_name = base_model_name or str(concept_file.training.get("pretrained_model_name_or_path", ""))
            base = BaseModelRow(
                fingerprint=fingerprint, name=base_name, covariance_sha256=concept_file.covariance_sha256
            )
            session.add(base)
            session.flush()
        concept = session.scalars(select(ConceptRow).where(ConceptRow.name == name)).first()
        if concept is None:
            concept = ConceptRow(
                name=name,
                placeholder_token=concept_file.placeholder_token,
                superclass_token=concept_file.superclass_token,
                base_model_id=base.id,
                created_by=caller.principal,
            )
            session.add(concept)
            session.flush()
        else:
            if concept.base_model_id != base.id:
                raise KeylockedError(
                    f"{source} is for base model {fingerprint[:12]}, concept {name!r} for "
                    f"{concept.base_model.fingerprint[:12]}; register it under a new concept name"
                )
            if concept.placeholder_token != concept_file.placeholder_token:
                raise KeylockedError(
                    f"{source} uses token {concept_file.placeholder_token!r}, concept {name!r} uses "
                    f"{concept.placeholder_token!r}"
                )
        sha256 = sha256_bytes(data)
        for existing in concept.versions:
            if existing.sha256 == sha256:
                raise KeylockedError(f"{source} is already {name}@{existing.number} (same sha256); nothing added")
        number = (
            session.scalar(select(func.max(VersionRow.number)).where(VersionRow.concept_id == concept.id)) or 0
        ) + 1
        self.store.put(data)  # the blob first: a crash before the row commits leaves an orphan, never a dangling row
        row = VersionRow(
            concept_id=concept.id,
            number=number,
            sha256=sha256,
            size=len(data),
            file_metadata=json.dumps(concept_file.metadata(), sort_keys=True),
            status="draft",
            created_by=caller.principal,
            notes=notes,
        )
        session.add(row)
        session.flush()
        self._allowed(
            session,
            caller,
            "version.add",
            concept=name,
            version=number,
            project=(details or {}).get("project", ""),
            details={"sha256": sha256, "bytes": len(data), "source": source, **(details or {})},
        )
        return _version_info(row, name)

    def list(self, *, api_key: str | None = None) -> list[ConceptInfo]:
        """Every concept with its versions."""
        with self._operation("library.list", api_key, "use") as (session, caller):
            concepts = session.scalars(select(ConceptRow).order_by(ConceptRow.name)).all()
            self._allowed(session, caller, "library.list")
            return [_concept_info(c) for c in concepts]

    def show(self, name: str, *, api_key: str | None = None) -> ConceptInfo:
        """One concept: versions, base model, grants."""
        name, _ = parse_reference(name)
        with self._operation("concept.show", api_key, "use", concept=name) as (session, caller):
            concept = self._concept(session, name)
            grants = session.scalars(select(GrantRow).where(GrantRow.concept_id == concept.id)).all()
            self._allowed(session, caller, "concept.show", concept=name)
            return _concept_info(concept, grants)

    def approve(self, reference: str, *, api_key: str | None = None) -> VersionInfo:
        """draft -> approved."""
        return self._set_status(reference, "approved", ("draft",), "approve", api_key)

    def retire(self, reference: str, *, api_key: str | None = None) -> VersionInfo:
        """draft or approved -> retired (final: a retired version is never served again)."""
        return self._set_status(reference, "retired", ("draft", "approved"), "approve", api_key)

    def _set_status(
        self, reference: str, status: str, sources: tuple[str, ...], scope: str, api_key: str | None
    ) -> VersionInfo:
        name, number = parse_reference(reference)
        if number is None:
            raise KeylockedError(f"give the version to {status[:-1]}: {name}@N")
        action = f"version.{status[:-1] if status.endswith('d') else status}"
        with self._operation(action, api_key, scope, concept=name, version=number) as (session, caller):
            row = self._version(session, name, number)
            if row.status not in sources:
                raise KeylockedError(
                    f"{name}@{number} is {row.status}; only {' or '.join(sources)} can become {status}"
                )
            row.status, row.status_by, row.status_at = status, caller.principal, utcnow()
            self._allowed(session, caller, action, concept=name, version=number, details={"sha256": row.sha256})
            return _version_info(row, name)

    # -- projects and grants -----------------------------------------------------------

    def grant(self, project: str, concept: str, *, version: int | None = None, api_key: str | None = None) -> GrantInfo:
        """Project ``project`` may use ``concept``: any approved version, or only ``version`` (pinned)."""
        _check_name("project", project)
        name, pinned = parse_reference(concept)
        pinned = version if version is not None else pinned
        with self._operation("grant.add", api_key, "admin", concept=name, version=pinned, project=project) as (
            session,
            caller,
        ):
            concept_row = self._concept(session, name)
            if pinned is not None:
                self._version(session, name, pinned)
            project_row = session.scalars(select(ProjectRow).where(ProjectRow.name == project)).first()
            if project_row is None:
                project_row = ProjectRow(name=project)
                session.add(project_row)
                session.flush()
            row = self._grant(session, project_row.id, concept_row.id)
            if row is None:
                row = GrantRow(project_id=project_row.id, concept_id=concept_row.id, created_by=caller.principal)
                session.add(row)
            row.pinned_version, row.created_by, row.created_at = pinned, caller.principal, utcnow()
            session.flush()
            self._allowed(session, caller, "grant.add", concept=name, version=pinned, project=project)
            return _grant_info(row)

    def revoke(self, project: str, concept: str, *, api_key: str | None = None) -> None:
        """Remove the grant of ``concept`` to ``project``."""
        name, _ = parse_reference(concept)
        with self._operation("grant.revoke", api_key, "admin", concept=name, project=project) as (session, caller):
            project_row = session.scalars(select(ProjectRow).where(ProjectRow.name == project)).first()
            row = self._grant(session, project_row.id, self._concept(session, name).id) if project_row else None
            if row is None:
                raise KeylockedError(f"project {project!r} has no grant for {name!r}")
            session.delete(row)
            self._allowed(session, caller, "grant.revoke", concept=name, project=project)

    def grants(self, *, project: str | None = None, api_key: str | None = None) -> list[GrantInfo]:
        with self._operation("grant.list", api_key, "use", project=project) as (session, caller):
            query = select(GrantRow).join(ProjectRow).join(ConceptRow).order_by(ProjectRow.name, ConceptRow.name)
            if project:
                query = query.where(ProjectRow.name == project)
            rows = session.scalars(query).all()
            self._allowed(session, caller, "grant.list", project=project)
            return [_grant_info(r) for r in rows]

    # -- keys --------------------------------------------------------------------------

    def create_key(
        self,
        principal: str,
        scopes: Sequence[str],
        *,
        projects: Sequence[str] = (),
        api_key: str | None = None,
    ) -> NewKey:
        """A new key for ``principal`` (created if new). The returned ``key`` is the only copy."""
        _check_name("principal", principal)
        scopes = tuple(sorted(set(scopes)))
        unknown = sorted(set(scopes) - set(SCOPES))
        if not scopes or unknown:
            raise KeylockedError(f"scopes must be some of {list(SCOPES)}, got {list(scopes)}")
        for project in projects:
            _check_name("project", project)
        with self._operation("key.create", api_key, "admin") as (session, caller):
            person = session.scalars(select(PrincipalRow).where(PrincipalRow.name == principal)).first()
            if person is None:
                person = PrincipalRow(name=principal)
                session.add(person)
                session.flush()
            key, prefix, secret = new_key()
            row = ApiKeyRow(
                prefix=prefix,
                secret_hash=hash_secret(secret),
                principal_id=person.id,
                scopes=",".join(scopes),
                projects=",".join(sorted(set(projects))),
                created_by=caller.principal,
            )
            session.add(row)
            session.flush()
            self._allowed(
                session,
                caller,
                "key.create",
                details={"prefix": prefix, "principal": principal, "scopes": list(scopes)},
            )
            return NewKey(key=key, info=_key_info(row))

    def revoke_key(self, prefix: str, *, api_key: str | None = None) -> KeyInfo:
        """Revoke a key by its prefix (``kl_<prefix>`` or the bare prefix); it stops working at once."""
        prefix = prefix.removeprefix("kl_").split("_")[0]
        with self._operation("key.revoke", api_key, "admin") as (session, caller):
            row = session.scalars(select(ApiKeyRow).where(ApiKeyRow.prefix == prefix)).first()
            if row is None:
                raise KeylockedError(f"no API key kl_{prefix}")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            self._allowed(session, caller, "key.revoke", details={"prefix": prefix, "principal": row.principal.name})
            return _key_info(row)

    def list_keys(self, *, api_key: str | None = None) -> list[KeyInfo]:
        with self._operation("key.list", api_key, "admin") as (session, caller):
            rows = session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at)).all()
            self._allowed(session, caller, "key.list")
            return [_key_info(r) for r in rows]

    # -- using a concept ---------------------------------------------------------------

    def resolve(
        self,
        reference: str,
        api_key: str | None = None,
        project: str | None = None,
        base_model_fingerprint: str | None = None,
    ) -> Resolved:
        """Check key, scope, grant, status and base model; verify the blob; audit; return the file."""
        name, number = parse_reference(reference)
        with self._operation("concept.use", api_key, "use", concept=name, version=number, project=project) as (
            session,
            caller,
        ):
            if not project and not caller.has("admin"):
                raise _Refusal("a project is required to use a concept (--project)", caller)
            concept = session.scalars(select(ConceptRow).where(ConceptRow.name == name)).first()
            if concept is None:
                raise _Refusal(f"unknown concept {name!r}", caller)
            grant = None
            if project:
                project_row = session.scalars(select(ProjectRow).where(ProjectRow.name == project)).first()
                grant = self._grant(session, project_row.id, concept.id) if project_row else None
                if grant is None:
                    raise _Refusal(f"project {project!r} has no grant for {name!r}", caller)
                if grant.pinned_version is not None:
                    if number is not None and number != grant.pinned_version:
                        raise _Refusal(f"project {project!r} is pinned to {name}@{grant.pinned_version}", caller)
                    number = grant.pinned_version
            if number is None:
                approved = [v for v in concept.versions if v.status == "approved"]
                if not approved:
                    raise _Refusal(f"{name} has no approved version", caller)
                row = approved[-1]
            else:
                row = next((v for v in concept.versions if v.number == number), None)
                if row is None:
                    raise _Refusal(f"unknown version {name}@{number}", caller, version=number)
            context = {"version": row.number}
            if row.status == "retired":
                raise _Refusal(f"{name}@{row.number} is retired", caller, **context)
            if row.status == "draft" and not (caller.has("publish") or caller.has("approve")):
                raise _Refusal(f"{name}@{row.number} is a draft, not approved", caller, **context)
            if base_model_fingerprint and concept.base_model.fingerprint != base_model_fingerprint:
                raise _Refusal(
                    f"{name}@{row.number} is for another base model "
                    f"({concept.base_model.fingerprint[:12]}, this pipeline is {base_model_fingerprint[:12]})",
                    caller,
                    **context,
                )
            try:
                path = self.store.verify(row.sha256)
            except KeylockedError as error:
                raise _Refusal(str(error), caller, **context) from None
            entry = self._allowed(
                session,
                caller,
                "concept.use",
                concept=name,
                version=row.number,
                project=project or "",
                details={"sha256": row.sha256},
            )
            return Resolved(
                concept=name,
                version=row.number,
                sha256=row.sha256,
                path=path,
                placeholder_token=concept.placeholder_token,
                superclass_token=concept.superclass_token,
                base_model_fingerprint=concept.base_model.fingerprint,
                project=project or "",
                audit_id=entry.id,
            )

    def record_generation(
        self,
        concepts: Iterable[str],
        prompt: str,
        image_sha256s: Sequence[str],
        *,
        project: str | None = None,
        api_key: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> int:
        """Audit one generation: the concept versions used (``NAME@N``), the prompt, each output's sha256."""
        concepts = [str(c) for c in concepts]
        for reference in concepts:
            parse_reference(reference)
        with self._operation("generate", api_key, "use", project=project) as (session, caller):
            single = concepts[0] if len(concepts) == 1 else ""
            name, number = parse_reference(single) if single else (",".join(concepts), None)
            entry = self._allowed(
                session,
                caller,
                "generate",
                concept=name,
                version=number,
                project=project or "",
                details={"concepts": concepts, "prompt": prompt, "images": list(image_sha256s), **(details or {})},
            )
            return entry.id

    # -- audit -------------------------------------------------------------------------

    def audit(
        self,
        *,
        limit: int | None = None,
        concept: str | None = None,
        project: str | None = None,
        api_key: str | None = None,
    ) -> list[AuditEntry]:
        """Audit rows, oldest first (the last ``limit`` when given)."""
        with self._operation("audit.read", api_key, "admin") as (session, caller):
            query = select(AuditRow).order_by(AuditRow.id.desc())
            if concept:
                query = query.where(AuditRow.concept == concept)
            if project:
                query = query.where(AuditRow.project == project)
            rows = session.scalars(query.limit(limit) if limit else query).all()
            entries = [AuditEntry.of(r) for r in reversed(rows)]
            self._allowed(session, caller, "audit.read")
            return entries

    def verify_audit(self, *, api_key: str | None = None) -> ChainReport:
        """Check the hash chain (edited, inserted, deleted rows)."""
        with self._operation("audit.verify", api_key, "admin") as (session, caller):
            report = audit.verify_chain(session)
            self._allowed(session, caller, "audit.verify", details={"ok": report.ok, "rows": report.rows})
            return report

    def prune_audit(self, before: str, *, api_key: str | None = None) -> int:
        """Delete rows older than ``before`` (ISO date, UTC), keeping the chain verifiable; rows removed."""
        try:
            before = datetime.fromisoformat(before).isoformat()
        except (TypeError, ValueError):
            raise KeylockedError(f"--before must be an ISO date like 2026-01-31, got {before!r}") from None
        with self._operation("audit.prune", api_key, "admin") as (session, caller):
            removed, cut_id, cut_hash = audit.prune_before(session, before)
            self._allowed(
                session,
                caller,
                "audit.prune",
                details={"before": before, "rows": removed, "cut_id": cut_id, "cut_hash": cut_hash},
            )
            return removed

    def export_audit(self, path: str | os.PathLike, fmt: str | None = None, *, api_key: str | None = None) -> int:
        """Write the audit log as CSV or JSON Lines; rows written."""
        entries = self.audit(api_key=api_key)
        return audit.export_entries(entries, path, fmt)

    # -- integrity ---------------------------------------------------------------------

    def verify(self, *, api_key: str | None = None) -> VerifyReport:
        """Every blob against its sha256, versions without blobs, orphan blobs, and the audit chain."""
        with self._operation("library.verify", api_key, "admin") as (session, caller):
            referenced = set(session.scalars(select(VersionRow.sha256)).all())
            stored = set(self.store)
            missing = sorted(referenced - stored)
            mismatched = []
            for sha256 in sorted(referenced & stored):
                try:
                    self.store.verify(sha256)
                except KeylockedError:
                    mismatched.append(sha256)
            chain = audit.verify_chain(session)
            report = VerifyReport(len(referenced & stored), missing, mismatched, sorted(stored - referenced), chain)
            self._allowed(
                session,
                caller,
                "library.verify",
                details={
                    "ok": report.ok,
                    "missing": missing,
                    "mismatched": mismatched,
                    "orphans": report.orphans,
                    "audit_problems": len(chain.problems),
                },
            )
            return report

    def gc(self, *, min_age_seconds: float = GC_MIN_AGE_SECONDS, api_key: str | None = None) -> GcReport:
        """Remove orphan blobs (no version refers to them) older than ``min_age_seconds``."""
        with self._operation("library.gc", api_key, "admin") as (session, caller):
            referenced = set(session.scalars(select(VersionRow.sha256)).all())
            report = GcReport([], [])
            for sha256 in sorted(set(self.store) - referenced):
                if self.store.age_seconds(sha256) < min_age_seconds:
                    report.kept_young.append(sha256)
                else:
                    self.store.delete(sha256)
                    report.removed.append(sha256)
            self._allowed(session, caller, "library.gc", details={"removed": report.removed})
            return report

    # -- distribution ------------------------------------------------------------------

    def trust(self, name: str, public_key: str | os.PathLike, *, api_key: str | None = None) -> SignerInfo:
        """Accept bundles signed by ``public_key`` (PEM file, PEM text or hex)."""
        _check_name("signer", name)
        key_hex = raw_hex(load_public_key(public_key))
        with self._operation("signer.trust", api_key, "admin") as (session, caller):
            if session.scalars(select(SignerRow).where(SignerRow.public_key == key_hex)).first():
                raise KeylockedError(f"public key {key_hex[:16]}… is already trusted")
            row = SignerRow(name=name, public_key=key_hex, created_by=caller.principal)
            session.add(row)
            session.flush()
            self._allowed(session, caller, "signer.trust", details={"name": name, "public_key": key_hex})
            return SignerInfo(row.name, row.public_key, row.created_by, row.created_at)

    def signers(self, *, api_key: str | None = None) -> list[SignerInfo]:
        with self._operation("signer.list", api_key, "use") as (session, caller):
            rows = session.scalars(select(SignerRow).order_by(SignerRow.name)).all()
            self._allowed(session, caller, "signer.list")
            return [SignerInfo(r.name, r.public_key, r.created_by, r.created_at) for r in rows]

    def export(
        self,
        reference: str,
        destination: str | os.PathLike,
        *,
        signing_key: str | os.PathLike | None = None,
        api_key: str | None = None,
    ) -> Path:
        """Write ``NAME@VERSION`` as a bundle (folder, .tar or .zip), signed with an ed25519 key file."""
        name, number = parse_reference(reference)
        if number is None:
            raise KeylockedError(f"give the version to export: {name}@N")
        key = load_private_key(signing_key) if signing_key else None
        with self._operation("bundle.export", api_key, "publish", concept=name, version=number) as (session, caller):
            row = self._version(session, name, number)
            if row.status == "retired":
                raise _Refusal(f"{name}@{number} is retired", caller)
            data = self.store.read(row.sha256)
            concept = row.concept
            manifest = {
                "format": BUNDLE_FORMAT,
                "format_version": BUNDLE_FORMAT_VERSION,
                "concept": name,
                "version": number,
                "status": row.status,
                "notes": row.notes,
                "placeholder_token": concept.placeholder_token,
                "superclass_token": concept.superclass_token,
                "base_model": {
                    "fingerprint": concept.base_model.fingerprint,
                    "name": concept.base_model.name,
                    "covariance_sha256": concept.base_model.covariance_sha256,
                },
                "files": {CONCEPT_MEMBER: {"sha256": row.sha256, "bytes": row.size}},
                "created_by": row.created_by,
                "created_at": row.created_at.isoformat(),
                "exported_by": caller.principal,
                "exported_at": audit.now_iso(),
                "signer_public_key": raw_hex(key.public_key()) if key else "",
            }
            path = write_bundle(destination, manifest, data, key)
            self._allowed(
                session,
                caller,
                "bundle.export",
                concept=name,
                version=number,
                details={"sha256": row.sha256, "signed": key is not None, "destination": str(path)},
            )
            return path

    def import_bundle(
        self,
        source: str | os.PathLike,
        *,
        name: str | None = None,
        allow_unsigned: bool = False,
        api_key: str | None = None,
    ) -> VersionInfo:
        """Check a bundle's signature (trusted signer) and sha256s, then add it as a new draft version."""
        bundle = read_bundle(source)
        name = _check_name("concept", name or str(bundle.manifest.get("concept", "")))
        with self._operation("bundle.import", api_key, "publish", concept=name) as (session, caller):
            listed = bundle.manifest.get("files", {}).get(CONCEPT_MEMBER, {})
            sha256 = sha256_bytes(bundle.concept_bytes)
            if listed.get("sha256") != sha256 or listed.get("bytes") != len(bundle.concept_bytes):
                raise _Refusal(f"{source}: tampered bundle (concept file does not match the manifest's sha256)", caller)
            trusted = {key: name for key, name in session.execute(select(SignerRow.public_key, SignerRow.name))}
            status, signer = signature_status(bundle, trusted)
            if status == "invalid":
                raise _Refusal(f"{source}: tampered bundle (the signature does not match the manifest)", caller)
            if status != "valid" and not allow_unsigned:
                why = "unsigned" if status == "unsigned" else f"signed by an untrusted key {signer[:16]}…"
                raise _Refusal(f"{source}: {why} bundle (trust the signer, or pass --allow-unsigned)", caller)
            concept_file = _parse_concept(bundle.concept_bytes, str(source))
            if concept_file.base_model_fingerprint != bundle.manifest.get("base_model", {}).get("fingerprint"):
                raise _Refusal(f"{source}: the manifest's base model does not match the concept file", caller)
            details = {
                "bundle": str(source),
                "signature": status,
                "signer": signer,
                "origin": f"{bundle.manifest.get('concept')}@{bundle.manifest.get('version')}",
            }
            if status != "valid":
                self._allowed(
                    session, caller, "bundle.accept-unsigned", concept=name, reason="--allow-unsigned", details=details
                )
            notes = str(bundle.manifest.get("notes", "")) or f"imported from {details['origin']}"
            base_name = str(bundle.manifest.get("base_model", {}).get("name", ""))
            return self._add_version(
                session, caller, bundle.concept_bytes, name, notes, base_name, str(source), details
            )

    # -- lookups -----------------------------------------------------------------------

    @staticmethod
    def _concept(session: Session, name: str) -> ConceptRow:
        row = session.scalars(select(ConceptRow).where(ConceptRow.name == name)).first()
        if row is None:
            raise KeylockedError(f"unknown concept {name!r}")
        return row

    def _version(self, session: Session, name: str, number: int) -> VersionRow:
        concept = self._concept(session, name)
        row = next((v for v in concept.versions if v.number == number), None)
        if row is None:
            known = ", ".join(str(v.number) for v in concept.versions) or "none"
            raise KeylockedError(f"unknown version {name}@{number} (versions: {known})")
        return row

    @staticmethod
    def _grant(session: Session, project_id: int, concept_id: int) -> GrantRow | None:
        return session.scalars(
            select(GrantRow).where(GrantRow.project_id == project_id, GrantRow.concept_id == concept_id)
        ).first()


# ---------------------------------------------------------------------------------------
# Helpers.


def _owner_name() -> str:
    try:
        return f"owner:{getpass.getuser()}"
    except (KeyError, OSError):
        return "owner"


def _read_file(path: str | os.PathLike) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise KeylockedError(f"concept file not found: {path}")
    return path.read_bytes()


def _parse_concept(data: bytes, source: str) -> Concept:
    """Validate the bytes as a complete concept file (the same reader generation uses)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "concept.safetensors"
        path.write_bytes(data)
        try:
            return Concept.load(path)
        except KeylockedError as error:
            raise KeylockedError(f"{source}: {str(error).split(': ', 1)[-1]}") from None


def generate_key_pair(path: str | os.PathLike) -> tuple[Path, Path]:
    """A new ed25519 signing key (``path``) and its public key (``path.pub``) for bundles."""
    return generate_signing_key(path)


def _version_info(row: VersionRow, name: str) -> VersionInfo:
    return VersionInfo(
        concept=name,
        number=row.number,
        sha256=row.sha256,
        size=row.size,
        status=row.status,
        created_by=row.created_by,
        created_at=row.created_at,
        notes=row.notes or "",
        status_by=row.status_by,
        status_at=row.status_at,
        metadata=json.loads(row.file_metadata or "{}"),
    )


def _concept_info(row: ConceptRow, grants: Iterable[GrantRow] = ()) -> ConceptInfo:
    return ConceptInfo(
        name=row.name,
        placeholder_token=row.placeholder_token,
        superclass_token=row.superclass_token,
        base_model_fingerprint=row.base_model.fingerprint,
        base_model_name=row.base_model.name,
        created_by=row.created_by,
        created_at=row.created_at,
        versions=[_version_info(v, row.name) for v in row.versions],
        grants=[_grant_info(g) for g in grants],
    )


def _grant_info(row: GrantRow) -> GrantInfo:
    return GrantInfo(row.project.name, row.concept.name, row.pinned_version, row.created_by, row.created_at)


def _key_info(row: ApiKeyRow) -> KeyInfo:
    return KeyInfo(
        prefix=f"kl_{row.prefix}",
        principal=row.principal.name,
        scopes=_split_csv(row.scopes),
        projects=_split_csv(row.projects),
        created_by=row.created_by,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )
