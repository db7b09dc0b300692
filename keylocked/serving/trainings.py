"""Training jobs of the service: accepted by any replica, run by the replica that accepted them.

A job's state lives in the library's database (table ``keylocked_serve_trainings``), so every
replica can report it; its input images and working files live on the replica that runs it.
The trained concept becomes a *draft* version in the library only after training finished and
the file was written whole; a replica that restarts marks the jobs it was running as failed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..base_model import KeylockedError
from ..library import Library

logger = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed")
RESTART_ERROR = "the server was stopped during this job (replica {replica} restarted); nothing was registered"

metadata = sa.MetaData()
trainings = sa.Table(
    "keylocked_serve_trainings",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("concept", sa.String(128), nullable=False),
    sa.Column("token", sa.String(128), nullable=False),
    sa.Column("super_category", sa.String(128), nullable=False),
    sa.Column("project", sa.String(128), nullable=True),
    sa.Column("step", sa.Integer, nullable=False, default=0),
    sa.Column("total_steps", sa.Integer, nullable=False),
    sa.Column("version", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("replica", sa.String(255), nullable=False, index=True),
    sa.Column("created_by", sa.String(255), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class TrainingRequest:
    """What a job trains: validated by the HTTP layer before it is accepted."""

    concept: str
    token: str
    super_category: str
    images: list[bytes]  # encoded image files, already checked to decode
    steps: int
    project: str | None = None
    created_by: str | None = None
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    mask: str = "attention"
    principal: Any = field(default=None, repr=False)  # who registers the result (in memory only)


# train(request, images_dir, output_dir, on_step) -> path of the concept file
TrainFunction = Callable[[TrainingRequest, Path, Path, Callable[[int], None]], Path]
# register(request, concept_file, job_id) -> the new draft version number
RegisterFunction = Callable[[TrainingRequest, Path, str], int]


class TrainingJobs:
    """Queue, run and report training jobs of one replica."""

    def __init__(
        self,
        library: Library,
        replica: str,
        train: TrainFunction,
        register: RegisterFunction,
        workers: int = 1,
        work_dir: str | Path | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.engine: Engine = library.engine  # the jobs table only; library tables are the library's
        self.replica = replica
        self._train = train
        self._register = register
        self.workers = workers
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "keylocked-serve"
        self._executor = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="keylocked-train") if workers else None
        )
        self._on_change = on_change or (lambda: None)
        self._closing = threading.Event()
        library.create_tables(metadata)
        self.failed_on_start = self._fail_unfinished()

    # -- state ------------------------------------------------------------------------------
    def _fail_unfinished(self) -> int:
        """Jobs this replica had accepted and not finished died with its previous process: mark them
        failed and remove their working files."""
        unfinished = (trainings.c.replica == self.replica) & trainings.c.status.not_in(TERMINAL)
        with self.engine.begin() as connection:
            ids = connection.execute(sa.select(trainings.c.id).where(unfinished)).scalars().all()
            connection.execute(
                trainings.update()
                .where(unfinished)
                .values(status="failed", error=RESTART_ERROR.format(replica=self.replica), updated_at=_now())
            )
        for job_id in ids:
            shutil.rmtree(self.work_dir / job_id, ignore_errors=True)
        if ids:
            logger.warning("marked %d unfinished training job(s) of replica %s as failed", len(ids), self.replica)
        return len(ids)

    def _update(self, job_id: str, **values: Any) -> None:
        with self.engine.begin() as connection:
            connection.execute(trainings.update().where(trainings.c.id == job_id).values(updated_at=_now(), **values))
        self._on_change()

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(trainings).where(trainings.c.id == job_id)).mappings().first()
        return dict(row) if row else None

    def counts(self) -> dict[str, int]:
        """Jobs of this replica by status."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(trainings.c.status, sa.func.count())
                .where(trainings.c.replica == self.replica)
                .group_by(trainings.c.status)
            ).all()
        return {status: count for status, count in rows}

    # -- running ----------------------------------------------------------------------------
    def submit(self, request: TrainingRequest) -> dict[str, Any]:
        if self._executor is None:
            raise KeylockedError(
                "this replica does not run training jobs (--training_workers 0); send them to one that does"
            )
        job_id = str(uuid.uuid4())
        job_dir = self.work_dir / job_id
        images_dir = job_dir / "images"
        images_dir.mkdir(parents=True)
        for index, data in enumerate(request.images):
            (images_dir / f"image-{index:02d}.png").write_bytes(data)  # PNG: re-encoded by the HTTP layer
        now = _now()
        with self.engine.begin() as connection:
            connection.execute(
                trainings.insert().values(
                    id=job_id,
                    status="queued",
                    concept=request.concept,
                    token=request.token,
                    super_category=request.super_category,
                    project=request.project,
                    step=0,
                    total_steps=request.steps,
                    replica=self.replica,
                    created_by=request.created_by,
                    created_at=now,
                    updated_at=now,
                )
            )
        self._on_change()
        self._executor.submit(self._run, job_id, request, job_dir)
        return self.get(job_id)

    def _run(self, job_id: str, request: TrainingRequest, job_dir: Path) -> None:
        if self._closing.is_set():
            return
        self._update(job_id, status="running")
        last = [0]

        def on_step(step: int) -> None:
            if self._closing.is_set():
                raise _Stopped()
            if step != last[0]:
                last[0] = step
                self._update(job_id, step=min(step, request.steps))

        try:
            concept_file = self._train(request, job_dir / "images", job_dir / "output", on_step)
            if self._closing.is_set():
                raise _Stopped()
            # The one step that makes a version: the library writes the blob, then its row.
            version = self._register(request, concept_file, job_id)
        except _Stopped:
            logger.info("training job %s stopped by shutdown", job_id)
            self._update(job_id, status="failed", error="the server shut down during this job; nothing was registered")
        except Exception as error:  # a job's failure is reported on the job, never raised into the server
            logger.exception("training job %s failed", job_id)
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            self._update(job_id, status="failed", error=message[:2000])
        else:
            self._update(job_id, status="succeeded", step=request.steps, version=version)
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)

    async def events(
        self, job_id: str, poll_seconds: float = 0.25, heartbeat_seconds: float = 15.0
    ) -> AsyncIterator[str]:
        """Server-sent events: one ``progress`` event per change, then ``done``; read from the
        database, so any replica can stream any job."""
        last: tuple | None = None
        quiet = 0.0
        while True:
            job = await asyncio.to_thread(self.get, job_id)
            if job is None:
                yield _sse("error", {"detail": f"training job {job_id} not found"})
                return
            state = (job["status"], job["step"], job["version"], job["error"])
            if state != last:
                last, quiet = state, 0.0
                yield _sse("done" if job["status"] in TERMINAL else "progress", _public(job))
                if job["status"] in TERMINAL:
                    return
            elif quiet >= heartbeat_seconds:
                quiet = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(poll_seconds)
            quiet += poll_seconds

    def close(self, wait: bool = True) -> None:
        """Stop taking jobs; running ones stop at their next step and are marked failed."""
        self._closing.set()
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
        self._fail_unfinished_on_close()

    def _fail_unfinished_on_close(self) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                trainings.update()
                .where(trainings.c.replica == self.replica, trainings.c.status == "queued")
                .values(status="failed", error="the server shut down before this job started", updated_at=_now())
            )


class _Stopped(Exception):
    pass


def _public(job: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in job.items()}


def _sse(event: str, data: dict[str, Any]) -> str:
    import json

    return f"event: {event}\ndata: {json.dumps(data, sort_keys=True)}\n\n"
