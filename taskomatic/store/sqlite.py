"""SQLite, the embedded default: one dispatcher process on one machine, zero setup."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from taskomatic import defaults, errors
from taskomatic import schema as s
from taskomatic.store.base import Store


class SQLiteStore(Store):
    """Writers serialize on `BEGIN IMMEDIATE`; other processes are seen via `data_version`."""

    def __init__(self, engine: sa.Engine, path: Path) -> None:
        super().__init__(engine)
        self.path = path

    @classmethod
    def from_url(cls, url: sa.URL, **engine_kwargs: Any) -> SQLiteStore:
        if not url.database or url.database == ":memory:":
            raise errors.ValidationError(
                "an in-memory SQLite database cannot be shared; give a file: sqlite:///path/to.db",
                field="database_url",
            )
        path = Path(url.database).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise errors.DatabaseUnavailable(
                f"cannot create the directory of the SQLite database {path}: "
                f"{exc.strerror or exc}; give another path"
            ) from None
        engine = sa.create_engine(
            url.set(database=str(path)),
            connect_args={
                "check_same_thread": False,
                "timeout": defaults.SQLITE_BUSY_TIMEOUT_MS / 1000,
            },
            **engine_kwargs,
        )
        engine.dialect.statement_compiler = _Compiler
        sa.event.listen(engine, "connect", _on_connect)
        sa.event.listen(engine, "begin", _on_begin)
        return cls(engine, path)

    @contextlib.contextmanager
    def read(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            conn = conn.execution_options(taskomatic_readonly=True)
            with conn.begin():
                yield conn

    def is_transient(self, exc: BaseException) -> bool:
        # SQLite reports missing tables as OperationalError too; only contention is transient.
        text = str(getattr(exc, "orig", exc)).lower()
        return "locked" in text or "busy" in text

    def _assign_seq(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
        # Safe without a sequence: BEGIN IMMEDIATE makes this transaction the only writer.
        last = conn.execute(sa.select(sa.func.coalesce(sa.func.max(s.tasks.c.seq), 0))).scalar()
        for i, row in enumerate(rows, start=int(last or 0) + 1):
            row["seq"] = i

    def _insert_ignoring_conflicts(self, table: sa.Table) -> Any:
        return sqlite.insert(table).on_conflict_do_nothing()

    def watch(self, stop: threading.Event, fire: Callable[[], None], sender: str) -> None:
        # data_version cannot tell who committed, so our own commits wake us too (at most
        # once per poll interval): a spare cycle, never a lost wake-up.
        conn = sqlite3.connect(self.path, check_same_thread=False)
        try:
            last = conn.execute("PRAGMA data_version").fetchone()[0]
            fire()  # whatever was committed before the baseline above (as LISTEN does)
            while not stop.wait(defaults.SQLITE_DATA_VERSION_POLL_SECONDS):
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version != last:
                    fire()
                last = version
        finally:
            conn.close()


def _on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Autocommit at the driver level, so the "begin" hook decides how transactions start.
    dbapi_conn.isolation_level = None
    for pragma in (
        "journal_mode=WAL",
        "synchronous=FULL",
        "foreign_keys=ON",
        f"busy_timeout={defaults.SQLITE_BUSY_TIMEOUT_MS}",
    ):
        dbapi_conn.execute(f"PRAGMA {pragma}")


def _on_begin(conn: sa.Connection) -> None:
    # IMMEDIATE takes the write lock up front: a read-then-write claim cannot be raced.
    readonly = conn.get_execution_options().get("taskomatic_readonly")
    conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


class _Compiler(sqlite.base.SQLiteCompiler):
    """SQLite's statement compiler, with the table hints (`INDEXED BY …`) of `with_hint`,
    which SQLAlchemy's leaves out."""

    def get_from_hint_text(self, table: Any, text: str | None) -> str | None:
        return text
