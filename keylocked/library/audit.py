"""The append-only, hash-chained audit log.

Each row stores ``prev_hash`` (the row before's ``row_hash``) and
``row_hash = sha256(canonical JSON of its content with prev_hash)``. An edited row no longer matches
its hash; an inserted or deleted row breaks the link or the id sequence. A retention prune deletes
a prefix and leaves one ``marker`` row carrying the cut's last hash, so the rest still verifies;
the prune itself is a row at the end that repeats that hash.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from ..base_model import KeylockedError
from ..io import atomic_path
from .db import AuditRow

GENESIS = "0" * 64
FIELDS = ("id", "at", "actor", "key_prefix", "action", "concept", "version", "project", "outcome", "reason", "details")
EXPORT_FORMATS = ("csv", "jsonl")


@dataclass(frozen=True)
class AuditEntry:
    """One audit row as the API returns it (``details`` decoded)."""

    id: int
    at: str
    actor: str
    key_prefix: str
    action: str
    concept: str
    version: int | None
    project: str
    outcome: str
    reason: str
    details: dict[str, Any]
    prev_hash: str
    row_hash: str

    @classmethod
    def of(cls, row: AuditRow) -> AuditEntry:
        return cls(
            **{name: getattr(row, name) for name in FIELDS if name != "details"},
            details=json.loads(row.details),
            prev_hash=row.prev_hash,
            row_hash=row.row_hash,
        )


@dataclass
class ChainReport:
    rows: int
    head_hash: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def row_hash(row: AuditRow) -> str:
    content = {name: getattr(row, name) for name in FIELDS}
    content["prev_hash"] = row.prev_hash
    return hashlib.sha256(canonical_json(content).encode()).hexdigest()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def append(
    session: Session,
    *,
    actor: str,
    action: str,
    outcome: str,
    key_prefix: str = "",
    concept: str = "",
    version: int | None = None,
    project: str = "",
    reason: str = "",
    details: dict[str, Any] | None = None,
) -> AuditRow:
    """Add one row at the end of the chain. Call inside ``db.write_session`` (writers are serialized)."""
    last = session.scalars(select(AuditRow).order_by(AuditRow.id.desc()).limit(1)).first()
    row = AuditRow(
        id=(last.id + 1) if last else 1,
        at=now_iso(),
        actor=actor,
        key_prefix=key_prefix or "",
        action=action,
        concept=concept or "",
        version=version,
        project=project or "",
        outcome=outcome,
        reason=reason or "",
        details=canonical_json(details or {}),
        prev_hash=last.row_hash if last else GENESIS,
    )
    row.row_hash = row_hash(row)
    session.add(row)
    session.flush()
    return row


def verify_chain(session: Session) -> ChainReport:
    """Every problem in the chain, one line each (an empty list: intact)."""
    rows = session.scalars(select(AuditRow).order_by(AuditRow.id)).all()
    problems: list[str] = []
    expected_prev, previous_id = GENESIS, None
    prune_cuts = {
        (json.loads(r.details).get("cut_id"), json.loads(r.details).get("cut_hash"))
        for r in rows
        if r.action == "audit.prune" and r.outcome == "allowed"
    }
    for index, row in enumerate(rows):
        if row.outcome == "marker":
            if index != 0:
                problems.append(f"row {row.id}: a prune marker in the middle of the chain (rows inserted)")
            elif (row.id, row.row_hash) not in prune_cuts:
                problems.append(f"row {row.id}: prune marker not confirmed by any audit.prune row")
            expected_prev, previous_id = row.row_hash, row.id
            continue
        if previous_id is not None and row.id != previous_id + 1:
            problems.append(f"rows {previous_id + 1}..{row.id - 1} are missing (deleted)")
        elif previous_id is None and row.id != 1:
            problems.append(f"rows 1..{row.id - 1} are missing (deleted without a prune marker)")
        if row.prev_hash != expected_prev:
            problems.append(f"row {row.id}: does not link to the row before it (a row was inserted or deleted)")
        if row_hash(row) != row.row_hash:
            problems.append(f"row {row.id}: content does not match its hash (edited)")
        expected_prev, previous_id = row.row_hash, row.id
    return ChainReport(rows=len(rows), head_hash=expected_prev, problems=problems)


def prune_before(session: Session, before: str) -> tuple[int, int | None, str]:
    """Delete the rows older than ``before`` (ISO date/time, UTC); (rows removed, cut id, cut hash)."""
    cut = session.scalars(select(AuditRow).where(AuditRow.at < before).order_by(AuditRow.id.desc()).limit(1)).first()
    if cut is None or cut.outcome == "marker":
        return 0, None, ""
    removed = session.execute(delete(AuditRow).where(AuditRow.id <= cut.id)).rowcount
    marker = AuditRow(
        id=cut.id,
        at=cut.at,
        actor="keylocked",
        key_prefix="",
        action="audit.pruned",
        concept="",
        version=None,
        project="",
        outcome="marker",
        reason=f"rows up to {cut.id} pruned (older than {before})",
        details=canonical_json({"before": before}),
        prev_hash=GENESIS,
        row_hash=cut.row_hash,  # the cut's last hash: the next row links to it
    )
    session.add(marker)
    session.flush()
    return removed, cut.id, cut.row_hash


def export_entries(entries: Iterable[AuditEntry], path: str | os.PathLike, fmt: str | None = None) -> int:
    """Write CSV or JSON Lines (chosen by ``fmt`` or the file suffix); the number of rows written."""
    path = Path(path)
    fmt = fmt or {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(path.suffix.lower())
    if fmt not in EXPORT_FORMATS:
        raise KeylockedError(f"audit export format must be one of {EXPORT_FORMATS} (or a .csv/.jsonl file name)")
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as out:
        names = [f.name for f in AuditEntry.__dataclass_fields__.values()]
        writer = csv.DictWriter(out, fieldnames=names) if fmt == "csv" else None
        if writer:
            writer.writeheader()
        for entry in entries:
            record = asdict(entry)
            if writer:
                writer.writerow({**record, "details": canonical_json(record["details"])})
            else:
                out.write(canonical_json(record) + "\n")
            count += 1
    return count
