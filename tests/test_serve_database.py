"""The service's database on SQLite and on a real PostgreSQL server (``postgres_server`` in conftest.py): the schema
created and upgraded at start, the SQL that differs between the two (upserts, conditional updates, text), and
``--database-url`` checked before anything loads."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import both_databases
from sqlalchemy import JSON, Column, Index, Integer, MetaData, String, Table, create_engine, inspect, text

from faceid.errors import FaceIDError
from faceid.service.store import (
    DONE,
    FAILED,
    QUEUED,
    Base,
    Identity,
    Job,
    SchemaError,
    Store,
    check_database_url,
    upgrade_schema,
)

ID = "a" * 32


def new_url(database, tmp_path) -> str:
    """A new, empty database of the test's kind."""
    return database.url(tmp_path) or f"sqlite:///{tmp_path / 'faceid.db'}"


def old_schema() -> MetaData:
    """The schema without any column that a later version may have added (every nullable one that is not a key):
    the oldest database that ``upgrade_schema`` must bring up to date, whatever columns come later."""
    old = MetaData()
    for table in Base.metadata.sorted_tables:
        kept = [c._copy() for c in table.columns if not c.nullable or c.primary_key or c.foreign_keys]
        Table(table.name, old, *kept)
    return old


@both_databases
def test_a_database_from_an_earlier_version_gets_the_columns_added_since(database, tmp_path):
    url = new_url(database, tmp_path)
    old = old_schema()
    dropped = {(t.name, c.name) for t in Base.metadata.sorted_tables for c in t.columns} - {
        (t.name, c.name) for t in old.sorted_tables for c in t.columns
    }
    assert {("jobs", "inputs"), ("images", "score"), ("identities", "name")} <= dropped
    engine = create_engine(url)  # the old schema and its rows, as that version wrote them
    old.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO jobs (id, owner, status, created_ns, identity_ids, settings) "
                "VALUES (:id, 'someone', 'done', 1, '[]', '{\"prompt\": \"kept\"}')"
            ),
            {"id": ID},
        )
        connection.execute(text("INSERT INTO identities (id, owner, created) VALUES (:id, 'someone', 2.5)"), {"id": ID})
    engine.dispose()

    store = Store(url)  # the start: every dropped column is back
    found = inspect(store.engine)
    have = {(t, c["name"]) for t in Base.metadata.tables for c in found.get_columns(t)}
    assert dropped <= have
    job = store.job(ID)
    assert isinstance(job, Job) and job.settings == {"prompt": "kept"} and job.inputs is None and job.error is None
    identity = store.identity(ID, "someone")
    assert isinstance(identity, Identity) and identity.created == 2.5 and identity.name is None
    store.finish_job(ID, FAILED, error="a new value in an added column")  # the added columns take values
    assert store.job(ID).error == "a new value in an added column"
    store.close()

    with Store(url).engine.begin() as connection:  # a second start: nothing left to add
        assert upgrade_schema(connection) == []


@both_databases
def test_a_column_that_cannot_be_added_stops_the_start_and_indexes_come_with_columns(database, tmp_path):
    engine = create_engine(new_url(database, tmp_path))
    first = MetaData()
    Table("things", first, Column("id", Integer, primary_key=True))
    with engine.begin() as connection:
        assert upgrade_schema(connection, first) == ["things"]

    later = MetaData()
    Table("things", later, Column("id", Integer, primary_key=True), Column("label", String(20), index=True),
          Column("extra", JSON), Index("things_by_label_extra", "label", "id"))  # fmt: skip
    with engine.begin() as connection:
        assert upgrade_schema(connection, later) == ["things.label", "things.extra"]
    indexes = {index["name"]: index["column_names"] for index in inspect(engine).get_indexes("things")}
    assert indexes == {"ix_things_label": ["label"], "things_by_label_extra": ["label", "id"]}

    strict = MetaData()
    Table("things", strict, Column("id", Integer, primary_key=True), Column("label", String(20)),
          Column("extra", JSON), Column("size", Integer, nullable=False))  # fmt: skip
    with pytest.raises(SchemaError, match="table things lacks column size, which cannot be added"):
        with engine.begin() as connection:
            upgrade_schema(connection, strict)
    assert "size" not in {c["name"] for c in inspect(engine).get_columns("things")}
    engine.dispose()


def test_servers_starting_at_once_create_the_schema_once(postgres_server):
    """Several processes (ingress replicas) starting on a new PostgreSQL database: each waits for the one that
    creates the schema (an advisory lock), none fails on a table another just made."""
    url = postgres_server.new_database()
    errors, stores = [], []

    def start():
        try:
            stores.append(Store(url))
        except Exception as exc:  # noqa: BLE001 (the assertion shows it)
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(stores) == 4
    assert set(inspect(stores[0].engine).get_table_names()) == set(Base.metadata.tables)
    for store in stores:
        store.close()


