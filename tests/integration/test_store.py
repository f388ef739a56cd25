"""The store's contract on both backends: invariants, the one runnable definition, the schema."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
import sqlalchemy as sa
from helpers import (
    OffsetClock,
    assert_timelines_consistent,
    audit,
    claim,
    complete,
    fail,
    held_locks,
    open_queue,
    run_to_completion,
    run_to_failure,
    running_dispatcher,
)

from taskomatic import (
    Context,
    Dispatcher,
    Queue,
    Registry,
    State,
    Task,
    TaskSpec,
    defaults,
    errors,
)
from taskomatic import schema as s
from taskomatic.model import TERMINAL, Move
from taskomatic.queue import Outcome
from taskomatic.store.base import Change


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock()


@pytest.fixture
def queue(db_url: str, clock: OffsetClock) -> Iterator[Queue]:
    with open_queue(db_url, clock=clock) as q:
        yield q


# -- invariants ------------------------------------------------------------------------------


def test_audit_is_clean_after_a_mixed_workload(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chains, locks, failures, retries and cancellations leave every invariant intact."""
    monkeypatch.setattr(defaults, "RETRY_BACKOFF_BASE_SECONDS", 0.02)
    registry = Registry()
    calls: dict[str, int] = {}
    guard = threading.Lock()

    @registry.action("flaky")
    def flaky(ctx: Context) -> int:
        with guard:
            calls[str(ctx.task_id)] = calls.get(str(ctx.task_id), 0) + 1
            if calls[str(ctx.task_id)] == 1:
                raise RuntimeError("first attempt breaks")
            return calls[str(ctx.task_id)]

    with open_queue(db_url, registry=registry) as queue:
        # Not a group: a group stops at its first failure; these run on past one.
        tasks = queue.submit_many(
            [
                TaskSpec("noop", name="a", locks=["vm:1"]),
                TaskSpec("flaky", name="b", after=["a"], locks=["vm:1"], max_attempts=2),
                TaskSpec("fail", name="c", after=["a"], locks=["vm:2"]),
                TaskSpec("noop", name="d", after=["b", "c"]),
                TaskSpec("noop", name="e", after=["d"], locks=["vm:1", "vm:2"]),
                TaskSpec("sleep", {"seconds": 0.01}, name="f", locks=["vm:2"]),
                TaskSpec("noop", name="g", after=["f"]),
            ],
        )
        doomed = queue.submit("noop")
        doomed_dependent = queue.submit("noop", after=[doomed.id])
        queue.cancel(doomed.id)
        later = queue.submit("noop", not_before=queue.now() + timedelta(hours=1))
        chain = queue.submit_many(
            [TaskSpec("flaky", name="h", max_attempts=1), TaskSpec("noop", after=["h"])]
        )
        ids = [t.id for t in [*tasks, doomed, doomed_dependent, later, *chain]]
        finished = [i for i in ids if i != later.id]
        with running_dispatcher(queue, workers=3):
            queue.wait(finished, timeout=20)
            assert audit(queue) == []
            queue.retry(chain[0].id)  # failed once: runs again and succeeds, with its dependent
            queue.retry(doomed.id)
            queue.wait(finished, timeout=20)
        states = {t.id: t.state for t in queue.wait(finished, timeout=1)}
        assert audit(queue) == []
        assert held_locks(queue) == {}
        assert_timelines_consistent(queue, ids)
        a, b, c, d, e, f, g = tasks
        assert [states[t.id] for t in (a, b, c, d, e, f, g)] == [
            State.COMPLETE,
            State.COMPLETE,
            State.FAILED,
            State.CANCELLED,
            State.CANCELLED,
            State.COMPLETE,
            State.COMPLETE,
        ]
        assert all(states[t.id] is State.COMPLETE for t in chain)
        assert states[doomed.id] is State.COMPLETE and states[doomed_dependent.id] is State.COMPLETE
        assert queue.get(later.id).state is State.NEW


