"""How a dispatcher's loop learns of other processes' commits: its Waiter (PostgreSQL: its
own LISTEN connection in the same select() as its wake-up pipe; SQLite: the watcher thread)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
import sqlalchemy as sa

from taskomatic import Queue, defaults
from taskomatic.wakeup import Waiter


@contextmanager
def listening(queue: Queue) -> Iterator[Waiter]:
    """A waiter that has started listening: that first wake-up (for whatever was committed
    before: LISTEN's new connection, the SQLite watcher's start) is taken."""
    seen = queue.signal.generation
    waiter = queue.waiter()
    try:
        assert waiter.wait(seen, 10), "no wake-up when listening began"
        yield waiter
    finally:
        waiter.close()


def _notify(url: str, payload: str) -> None:
    conninfo = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", [defaults.NOTIFY_CHANNEL, payload])


def test_another_processes_submission_wakes_the_waiter(db_url: str) -> None:
    """A submission through another Queue (another process) ends the wait; nothing else does."""
    with Queue.open(db_url) as ours, Queue.open(db_url) as theirs, listening(ours) as waiter:
        seen = ours.signal.generation
        assert not waiter.wait(seen, 0.3), "woken with nothing committed"
        theirs.submit("noop")
        assert waiter.wait(seen, 10), "another process's submission did not wake the waiter"
        assert ours.signal.generation != seen  # other waiters of this process see it too


def test_own_notifications_do_not_wake_the_waiter(pg_url: str) -> None:
    """The dispatcher's own commits (its token as payload) are not news to it."""
    with Queue.open(pg_url) as ours, listening(ours) as waiter:
        seen = ours.signal.generation
        _notify(pg_url, ours.token)
        assert not waiter.wait(seen, 0.5), "woken by its own notification"
        _notify(pg_url, "another-process")
        assert waiter.wait(seen, 10)


def test_a_lost_listen_connection_is_replaced_and_wakes_the_waiter(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server ends the LISTEN connection: one warning, a new connection, a wake-up (for
    what may have been committed meanwhile), and later submissions wake it again."""
    name = sa.make_url(pg_url).database
    with (
        Queue.open(pg_url) as ours,
        Queue.open(pg_url) as theirs,
        listening(ours) as waiter,
        caplog.at_level(logging.WARNING, logger="taskomatic.store.postgres"),
    ):
        seen = ours.signal.generation
        conninfo = sa.make_url(pg_url).set(drivername="postgresql")
        with psycopg.connect(
            conninfo.render_as_string(hide_password=False), autocommit=True
        ) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND query LIKE 'LISTEN%%'",
                [name],
            ).fetchone()
        assert killed == (1,)
        assert waiter.wait(seen, 10), "no wake-up after the connection came back"
        assert any("LISTEN connection lost" in r.getMessage() for r in caplog.records)
        seen = ours.signal.generation
        assert not waiter.wait(seen, 0.3)
        theirs.submit("noop")
        assert waiter.wait(seen, 10), "the new connection does not deliver notifications"
