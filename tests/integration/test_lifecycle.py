"""A task's life through the Queue API: events, cancel, retry, collect and wait."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from helpers import (
    OffsetClock,
    assert_timelines_consistent,
    audit,
    claim,
    complete,
    error_of,
    fail,
    open_queue,
    run_to_completion,
    run_to_failure,
    running_dispatcher,
)

from taskomatic import Context, Queue, Registry, State, Task, TaskSpec, errors
from taskomatic.model import TERMINAL, Move
from taskomatic.store.base import Change


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock()


@pytest.fixture
def queue(db_url: str, clock: OffsetClock) -> Iterator[Queue]:
    with open_queue(db_url, clock=clock) as q:
        yield q


def _moves(queue: Queue, task: Task) -> list[tuple[State | None, State]]:
    return [(e.from_state, e.to_state) for e in queue.events(task.id)]


# -- events --------------------------------------------------------------------------------


def test_submit_claim_complete_writes_one_event_per_transition(queue: Queue) -> None:
    """new → running → complete: three events, with states, actors and messages."""
    task = queue.submit("noop", created_by="alice")
    owner = uuid.uuid4()
    (running,) = claim(queue, owner)
    complete(queue, owner, running, result={"ok": 1})
    events = queue.events(task.id)
    assert [(e.from_state, e.to_state) for e in events] == [
        (None, State.NEW),
        (State.NEW, State.RUNNING),
        (State.RUNNING, State.COMPLETE),
    ]
    assert [e.actor for e in events] == ["alice", f"dispatcher:{owner}", f"dispatcher:{owner}"]
    assert [e.message for e in events] == ["submitted", "attempt 1 of 1", "completed"]
    assert events[0].at <= events[1].at <= events[2].at
    done = queue.get(task.id)
    assert done.result == {"ok": 1} and done.finished_at == events[2].at
    assert done.owner == owner and done.lease_until is None


def test_retry_later_then_fail_writes_each_transition(queue: Queue, clock: OffsetClock) -> None:
    """A failed attempt with attempts left goes back to new with a later not_before."""
    task = queue.submit("noop", max_attempts=2)
    owner = uuid.uuid4()
    (first,) = claim(queue, owner)
    failed_at = clock()
    fail(queue, owner, first, "host unreachable")
    later = queue.get(task.id)
    assert later.state is State.NEW and later.attempt == 1
    assert later.error is not None and later.error["message"] == "host unreachable"
    delay = (later.not_before - failed_at).total_seconds()
    assert 0.8 - 0.1 <= delay <= 1.2 + 0.5, "first retry waits about the base backoff"
    assert claim(queue, owner) == [], "not runnable before its backoff has passed"
    clock.advance(2)
    (second,) = claim(queue, owner)
    assert second.attempt == 2
    fail(queue, owner, second, "still unreachable")
    events = queue.events(task.id)
    assert [(e.from_state, e.to_state) for e in events] == [
        (None, State.NEW),
        (State.NEW, State.RUNNING),
        (State.RUNNING, State.NEW),
        (State.NEW, State.RUNNING),
        (State.RUNNING, State.FAILED),
    ]
    assert events[2].message.startswith("attempt 1 failed: host unreachable; retry at ")
    assert events[4].message == "attempt 2 failed: still unreachable"
    final = queue.get(task.id)
    assert final.error is not None and final.error["attempt"] == 2
    assert final.state is State.FAILED


def test_cancel_records_the_actor_and_reason(queue: Queue) -> None:
    """Who cancelled and why is in the event and the task's error."""
    task = queue.submit("noop")
    (cancelled,) = queue.cancel(task.id, "maintenance window closed", actor="bob")
    assert cancelled.state is State.CANCELLED
    assert cancelled.error == {"type": "Cancelled", "message": "maintenance window closed"}
    (_, event) = queue.events(task.id)
    assert (event.from_state, event.to_state, event.actor, event.message) == (
        State.NEW,
        State.CANCELLED,
        "bob",
        "maintenance window closed",
    )


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_a_chain(queue: Queue) -> None:
    """Cancelling the head cancels each dependent, naming its prerequisite and the root."""
    a, b, c = queue.submit_many(
        [
            TaskSpec("noop", name="a"),
            TaskSpec("noop", name="b", after=["a"]),
            TaskSpec("noop", name="c", after=["b"]),
        ]
    )
    other = queue.submit("noop")
    cancelled = queue.cancel(a.id, "not needed")
    assert [t.id for t in cancelled] == [a.id, b.id, c.id]
    assert all(t.state is State.CANCELLED for t in cancelled)
    _, b2, c2 = cancelled
    assert b2.error is not None and c2.error is not None
    assert b2.error["message"] == f"prerequisite {a.id} was cancelled"
    assert c2.error["message"] == (
        f"prerequisite {b.id} was cancelled because task {a.id} was cancelled"
    )
    assert (c2.error["prerequisite"], c2.error["root"]) == (str(b.id), str(a.id))
    assert queue.get(other.id).state is State.NEW
    assert_timelines_consistent(queue, [a.id, b.id, c.id, other.id])