def test_audit_reports_broken_invariants(queue: Queue) -> None:
    """The audit is not vacuous: a wrong pending count and a stale lock are both reported."""
    a = queue.submit("noop", locks=["vm:x"])
    b = queue.submit("noop", after=[a.id])
    run_to_completion(queue, a)
    assert audit(queue) == []
    with queue.store.write() as conn:
        conn.execute(s.tasks.update().where(s.tasks.c.id == b.id).values(pending=1))
        conn.execute(s.held_locks.insert().values(key="vm:x", task_id=a.id, since=queue.now()))
    problems = audit(queue)
    assert f"task {b.id}: pending=1 but 0 prerequisites are incomplete" in problems
    assert f"lock vm:x held by task {a.id}, which is complete" in problems


# -- the one runnable definition -------------------------------------------------------------


def _definitely_runnable(queue: Queue) -> list[uuid.UUID]:
    """Runnable by the words of DESIGN.md, computed in Python from the rows, in dispatch order."""
    everything: list[Task] = []
    cursor = None
    while True:
        page = queue.list(limit=100, cursor=cursor)
        everything += page.tasks
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    state = {t.id: t.state for t in everything}
    held = set(held_locks(queue))
    now = queue.now()
    oldest_first = everything[::-1]
    runnable = [
        t
        for t in oldest_first
        if t.state is State.NEW
        and all(state[p] is State.COMPLETE for p in queue.get(t.id).prerequisites)
        and t.not_before <= now
        and not held & set(t.locks)
    ]
    return [t.id for t in sorted(runnable, key=lambda t: -t.priority)]  # stable: age kept


def test_runnable_agrees_with_the_definition(queue: Queue, clock: OffsetClock) -> None:
    """Over a graph with every kind of blocker, the runnable query is exactly the definition."""
    owner = uuid.uuid4()
    done = queue.submit("noop", priority=100)
    run_to_completion(queue, done)
    failed = queue.submit("noop", priority=100)
    run_to_failure(queue, failed)
    holder = queue.submit("noop", locks=["vm:held"], priority=100)
    (holder,) = claim(queue, owner)
    busy = queue.submit("noop", priority=100)
    (busy,) = claim(queue, owner)
    retrying = queue.submit("noop", max_attempts=2, priority=100)
    fail(queue, owner, claim(queue, owner)[0])  # back to new, with a backoff in not_before

    free = queue.submit("noop")
    after_done = queue.submit("noop", after=[done.id], priority=3)
    queue.submit("noop", after=[free.id])  # prerequisite new
    queue.submit("noop", after=[busy.id])  # prerequisite running
    queue.submit("noop", after=[done.id, busy.id])  # one of two incomplete
    later = queue.submit("noop", not_before=clock() + timedelta(minutes=5))
    queue.submit("noop", locks=["vm:held"])  # lock held by a running task
    queue.submit("noop", locks=["vm:free", "vm:held"])  # one of its locks held
    shared_1 = queue.submit("noop", locks=["vm:shared"])  # shared but not held: both runnable
    shared_2 = queue.submit("noop", locks=["vm:shared"], priority=3)
    urgent = queue.submit("noop", priority=7)
    queue.cancel(queue.submit("noop", priority=9).id)

    expected = [urgent.id, after_done.id, shared_2.id, free.id, shared_1.id]
    assert _definitely_runnable(queue) == expected
    assert [t.id for t in queue.runnable()] == expected
    assert [t.id for t in queue.runnable(limit=2)] == expected[:2]

    # Time passes: the delayed and the retrying task join, in their places.
    clock.advance(600)
    assert [t.id for t in queue.runnable()] == _definitely_runnable(queue)
    assert {later.id, retrying.id} <= {t.id for t in queue.runnable()}

    # The holder ends and frees its key. The claim then takes the runnable tasks in that
    # same order, except one that would share a key with a task this claim already took.
    complete(queue, owner, holder)
    runnable = _definitely_runnable(queue)
    assert [t.id for t in queue.runnable()] == runnable
    expected_claim: list[uuid.UUID] = []
    taken: set[str] = set()
    for tid in runnable:
        keys = set(queue.get(tid).locks)
        if not keys & taken:
            expected_claim.append(tid)
            taken |= keys
    assert len(expected_claim) < len(runnable), "the graph should exercise a lock conflict"
    assert [t.id for t in claim(queue, owner, 50)] == expected_claim
    assert audit(queue) == []


