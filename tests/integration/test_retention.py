"""Fork/wait retention: results stay until collected, then `prune` removes old finished tasks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from helpers import OffsetClock, open_queue, row_counts, run_to_completion, run_to_failure

from taskomatic import Queue, State, TaskSpec, errors


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock()


@pytest.fixture
def queue(db_url: str, clock: OffsetClock) -> Iterator[Queue]:
    with open_queue(db_url, clock=clock) as q:
        yield q


def _ids(queue: Queue) -> set[uuid.UUID]:
    return {t.id for t in queue.list(limit=1000).tasks}


def test_only_old_collected_results_are_pruned(queue: Queue, clock: OffsetClock) -> None:
    """A finished task goes once its result was collected and it is older than asked; an
    uncollected one stays (the caller has not read it), as does a recent one."""
    collected = run_to_completion(queue, queue.submit("noop"), result={"n": 1})
    unread = run_to_failure(queue, queue.submit("noop"))
    queue.collect(collected.id)
    assert queue.uncollected() == 1
    clock.advance(3600)
    recent = run_to_completion(queue, queue.submit("noop"))
    queue.collect(recent.id)
    waiting = queue.submit("noop")

    assert queue.prune(timedelta(minutes=30)) == 1
    assert _ids(queue) == {unread.id, recent.id, waiting.id}
    with pytest.raises(errors.TaskNotFound):
        queue.events(collected.id)
    assert queue.prune(timedelta(minutes=30)) == 0  # nothing more to do

    assert queue.prune(timedelta(minutes=30), force=True) == 1  # the unread one too
    assert _ids(queue) == {recent.id, waiting.id}
    assert queue.uncollected() == 0


def test_a_prerequisite_of_a_waiting_task_is_never_pruned(queue: Queue, clock: OffsetClock) -> None:
    """`why` and a later retry need a live task's prerequisites: they stay until it ends."""
    first = queue.submit("noop")
    _, (second, _third) = queue.submit_group(
        [TaskSpec("noop", name="b", after=[first.id]), TaskSpec("noop", after=["b"])]
    )
    run_to_completion(queue, first)
    run_to_completion(queue, second)
    for task in (first, second):
        queue.collect(task.id)
    clock.advance(7200)
    assert queue.prune(timedelta(hours=1), force=True) == 0
    assert queue.get(second.id).state == State.COMPLETE


def test_pruning_removes_every_row_of_a_finished_group(queue: Queue, clock: OffsetClock) -> None:
    """A finished group goes whole: tasks, edges, locks, events and the group row, in
    batches; what is left of the database is exactly what was there before it."""
    before = row_counts(queue)
    group, tasks = queue.submit_group(
        [
            TaskSpec("noop", name=f"t{i}", after=[f"t{i - 1}"] if i else [], locks=["vm:a"])
            for i in range(5)
        ]
    )
    for task in tasks:
        run_to_completion(queue, task)
        queue.collect(task.id)
    clock.advance(120)
    assert queue.prune(timedelta(seconds=60)) == 5
    assert row_counts(queue) == before
    with pytest.raises(errors.GroupNotFound):
        queue.group(group.id)


def test_a_negative_age_is_refused(queue: Queue) -> None:
    with pytest.raises(errors.ValidationError, match="must not be negative"):
        queue.prune(timedelta(seconds=-1))
