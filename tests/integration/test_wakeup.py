"""How a dispatcher's loop learns of other processes' commits: its Waiter (PostgreSQL: its
own LISTEN connection in the same select() as its wake-up pipe; SQLite: the watcher thread)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import psycopg
import pytest
import sqlalchemy as sa
from helpers import running_dispatcher

from taskomatic import Queue, State, TaskSpec, defaults
from taskomatic.queue import Outcome
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


def _conninfo(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _notify(url: str, payload: str) -> None:
    with psycopg.connect(_conninfo(url), autocommit=True) as conn:
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


def _settle(queue: Queue, waiter: Waiter) -> None:
    """Take the wake-ups already on their way, until 0.3 s pass without one."""
    while waiter.wait(queue.signal.generation, 0.3):
        pass


def test_a_quiet_cycle_notifies_only_when_it_may_leave_work_for_others(pg_url: str) -> None:
    """A quiet cycle (its dispatcher told others of its changes a moment ago) that claims
    fewer tasks than it may leaves no runnable task for other dispatchers: it does not
    notify and says so; `announce()` then does. One that claims as many as it may, or one
    that is not quiet, notifies at once."""
    owner = uuid.uuid4()
    with Queue.open(pg_url) as ours, Queue.open(pg_url) as theirs, listening(theirs) as waiter:
        seen = theirs.signal.generation
        ours.submit_many([TaskSpec("noop") for _ in range(3)])
        assert waiter.wait(seen, 10), "the submission was not announced"
        _settle(theirs, waiter)
        seen = theirs.signal.generation
        full = ours.cycle(owner, [], 2, 60, quiet=True)
        assert (len(full.claimed), full.announced, full.unannounced) == (2, True, False)
        assert waiter.wait(seen, 10), "a full claim (work may be left) was not announced"
        _settle(theirs, waiter)

        seen = theirs.signal.generation
        last = ours.cycle(owner, [], 5, 60, quiet=True)
        assert (len(last.claimed), last.announced, last.unannounced) == (1, False, True)
        assert not waiter.wait(seen, 0.5), "a quiet cycle leaving no work notified"
        ours.announce()
        assert waiter.wait(seen, 10), "announce() did not notify"

        seen = theirs.signal.generation
        ended = ours.cycle(owner, [Outcome(t, True) for t in full.claimed], 5, 60)
        assert (ended.announced, ended.unannounced) == (True, False)
        assert waiter.wait(seen, 10), "a cycle that is not quiet did not notify"


def test_a_busy_dispatcher_coalesces_its_notifications_and_announces_its_last_change(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running a chain, a dispatcher tells other processes of its changes at most every
    NOTIFY_COALESCE_SECONDS, not at every cycle, yet tells them of its last change too: a
    wait in another process ends with the chain, not at its next safety poll."""
    # A window longer than the chain, so that no machine is too slow to show the coalescing.
    monkeypatch.setattr(defaults, "NOTIFY_COALESCE_SECONDS", 0.5)
    chain = [TaskSpec("noop", name="t0")]
    chain += [TaskSpec("noop", name=f"t{i}", after=[f"t{i - 1}"]) for i in range(1, 30)]
    with (
        Queue.open(pg_url) as ours,
        Queue.open(pg_url) as theirs,
        psycopg.connect(_conninfo(pg_url), autocommit=True) as listen,
    ):
        listen.execute(f"LISTEN {defaults.NOTIFY_CHANNEL}")
        tasks = ours.submit_many(chain)
        with running_dispatcher(ours, poll=30, workers=2):
            (last,) = theirs.wait([tasks[-1].id], timeout=25)
            heard_at = datetime.now(UTC)
        assert last.state is State.COMPLETE and last.finished_at is not None
        late = (heard_at - last.finished_at).total_seconds()
        assert late < defaults.SAFETY_POLL_SECONDS / 2, f"heard of the end {late:.1f}s late"
        heard = [n for n in listen.notifies(timeout=0.5) if n.payload == ours.token]
        assert 0 < len(heard) < len(tasks), f"{len(heard)} notifications for {len(tasks)} hops"
