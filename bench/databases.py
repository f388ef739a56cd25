"""The databases under test: a throwaway PostgreSQL 15 cluster and SQLite files in a temp dir.

Every measurement gets a fresh database holding the schema (PostgreSQL: a copy of a template
database; SQLite: a copy of a template file). The history workload's 1,000,000 finished tasks
are generated once per invocation, in SQL, by replicating a few real finished tasks (with
their event rows) that an in-process dispatcher has just run; each repetition then starts
from a copy of that database. Nothing is kept across invocations.
"""

from __future__ import annotations

import importlib.util
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from bench.machine import ROOT
from bench.procs import process_tree_cpu
from taskomatic import Dispatcher, Queue, schema

PGCLUSTER_PATH = ROOT / "tests" / "pgcluster.py"
"""The tests' throwaway-cluster helper, reused as is (loaded by path; tests/ is no package)."""

HISTORY_STEP_SECONDS = 2
"""Spacing of the generated finished tasks' timestamps (seconds); 1M tasks span ~23 days."""

LIVE_STATES = ("new", "running", "waiting")

t = schema.tasks


def load_pgcluster() -> ModuleType:
    """tests/pgcluster.py as the module `pgcluster`."""
    if "pgcluster" in sys.modules:
        return sys.modules["pgcluster"]
    spec = importlib.util.spec_from_file_location("pgcluster", PGCLUSTER_PATH)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {PGCLUSTER_PATH}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pgcluster"] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class TaskTimes:
    """One task's timeline as the database recorded it (the dispatcher's clock)."""

    seq: int
    state: str
    started_at: datetime | None
    finished_at: datetime | None


class Reader:
    """The harness's own autocommit connection: waits for the end of a run, reads timestamps.

    It never holds a transaction open between statements, so it neither blocks PostgreSQL's
    vacuum nor SQLite's WAL checkpoints; `statements` counts what it ran, so that per-task
    commit counts can leave it out.
    """

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(
            url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.StaticPool
        )
        self.statements = 0

    def close(self) -> None:
        self.engine.dispose()

    def _all(self, query: sa.Executable) -> Sequence[sa.Row[Any]]:
        self.statements += 1
        with self.engine.connect() as conn:
            return conn.execute(query).all()

    def max_seq(self) -> int:
        """The newest task's `seq` (0 when empty): tasks after it belong to the next run."""
        return int(self._all(sa.select(sa.func.coalesce(sa.func.max(t.c.seq), 0)))[0][0])

    def live(self) -> bool:
        """Whether any task is still new, running or waiting."""
        query = sa.select(t.c.id).where(t.c.state.in_(LIVE_STATES)).limit(1)
        return bool(self._all(query))

    def dispatcher_registered(self, pid: int) -> bool:
        """Whether a dispatcher process with this pid has announced itself."""
        d = schema.dispatchers
        return bool(self._all(sa.select(d.c.id).where(d.c.pid == pid, d.c.stopped_at.is_(None))))

    def times(self, after_seq: int) -> list[TaskTimes]:
        """Timelines of the tasks submitted after `after_seq`, in submission order."""
        query = (
            sa.select(t.c.seq, t.c.state, t.c.started_at, t.c.finished_at)
            .where(t.c.seq > after_seq)
            .order_by(t.c.seq)
        )
        return [TaskTimes(r.seq, r.state, r.started_at, r.finished_at) for r in self._all(query)]

    def event_count(self, after_seq: int) -> int:
        """Event rows of the tasks submitted after `after_seq`."""
        e = schema.task_events
        query = (
            sa.select(sa.func.count())
            .select_from(e.join(t, t.c.id == e.c.task_id))
            .where(t.c.seq > after_seq)
        )
        return int(self._all(query)[0][0])

    def wal_lsn(self) -> int | None:
        """PostgreSQL's current WAL position in bytes (None on SQLite)."""
        if self.engine.dialect.name != "postgresql":
            return None
        return int(self._all(sa.text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))[0][0])


