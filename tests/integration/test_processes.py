"""Dispatchers as real OS processes: several on one PostgreSQL, kill -9, a server restart,
cross-process wake-ups on SQLite, and SIGTERM with and without enough grace.

What only separate processes show: SKIP LOCKED and NOTIFY between processes, PRAGMA
data_version between processes, a dispatcher that dies without running another line of code,
signals. Every task runs the `effect` action of tests/side_effects.py, which writes one row per
real execution into a table of its own: those rows, not the queue's tables, prove that each
task ran exactly once.
"""

from __future__ import annotations

import contextlib
import json
import signal
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import audit, open_queue, wait_until
from pgcluster import ExternalPostgres, PostgresCluster
from procs import Proc, Processes
from side_effects import URL_ENV, Ledger, register, spec

from taskomatic import Event, Queue, Registry, State, Task

START_SECONDS = 30.0
"""Bound on a dispatcher process starting and registering (it takes about half a second)."""

RUN_SECONDS = 90.0
"""Bound on a test's tasks all finishing; a healthy run needs a fraction of it."""

WAKE_SECONDS = 2.0
"""Bound on the time from a submit to the start of its task when a wake-up carries it."""


@dataclass(frozen=True)
class Running:
    """A dispatcher process and the id it registered under (tasks' `owner`, events' actor)."""

    proc: Proc
    id: uuid.UUID

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Harness:
    """One test's database, the side-effect ledger in it, and the processes the test starts."""

    url: str
    queue: Queue
    ledger: Ledger
    procs: Processes

    def dispatcher(self, *options: str) -> Running:
        """Start `taskomatic dispatcher OPTIONS…` knowing `effect`; return once it registered.

        Its watcher (LISTEN, data_version) starts right after and fires once when it does, so a
        change committed before it listens is not missed either.
        """
        proc = self.procs.start(
            *("--database-url", self.url, "--actions", "side_effects", "dispatcher", *options)
        )

        def registered() -> uuid.UUID | None:
            assert proc.running, f"the dispatcher exited while starting:\n{proc.describe()}"
            return next((d.id for d in self.queue.dispatchers() if d.pid == proc.pid), None)

        found = wait_until(registered, START_SECONDS, f"dispatcher pid {proc.pid} to register")
        assert found is not None  # wait_until returns only what is truthy
        return Running(proc, found)

    def reached(self, task: Task, state: State) -> Task:
        """Wait until the task is in `state`; its row at that moment."""

        def row_if_there() -> Task | None:
            row = self.queue.get(task.id)
            return row if row.state is state else None

        found = wait_until(row_if_there, RUN_SECONDS, f"task {task.id} to be {state}")
        assert found is not None
        return found

    def current(self, tasks: Iterable[Task]) -> dict[uuid.UUID, Task]:
        """The rows of these tasks as they are now, by id."""
        with self.queue.store.read() as conn:
            return {t.id: t for t in self.queue.store.get_many(conn, [t.id for t in tasks])}

    def run_out(self, tasks: Iterable[Task]) -> dict[uuid.UUID, Task]:
        """Wait until no task of the queue is left to run; then these tasks' rows, by id."""
        wait_until(lambda: self.queue.live_count() == 0, RUN_SECONDS, "every task to finish")
        return self.current(tasks)

    def ran_once_each(self, tasks: Iterable[Task]) -> dict[uuid.UUID, int]:
        """Assert that the work of each task, and of nothing else, happened exactly once;
        return the pid of the process that did each."""
        ids = {t.id for t in tasks}
        runs = self.ledger.runs()
        missing = ids - runs.keys()
        repeated = {tid: pids for tid, pids in runs.items() if len(pids) > 1}
        assert not missing, f"{len(missing)} of {len(ids)} never ran, e.g. {sorted(missing)[:3]}"
        assert not repeated, f"{len(repeated)} ran more than once (task: pids): {repeated}"
        assert runs.keys() == ids, f"runs of unknown tasks: {runs.keys() - ids}"
        return {tid: pids[0] for tid, pids in runs.items()}

    def takeovers(self, task_id: uuid.UUID) -> list[Event]:
        """The task's takeover events (running -> running: a new owner)."""
        return [
            e
            for e in self.queue.events(task_id)
            if (e.from_state, e.to_state) == (State.RUNNING, State.RUNNING)
        ]


