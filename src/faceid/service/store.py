"""The database: identities and their faces, uploaded images, generation jobs and their images, each row with its
owner.

SQLAlchemy 2, on SQLite (in the data dir, the one-machine default) or PostgreSQL (``postgresql+psycopg://...``,
what several processes or machines share); the same code runs on both, and the tests run the service on both.
With SQLite, deleted rows are overwritten on disk (``secure_delete``): an identity's data that is deleted is gone,
not left in free pages. Jobs are rows too, so a restart finds every job that was queued or running
(``unfinished_jobs``).

The schema is created and upgraded at start (``upgrade_schema``): missing tables are created, and columns added
to a table since a database was made are added to it, from the models below. Changes are additive: a new column
is nullable (old rows read None) or has a server default. That needs no migration scripts, so no Alembic: it
becomes worth it for the first change that is not additive (a renamed or retyped column, a NOT NULL one filled from
old rows), which ``upgrade_schema`` refuses to guess.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    and_,
    create_engine,
    delete,
    event,
    func,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload, sessionmaker
from sqlalchemy.schema import CreateColumn

from ..errors import FaceIDError

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


class Base(DeclarativeBase):
    pass


class Identity(Base):
    __tablename__ = "identities"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    created: Mapped[float] = mapped_column(Float)
    faces: Mapped[list[IdentityFace]] = relationship(
        back_populates="identity", cascade="all, delete-orphan", order_by="IdentityFace.k"
    )


class IdentityFace(Base):
    """The face used from photo ``k`` of an identity (the largest one found); its arrays are in the data dir."""

    __tablename__ = "identity_faces"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    identity_id: Mapped[str] = mapped_column(ForeignKey("identities.id", ondelete="CASCADE"), index=True)
    owner: Mapped[str] = mapped_column(String(64))
    k: Mapped[int] = mapped_column(Integer)
    box: Mapped[list] = mapped_column(JSON)
    score: Mapped[float] = mapped_column(Float)
    faces_found: Mapped[int] = mapped_column(Integer)
    # The insightface packs whose recognizers embedded it (their vectors are in its face file): what methods it can
    # run with (InstantID reads antelopev2's). None: a row of an earlier version, embedded by buffalo_l only.
    recognizers: Mapped[list | None] = mapped_column(JSON, nullable=True)
    identity: Mapped[Identity] = relationship(back_populates="faces")


def face_recognizers(face: IdentityFace) -> list[str]:
    """The packs whose embeddings ``face`` has (a row of an earlier version: buffalo_l's only)."""
    return list(face.recognizers) if face.recognizers else ["buffalo_l"]


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_ns: Mapped[int] = mapped_column(BigInteger, index=True)  # queue order
    identity_ids: Mapped[list] = mapped_column(JSON)  # one per prompt
    settings: Mapped[dict] = mapped_column(JSON)  # resolved, one seed per image
    # The input images by upload id (``faceid.service.inputs.JobInputs``, as JSON); empty: text-to-image.
    inputs: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    started: Mapped[float | None] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    # The shared queue (``faceid.service.jobs.JobQueue``): any process may claim a queued job. Jobs of the same
    # batch key can share one pipeline call; ``worker`` is the process (``WorkerProcess``) running it, whose
    # heartbeat says it is alive; ``step`` its progress; ``cancel_requested`` is read by that worker at its next
    # step; ``preview`` the newest preview's file in the data dir (while it runs). All nullable: rows of an earlier
    # version read None (no batch key: a batch of its own).
    batch_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cancel_requested: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    passed_over: Mapped[int | None] = mapped_column(Integer, nullable=True)
    preview: Mapped[str | None] = mapped_column(Text, nullable=True)
    images: Mapped[list[ImageRow]] = relationship(back_populates="job", order_by="ImageRow.index")


class JobEvent(Base):
    """One event of a job (what ``GET /v1/generations/{id}/events`` streams), numbered in order by ``id``. A
    preview's images are in a file of the data dir (``data``: its path); only the newest preview's row is kept."""

    __tablename__ = "job_events"
    # numbers never reused (SQLite's AUTOINCREMENT): a reader that saw a preview that was then deleted still gets
    # the next event
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict] = mapped_column(JSON)