def test_claim_takes_runnable_tasks_in_dispatch_order(queue: Queue) -> None:
    """The dispatch path claims the head of the runnable query, in its order."""
    tasks = [queue.submit("noop", priority=p) for p in (1, 5, 1, 9, 0)]
    order = [t.id for t in queue.runnable()]
    assert order == [tasks[i].id for i in (3, 1, 0, 2, 4)]
    owner = uuid.uuid4()
    assert [t.id for t in claim(queue, owner, 2)] == order[:2]
    assert [t.id for t in queue.runnable()] == order[2:]
    assert [t.id for t in claim(queue, owner, 10)] == order[2:]
    assert claim(queue, owner, 10) == []


def test_each_task_completed_in_one_cycle_keeps_its_own_result(queue: Queue) -> None:
    """Results reported together are stored each with its task, including results that
    Python holds equal but JSON does not (1 and true), and results all alike."""
    owner = uuid.uuid4()
    for results in ([1, True], [1, True, "1", None, {"vm": "a"}], [{"same": [1]}] * 4):
        queue.submit_many([TaskSpec("noop") for _ in results])
        running = claim(queue, owner, len(results))
        outcomes = [Outcome(t, True, result=r) for t, r in zip(running, results, strict=True)]
        cycle = queue.cycle(owner, outcomes, 0, 30.0)
        assert cycle.refused == {}
        stored = [queue.get(t.id) for t in running]
        assert [t.state for t in stored] == [State.COMPLETE] * len(results)
        assert [(type(t.result), t.result) for t in stored] == [(type(r), r) for r in results]


def test_a_cycle_after_the_server_dropped_the_kept_connection_runs_on_a_new_one(
    pg_url: str,
) -> None:
    """PostgreSQL's one-step cycle keeps its connection between cycles; when the server ends
    that session, the next cycle is retried on a new connection and loses nothing."""
    name = sa.make_url(pg_url).database
    admin = sa.make_url(pg_url).set(drivername="postgresql", database="postgres")
    with open_queue(pg_url) as queue:
        a, b = queue.submit_many(
            [TaskSpec("noop", name="a"), TaskSpec("noop", name="b", after=["a"])]
        )
        owner = uuid.uuid4()
        first = queue.cycle(owner, [], 1, 30.0)
        assert [t.id for t in first.claimed] == [a.id]
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as c:
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                [name],
            )
        second = queue.cycle(owner, [Outcome(first.claimed[0], True, result="done")], 1, 30.0)
        assert [t.id for t in second.claimed] == [b.id]
        assert queue.get(a.id).state is State.COMPLETE
        assert queue.get(a.id).result == "done"


def test_the_cycles_kept_connection_goes_back_to_the_pool_transactional(pg_url: str) -> None:
    """The one-step cycle keeps its connection in autocommit; once the dispatcher's loop
    ends, the connection goes back to the pool out of it, so that a later transaction on
    it is still all or nothing."""
    with open_queue(pg_url) as queue:
        queue.submit("noop")
        assert len(queue.cycle(uuid.uuid4(), [], 1, 30.0).claimed) == 1
        queue.cycles_done()
        pool = queue.store.engine.pool
        pooled = [queue.store.engine.raw_connection() for _ in range(pool.checkedin())]
        try:
            assert len(pooled) >= 1
            assert [c.driver_connection.autocommit for c in pooled] == [False] * len(pooled)
        finally:
            for c in pooled:
                c.close()