class Database:
    """One backend: where fresh databases come from, and what can be measured about it."""

    backend = ""
    has_server = False  # a server process whose CPU time counts (not an in-process library)

    def start(self) -> None:
        """Prepare the schema template."""

    def close(self) -> None:
        """Remove everything this object created."""

    def version(self) -> str | None:
        return None

    def fresh(self, history: bool = False) -> str:
        """The URL of a new database holding the schema (and the history, if asked)."""
        raise NotImplementedError

    def drop(self, url: str) -> None:
        """Remove a database made by `fresh`."""

    def build_history(self, rows: int) -> dict[str, float]:
        """Generate the history template: `rows` finished tasks with their events."""
        raise NotImplementedError

    def server_cpu(self) -> float:
        """CPU seconds used so far by the database server's processes (0 when in-process)."""
        return 0.0

    def counters(self, url: str) -> dict[str, float]:
        """Server-side counters (commits, rows, WAL) of database `url`, for deltas."""
        return {}


def prototypes(url: str) -> dict[int, uuid.UUID]:
    """Run a few real tasks to the end, as templates for generated history.

    Returns {kind: task id}: 0 a completed `noop`, 1 a failed `fail`, 2 a cancelled `noop`
    (kind 0 is 98% of the history, kinds 1 and 2 1% each).
    """
    queue = Queue.open(url, actor="bench")
    try:
        dispatcher = Dispatcher(queue, workers=2).start()
        ok = queue.submit("noop")
        failed = queue.submit("fail", {"message": "generated history"})
        queue.wait([ok.id, failed.id], timeout=60)
        dispatcher.stop()
        cancelled = queue.submit("noop")
        queue.cancel(cancelled.id, "generated history")
        return {0: ok.id, 1: failed.id, 2: cancelled.id}
    finally:
        queue.close()


def _kind_of(g: str) -> str:
    return f"(CASE WHEN {g} % 100 = 0 THEN 1 WHEN {g} % 100 = 50 THEN 2 ELSE 0 END)"


def _history_statements(
    dialect: str, rows: int, protos: dict[int, uuid.UUID], first_seq: int
) -> list[str]:
    """INSERT … SELECT statements copying the prototypes `rows` times, with new ids and times.

    Columns come from the SQLAlchemy tables, so a column added to the schema is copied from
    the prototypes without touching this code.
    """
    pg = dialect == "postgresql"
    g = "g" if pg else "g.n"

    def ident(name: str) -> str:
        return f'"{name}"'

    def lit(tid: uuid.UUID) -> str:
        return f"'{tid}'::uuid" if pg else f"'{tid.hex}'"

    task_id = (
        f"md5('history-' || {g})::uuid"
        if pg
        else f"printf('%08x%024x', ({g} * 2654435761) % 4294967296, {g})"
    )
    offset = f"(({g} - {rows}) * {HISTORY_STEP_SECONDS} - 3600)"

    def shifted(column: str) -> str:
        if pg:
            return f"{column} + {offset} * interval '1 second'"
        # SQLite stores 'YYYY-MM-DD HH:MM:SS.ffffff': shift whole seconds, keep the fraction.
        return (
            f"CASE WHEN {column} IS NULL THEN NULL ELSE "
            f"datetime({column}, {offset} || ' seconds') || substr({column}, 20) END"
        )

    series = (
        f"generate_series(1, {rows}) AS g"
        if pg
        else f"(WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < {rows})"
        " SELECT n FROM s) AS g"
    )
    kinds = " ".join(f"WHEN {k} THEN {lit(v)}" for k, v in protos.items())
    proto_of = f"CASE {_kind_of(g)} {kinds} END"

    task_columns, task_values = [], []
    for col in t.columns:
        name = ident(col.name)
        task_columns.append(name)
        if col.name == "id":
            task_values.append(task_id)
        elif col.name == "seq":
            task_values.append("nextval('tasks_seq')" if pg else f"{first_seq - 1} + {g}")
        elif col.name == "group_id":
            task_values.append("NULL")
        elif isinstance(col.type, schema.UTCDateTime):
            task_values.append(shifted(f"p.{name}"))
        else:
            task_values.append(f"p.{name}")
    e = schema.task_events
    event_columns, event_values = [], []
    for col in e.columns:
        if col.primary_key:
            continue  # the id comes from the sequence / rowid, in insertion order
        name = ident(col.name)
        event_columns.append(name)
        if col.name == "task_id":
            event_values.append(task_id)
        elif isinstance(col.type, schema.UTCDateTime):
            event_values.append(shifted(f"p.{name}"))
        else:
            event_values.append(f"p.{name}")
    return [
        f"INSERT INTO tasks ({', '.join(task_columns)}) "
        f"SELECT {', '.join(task_values)} FROM {series} JOIN tasks AS p ON p.id = {proto_of}",
        # Ordered by task, so that each task's events have neighbouring ids, as in real life.
        f"INSERT INTO task_events ({', '.join(event_columns)}) "
        f"SELECT {', '.join(event_values)} FROM {series} "
        f"JOIN task_events AS p ON p.task_id = {proto_of} ORDER BY {g}, p.id",
    ]