class WorkerProcess(Base):
    """A process whose workers run jobs, alive while its ``heartbeat`` (Unix time) is recent: a job whose worker is
    gone is queued again by whichever process notices (``Service.recover``)."""

    __tablename__ = "worker_processes"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    heartbeat: Mapped[float] = mapped_column(Float)


class ImageRow(Base):
    __tablename__ = "images"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    settings: Mapped[dict] = mapped_column(JSON)
    # how much it looks like its person (each person's, for several): ``faceid.service.core.likeness``
    score: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    job: Mapped[Job] = relationship(back_populates="images")


class Upload(Base):
    """An uploaded image (an img2img, mask, control or swap target image); its PNG is in the data dir."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str | None] = mapped_column(String(200))  # the uploaded file's name, to show
    width: Mapped[int] = mapped_column(Integer)  # upright, as stored
    height: Mapped[int] = mapped_column(Integer)
    created: Mapped[float] = mapped_column(Float)


class OwnerOption(Base):
    """A setting an owner (an API key) keeps between requests: what a protocol's client sets once and expects
    remembered (the AUTOMATIC1111 API's ``sd_model_checkpoint``: the person its requests draw)."""

    __tablename__ = "owner_options"

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)


# The driver faceid installs for each database that needs one (pyproject's dependencies): ``postgresql://`` means
# psycopg 3 here, not SQLAlchemy's default (psycopg2, which faceid does not install).
DRIVERS = {"postgresql": "psycopg"}


def check_database_url(url: str | None) -> str | None:
    """``--database-url`` checked before anything loads: a URL that SQLAlchemy reads, for a database whose driver is
    installed; ``postgresql://...`` gets faceid's driver (``postgresql+psycopg://...``). None stays None (SQLite in
    the data dir)."""
    if url is None:
        return None
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise FaceIDError(
            f"--database-url {url!r} is not a database URL: give postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE "
            "or sqlite:////PATH/faceid.db"
        ) from None
    if parsed.drivername in DRIVERS:
        parsed = parsed.set(drivername=f"{parsed.drivername}+{DRIVERS[parsed.drivername]}")
    shown = parsed.render_as_string(hide_password=True)
    try:
        parsed.get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise FaceIDError(
            f"--database-url {shown}: SQLAlchemy knows no database {parsed.drivername!r}: use postgresql:// or sqlite://"
        ) from None
    except ImportError as exc:
        raise FaceIDError(
            f"--database-url {shown}: its driver is not installed ({exc}): pip install 'psycopg[binary]' for "
            "PostgreSQL (faceid's dependencies pin it)"
        ) from None
    return parsed.render_as_string(hide_password=False)


class SchemaError(FaceIDError):
    """The database's schema cannot be brought up to this version's (a change that is not additive)."""


# A key of PostgreSQL's advisory locks: processes starting at once (several ingress replicas) upgrade the schema
# one after the other, each in one transaction (PostgreSQL's DDL is transactional), and never twice.
SCHEMA_LOCK = 0x66616365  # "face"
# The queue's advisory lock (PostgreSQL): a submission counts the queue and adds its job under it
QUEUE_LOCK = 0x71756575  # "queu"


