"""Submitting tasks and reading them back: idempotency, validation, get and list."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from helpers import claim, complete, open_queue, row_counts, run_to_failure
from netfault import reply_cutter

from taskomatic import Context, Param, Queue, Registry, State, TaskSpec, errors
from taskomatic import schema as s
from taskomatic.model import TERMINAL


def _registry() -> Registry:
    reg = Registry()

    @reg.action("guest.start", params={"vm": str, "host": Param(str, default="any")})
    def start(ctx: Context) -> None:
        """Start a VM."""

    return reg


@pytest.fixture
def queue(db_url: str) -> Iterator[Queue]:
    with open_queue(db_url, registry=_registry()) as q:
        yield q


# -- submit ------------------------------------------------------------------------------


def test_submit_one_task(queue: Queue) -> None:
    """A submitted task is new, carries what was asked, and has its first event."""
    when = datetime.now(UTC) + timedelta(hours=1)
    task = queue.submit(
        "guest.start",
        {"vm": "web1"},
        priority=5,
        locks=["host:h1"],
        timeout=30,
        max_attempts=3,
        not_before=when,
        created_by="alice",
    )
    assert task.state is State.NEW
    assert task.params == {"vm": "web1", "host": "any"}
    assert (task.priority, task.timeout, task.max_attempts, task.attempt) == (5, 30.0, 3, 0)
    assert task.locks == ("host:h1",)
    assert task.not_before == when
    assert task.created_by == "alice"
    assert queue.get(task.id) == task
    (event,) = queue.events(task.id)
    assert (event.from_state, event.to_state, event.actor) == (None, State.NEW, "alice")


def test_what_submit_returns_is_what_is_stored(queue: Queue) -> None:
    """The tasks a submission returns (built from the rows it wrote, without reading them
    back) equal what `get` reads: edges, locks, times in UTC, group, pending counts."""
    elsewhere = timezone(timedelta(hours=-7))
    first = queue.submit("guest.start", {"vm": "a"})
    _, tasks = queue.submit_group(
        [
            TaskSpec("guest.start", {"vm": "b"}, name="b", after=[first.id], locks=["x", "a"]),
            TaskSpec(
                "guest.start",
                {"vm": "c"},
                after=["b", first.id],
                not_before=datetime.now(elsewhere) + timedelta(minutes=5),
            ),
        ]
    )
    for task in (first, *tasks):
        assert queue.get(task.id) == task
        assert task.not_before.utcoffset() == timedelta(0)
    assert [t.pending for t in tasks] == [1, 2]


def test_group_dag_with_names_resolved(queue: Queue) -> None:
    """A group is one DAG: names in `after` become edges; only the root is runnable."""
    group, tasks = queue.submit_group(
        [
            TaskSpec("noop", name="root"),
            TaskSpec("guest.start", {"vm": "a"}, name="left", after=["root"]),
            TaskSpec("guest.start", {"vm": "b"}, name="right", after=["root"]),
            TaskSpec("noop", name="join", after=["left", "right"]),
        ],
        name="diamond",
    )
    root, left, right, join = tasks
    assert left.prerequisites == (root.id,) and right.prerequisites == (root.id,)
    assert set(join.prerequisites) == {left.id, right.id}
    assert all(t.group_id == group.id for t in tasks)
    assert group.name == "diamond" and group.state == "running"
    assert group.counts == {State.NEW: 4}
    assert [t.id for t in queue.runnable()] == [root.id]


def test_group_may_depend_on_existing_tasks(queue: Queue) -> None:
    """Edges may point outside the group, at tasks submitted earlier."""
    before = queue.submit("noop")
    _, (inside,) = queue.submit_group([TaskSpec("noop", after=[str(before.id)])])
    assert inside.prerequisites == (before.id,)
    assert inside.pending == 1


def test_resubmitting_the_same_content_returns_the_existing_task(queue: Queue) -> None:
    """A retried submit (lost reply) creates no second row and no second event."""
    tid = uuid.uuid4()
    first = queue.submit("guest.start", {"vm": "a"}, id=tid, priority=2, locks=["x"])
    counts = row_counts(queue)
    again = queue.submit(
        "guest.start", {"vm": "a", "host": "any"}, id=str(tid), priority=2, locks=["x"]
    )
    assert again == first
    assert row_counts(queue) == counts


def test_resubmitting_a_group_with_its_ids_returns_the_existing_tasks(queue: Queue) -> None:
    """The same group, same ids and same edges, submitted twice, is one group."""
    gid, a, b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    specs = [TaskSpec("noop", id=a, name="a"), TaskSpec("noop", id=b, after=["a"])]
    _, first = queue.submit_group(specs, group_id=gid)
    counts = row_counts(queue)
    _, second = queue.submit_group(specs, group_id=gid)
    assert second == first
    assert row_counts(queue) == counts


def test_resubmitting_different_content_is_a_conflict_naming_the_fields(queue: Queue) -> None:
    """Same id, other params and priority: Conflict says which fields differ."""
    tid = uuid.uuid4()
    queue.submit("guest.start", {"vm": "a"}, id=tid)
    counts = row_counts(queue)
    with pytest.raises(errors.Conflict) as caught:
        queue.submit("guest.start", {"vm": "b"}, id=tid, priority=1)
    assert caught.value.fields == ["params", "priority"]
    assert str(tid) in caught.value.message and "params, priority" in caught.value.message
    assert row_counts(queue) == counts


def test_a_conflict_inside_a_group_writes_none_of_it(queue: Queue) -> None:
    """One conflicting task in a group refuses the whole group."""
    tid = uuid.uuid4()
    queue.submit("noop", id=tid)
    counts = row_counts(queue)
    with pytest.raises(errors.Conflict):
        queue.submit_group([TaskSpec("noop"), TaskSpec("noop", id=tid, locks=["k"])])
    assert row_counts(queue) == counts


def _bad(**kwargs: Any) -> TaskSpec:
    return TaskSpec(kwargs.pop("action", "noop"), **kwargs)


UNKNOWN = uuid.UUID(int=42)
CYCLE_A, CYCLE_B = uuid.UUID(int=1), uuid.UUID(int=2)

INVALID_SUBMISSIONS: list[tuple[str, list[TaskSpec], type[errors.TaskomaticError], str]] = [
    ("unknown action", [_bad(action="guest.strat")], errors.UnknownAction, "registered actions:"),
    (
        "unknown param",
        [_bad(action="guest.start", params={"vm": "a", "hots": "h"})],
        errors.InvalidParams,
        "has no parameter 'hots'",
    ),
    (
        "missing param",
        [_bad(action="guest.start", params={})],
        errors.InvalidParams,
        "needs parameter 'vm'",
    ),
    (
        "wrong type",
        [_bad(action="guest.start", params={"vm": 3})],
        errors.InvalidParams,
        "'vm' must be a string, got 3",
    ),
    (
        "unknown prerequisite",
        [_bad(after=[UNKNOWN])],
        errors.UnknownPrerequisite,
        f"prerequisite {UNKNOWN}, which is neither an existing task",
    ),
    (
        "self edge",
        [_bad(id=CYCLE_A, after=[CYCLE_A])],
        errors.CycleError,
        f"{CYCLE_A} -> {CYCLE_A}",
    ),
    (
        "cycle",
        [_bad(id=CYCLE_A, after=[CYCLE_B]), _bad(id=CYCLE_B, after=[CYCLE_A])],
        errors.CycleError,
        f"{CYCLE_A} -> {CYCLE_B} -> {CYCLE_A}",
    ),
    ("duplicate id", [_bad(id=CYCLE_A), _bad(id=CYCLE_A)], errors.ValidationError, "appears twice"),
    ("bad priority", [_bad(priority="high")], errors.ValidationError, "priority must be"),
    ("huge priority", [_bad(priority=2**31)], errors.ValidationError, "priority must be"),
    ("zero attempts", [_bad(max_attempts=0)], errors.ValidationError, "at least 1"),
    ("negative timeout", [_bad(timeout=-5)], errors.ValidationError, "timeout must be"),
    ("infinite timeout", [_bad(timeout=float("inf"))], errors.ValidationError, "timeout must be"),
    (
        "naive not_before",
        [_bad(not_before=datetime(2030, 1, 1))],
        errors.ValidationError,
        "needs a timezone",
    ),
]


@pytest.mark.parametrize(
    ("specs", "kind", "message"),
    [case[1:] for case in INVALID_SUBMISSIONS],
    ids=[case[0] for case in INVALID_SUBMISSIONS],
)
def test_invalid_submissions_raise_typed_errors_and_write_nothing(
    queue: Queue, specs: list[TaskSpec], kind: type[errors.TaskomaticError], message: str
) -> None:
    """Each bad input is its own exception with an actionable message; no row is written."""
    queue.submit("noop")  # something there already, so "nothing written" is not vacuous
    counts = row_counts(queue)
    with pytest.raises(kind) as caught:
        queue.submit_group([TaskSpec("noop", name="fine"), *specs], name="bad")
    assert type(caught.value) is kind
    assert message in caught.value.message
    assert row_counts(queue) == counts


def test_a_cycle_through_an_existing_task_is_refused(queue: Queue) -> None:
    """Resubmitting an existing task with an edge to a new task cannot close a cycle."""
    old = queue.submit("noop")
    new_id = uuid.uuid4()
    counts = row_counts(queue)
    with pytest.raises(errors.CycleError):
        queue.submit_many(
            [
                TaskSpec("noop", id=old.id, after=[new_id]),
                TaskSpec("noop", id=new_id, after=[old.id]),
            ]
        )
    # Without the back edge it is simply a changed task: a conflict on its prerequisites.
    with pytest.raises(errors.Conflict) as caught:
        queue.submit_many(
            [TaskSpec("noop", id=old.id, after=[new_id]), TaskSpec("noop", id=new_id)]
        )
    assert caught.value.fields == ["prerequisites"]
    assert row_counts(queue) == counts
    assert queue.get(old.id).prerequisites == ()


@pytest.mark.parametrize("sink", [State.FAILED, State.CANCELLED])
def test_a_task_submitted_after_a_sunk_prerequisite_is_cancelled_at_once(
    queue: Queue, sink: State
) -> None:
    """A dependent of a failed or cancelled task never sits in `new`: it ends, naming it."""
    pre = queue.submit("noop")
    if sink is State.FAILED:
        run_to_failure(queue, pre)
    else:
        queue.cancel(pre.id)
    task = queue.submit("noop", after=[pre.id])
    assert task.state is State.CANCELLED
    verb = "failed" if sink is State.FAILED else "was cancelled"
    assert task.error is not None
    assert task.error["message"] == f"prerequisite {pre.id} {verb}"
    assert task.error["prerequisite"] == str(pre.id)
    assert [(e.from_state, e.to_state) for e in queue.events(task.id)] == [
        (None, State.NEW),
        (State.NEW, State.CANCELLED),
    ]


def test_a_task_submitted_after_a_complete_prerequisite_is_runnable(queue: Queue) -> None:
    """Only incomplete prerequisites count as pending."""
    pre = queue.submit("noop")
    owner = uuid.uuid4()
    complete(queue, owner, claim(queue, owner)[0])
    task = queue.submit("noop", after=[pre.id])
    assert task.pending == 0
    assert [t.id for t in queue.runnable()] == [task.id]


def test_a_dependent_submitted_while_its_prerequisite_completes_is_not_stranded(
    db_url: str,
) -> None:
    """A submit racing the completion of its prerequisite still counts that completion."""
    with open_queue(db_url) as queue, open_queue(db_url) as other:
        pre = queue.submit("noop")
        owner = uuid.uuid4()
        (running,) = claim(queue, owner)
        tid = uuid.uuid4()
        blocker = queue.store.engine.connect()
        blocker_tx = blocker.begin()
        # An uncommitted row with the same id parks the submit between reading its
        # prerequisite's state and inserting its own row.
        blocker.execute(
            s.tasks.insert().values(
                id=tid,
                seq=10**9,
                action="noop",
                params={},
                state="new",
                priority=0,
                not_before=datetime.now(UTC),
                max_attempts=1,
                attempt=0,
                locks=[],
                created_at=datetime.now(UTC),
                updated_at=datetime.now(UTC),
                pending=0,
            )
        )
        results: dict[str, Any] = {}

        def submit() -> None:
            results["task"] = other.submit("noop", id=tid, after=[pre.id])

        def finish() -> None:
            complete(queue, owner, running)

        submitter = threading.Thread(target=submit)
        submitter.start()
        submitter.join(0.5)  # the submit is now waiting on the blocker
        completer = threading.Thread(target=finish)
        completer.start()
        completer.join(0.5)
        blocker_tx.rollback()
        blocker.close()
        submitter.join(10)
        completer.join(10)
        assert queue.get(pre.id).state is State.COMPLETE
        task = queue.get(tid)
        assert task.pending == 0, "the completed prerequisite is still counted as pending"
        assert [t.id for t in queue.runnable()] == [tid]


# -- get and list ------------------------------------------------------------------------


def test_get_unknown_task(queue: Queue) -> None:
    """An unknown id is TaskNotFound; a malformed one is a validation error."""
    missing = uuid.uuid4()
    with pytest.raises(errors.TaskNotFound, match=str(missing)):
        queue.get(missing)
    with pytest.raises(errors.ValidationError, match="is not a task id"):
        queue.get("web1")


def test_list_filters_by_state_action_and_group(queue: Queue) -> None:
    """Each filter narrows the listing to exactly the matching tasks."""
    a = queue.submit("noop")
    b = queue.submit("guest.start", {"vm": "x"})
    group, (c, d) = queue.submit_group([TaskSpec("noop"), TaskSpec("guest.start", {"vm": "y"})])
    queue.cancel(a.id)

    def ids(**kw: Any) -> set[uuid.UUID]:
        return {t.id for t in queue.list(**kw).tasks}

    assert ids() == {a.id, b.id, c.id, d.id}
    assert ids(state="cancelled") == {a.id}
    assert ids(state=[State.NEW, State.CANCELLED]) == {a.id, b.id, c.id, d.id}
    assert ids(state=State.RUNNING) == set()
    assert ids(action="guest.start") == {b.id, d.id}
    assert ids(group=group.id) == {c.id, d.id}
    assert ids(group=str(group.id), action="noop") == {c.id}
    assert ids(state="new", action="noop") == {c.id}


def test_listed_tasks_carry_their_prerequisites(queue: Queue) -> None:
    """A listing shows what each task waits for, as `get` does."""
    first = queue.submit("noop")
    _, (second, third) = queue.submit_group(
        [TaskSpec("noop", name="s", after=[first.id]), TaskSpec("noop", after=["s", first.id])]
    )
    listed = {t.id: t.prerequisites for t in queue.list().tasks}
    assert listed == {
        first.id: (),
        second.id: (first.id,),
        third.id: tuple(sorted([first.id, second.id])),
    }
    assert listed[third.id] == queue.get(third.id).prerequisites


def test_list_pages_cover_every_task_once_newest_first(queue: Queue) -> None:
    """Following the cursor visits each task exactly once, in reverse submission order."""
    submitted = [t.id for t in queue.submit_many([TaskSpec("noop") for _ in range(17)])]
    submitted += [queue.submit("noop").id for _ in range(6)]
    seen: list[uuid.UUID] = []
    cursor = None
    pages = 0
    while True:
        page = queue.list(limit=5, cursor=cursor)
        assert len(page.tasks) <= 5
        seen += [t.id for t in page.tasks]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == submitted[::-1]
    assert pages == 5
    # A task submitted while paging shows up on a fresh first page, not in the middle.
    newest = queue.submit("noop")
    assert queue.list(limit=1).tasks[0].id == newest.id


def test_list_last_full_page_has_no_cursor(queue: Queue) -> None:
    """When the tasks fill the last page exactly, there is no empty page after it."""
    queue.submit_many([TaskSpec("noop") for _ in range(4)])
    first = queue.list(limit=2)
    assert first.next_cursor is not None
    second = queue.list(limit=2, cursor=first.next_cursor)
    assert len(second.tasks) == 2 and second.next_cursor is None


@pytest.mark.parametrize("limit", [0, -1, 1001])
def test_list_limit_is_bounded(queue: Queue, limit: int) -> None:
    """A page holds 1 to 1000 tasks; anything else is refused with the bounds."""
    with pytest.raises(errors.ValidationError, match="between 1 and 1000"):
        queue.list(limit=limit)


def test_list_rejects_an_unknown_state(queue: Queue) -> None:
    """A misspelt state filter is a validation error listing the states, not a crash."""
    with pytest.raises(errors.ValidationError, match="complete") as caught:
        queue.list(state="done")
    assert "'done'" in caught.value.message


def test_counts_by_state(queue: Queue) -> None:
    """The dashboard's counts agree with what was done."""
    a, _, _ = queue.submit_many([TaskSpec("noop"), TaskSpec("noop"), TaskSpec("noop")])
    queue.cancel(a.id)
    assert queue.counts() == {State.NEW: 2, State.CANCELLED: 1}
    assert queue.live_count() == 2
    assert sum(n for st, n in queue.counts().items() if st in TERMINAL) == 1


