"""`why`: for a task that is not running, exactly what it waits for; otherwise what it does."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from helpers import OffsetClock, claim, open_queue, run_to_completion, run_to_failure

from taskomatic import Queue, State, TaskSpec
from taskomatic.model import Dispatcher as DispatcherRow


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock()


@pytest.fixture
def queue(db_url: str, clock: OffsetClock) -> Iterator[Queue]:
    with open_queue(db_url, clock=clock) as q:
        yield q


def _announce(queue: Queue, workers: int = 2, age: float = 0.0) -> uuid.UUID:
    """Register a dispatcher (as one does at start-up) whose last heartbeat was `age` s ago."""
    did = uuid.uuid4()
    at = queue.now() - timedelta(seconds=age)
    queue.register_dispatcher(DispatcherRow(did, "host-a", os.getpid(), workers, at, at, None))
    return did


def test_waiting_for_prerequisites_names_each_with_its_state(queue: Queue) -> None:
    """Every incomplete prerequisite is a blocker with its id, action and state."""
    a, b, c, d = queue.submit_many(
        [
            TaskSpec("noop", name="a"),
            TaskSpec("sleep", name="b"),
            TaskSpec("noop", name="c"),
            TaskSpec("noop", after=["a", "b", "c"]),
        ]
    )
    run_to_completion(queue, a)
    claim(queue, uuid.uuid4())  # b is running now
    why = queue.why(d.id)
    assert [(x.kind, x.task_id) for x in why.blockers] == [
        ("prerequisite", b.id),
        ("prerequisite", c.id),
    ]
    assert why.blockers[0].message == f"waits for prerequisite {b.id} (sleep), which is running"
    assert why.blockers[1].message == f"waits for prerequisite {c.id} (noop), which is new"
    assert str(a.id) not in why.summary
    assert why.task.id == d.id


def test_lock_held_names_the_holder_and_since_when(queue: Queue) -> None:
    """A held lock is a blocker naming the key, the holding task, its state and since when."""
    holder = queue.submit("noop", locks=["vm:web1"])
    (running,) = claim(queue, uuid.uuid4())
    waiter = queue.submit("noop", locks=["vm:web1", "host:h2"])
    (blocker,) = queue.why(waiter.id).blockers
    assert (blocker.kind, blocker.task_id, blocker.since) == ("lock", holder.id, running.started_at)
    assert running.started_at is not None
    assert blocker.message == (
        f"lock vm:web1 is held by task {holder.id} (running) since "
        f"{running.started_at.isoformat(timespec='seconds')}"
    )


def test_not_before_in_the_future(queue: Queue, clock: OffsetClock) -> None:
    """A delayed task says until when; once the time passes, that blocker is gone."""
    when = clock() + timedelta(minutes=10)
    task = queue.submit("noop", not_before=when)
    (blocker,) = queue.why(task.id).blockers
    assert (blocker.kind, blocker.since) == ("not_before", when)
    assert blocker.message == f"not before {when.isoformat(timespec='seconds')}"
    clock.advance(11 * 60)
    assert [b.kind for b in queue.why(task.id).blockers] == ["dispatcher"]


def test_every_blocker_at_once(queue: Queue, clock: OffsetClock) -> None:
    """Prerequisite, lock and time are all reported, and the summary joins them."""
    queue.submit("noop", locks=["k"])
    claim(queue, uuid.uuid4())
    pre = queue.submit("noop")
    task = queue.submit(
        "noop", after=[pre.id], locks=["k"], not_before=clock() + timedelta(hours=1)
    )
    why = queue.why(task.id)
    assert [b.kind for b in why.blockers] == ["prerequisite", "lock", "not_before"]
    assert why.summary == "; ".join(b.message for b in why.blockers)


def test_runnable_but_no_dispatcher_alive(queue: Queue) -> None:
    """Nothing blocks the task, but nobody is there to run it: say how to start one."""
    task = queue.submit("noop")
    why = queue.why(task.id)
    assert [b.kind for b in why.blockers] == ["dispatcher"]
    assert "no dispatcher is alive" in why.summary and "taskomatic dispatcher" in why.summary


def test_a_dispatcher_without_heartbeat_counts_as_dead(queue: Queue) -> None:
    """A dispatcher silent for longer than the dead-after interval does not count."""
    _announce(queue, age=31)
    task = queue.submit("noop")
    assert [b.kind for b in queue.why(task.id).blockers] == ["dispatcher"]


def test_a_stopped_dispatcher_counts_as_gone(queue: Queue) -> None:
    """A dispatcher that announced its stop is not alive, however recent its heartbeat."""
    did = _announce(queue)
    queue.dispatcher_stopped(did, [])
    task = queue.submit("noop")
    assert [b.kind for b in queue.why(task.id).blockers] == ["dispatcher"]
    assert queue.dispatchers() == []


def test_runnable_but_no_free_worker(queue: Queue) -> None:
    """A live dispatcher whose only worker is busy: the task waits for a worker."""
    did = _announce(queue, workers=1)
    queue.submit("sleep")
    claim(queue, did)
    task = queue.submit("noop")
    why = queue.why(task.id)
    assert [b.kind for b in why.blockers] == ["worker"]
    assert "all 1 workers of 1 dispatcher(s) are busy" in why.summary


def test_runnable_with_a_free_worker(queue: Queue) -> None:
    """With a live dispatcher and room, the task is simply about to be claimed."""
    did = _announce(queue, workers=2)
    queue.submit("sleep")
    claim(queue, did)
    task = queue.submit("noop")
    why = queue.why(task.id)
    assert why.blockers == ()
    assert why.summary.startswith("runnable; 1 free worker(s) on 1 dispatcher(s)")


def test_running_task_is_described(queue: Queue) -> None:
    """A running task says who runs it, since when and which attempt."""
    task = queue.submit("noop", max_attempts=3)
    owner = uuid.uuid4()
    (running,) = claim(queue, owner)
    assert running.started_at is not None
    why = queue.why(task.id)
    assert why.blockers == ()
    assert why.summary == (
        f"running on dispatcher {owner} since "
        f"{running.started_at.isoformat(timespec='seconds')} (attempt 1 of 3)"
    )


@pytest.mark.parametrize("end", [State.COMPLETE, State.FAILED, State.CANCELLED])
def test_finished_task_is_described(queue: Queue, end: State) -> None:
    """A finished task says how it ended and, if badly, why."""
    task = queue.submit("noop")
    if end is State.COMPLETE:
        run_to_completion(queue, task)
        expected = "complete"
    elif end is State.FAILED:
        run_to_failure(queue, task, "libvirt: domain not found")
        expected = "failed: libvirt: domain not found"
    else:
        queue.cancel(task.id, "operator changed their mind")
        expected = "cancelled: operator changed their mind"
    why = queue.why(task.id)
    assert (why.summary, why.blockers) == (expected, ())
    assert why.to_dict()["state"] == end.value


def test_why_as_json(queue: Queue) -> None:
    """The CLI's and HTTP API's view carries kinds, task ids and times as strings."""
    pre = queue.submit("noop")
    task = queue.submit("noop", after=[pre.id])
    data = queue.why(task.id).to_dict()
    assert data["task"] == str(task.id) and data["state"] == "new"
    assert data["blockers"] == [
        {
            "kind": "prerequisite",
            "message": f"waits for prerequisite {pre.id} (noop), which is new",
            "task": str(pre.id),
            "since": None,
        }
    ]