def test_cancel_a_diamond_cancels_the_join_once(queue: Queue) -> None:
    """In a diamond each task is cancelled exactly once, by one of its prerequisites."""
    a, b, c, d = queue.submit_many(
        [
            TaskSpec("noop", name="a"),
            TaskSpec("noop", name="b", after=["a"]),
            TaskSpec("noop", name="c", after=["a"]),
            TaskSpec("noop", name="d", after=["b", "c"]),
        ]
    )
    assert {t.id for t in queue.cancel(a.id)} == {a.id, b.id, c.id, d.id}
    join = queue.get(d.id)
    assert join.error is not None
    assert join.error["prerequisite"] in {str(b.id), str(c.id)}
    assert join.error["root"] == str(a.id)
    assert _moves(queue, join) == [(None, State.NEW), (State.NEW, State.CANCELLED)]


def test_cancel_in_the_middle_leaves_the_rest(queue: Queue) -> None:
    """Cancelling one branch cancels what depends on it, not its prerequisites or siblings."""
    a, b, c, d = queue.submit_many(
        [
            TaskSpec("noop", name="a"),
            TaskSpec("noop", name="b", after=["a"]),
            TaskSpec("noop", name="c", after=["a"]),
            TaskSpec("noop", name="d", after=["b", "c"]),
        ]
    )
    assert {t.id for t in queue.cancel(b.id)} == {b.id, d.id}
    assert queue.get(a.id).state is State.NEW and queue.get(c.id).state is State.NEW


@pytest.mark.parametrize("state", [State.COMPLETE, State.CANCELLED])
def test_cancel_of_a_finished_task_is_refused_with_the_state(queue: Queue, state: State) -> None:
    """A finished task cannot be cancelled; the error says what it is, and nothing changes."""
    task = queue.submit("noop")
    dependent = queue.submit("noop", after=[task.id])
    if state is State.COMPLETE:
        run_to_completion(queue, task)
    else:
        queue.cancel(task.id)
    before = queue.get(dependent.id)
    with pytest.raises(errors.InvalidTransition) as caught:
        queue.cancel(task.id)
    assert caught.value.state == state
    assert f"task {task.id} is {state.value}" in caught.value.message
    assert "a finished task cannot be cancelled" in caught.value.message
    assert queue.get(task.id).state is state
    assert queue.get(dependent.id) == before


def test_cancel_of_a_running_task_asks_it_to_stop(queue: Queue) -> None:
    """A running task is not cancelled on the spot: it records the request (its dispatcher
    stops the action and aborts a host job) and stays running; its dependents wait."""
    task = queue.submit("noop")
    dependent = queue.submit("noop", after=[task.id])
    claim(queue, uuid.uuid4())
    before = queue.get(dependent.id)
    [asked] = queue.cancel(task.id, "operator changed their mind")
    assert asked.state is State.RUNNING
    assert asked.stop_request is not None
    assert asked.stop_request["reason"] == "cancel"
    assert asked.stop_request["message"] == "operator changed their mind"
    last = queue.events(task.id)[-1]
    assert (last.from_state, last.to_state) == (State.RUNNING, State.RUNNING)
    assert last.message == "cancel requested: operator changed their mind"
    assert queue.get(dependent.id) == before


def test_cancel_unknown_task(queue: Queue) -> None:
    """Cancelling nothing is TaskNotFound."""
    with pytest.raises(errors.TaskNotFound):
        queue.cancel(uuid.uuid4())


