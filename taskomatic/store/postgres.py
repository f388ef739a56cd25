"""PostgreSQL, the reference backend: many dispatchers on many machines share one database."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from taskomatic import defaults
from taskomatic.store.base import Store

log = logging.getLogger(__name__)

# How long one wait for notifications blocks: bounds how late the watcher sees `stop`, which
# `Queue.close()` waits for (seconds).
_SLICE = 0.1

# Errors after which the whole transaction may simply be run again.
RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock detected


class PostgresStore(Store):
    """Claims with SKIP LOCKED; wakes other processes with NOTIFY sent inside the transaction."""

    def __init__(self, engine: sa.Engine, conninfo: str) -> None:
        super().__init__(engine)
        self.conninfo = conninfo

    @classmethod
    def from_url(cls, url: sa.URL, **engine_kwargs: Any) -> PostgresStore:
        engine_kwargs.setdefault("pool_size", 10)
        engine = sa.create_engine(url.set(drivername="postgresql+psycopg"), **engine_kwargs)
        conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        return cls(engine, conninfo)

    def is_transient(self, exc: BaseException) -> bool:
        orig = getattr(exc, "orig", None)
        if getattr(orig, "sqlstate", None) in RETRYABLE_SQLSTATES:
            return True
        return super().is_transient(exc)

    def notify(self, conn: sa.Connection, sender: str) -> None:
        # Delivered only when (and if) this transaction commits; identical payloads in one
        # transaction collapse into one, so a batch costs one notification. The payload is
        # only the sender's token, so a process does not wake itself.
        conn.execute(sa.select(sa.func.pg_notify(defaults.NOTIFY_CHANNEL, sender)))

    def _insert_ignoring_conflicts(self, table: sa.Table) -> Any:
        return postgresql.insert(table).on_conflict_do_nothing()

    def watch(self, stop: threading.Event, fire: Callable[[], None], sender: str) -> None:
        delay = defaults.DB_RETRY_BASE_SECONDS
        while not stop.is_set():
            try:
                self._listen(stop, fire, sender)
            except psycopg.Error as exc:
                log.warning("LISTEN connection lost (%s); reconnecting in %.1fs", exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, defaults.DB_RETRY_MAX_SECONDS)
            else:
                delay = defaults.DB_RETRY_BASE_SECONDS

    def _listen(self, stop: threading.Event, fire: Callable[[], None], sender: str) -> None:
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute(f"LISTEN {defaults.NOTIFY_CHANNEL}")
            fire()  # whatever happened while we were not listening
            idle = 0.0
            while not stop.is_set():
                got = [n.payload for n in conn.notifies(timeout=_SLICE, stop_after=1)]
                if got:
                    if any(payload != sender for payload in got):
                        fire()
                    idle = 0.0
                    continue
                idle += _SLICE
                if idle >= defaults.LISTEN_PING_SECONDS:
                    conn.execute("SELECT 1")  # a half-open socket raises only when used
                    idle = 0.0