@contextlib.contextmanager
def _harness(url: str, directory: Path) -> Iterator[Harness]:
    """A Harness over `url`; at the end every process it started is killed and, since pytest
    shows a failed test's teardown output, what each printed lands in the failure report."""
    registry = Registry()
    register(registry)
    ledger = Ledger(url)
    ledger.create()
    procs = Processes(directory, env={URL_ENV: url})
    try:
        with open_queue(url, registry=registry) as queue:
            yield Harness(url, queue, ledger, procs)
    finally:
        print(procs.kill_all())
        ledger.close()


# Each harness depends on its database fixture, so its processes are killed before the
# database is dropped.
@pytest.fixture
def pg(pg_url: str, tmp_path: Path) -> Iterator[Harness]:
    """A Harness on a fresh PostgreSQL database."""
    with _harness(pg_url, tmp_path) as harness:
        yield harness


@pytest.fixture
def lite(sqlite_url: str, tmp_path: Path) -> Iterator[Harness]:
    """A Harness on a fresh SQLite database file."""
    with _harness(sqlite_url, tmp_path) as harness:
        yield harness


@pytest.fixture
def db(db_url: str, tmp_path: Path) -> Iterator[Harness]:
    """A Harness on each backend in turn."""
    with _harness(db_url, tmp_path) as harness:
        yield harness


def _stop_all(dispatchers: Iterable[Running]) -> None:
    """SIGTERM each dispatcher; each must exit 0, as after any healthy run."""
    for d in dispatchers:
        d.proc.signal(signal.SIGTERM)
    statuses = {d.pid: d.proc.wait() for d in dispatchers}
    assert set(statuses.values()) == {0}, f"exit statuses by pid: {statuses}"


# -- many dispatchers ------------------------------------------------------------------------


def test_three_dispatchers_run_2000_tasks_each_exactly_once(pg: Harness) -> None:
    """Three dispatcher processes on one PostgreSQL database complete 2,000 tasks; each
    task's work happens exactly once, in the process the queue says ran it, and the work is
    shared: SKIP LOCKED lets them claim side by side, NOTIFY wakes all of them."""
    dispatchers = [pg.dispatcher("--workers", "4") for _ in range(3)]
    tasks = pg.queue.submit_many([spec() for _ in range(2000)])

    done = pg.run_out(tasks)

    assert pg.queue.counts() == {State.COMPLETE: 2000}
    ran_in = pg.ran_once_each(tasks)
    pid_of = {d.id: d.pid for d in dispatchers}
    odd = [
        t
        for t in done.values()
        if t.owner is None
        or (ran_in[t.id], t.result, t.attempt) != (pid_of[t.owner], {"pid": ran_in[t.id]}, 1)
    ]
    assert not odd, f"{len(odd)} tasks not run once by their owner, e.g. {odd[0]}"
    # All three are woken by the submit's NOTIFY and claim side by side (about a third each
    # in practice); one left idle would have missed its wake-ups or been starved of rows.
    share = {pid_of[owner]: sum(t.owner == owner for t in done.values()) for owner in pid_of}
    assert all(share.values()), f"tasks per dispatcher pid: {share}"
    assert audit(pg.queue) == []
    _stop_all(dispatchers)


# -- crashes ---------------------------------------------------------------------------------