def test_a_failure_cancels_its_dependents_transitively(db_url: str) -> None:
    """When the dispatcher fails a task, its chain and diamond of dependents end cancelled."""
    with open_queue(db_url) as queue:
        f, b, c, d, e = queue.submit_many(
            [
                TaskSpec("fail", {"message": "disk full"}, name="f"),
                TaskSpec("noop", name="b", after=["f"]),
                TaskSpec("noop", name="c", after=["f"]),
                TaskSpec("noop", name="d", after=["b", "c"]),
                TaskSpec("noop", name="e", after=["d"]),
            ]
        )
        bystander = queue.submit("noop")
        with running_dispatcher(queue) as dispatcher:
            ids = [t.id for t in (f, b, c, d, e, bystander)]
            done = {t.id: t for t in queue.wait(ids, timeout=10)}
        assert done[f.id].state is State.FAILED
        assert error_of(done[f.id])["message"] == "disk full"
        assert done[bystander.id].state is State.COMPLETE
        for dep in (b, c, d, e):
            assert done[dep.id].state is State.CANCELLED
            assert error_of(done[dep.id])["root"] == str(f.id)
        assert done[b.id].error == {
            "type": "PrerequisiteFailed",
            "message": f"prerequisite {f.id} failed",
            "prerequisite": str(f.id),
            "root": str(f.id),
        }
        assert error_of(done[e.id])["message"] == (
            f"prerequisite {d.id} was cancelled because task {f.id} failed"
        )
        assert queue.events(e.id)[-1].actor == f"dispatcher:{dispatcher.id}"
        assert_timelines_consistent(queue, ids)


# -- retry ----------------------------------------------------------------------------------


def test_retry_revives_a_failed_task_and_its_dependents_which_then_run(db_url: str) -> None:
    """failed → new with attempts reset; the dependents it sank come back and complete."""
    registry = Registry()
    runs: list[int] = []

    @registry.action("flaky")
    def flaky(ctx: Context) -> str:
        runs.append(ctx.attempt)
        if len(runs) == 1:
            raise RuntimeError("first run breaks")
        return "fine"

    with open_queue(db_url, registry=registry) as queue:
        f, b, c = queue.submit_many(
            [
                TaskSpec("flaky", name="f"),
                TaskSpec("noop", name="b", after=["f"]),
                TaskSpec("noop", name="c", after=["b"]),
            ]
        )
        ids = [f.id, b.id, c.id]
        with running_dispatcher(queue):
            first = queue.wait(ids, timeout=10)
        assert [t.state for t in first] == [State.FAILED, State.CANCELLED, State.CANCELLED]
        revived = queue.retry(f.id, actor="carol")
        assert [t.id for t in revived] == ids
        assert all(t.state is State.NEW for t in revived)
        fresh = revived[0]
        assert (fresh.attempt, fresh.error, fresh.result, fresh.finished_at) == (
            0,
            None,
            None,
            None,
        )
        assert [t.pending for t in revived] == [0, 1, 1]
        with running_dispatcher(queue):
            final = queue.wait(ids, timeout=10)
        assert [t.state for t in final] == [State.COMPLETE] * 3
        assert final[0].result == "fine" and final[0].attempt == 1
        assert runs == [1, 1]
        retried = queue.events(f.id)[3]
        assert (retried.from_state, retried.to_state, retried.actor) == (
            State.FAILED,
            State.NEW,
            "carol",
        )
        revival = [e for e in queue.events(c.id) if e.from_state is State.CANCELLED]
        assert [e.message for e in revival] == [f"revived with prerequisite {f.id}"]
        assert_timelines_consistent(queue, ids)
        assert audit(queue) == []


def test_retry_refuses_a_task_whose_prerequisite_is_still_failed(queue: Queue) -> None:
    """Retrying a dependent first points at the prerequisite to retry instead."""
    a = queue.submit("noop")
    b = queue.submit("noop", after=[a.id])
    run_to_failure(queue, a)
    with pytest.raises(errors.InvalidTransition) as caught:
        queue.retry(b.id)
    assert f"its prerequisite {a.id} is failed; retry that first" in caught.value.message
    assert queue.get(b.id).state is State.CANCELLED