# --- PostgreSQL -----------------------------------------------------------------------------


class PostgresDatabase(Database):
    """A private PostgreSQL 15 cluster (tests/pgcluster.py), durability settings untouched."""

    backend = "postgresql"
    has_server = True
    SCHEMA = "bench_schema"
    HISTORY = "bench_history"

    def __init__(self) -> None:
        self.cluster: Any = None
        self._count = 0
        self._history = False

    def start(self) -> None:
        self.cluster = load_pgcluster().PostgresCluster()
        self.cluster.start()
        self.cluster.create_database(self.SCHEMA)
        with Queue.open(self.cluster.url(self.SCHEMA)) as queue:
            queue.init_db()

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.cleanup()
            self.cluster = None

    def _conninfo(self, dbname: str) -> str:
        return (
            make_url(self.cluster.url(dbname))
            .set(drivername="postgresql")
            .render_as_string(hide_password=False)
        )

    @contextmanager
    def admin(self, dbname: str = "postgres") -> Iterator[psycopg.Connection[Any]]:
        """An autocommit psycopg connection (CREATE DATABASE, VACUUM, counters)."""
        with psycopg.connect(self._conninfo(dbname), autocommit=True) as conn:
            yield conn

    def version(self) -> str | None:
        with self.admin() as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else None

    def setting(self, name: str) -> str:
        with self.admin() as conn:
            row = conn.execute("SELECT current_setting(%s)", [name]).fetchone()
        return str(row[0]) if row else ""

    def fresh(self, history: bool = False) -> str:
        if history and not self._history:
            raise RuntimeError("build_history() first")
        self._count += 1
        name = f"bench_{self._count}"
        template = self.HISTORY if history else self.SCHEMA
        with self.admin() as conn:
            # FILE_COPY copies the files instead of WAL-logging every block of a 1 GB template.
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
            conn.execute("CHECKPOINT")  # every run starts without a checkpoint pending
        return str(self.cluster.url(name))

    def drop(self, url: str) -> None:
        name = make_url(url).database
        self.cluster.terminate_connections(name)
        self.cluster.drop_database(name)

    def build_history(self, rows: int) -> dict[str, float]:
        started = time.monotonic()
        self.cluster.create_database(self.HISTORY, template=self.SCHEMA)
        protos = prototypes(self.cluster.url(self.HISTORY))
        tasks_sql, events_sql = _history_statements("postgresql", rows, protos, 0)
        with self.admin(self.HISTORY) as conn:
            conn.execute("SET work_mem = '256MB'")
            conn.execute("SET maintenance_work_mem = '256MB'")
            with conn.transaction():
                conn.execute(tasks_sql)
                conn.execute(events_sql)
            loaded = time.monotonic()
            # What autovacuum does on its own soon after such a load: statistics and the
            # visibility map. Done here so every repetition starts from the same state.
            conn.execute("VACUUM (ANALYZE) tasks")
            conn.execute("VACUUM (ANALYZE) task_events")
            conn.execute("CHECKPOINT")
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        self._history = True
        return {
            "rows": rows,
            "load_s": loaded - started,
            "vacuum_s": time.monotonic() - loaded,
            "total_s": time.monotonic() - started,
            "database_mb": (size[0] if size else 0) / 2**20,
        }

    def server_cpu(self) -> float:
        pid = int((Path(self.cluster.data_dir) / "postmaster.pid").read_text().split("\n")[0])
        return process_tree_cpu(pid)

    def counters(self, url: str) -> dict[str, float]:
        name = make_url(url).database
        with self.admin() as conn:
            db = conn.execute(
                "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted,"
                " blks_read, blks_hit FROM pg_stat_database WHERE datname = %s",
                [name],
            ).fetchone()
            wal = conn.execute(
                "SELECT wal_records, wal_fpi, wal_bytes, wal_write, wal_sync FROM pg_stat_wal"
            ).fetchone()
            lsn = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        names = ("commits", "rollbacks", "rows_inserted", "rows_updated", "rows_deleted")
        names += ("blocks_read", "blocks_hit")
        out = dict(zip(names, map(float, db or ()), strict=False))
        wal_names = ("wal_records", "wal_fpi", "wal_bytes", "wal_writes", "wal_syncs")
        out.update(zip(wal_names, map(float, wal or ()), strict=False))
        out["wal_lsn"] = float(lsn[0]) if lsn else 0.0
        return out