def test_kill_9_survivor_takes_over_after_the_lease_and_checks_before_rerunning(
    pg: Harness,
) -> None:
    """A dispatcher killed with SIGKILL mid-task: once its leases expire, the survivor takes its
    tasks over. The `check` hook finds which ones did their work: those complete with the
    found result, the others run again, so every task completes and none runs twice."""
    victim = pg.dispatcher("--workers", "4", "--lease", "2")
    # Done, but the report never comes: the side effect, then a wait the kill cuts short.
    unreported = pg.queue.submit_many([spec(after=30) for _ in range(2)])
    # Killed before the work: the side effect comes only after a wait the kill cuts short.
    interrupted = pg.queue.submit_many([spec(before=6) for _ in range(2)])
    victims = unreported + interrupted

    def victim_mid_task() -> bool:
        rows, runs = pg.current(victims).values(), pg.ledger.runs()
        held = all(t.state is State.RUNNING and t.owner == victim.id for t in rows)
        return held and all(t.id in runs for t in unreported)

    wait_until(victim_mid_task, RUN_SECONDS, "the victim to run all four, two past their work")
    survivor = pg.dispatcher("--workers", "4", "--lease", "2")
    victim.proc.kill()
    assert victim.proc.popen.returncode == -signal.SIGKILL
    leases = {tid: t.lease_until for tid, t in pg.current(victims).items()}  # nobody renews now
    assert not pg.ledger.runs().keys() & {t.id for t in interrupted}, "killed too late"
    later = pg.queue.submit_many([spec() for _ in range(6)])  # work arriving meanwhile

    done = pg.run_out(victims + later)

    assert {t.state for t in done.values()} == {State.COMPLETE}
    ran_in = pg.ran_once_each(victims + later)
    for task in victims:
        (takeover,) = pg.takeovers(task.id)
        assert takeover.actor == f"dispatcher:{survivor.id}"
        assert str(victim.id) in takeover.message
        lease = leases[task.id]
        assert lease is not None
        assert takeover.at > lease, "taken over before the lease expired"
        assert done[task.id].attempt == 1, "a takeover is not another attempt"
    for task in unreported:  # the check found the work done: not run again
        assert ran_in[task.id] == victim.pid
        assert done[task.id].result == {"pid": victim.pid, "checked": True}
    for task in interrupted + later:  # the check found nothing: run (again) by the survivor
        assert ran_in[task.id] == survivor.pid
        assert done[task.id].result == {"pid": survivor.pid}
    _stop_all([survivor])


def test_postgresql_restart_mid_run_every_task_done_exactly_once(
    pg: Harness, pg_cluster: PostgresCluster | ExternalPostgres
) -> None:
    """The PostgreSQL server restarts while two dispatchers work through 400 tasks: they
    reconnect (with backoff) instead of dying, and the run completes with each task's work
    done exactly once. Runs cut off by the outage fail and are retried (max_attempts)."""
    dispatchers = [pg.dispatcher("--workers", "4") for _ in range(2)]
    tasks = pg.queue.submit_many([spec(before=0.05, max_attempts=5) for _ in range(400)])
    wait_until(lambda: pg.ledger.count() >= 100, RUN_SECONDS, "a quarter of the run")
    assert pg.queue.live_count() > 0, "the run is over already; a restart would prove nothing"

    pg_cluster.restart()

    done = pg.run_out(tasks)
    assert {t.state for t in done.values()} == {State.COMPLETE}
    pg.ran_once_each(tasks)
    assert all(d.proc.running for d in dispatchers), "a dispatcher died with the server"
    logs = "".join(d.proc.output() for d in dispatchers)
    assert "database error, retrying" in logs, "no dispatcher noticed the restart"
    assert audit(pg.queue) == []
    _stop_all(dispatchers)


def test_sigterm_during_a_database_outage_ends_the_dispatcher_in_seconds(
    pg: Harness, pg_cluster: PostgresCluster | ExternalPostgres
) -> None:
    """While PostgreSQL is down a dispatcher retries for minutes; asked to stop, it gives up
    at once and exits 0 rather than holding the operator's `systemctl stop` hostage. What it
    held is recovered by leases once the server is back (the other tests show that)."""
    dispatcher = pg.dispatcher("--workers", "2", "--grace", "1")
    pg_cluster.stop()
    try:
        wait_until(
            lambda: "database error, retrying" in dispatcher.proc.output(),
            RUN_SECONDS,
            "the dispatcher to notice the outage",
        )
        assert dispatcher.proc.stop(timeout=20) == 0, dispatcher.proc.describe()
    finally:
        pg_cluster.start()