@pytest.mark.parametrize("state", [State.NEW, State.RUNNING, State.COMPLETE])
def test_retry_refuses_tasks_that_did_not_end_badly(queue: Queue, state: State) -> None:
    """Only failed or cancelled tasks can be retried."""
    task = queue.submit("noop")
    if state is State.RUNNING:
        claim(queue, uuid.uuid4())
    elif state is State.COMPLETE:
        run_to_completion(queue, task)
    with pytest.raises(errors.InvalidTransition, match="only failed or cancelled") as caught:
        queue.retry(task.id)
    assert caught.value.state == state
    assert queue.get(task.id).state is state


def test_retry_does_not_strand_a_dependent_of_another_failed_task(queue: Queue) -> None:
    """A dependent of two failed tasks stays cancelled (naming the other) until both are retried."""
    a, x, d = queue.submit_many(
        [TaskSpec("noop", name="a"), TaskSpec("noop", name="x"), TaskSpec("noop", after=["a", "x"])]
    )
    owner = uuid.uuid4()
    first, second = claim(queue, owner, 2)
    fail(queue, owner, first, permanent=True)
    fail(queue, owner, second, permanent=True)
    assert queue.get(d.id).error == {
        "type": "PrerequisiteFailed",
        "message": f"prerequisite {a.id} failed",
        "prerequisite": str(a.id),
        "root": str(a.id),
    }
    queue.retry(a.id)
    after_a = queue.get(d.id)
    assert after_a.state is State.CANCELLED, "a dependent of a failed task must not sit in new"
    assert after_a.error is not None and after_a.error["prerequisite"] == str(x.id)
    queue.retry(x.id)
    assert queue.get(d.id).state is State.NEW
    assert queue.get(d.id).pending == 2
    assert audit(queue) == []
    assert_timelines_consistent(queue, [a.id, x.id, d.id])


def test_a_retry_racing_the_completion_of_another_prerequisite_counts_it(queue: Queue) -> None:
    """A revived dependent's pending count includes a completion committed concurrently."""
    a, q, d = queue.submit_many(
        [TaskSpec("noop", name="a"), TaskSpec("noop", name="q"), TaskSpec("noop", after=["a", "q"])]
    )
    owner = uuid.uuid4()
    first, second = claim(queue, owner, 2)
    fail(queue, owner, first, permanent=True)  # a fails: d is cancelled
    assert queue.get(d.id).state is State.CANCELLED
    store = queue.store
    retried = threading.Thread(target=queue.retry, args=(a.id,))
    with store.write() as conn:
        # q completes in a transaction that is still open while a is retried, the way a
        # dispatcher's cycle records it (d is cancelled, so there is no dependent to release).
        now = queue.now()
        ended = {"lease_until": None, "deadline": None, "result": None, "finished_at": now}
        moved = store.move(conn, Move.COMPLETE, [Change(q.id, ended, "completed")], now, "t", owner)
        assert list(moved.moved) == [second.id]
        store.release_dependents(conn, [q.id], now)
        retried.start()
        retried.join(0.5)  # the retry is now parked on the completion's row lock (or done)
    retried.join(10)
    revived = queue.get(d.id)
    assert revived.state is State.NEW
    assert revived.pending == 1, "the completed prerequisite is still counted as pending"
    assert audit(queue) == []


def test_retry_of_a_cancelled_task(queue: Queue) -> None:
    """A task cancelled by hand can be sent back to new, with its dependents."""
    a = queue.submit("noop")
    b = queue.submit("noop", after=[a.id])
    queue.cancel(a.id)
    assert [t.state for t in queue.retry(a.id)] == [State.NEW, State.NEW]
    assert queue.get(b.id).pending == 1
    assert [t.id for t in queue.runnable()] == [a.id]


# -- collect ------------------------------------------------------------------------------------


def test_collect_marks_a_finished_task(queue: Queue, clock: OffsetClock) -> None:
    """Collecting records when; a second collect keeps the first time."""
    task = run_to_completion(queue, queue.submit("noop"), result=[1, 2])
    assert task.collected_at is None
    collected = queue.collect(task.id)
    assert collected.collected_at is not None
    assert collected.result == [1, 2] and collected.state is State.COMPLETE
    clock.advance(60)
    assert queue.collect(task.id).collected_at == collected.collected_at
    failed = run_to_failure(queue, queue.submit("noop"))
    assert queue.collect(failed.id).collected_at is not None