def upgrade_schema(connection: Connection, metadata=None) -> list[str]:
    """Bring the database to the schema of ``metadata`` (default: this module's): create the tables it lacks (with
    their indexes), add the columns its tables lack (compiled for the database's dialect, and the indexes that
    name them). What was added, as ``table`` or ``table.column``; an empty list when nothing was missing.

    ``create_all`` makes missing tables only, never columns of existing ones: a database made by an earlier
    version gets those here. A missing column must be nullable or have a server default (its existing rows need a
    value): anything else, or a column that changed type, is a ``SchemaError`` that stops the start."""
    metadata = metadata if metadata is not None else Base.metadata
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
    found = inspect(connection)
    existing = set(found.get_table_names())
    added = [table.name for table in metadata.sorted_tables if table.name not in existing]
    metadata.create_all(connection)
    preparer = connection.dialect.identifier_preparer
    for table in metadata.sorted_tables:
        if table.name not in existing:
            continue
        have = {column["name"] for column in found.get_columns(table.name)}
        missing = [column for column in table.columns if column.name not in have]
        for column in missing:
            if column.primary_key or not (column.nullable or column.server_default is not None):
                raise SchemaError(
                    f"the database's table {table.name} lacks column {column.name}, which cannot be added to "
                    "existing rows (it is not nullable and has no server default): migrate the database by hand or "
                    "start on a new one"
                )
            spec = CreateColumn(column).compile(dialect=connection.dialect)
            connection.exec_driver_sql(f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {spec}")
            added.append(f"{table.name}.{column.name}")
        names = {column.name for column in missing}
        for index in table.indexes:
            if names & {column.name for column in index.columns}:
                index.create(connection)
    return added


class Store:
    """Sessions on one engine; every method opens its own, so threads (requests, workers) can share it."""

    def __init__(self, url: str) -> None:
        kwargs: dict[str, Any] = {}
        self.dialect = make_url(url).get_backend_name()
        self.sqlite = self.dialect == "sqlite"
        if self.sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            kwargs["json_deserializer"] = read_json  # SQLite keeps JSON as text, which may no longer parse
        else:
            # a server restarted (or a connection dropped) since a pooled connection was opened: test each one as
            # it is taken, so no request fails on a dead connection
            kwargs["pool_pre_ping"] = True
        self.engine = create_engine(url, **kwargs)
        if self.sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            with self.engine.begin() as connection:
                added = upgrade_schema(connection)
        except OperationalError as exc:  # no server there, no such database, refused login
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
            raise FaceIDError(
                f"cannot open the database {self.engine.url.render_as_string(hide_password=True)}: {reason} (is the "
                "server running, and was the database created: createdb -O USER DATABASE?)"
            ) from exc
        if added and not set(added) >= set(Base.metadata.tables):  # an existing database that was upgraded
            logger.warning("database upgraded: added %s", ", ".join(added))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ identities
    def add_identity(self, identity: Identity) -> None:
        with self.session() as s:
            s.add(identity)

    def identity(self, identity_id: str, owner: str) -> Identity | None:
        with self.session() as s:
            found = s.get(Identity, identity_id)
            if found is None or found.owner != owner:
                return None
            _ = list(found.faces)  # loaded before the session closes
            return found

    def identities(self, owner: str) -> list[Identity]:
        with self.session() as s:
            rows = s.scalars(select(Identity).where(Identity.owner == owner).order_by(Identity.created)).all()
            for row in rows:
                _ = list(row.faces)
            return list(rows)

    def identity_exists(self, identity_id: str, owner: str) -> bool:
        return self.identity(identity_id, owner) is not None

    def delete_identity(self, identity_id: str, owner: str) -> bool:
        return self._delete_owned(Identity, identity_id, owner)

    def _delete_owned(self, model, row_id: str, owner: str) -> bool:
        """Delete row ``row_id`` of ``model``, only when it is the owner's (its dependent rows go with it, as the
        model's relationships cascade); whether it was."""
        with self.session() as s:
            found = s.get(model, row_id)
            if found is None or found.owner != owner:
                return False
            s.delete(found)
        self._forget()
        return True

    def _forget(self) -> None:
        """After a delete: with SQLite the write-ahead log still holds the deleted pages; fold it into the
        (zeroed, ``secure_delete``) file, so what was deleted is gone from disk."""
        if self.sqlite:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    # ------------------------------------------------------------------ jobs
    def add_job(self, job: Job) -> None:
        with self.session() as s:
            s.add(job)

    def job(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job; with ``owner``, only when it is theirs."""
        with self.session() as s:
            found = s.get(Job, job_id)
            if found is None or (owner is not None and found.owner != owner):
                return None
            _ = list(found.images)
            return found

    def update_job(self, job_id: str, **values: Any) -> None:
        with self.session() as s:
            found = s.get(Job, job_id)
            if found is not None:
                for key, value in values.items():
                    setattr(found, key, value)

    def jobs(self, owner: str, limit: int, before: tuple[int, str] | None = None) -> list[Job]:
        """The owner's jobs, newest first (by creation, then id), with their images; with ``before``
        (created_ns, id), only those after it in that order: the next page."""
        query = select(Job).where(Job.owner == owner).options(selectinload(Job.images))
        if before is not None:
            created, job_id = before
            query = query.where(or_(Job.created_ns < created, and_(Job.created_ns == created, Job.id < job_id)))
        with self.session() as s:
            return list(s.scalars(query.order_by(Job.created_ns.desc(), Job.id.desc()).limit(limit)))

    def delete_job(self, job_id: str, owner: str | None = None) -> list[str] | None:
        """Delete the job and its images' rows (with ``owner``, only theirs): the ids of the images it had, or
        None when there was no such job."""
        with self.session() as s:
            found = s.get(Job, job_id)
            if found is None or (owner is not None and found.owner != owner):
                return None
            images = [image.id for image in found.images]
            for image in found.images:
                s.delete(image)
            s.execute(delete(JobEvent).where(JobEvent.job_id == job_id))
            s.delete(found)
        self._forget()
        return images

    # ------------------------------------------------------------------ the shared queue
    @contextlib.contextmanager
    def queue_transaction(self) -> Iterator[Session]:
        """A transaction that holds the queue's lock from its start: what it counts stays true until it commits,
        whichever process (an ingress replica, a worker) writes. PostgreSQL: an advisory transaction lock; SQLite:
        the database's write lock, taken by a write that changes nothing (a read alone would not take it)."""
        with self.session() as s:
            if self.sqlite:
                s.execute(update(WorkerProcess).where(WorkerProcess.pid < 0).values(pid=WorkerProcess.pid))
            else:
                s.execute(select(func.pg_advisory_xact_lock(QUEUE_LOCK)))
            yield s

    def add_queued_job(self, job: Job, check) -> int:
        """Queue ``job`` (its row and its ``queued`` event): ``check(queued, running, queued_of_owner)`` first, under
        the queue's lock (it raises to refuse: a full queue, a key over its quota). Its position (0: next)."""
        with self.queue_transaction() as s:
            queued, running = self._counts(s)
            mine = s.scalar(select(func.count()).select_from(Job).where(Job.status == QUEUED, Job.owner == job.owner))
            check(queued, running, int(mine or 0))
            s.add(job)
            s.add(JobEvent(job_id=job.id, kind=QUEUED, data={"queue_position": queued}))
        return queued

    @staticmethod
    def _counts(s: Session) -> tuple[int, int]:
        found = dict(
            s.execute(
                select(Job.status, func.count()).where(Job.status.in_((QUEUED, RUNNING))).group_by(Job.status)
            ).all()
        )
        return int(found.get(QUEUED, 0)), int(found.get(RUNNING, 0))

    def queue_counts(self, owner: str | None = None) -> tuple[int, int]:
        """(queued, running) jobs; with ``owner``, theirs."""
        with self.session() as s:
            if owner is None:
                return self._counts(s)
            found = dict(
                s.execute(
                    select(Job.status, func.count())
                    .where(Job.status.in_((QUEUED, RUNNING)), Job.owner == owner)
                    .group_by(Job.status)
                ).all()
            )
            return int(found.get(QUEUED, 0)), int(found.get(RUNNING, 0))

    def position(self, job: Job) -> int:
        """Queued jobs ahead of ``job`` (in queue order: creation, then id)."""
        ahead = or_(Job.created_ns < job.created_ns, and_(Job.created_ns == job.created_ns, Job.id < job.id))
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(Job).where(Job.status == QUEUED, ahead)) or 0)

    def claim(self, worker: str, choose, window: int = 64) -> list[Job]:
        """Claim queued jobs for ``worker`` atomically: ``choose(rows)`` (the oldest ``window`` queued rows, in
        order) -> (the rows to run, the rows passed over, [(row, error)] to fail); the chosen become ``running``
        with ``worker``. PostgreSQL locks the rows it reads (``FOR UPDATE SKIP LOCKED``: other workers claim others
        meanwhile); SQLite takes its write lock first."""
        query = select(Job).where(Job.status == QUEUED).order_by(Job.created_ns, Job.id).limit(window)
        with self.queue_transaction() if self.sqlite else self.session() as s:
            if not self.sqlite:
                query = query.with_for_update(skip_locked=True)
            rows = list(s.scalars(query))
            if not rows:
                return []
            chosen, passed, failed = choose(rows)
            for row in passed:
                row.passed_over = (row.passed_over or 0) + 1
            for row, error in failed:
                row.status, row.error, row.finished = FAILED, error, time.time()
                s.add(JobEvent(job_id=row.id, kind=FAILED, data={"status": FAILED, "error": error}))
            for row in chosen:
                row.status, row.worker, row.step = RUNNING, worker, 0
            return chosen

    def request_cancel(self, job_id: str) -> str | None:
        """``"queued"``: it was queued and is cancelled now (its end and its event written); ``"running"``: its
        worker stops it at its next step (``cancel_requested``); None: it had ended."""
        with self.session() as s:
            cancelled = update(Job).where(Job.id == job_id, Job.status == QUEUED)
            if s.execute(cancelled.values(status=CANCELLED, finished=time.time())).rowcount:
                s.add(JobEvent(job_id=job_id, kind=CANCELLED, data={"status": CANCELLED}))
                return QUEUED
            running = update(Job).where(Job.id == job_id, Job.status == RUNNING).values(cancel_requested=True)
            return RUNNING if s.execute(running).rowcount else None

    def cancel_requested(self, job_ids: list[str]) -> set[str]:
        """Those of ``job_ids`` whose cancel was asked for (read by their worker at each step)."""
        with self.session() as s:
            return set(s.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.cancel_requested.is_(True))))

    def step_done(self, job_ids: list[str], step: int, total: int) -> set[str]:
        """Step ``step`` of ``total`` done for each of ``job_ids``: those whose cancel was asked for (returned: their
        worker stops them), and for the others their row and a ``progress`` event, in one transaction (a worker
        calls this once per denoising step: one commit per step, not two)."""
        with self.session() as s:
            cancelled = set(s.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.cancel_requested.is_(True))))
            going = [i for i in job_ids if i not in cancelled]
            if going:
                s.execute(update(Job).where(Job.id.in_(going)).values(step=step))
                s.add_all(JobEvent(job_id=i, kind="progress", data={"step": step, "total": total}) for i in going)
            return cancelled

    def set_preview(self, job_id: str, path: str, data: dict[str, Any]) -> str | None:
        """The job's newest preview (its images in the file ``path`` of the data dir): its event replaces the one
        before. The path of the one it replaces (None: none), whose file the caller deletes."""
        with self.session() as s:
            found = s.get(Job, job_id)
            if found is None or found.status != RUNNING:
                return path  # it ended meanwhile: no preview (its file goes)
            old, found.preview = found.preview, path
            s.execute(delete(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "preview"))
            s.add(JobEvent(job_id=job_id, kind="preview", data={**data, "file": path}))
            return old

    def events_since(self, job_id: str, after: int) -> list[tuple[int, str, dict]]:
        """The job's events after the one numbered ``after`` (0: all kept): (number, kind, data), in order."""
        with self.session() as s:
            rows = s.execute(
                select(JobEvent.id, JobEvent.kind, JobEvent.data)
                .where(JobEvent.job_id == job_id, JobEvent.id > after)
                .order_by(JobEvent.id)
            ).all()
            return [tuple(row) for row in rows]

    def requeue(self, job_id: str, worker: str | None) -> bool:
        """Put a running job back in the queue (its worker stops or is gone), as it was when submitted; only while
        ``worker`` still holds it (two processes noticing the same orphan, or one noticing it after another worker
        claimed it again, never put it back twice). Whether it was."""
        held = Job.worker.is_(None) if worker is None else Job.worker == worker
        with self.session() as s:
            query = update(Job).where(Job.id == job_id, Job.status == RUNNING, held)
            if not s.execute(query.values(status=QUEUED, started=None, worker=None, step=0, preview=None)).rowcount:
                return False
            s.execute(delete(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "preview"))
            return True

    # ------------------------------------------------------------------ worker processes
    def beat(self, worker: str, host: str, pid: int) -> None:
        """``worker``'s heartbeat: it is alive now."""
        with self.session() as s:
            found = s.get(WorkerProcess, worker)
            if found is None:
                s.add(WorkerProcess(id=worker, host=host, pid=pid, heartbeat=time.time()))
            else:
                found.heartbeat = time.time()

    def remove_worker(self, worker: str) -> None:
        with self.session() as s:
            s.execute(delete(WorkerProcess).where(WorkerProcess.id == worker))

    def running_jobs(self) -> list[tuple[Job, WorkerProcess | None]]:
        """Every running job with its worker process (None: none registered, or it was removed)."""
        with self.session() as s:
            rows = s.execute(
                select(Job, WorkerProcess)
                .outerjoin(WorkerProcess, WorkerProcess.id == Job.worker)
                .where(Job.status == RUNNING)
                .order_by(Job.created_ns)
            ).all()
            return [(job, process) for job, process in rows]

    def unfinished_jobs(self) -> list[Job]:
        """Jobs that were queued or running, oldest first (what a restart re-queues)."""
        with self.session() as s:
            return list(s.scalars(select(Job).where(Job.status.in_((QUEUED, RUNNING))).order_by(Job.created_ns)))

    def finish_job(
        self,
        job_id: str,
        status: str,
        error: str | None = None,
        images: list[ImageRow] = (),
        unfinished_only=False,
        event: dict[str, Any] | None = None,
    ) -> bool:
        """Set the job's end; with ``unfinished_only``, only if it has not ended yet; ``event``: the data of its last
        event (kind ``status``), added with it. Whether it was set."""
        # one conditional UPDATE, not a read then a write: a cancel and a worker finishing the same job at once
        # (two transactions, on any database) cannot both set its end
        query = update(Job).where(Job.id == job_id)
        if unfinished_only:
            query = query.where(Job.status.not_in(FINISHED))
        if error is not None:
            error = error.replace("\x00", "\\x00")  # PostgreSQL's text holds no NUL character
        with self.session() as s:
            if s.execute(query.values(status=status, error=error, finished=time.time(), preview=None)).rowcount == 0:
                return False
            s.add_all(images)
            if event is not None:  # the job's last event, with its end; its preview goes
                s.execute(delete(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "preview"))
                s.add(JobEvent(job_id=job_id, kind=status, data=event))
        return True

    # ------------------------------------------------------------------ images
    def image(self, image_id: str, owner: str) -> ImageRow | None:
        with self.session() as s:
            found = s.get(ImageRow, image_id)
            return found if found is not None and found.owner == owner else None

    def delete_image(self, image_id: str, owner: str) -> bool:
        """Delete the image's row, only when it is the owner's; whether it was."""
        return self._delete_owned(ImageRow, image_id, owner)

    # ------------------------------------------------------------------ uploads
    def add_upload(self, upload: Upload) -> None:
        with self.session() as s:
            s.add(upload)

    def upload(self, upload_id: str, owner: str) -> Upload | None:
        with self.session() as s:
            found = s.get(Upload, upload_id)
            return found if found is not None and found.owner == owner else None

    def uploads(self, owner: str) -> list[Upload]:
        """The owner's uploads, newest first."""
        with self.session() as s:
            return list(s.scalars(select(Upload).where(Upload.owner == owner).order_by(Upload.created.desc())))

    def delete_upload(self, upload_id: str, owner: str) -> bool:
        """Delete the upload's row, only when it is the owner's; whether it was."""
        return self._delete_owned(Upload, upload_id, owner)

    # ------------------------------------------------------------------ owners' options
    def option(self, owner: str, name: str) -> Any:
        with self.session() as s:
            found = s.get(OwnerOption, (owner, name))
            return None if found is None else found.value

    def set_option(self, owner: str, name: str, value: Any) -> None:
        """Insert or replace, as one statement (``INSERT ... ON CONFLICT DO UPDATE``, which SQLite and PostgreSQL
        both have): two requests setting the same option at once both succeed, the last one's value kept."""
        insert = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}.get(self.dialect)
        with self.session() as s:
            if insert is None:  # another database: read then write
                s.merge(OwnerOption(owner=owner, name=name, value=value))
                return
            statement = insert(OwnerOption).values(owner=owner, name=name, value=value)
            s.execute(statement.on_conflict_do_update(index_elements=["owner", "name"], set_={"value": value}))


class Unreadable:
    """A JSON column whose stored text does not parse: neither a dict nor a list, so that whatever reads it fails
    on its row only (``policy.readable_view`` shows such a job as failed; a restart fails it)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Unreadable({self.text[:40]!r}...)"


def read_json(text: str) -> Any:
    """A JSON column's value; ``Unreadable`` when its text does not parse, rather than failing the whole query."""
    try:
        return json.loads(text)
    except ValueError:
        return Unreadable(text)


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA secure_delete=ON")  # deleted biometric rows are overwritten, not left in free pages
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (requests) do not wait for the writer (a worker)
    cursor.close()