# -- wake-ups --------------------------------------------------------------------------------


def test_sqlite_dispatcher_is_woken_by_a_submit_from_another_process(lite: Harness) -> None:
    """A task submitted with `taskomatic submit` starts within seconds although the SQLite
    dispatcher's safety poll is a minute away: it saw the other process's commit (PRAGMA
    data_version). Its own timers (heartbeat every 5 s) would take longer for the second and
    third submit, each made just after the previous task ran."""
    dispatcher = lite.dispatcher("--poll", "60")
    for _ in range(3):
        out = lite.procs.run("--database-url", lite.url, "--json", "submit", "noop")
        (task,) = lite.queue.wait(json.loads(out)["id"], timeout=RUN_SECONDS)
        assert task.state is State.COMPLETE and task.owner == dispatcher.id
        assert task.started_at is not None
        waited = (task.started_at - task.created_at).total_seconds()
        assert waited < WAKE_SECONDS, f"started {waited:.2f}s after its submit: no wake-up?"
    _stop_all([dispatcher])


# -- shutdown --------------------------------------------------------------------------------


def test_sigterm_stops_claiming_and_lets_the_running_task_finish(db: Harness) -> None:
    """On SIGTERM a dispatcher claims nothing more, lets its running task finish within the
    grace period, and exits 0; the task it did not claim waits for the next dispatcher."""
    first = db.dispatcher("--workers", "1", "--grace", "30")
    running, queued = db.queue.submit_many([spec(before=2, priority=1), spec()])
    db.reached(running, State.RUNNING)

    assert first.proc.stop(timeout=20) == 0  # once the task is done, not when the grace is

    now = db.current([running, queued])
    assert now[running.id].state is State.COMPLETE
    assert now[running.id].result == {"pid": first.pid}
    assert now[queued.id].state is State.NEW and now[queued.id].attempt == 0, "claimed late"
    second = db.dispatcher()
    (queued_done,) = db.queue.wait(queued.id, timeout=RUN_SECONDS)
    assert queued_done.state is State.COMPLETE
    assert db.ran_once_each([running, queued]) == {running.id: first.pid, queued.id: second.pid}
    _stop_all([second])


def test_sigterm_hands_a_task_outlasting_the_grace_to_another_dispatcher(db: Harness) -> None:
    """A task still running when the grace period ends: the dispatcher exits 0 all the same,
    expiring the task's lease at once, and the next dispatcher takes the task over without
    waiting out the 60 s lease, finds it never did its work, and runs it once."""
    first = db.dispatcher("--workers", "1", "--grace", "1", "--lease", "60")
    (task,) = db.queue.submit_many([spec(before=3)])
    claimed = db.reached(task, State.RUNNING)

    assert first.proc.stop() == 0

    left = db.queue.get(task.id)
    assert (left.state, left.owner) == (State.RUNNING, first.id)
    assert left.lease_until is not None
    assert left.lease_until <= db.queue.now(), "the lease was kept, not expired at once"
    assert task.id not in db.ledger.runs(), "the stopped run did its work after all"
    second = db.dispatcher()
    (done,) = db.queue.wait(task.id, timeout=RUN_SECONDS)
    assert done.state is State.COMPLETE and done.result == {"pid": second.pid}
    assert db.ran_once_each([task]) == {task.id: second.pid}
    (takeover,) = db.takeovers(task.id)
    assert takeover.actor == f"dispatcher:{second.id}"
    assert claimed.lease_until is not None
    assert takeover.at < claimed.lease_until, "waited for the lease to run out"
    _stop_all([second])
