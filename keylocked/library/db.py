"""The library's tables (SQLAlchemy 2) and its engine: SQLite by default, PostgreSQL for a team.

Alembic (``migrations/``) owns the schema in a database; these classes mirror the latest revision.
Every write goes through ``write_session``, which serializes writers: ``BEGIN IMMEDIATE`` on SQLite,
a transaction-scoped advisory lock on PostgreSQL. That keeps the audit hash chain linear and gives
two processes adding versions of one concept at once distinct numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime, timezone

from sqlalchemy import (
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

WRITE_LOCK_KEY = 0x6B6C6962  # "klib": the PostgreSQL advisory lock all library writers take
STATUSES = ("draft", "approved", "retired")
SCOPES = ("use", "publish", "approve", "admin")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class BaseModelRow(Base):
    __tablename__ = "base_models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(128), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    covariance_sha256: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ConceptRow(Base):
    __tablename__ = "concepts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    placeholder_token: Mapped[str] = mapped_column(String(200))
    superclass_token: Mapped[str] = mapped_column(String(200))
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    base_model: Mapped[BaseModelRow] = relationship()
    versions: Mapped[list[VersionRow]] = relationship(back_populates="concept", order_by="VersionRow.number")


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("concept_id", "number", name="uq_versions_concept_number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id"))
    number: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(Integer)
    file_metadata: Mapped[str] = mapped_column(Text, default="{}")  # JSON: the concept file's header metadata
    status: Mapped[str] = mapped_column(String(16), default="draft")
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status_by: Mapped[str] = mapped_column(String(200), default="")
    status_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    notes: Mapped[str] = mapped_column(Text, default="")  # revision 0002
    concept: Mapped[ConceptRow] = relationship(back_populates="versions")


class ProjectRow(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class GrantRow(Base):
    __tablename__ = "grants"
    __table_args__ = (UniqueConstraint("project_id", "concept_id", name="uq_grants_project_concept"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id"))
    pinned_version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: any approved version
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    project: Mapped[ProjectRow] = relationship()
    concept: Mapped[ConceptRow] = relationship()


class PrincipalRow(Base):
    __tablename__ = "principals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)  # non-secret, for lookup and display
    secret_hash: Mapped[str] = mapped_column(String(200))  # argon2id, salted
    principal_id: Mapped[int] = mapped_column(ForeignKey("principals.id"))
    scopes: Mapped[str] = mapped_column(String(100))  # comma-separated
    projects: Mapped[str] = mapped_column(Text, default="")  # comma-separated; empty: any project
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    principal: Mapped[PrincipalRow] = relationship()


class SignerRow(Base):
    """An ed25519 public key whose bundles this library accepts."""

    __tablename__ = "trusted_signers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    public_key: Mapped[str] = mapped_column(String(64), unique=True)  # raw 32 bytes, hex
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditRow(Base):
    """One decision or change. Append-only; ``row_hash`` chains it to the row before (audit.py)."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # assigned under the write lock
    at: Mapped[str] = mapped_column(String(40), index=True)  # ISO 8601 UTC text: hashed exactly as stored
    actor: Mapped[str] = mapped_column(String(200))
    key_prefix: Mapped[str] = mapped_column(String(32), default="")
    action: Mapped[str] = mapped_column(String(64))
    concept: Mapped[str] = mapped_column(String(200), default="")
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    project: Mapped[str] = mapped_column(String(200), default="")
    outcome: Mapped[str] = mapped_column(String(16))  # allowed | denied | marker
    reason: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[str] = mapped_column(Text, default="{}")  # canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64))


Index("ix_audit_log_concept", AuditRow.concept)  # revision 0002


def make_engine(url: str) -> Engine:
    """An engine whose transactions serialize writers (see module docstring)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None  # let SQLAlchemy's "begin" below issue BEGIN itself
            dbapi_connection.execute("PRAGMA foreign_keys=ON")
            dbapi_connection.execute("PRAGMA journal_mode=WAL")

        @event.listens_for(engine, "begin")
        def _begin(connection) -> None:
            # IMMEDIATE takes the write lock at BEGIN, so read-then-write sequences cannot interleave.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


@contextlib.contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """One serialized transaction: commit on success, roll back on any error (nothing half-written)."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        if engine.dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK_KEY})
        yield session


# ---------------------------------------------------------------------------------------
# Schema migrations (Alembic, run programmatically).


def _alembic_config(connection):
    from pathlib import Path

    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None: an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade_schema(engine: Engine, revision: str = "head") -> str:
    """Bring the database to ``revision`` (all pending migrations in one transaction where the backend allows)."""
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), revision)
    return current_revision(engine) or ""