@pytest.mark.parametrize("running", [False, True])
def test_collect_refuses_live_tasks(queue: Queue, running: bool) -> None:
    """A result that does not exist yet cannot be collected."""
    task = queue.submit("noop")
    if running:
        claim(queue, uuid.uuid4())
    with pytest.raises(errors.InvalidTransition, match="only finished tasks can be collected"):
        queue.collect(task.id)
    assert queue.get(task.id).collected_at is None


# -- wait --------------------------------------------------------------------------------------


def test_wait_returns_at_once_for_finished_tasks(queue: Queue) -> None:
    """Nothing to wait for: the tasks come back as they are."""
    task = queue.submit("noop")
    queue.cancel(task.id)
    started = time.monotonic()
    (got,) = queue.wait(task.id, timeout=5)
    assert got.state is State.CANCELLED
    assert time.monotonic() - started < 1


def test_wait_times_out(queue: Queue) -> None:
    """A task that does not finish makes wait raise WaitTimeout after about the timeout."""
    task = queue.submit("noop")
    started = time.monotonic()
    with pytest.raises(errors.WaitTimeout, match=r"1 of 1 tasks not finished after 0\.3s"):
        queue.wait([task.id], timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 3


def test_wait_for_unknown_task(queue: Queue) -> None:
    """Waiting for a task that does not exist fails at once."""
    missing = uuid.uuid4()
    with pytest.raises(errors.TaskNotFound, match=str(missing)):
        queue.wait([queue.submit("noop").id, missing], timeout=1)


def test_wait_is_woken_by_the_dispatcher(db_url: str) -> None:
    """wait returns right after completion, long before its 5 s safety re-check."""
    with open_queue(db_url) as queue:
        tasks = queue.submit_many(
            [TaskSpec("sleep", {"seconds": 0.2}, name="a"), TaskSpec("noop", after=["a"])]
        )
        seen: list[list[State]] = []
        with running_dispatcher(queue, poll=30):
            started = time.monotonic()
            done = queue.wait(
                [t.id for t in tasks],
                timeout=20,
                on_change=lambda ts: seen.append([t.state for t in ts]),
            )
            elapsed = time.monotonic() - started
        assert [t.state for t in done] == [State.COMPLETE, State.COMPLETE]
        assert elapsed < 2.5, f"wait took {elapsed:.2f}s: woken by the safety re-check?"
        assert seen[0] in ([State.NEW, State.NEW], [State.RUNNING, State.NEW])
        assert seen[-1] == [State.COMPLETE, State.COMPLETE]


WAKER = """
import sys, time, uuid
from taskomatic import Queue, Registry
queue = Queue.open(sys.argv[1], registry=Registry())
queue.cancel(uuid.UUID(sys.argv[2]), "cancelled by another process")
print(time.time(), flush=True)
queue.close()
"""


def test_wait_is_woken_by_a_commit_from_another_process(db_url: str) -> None:
    """A change committed by another process (NOTIFY / data_version) ends a wait promptly."""
    with open_queue(db_url) as queue:
        task = queue.submit("noop")
        waker = subprocess.Popen(
            [sys.executable, "-c", WAKER, db_url, str(task.id)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            (done,) = queue.wait(task.id, timeout=20)
            returned_at = time.time()
        finally:
            out, _ = waker.communicate(timeout=30)
        assert waker.returncode == 0
        assert done.state is State.CANCELLED
        committed_at = float(out.strip())
        lag = returned_at - committed_at
        assert lag < 2.0, f"wait returned {lag:.2f}s after the commit (re-check is every 5s)"


def test_wait_for_many_from_several_threads(db_url: str) -> None:
    """Several threads waiting on one queue are all woken as their tasks finish."""
    with open_queue(db_url) as queue:
        tasks = queue.submit_many([TaskSpec("sleep", {"seconds": 0.05}) for _ in range(6)])
        results: dict[uuid.UUID, State] = {}

        def waiter(task: Task) -> None:
            (t,) = queue.wait(task.id, timeout=15)
            results[t.id] = t.state

        threads = [threading.Thread(target=waiter, args=(t,)) for t in tasks]
        for th in threads:
            th.start()
        with running_dispatcher(queue, workers=3):
            for th in threads:
                th.join(15)
        assert results == {t.id: State.COMPLETE for t in tasks}
        assert all(t.state in TERMINAL for t in queue.wait([t.id for t in tasks], timeout=1))