def test_group_not_found(queue: Queue) -> None:
    """An unknown group id is its own error."""
    with pytest.raises(errors.GroupNotFound):
        queue.group(uuid.uuid4())


def test_submit_on_a_database_without_schema_says_to_init(db_url: str) -> None:
    """Talking to an uninitialised database is SchemaError ("run taskomatic db init")."""
    with open_queue(db_url) as queue:
        s.metadata.drop_all(queue.store.engine)
        with pytest.raises(errors.SchemaError, match="db init"):
            queue.submit("noop")
        with pytest.raises(errors.SchemaError):
            queue.get(uuid.uuid4())
        assert queue.init_db() == s.SCHEMA_VERSION
        assert queue.submit("noop").state is State.NEW
        with queue.store.read() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(s.tasks)).scalar() == 1


@pytest.mark.parametrize(
    ("how", "marker"),
    [("tasks alone", b"INSERT INTO tasks"), ("a group", b"COMMIT")],
)
def test_a_submission_whose_commit_was_not_heard_of_returns_its_tasks_once(
    pg_url: str, how: str, marker: bytes
) -> None:
    """The network fails after the server committed a submission but before its reply
    arrived: the retry finds the tasks the first attempt wrote and returns them, as one
    task each, rather than failing on their ids or writing them twice."""
    specs = [TaskSpec("noop", name="a"), TaskSpec("noop", after=["a"], locks=["k"])]
    with reply_cutter(pg_url) as cutter, open_queue(cutter.url.render_as_string(False)) as queue:
        queue.submit("noop")  # connected, and past the session's first statements
        cutter.cut_after(marker)
        if how == "a group":
            _, tasks = queue.submit_group(specs, name="g")
        else:
            tasks = queue.submit_many(specs)
        assert cutter.cuts == 1
        assert [queue.get(t.id) for t in tasks] == tasks
        assert tasks[1].prerequisites == (tasks[0].id,) and tasks[1].pending == 1
        counts = row_counts(queue)
        assert (counts["tasks"], counts["task_events"], counts["task_prerequisites"]) == (3, 3, 1)


def test_a_submission_after_the_server_ended_the_pooled_sessions_runs_on_a_new_one(
    pg_url: str,
) -> None:
    """Sessions the server ended (a restart, an administrator) are found broken when
    a submission uses them: it is retried on a new connection and written once."""
    url = sa.make_url(pg_url)
    admin = url.set(drivername="postgresql", database="postgres")
    with open_queue(pg_url) as queue:
        first = queue.submit("noop")
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as c:
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                [url.database],
            )
        second = queue.submit("noop")
        assert [queue.get(t.id) for t in (first, second)] == [first, second]
        assert row_counts(queue)["tasks"] == 2


def test_an_unreachable_database_is_given_up_on_after_give_up_seconds() -> None:
    """A queue retries a lost database with backoff, then fails with DatabaseUnavailable;
    `give_up` bounds how long (the CLI uses a short one: a person is waiting)."""
    queue = Queue.open("postgresql+psycopg://x@127.0.0.1:1/x", give_up=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(errors.DatabaseUnavailable, match="database unavailable"):
            queue.submit("noop")
    finally:
        queue.close()
    assert time.monotonic() - started < 30  # far below the 300 s a dispatcher rides out