def test_concurrent_claimers_never_share_a_task(db_url: str) -> None:
    """Four dispatchers claiming at once get disjoint sets that cover every task."""
    with open_queue(db_url) as queue:
        tasks = queue.submit_many([TaskSpec("noop") for _ in range(60)])
    got: dict[int, list[uuid.UUID]] = {}
    errors_seen: list[BaseException] = []
    start = threading.Barrier(4)

    def claimer(n: int) -> None:
        try:
            with open_queue(db_url) as mine:
                owner = uuid.uuid4()
                start.wait()
                got[n] = []
                while batch := claim(mine, owner, 4):
                    got[n] += [t.id for t in batch]
        except BaseException as exc:
            errors_seen.append(exc)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert errors_seen == []
    everything = [tid for ids in got.values() for tid in ids]
    assert sorted(everything) == sorted(t.id for t in tasks)
    with open_queue(db_url) as queue:
        assert queue.counts() == {State.RUNNING: 60}
        for tid in everything[:5]:
            assert [e.to_state for e in queue.events(tid)] == [State.NEW, State.RUNNING]


# -- guarded moves ------------------------------------------------------------------------------


def test_guarded_moves_refuse_the_wrong_state_or_owner(queue: Queue) -> None:
    """A move applies only from its source states and for the owner; refusals write nothing."""
    owner, stranger = uuid.uuid4(), uuid.uuid4()
    waiting = queue.submit("noop")
    running = queue.submit("noop")
    (claimed,) = claim(queue, owner)
    assert claimed.id == waiting.id
    now = queue.now()
    events_before = len(queue.events(waiting.id)) + len(queue.events(running.id))
    with queue.store.write() as conn:
        moved = queue.store.move(
            conn,
            Move.COMPLETE,
            [Change(waiting.id, {"result": 1}, "x"), Change(running.id, {"result": 2}, "y")],
            now,
            "test",
            owner=stranger,
        )
    assert moved.moved == {}
    assert moved.refused == {waiting.id: State.RUNNING, running.id: State.NEW}
    assert len(queue.events(waiting.id)) + len(queue.events(running.id)) == events_before
    with queue.store.write() as conn:
        moved = queue.store.move(
            conn,
            Move.COMPLETE,
            [Change(waiting.id, {"result": 1}, "done"), Change(uuid.uuid4(), {}, "ghost")],
            now,
            "test",
            owner=owner,
        )
    assert moved.moved == {waiting.id: State.RUNNING}
    assert list(moved.refused.values()) == [None]
    assert queue.get(waiting.id).state is State.COMPLETE
    assert queue.get(running.id).state is State.NEW


# -- the schema ----------------------------------------------------------------------------------


def test_schema_init_is_idempotent_and_records_the_version(queue: Queue) -> None:
    """`db init` on an initialised database changes nothing and keeps the data."""
    task = queue.submit("noop")
    assert queue.init_db() == s.SCHEMA_VERSION
    assert queue.init_db() == s.SCHEMA_VERSION
    assert queue.store.schema_version() == s.SCHEMA_VERSION
    with queue.store.read() as conn:
        versions = conn.execute(sa.select(s.schema_version.c.version)).scalars().all()
    assert versions == [s.SCHEMA_VERSION]
    assert queue.get(task.id) == task


def test_a_schema_from_another_version_is_refused(queue: Queue) -> None:
    """A database written by a newer taskomatic is not silently used."""
    with queue.store.write() as conn:
        conn.execute(s.schema_version.insert().values(version=999, applied_at=queue.now()))
    with pytest.raises(errors.SchemaError) as caught:
        queue.init_db()
    assert caught.value.message == (
        f"database has schema version 999, this taskomatic expects {s.SCHEMA_VERSION}"
    )


def test_an_empty_database_has_no_schema_version(queue: Queue) -> None:
    """Before `db init` the store says so, and init creates everything."""
    s.metadata.drop_all(queue.store.engine)
    assert queue.store.schema_version() is None
    assert queue.init_db() == s.SCHEMA_VERSION
    assert queue.store.schema_version() == s.SCHEMA_VERSION
    assert queue.counts() == {}


def test_finished_tasks_keep_their_results(queue: Queue) -> None:
    """Terminal tasks, results and errors stay readable (retention is a policy, not a loss)."""
    ok = run_to_completion(queue, queue.submit("noop"), result={"vm": "up"})
    bad = run_to_failure(queue, queue.submit("noop"), "no such host")
    assert queue.get(ok.id).result == {"vm": "up"}
    assert queue.get(bad.id).error is not None
    assert {t.state for t in queue.list().tasks} <= TERMINAL