# --- SQLite ---------------------------------------------------------------------------------


class SQLiteDatabase(Database):
    """Files in a temporary directory; the store's own settings (WAL, synchronous=FULL)."""

    backend = "sqlite"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="taskomatic-bench-"))
        self._count = 0
        self.schema_file = self.dir / "schema.db"
        self.history_file = self.dir / "history.db"
        self._history = False

    def start(self) -> None:
        with Queue.open(f"sqlite:///{self.schema_file}") as queue:
            queue.init_db()
        _checkpoint(self.schema_file)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def version(self) -> str | None:
        return sqlite3.sqlite_version

    def fresh(self, history: bool = False) -> str:
        if history and not self._history:
            raise RuntimeError("build_history() first")
        self._count += 1
        path = self.dir / f"bench_{self._count}.db"
        shutil.copyfile(self.history_file if history else self.schema_file, path)
        return f"sqlite:///{path}"

    def drop(self, url: str) -> None:
        path = Path(make_url(url).database or "")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)

    def build_history(self, rows: int) -> dict[str, float]:
        started = time.monotonic()
        shutil.copyfile(self.schema_file, self.history_file)
        protos = prototypes(f"sqlite:///{self.history_file}")
        conn = sqlite3.connect(self.history_file, isolation_level=None)
        try:
            first_seq = conn.execute("SELECT max(seq) FROM tasks").fetchone()[0] + 1
            conn.execute("PRAGMA synchronous = OFF")  # set-up only; runs use the store's
            conn.execute("BEGIN")
            for sql in _history_statements("sqlite", rows, protos, first_seq):
                conn.execute(sql)
            conn.execute("COMMIT")
        finally:
            conn.close()
        loaded = time.monotonic()
        _checkpoint(self.history_file)
        self._history = True
        return {
            "rows": rows,
            "load_s": loaded - started,
            "vacuum_s": time.monotonic() - loaded,
            "total_s": time.monotonic() - started,
            "database_mb": self.history_file.stat().st_size / 2**20,
        }


def _checkpoint(path: Path) -> None:
    """Fold the WAL into the main file, so that copying the main file copies everything."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def make(backend: str) -> Database:
    """The Database for a backend name."""
    if backend == "postgresql":
        return PostgresDatabase()
    if backend == "sqlite":
        return SQLiteDatabase()
    raise ValueError(f"unknown backend {backend!r}")