@both_databases
def test_writes_that_race_give_one_answer(database, tmp_path):
    store = Store(new_url(database, tmp_path))
    store.add_job(Job(id=ID, owner="o", status=QUEUED, created_ns=time.time_ns(), identity_ids=[], settings={}))

    # a cancel that arrives after the worker finished the job changes nothing (one conditional UPDATE)
    assert store.finish_job(ID, DONE, error=None)
    assert not store.finish_job(ID, "cancelled", unfinished_only=True)
    assert store.job(ID).status == DONE
    assert not store.finish_job("b" * 32, DONE)  # no such job
    # an error text holding a NUL character (PostgreSQL's text holds none) is stored, escaped
    assert store.finish_job(ID, FAILED, error="bad\x00byte")
    assert store.job(ID).error == "bad\\x00byte"

    # an option set by many requests at once: an upsert, never a duplicate key
    errors = []

    def set_option(k):
        try:
            store.set_option("o", "sd_model_checkpoint", f"value-{k}")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=set_option, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert store.option("o", "sd_model_checkpoint") in {f"value-{k}" for k in range(8)}
    store.set_option("o", "sd_model_checkpoint", {"a": [1, 2.5, None]})  # JSON of any shape, replaced
    assert store.option("o", "sd_model_checkpoint") == {"a": [1, 2.5, None]}
    assert store.option("other", "sd_model_checkpoint") is None
    store.close()


def test_database_url_is_checked_before_anything_loads(tmp_path, capsys):
    from faceid.cli import main

    assert check_database_url(None) is None
    assert check_database_url("postgresql://faceid:secret@db:5433/faceid") == (
        "postgresql+psycopg://faceid:secret@db:5433/faceid"  # faceid's driver, not SQLAlchemy's default psycopg2
    )
    assert check_database_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(FaceIDError, match="is not a database URL"):
        check_database_url("db.example.org/faceid")
    with pytest.raises(FaceIDError, match="knows no database 'nosuchdb'"):
        check_database_url("nosuchdb://host/x")
    data = tmp_path / "data"
    assert main(["serve", "--data-dir", str(data), "--database-url", "not a url", "--base-model", "x"]) == 2
    assert "is not a database URL" in capsys.readouterr().err
    assert not data.exists()


def test_a_database_server_that_is_not_there_is_one_clear_error():
    from postgres_server import free_port

    url = f"postgresql://faceid:secret@127.0.0.1:{free_port()}/faceid"  # nothing listens there
    with pytest.raises(FaceIDError, match="cannot open the database") as raised:
        Store(check_database_url(url))
    assert "secret" not in str(raised.value) and "createdb" in str(raised.value)


@both_databases
def test_the_shared_queue_hands_each_job_to_one_worker_and_counts_under_its_lock(database, tmp_path):
    """Workers of several processes (here: threads with an engine each, as processes have) claim from one queue:
    every job runs once; submissions counted under the queue's lock never pass the bound, whoever submits."""
    from faceid.service.jobs import JobQueue, QueuedJob, QueueFull
    from faceid.settings import GenerationSettings

    url = new_url(database, tmp_path)
    stores = [Store(url) for _ in range(4)]
    settings = GenerationSettings(prompt="p", seed=[0]).to_json()

    def row(i: int) -> Job:
        return Job(id=f"{i:032x}", owner="o", status=QUEUED, created_ns=i, identity_ids=["x"], settings=settings,
                   batch_key=f"key {i % 3}")  # fmt: skip

    bound = 12
    refused = []

    def submit(store: Store, first: int) -> None:
        queue = JobQueue(store, max_queue=bound)
        for i in range(first, first + 5):
            try:
                queue.put(row(i))
            except QueueFull:
                refused.append(i)

    threads = [threading.Thread(target=submit, args=(s, 100 * k)) for k, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert stores[0].queue_counts() == (bound, 0) and len(refused) == 4 * 5 - bound  # never over the bound

    def make(r: Job) -> QueuedJob:
        return QueuedJob(r.id, r.owner, GenerationSettings.parse(r.settings), list(r.identity_ids), r.created_ns)

    claimed: dict[str, list[str]] = {}

    def work(store: Store, name: str) -> None:
        queue = JobQueue(store, max_queue=bound)
        while batch := queue.take(name, 2, make, timeout=0):
            claimed.setdefault(name, []).extend(job.id for job in batch)

    threads = [threading.Thread(target=work, args=(s, f"worker {k}")) for k, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    every = [job for jobs in claimed.values() for job in jobs]
    assert len(every) == len(set(every)) == bound  # each job once
    assert stores[0].queue_counts() == (0, bound)
    for job in every:  # its row names the worker that claimed it
        assert stores[0].job(job).worker in claimed and job in claimed[stores[0].job(job).worker]
    for store in stores:
        store.close()