def test_db_init_adds_the_host_job_columns_to_a_version_3_database(db_url: str) -> None:
    """A database from before host jobs and compensation (version 3) gets their columns
    from `db init`; what was queued stays, and the new columns work."""
    with Queue.open(db_url) as queue:
        kept = queue.submit("noop")
        with queue.store.write() as conn:
            for table, column in s.ADDED_COLUMNS[4]:
                conn.execute(sa.text(f"ALTER TABLE {table} DROP COLUMN {column}"))
            conn.execute(s.schema_version.delete())
            conn.execute(s.schema_version.insert().values(version=3, applied_at=queue.now()))
        assert queue.init_db() == s.SCHEMA_VERSION
        assert queue.store.schema_version() == s.SCHEMA_VERSION
        task = queue.get(kept.id)
        assert (task.state, task.job, task.stop_request, task.compensates) == (
            State.NEW,
            None,
            None,
            None,
        )


def _index_definition(queue: Queue, name: str) -> str:
    """The CREATE INDEX statement the database holds for `name`."""
    with queue.store.read() as conn:
        if conn.dialect.name == "postgresql":
            query = "SELECT indexdef FROM pg_indexes WHERE indexname = :name"
        else:
            query = "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = :name"
        return str(conn.execute(sa.text(query), {"name": name}).scalar_one())


def test_db_init_redefines_the_index_of_delayed_tasks_of_a_version_4_database(
    db_url: str,
) -> None:
    """A version 4 database's index of delayed tasks (one the runnable query could use, and
    with stale statistics did, sorting every ready task per claim) is re-created by `db
    init`; what was queued stays, and the next due time is still found."""
    with Queue.open(db_url) as queue:
        soon = queue.now() + timedelta(hours=1)
        delayed = queue.submit("noop", not_before=soon)
        with queue.store.write() as conn:
            conn.execute(sa.text("DROP INDEX tasks_scheduled"))
            conn.execute(
                sa.text(
                    "CREATE INDEX tasks_scheduled ON tasks (not_before) "
                    "WHERE state = 'new' AND pending = 0"
                )
            )
            conn.execute(s.schema_version.delete())
            conn.execute(s.schema_version.insert().values(version=4, applied_at=queue.now()))
        assert "priority IS NOT NULL" not in _index_definition(queue, "tasks_scheduled")

        assert queue.init_db() == s.SCHEMA_VERSION
        assert "priority IS NOT NULL" in _index_definition(queue, "tasks_scheduled")
        assert queue.get(delayed.id).state is State.NEW
        with queue.store.read() as conn:
            assert queue.store.next_due(conn, queue.now()) == soon


@pytest.mark.parametrize(
    ("column", "value"),
    [("state", "paused"), ("pending", -1), ("attempt", -1), ("max_attempts", 0)],
)
def test_the_database_refuses_an_impossible_task_row(
    queue: Queue, column: str, value: object
) -> None:
    """Whatever writes to the tables, a task cannot hold an unknown state or a negative
    count (a domain's check on PostgreSQL, a CHECK constraint on SQLite); the row stays."""
    task = queue.submit("noop")
    with pytest.raises(sa.exc.IntegrityError), queue.store.write() as conn:
        conn.execute(s.tasks.update().where(s.tasks.c.id == task.id).values({column: value}))
    assert queue.get(task.id) == task


def test_db_init_moves_the_task_checks_of_a_version_5_database_into_domains(
    pg_url: str,
) -> None:
    """On PostgreSQL, version 6 checks tasks' state and counters with domains instead of
    the table's CHECK constraints (re-read at every UPDATE): `db init` replaces them in a
    version 5 database, what was queued stays, and the checks still hold."""
    with Queue.open(pg_url) as queue:
        kept = queue.submit("noop", max_attempts=3)
        with queue.store.write() as conn:
            conn.execute(
                sa.text(
                    "ALTER TABLE tasks ALTER COLUMN state TYPE varchar(16), "
                    "ALTER COLUMN pending TYPE integer, ALTER COLUMN attempt TYPE integer, "
                    "ALTER COLUMN max_attempts TYPE integer, "
                    "ADD CONSTRAINT tasks_state_valid CHECK (state IN ('new', 'running')), "
                    "ADD CONSTRAINT tasks_pending_nonnegative CHECK (pending >= 0), "
                    "ADD CONSTRAINT tasks_attempts_valid "
                    "CHECK (attempt >= 0 AND max_attempts >= 1)"
                )
            )
            conn.execute(sa.text("DROP DOMAIN task_state, task_count, task_max_attempts"))
            conn.execute(s.schema_version.delete())
            conn.execute(s.schema_version.insert().values(version=5, applied_at=queue.now()))

        assert queue.init_db() == s.SCHEMA_VERSION
        with queue.store.read() as conn:
            checks = (
                conn.execute(
                    sa.text(
                        "SELECT conname FROM pg_constraint "
                        "WHERE contype = 'c' AND conrelid = 'tasks'::regclass"
                    )
                )
                .scalars()
                .all()
            )
            types = dict(
                conn.execute(
                    sa.text(
                        "SELECT column_name, domain_name FROM information_schema.columns "
                        "WHERE table_name = 'tasks' AND domain_name IS NOT NULL"
                    )
                ).all()
            )
        assert checks == []
        assert types == {
            "state": "task_state",
            "pending": "task_count",
            "attempt": "task_count",
            "max_attempts": "task_max_attempts",
        }
        assert queue.get(kept.id) == kept
        assert run_to_completion(queue, kept).state is State.COMPLETE
        with pytest.raises(sa.exc.IntegrityError), queue.store.write() as conn:
            conn.execute(s.tasks.update().values(state="paused"))


def test_connection_options_in_the_url_are_kept(pg_url: str) -> None:
    """Options a user puts in a PostgreSQL URL still apply, with the sessions in UTC that
    the store adds; times come back in UTC."""
    url = sa.make_url(pg_url).update_query_dict({"options": "-c application_name=fleet-ui"})
    with Queue.open(url.render_as_string(hide_password=False)) as queue:
        queue.init_db()
        task = queue.submit("noop")
        with queue.store.read() as conn:
            settings = conn.execute(
                sa.text("SELECT current_setting('application_name'), current_setting('TimeZone')")
            ).one()
        assert tuple(settings) == ("fleet-ui", "UTC")
        assert queue.get(task.id).created_at.utcoffset() == timedelta(0)


def test_a_role_that_may_not_create_temporary_objects_still_runs_its_chains(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A dispatcher's cycle is one call of a function it creates in its session; a role
    without the TEMPORARY privilege gets one warning and the same results, through the
    statements one by one."""
    url = sa.make_url(pg_url)
    role = f"taskomatic_no_temp_{uuid.uuid4().hex[:8]}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"REVOKE TEMPORARY ON DATABASE {url.database} FROM PUBLIC")
        conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
        conn.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")
    try:
        with Queue.open(url.set(username=role).render_as_string(hide_password=False)) as queue:
            first, second, third = queue.submit_many(
                [
                    TaskSpec("noop", name="a"),
                    TaskSpec("noop", name="b", after=["a"]),
                    TaskSpec("noop", name="c", after=["b"]),
                ]
            )
            with caplog.at_level(logging.WARNING, logger="taskomatic.store.postgres"):
                Dispatcher(queue, workers=2).run(until_empty=True)
            tasks = [queue.get(t.id) for t in (first, second, third)]
            assert [t.state for t in tasks] == [State.COMPLETE] * 3
            assert tasks[0].finished_at <= tasks[1].started_at  # type: ignore[operator]
            assert tasks[1].finished_at <= tasks[2].started_at  # type: ignore[operator]
        refusals = [r for r in caplog.records if "cycle function" in r.getMessage()]
        assert len(refusals) == 1 and "GRANT TEMPORARY" in refusals[0].getMessage()
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
