"""Waiting on host jobs: the task waits while the host works, and ends as the host says.

The job here is a real process on this machine (tests/jobproc.py), so these tests cover
the queue's side on both backends: the `waiting` state, the worker freed, cancellation and
timeouts that abort the job and wait for it to be gone, a job that vanishes without its
outcome. Real libvirt jobs are in test_live_merge.py.
"""

from __future__ import annotations

from pathlib import Path

import jobproc
import pytest
from helpers import assert_timelines_consistent, error_of, held_locks, open_queue, wait_until
from helpers import running_dispatcher as dispatching

from taskomatic import Registry, State
from taskomatic.queue import Queue


@pytest.fixture
def registry() -> Registry:
    registry = Registry()
    jobproc.register(registry)
    return registry


@pytest.fixture
def queue(db_url: str, registry: Registry) -> Queue:
    with open_queue(db_url, registry=registry) as queue:
        yield queue


def test_a_task_waits_on_its_job_with_its_worker_free_and_its_locks_held(
    queue: Queue, tmp_path: Path
) -> None:
    """While the job runs the task is `waiting`: the one worker runs other work, the lock
    stays held, and the task completes with the job's outcome once the process is gone."""
    task = queue.submit("proc.run", {"dir": str(tmp_path), "seconds": 2.0, "locks": ["vm:a"]})
    with dispatching(queue, workers=1, lease=30):
        wait_until(lambda: queue.get(task.id).state is State.WAITING, 10, "the task waiting")
        assert held_locks(queue) == {"vm:a": task.id}
        waiting = queue.get(task.id)
        assert waiting.job is not None
        assert (waiting.job["host"], waiting.job["kind"]) == ("local", "process")
        other = queue.submit("noop")  # the single worker is free for it
        assert queue.wait(other.id, timeout=10)[0].state is State.COMPLETE
        assert queue.get(task.id).state is State.WAITING
        [done] = queue.wait(task.id, timeout=20)
    assert done.state is State.COMPLETE
    assert done.result == {"done": True}
    assert held_locks(queue) == {}
    assert len(jobproc.starts(tmp_path)) == 1
    messages = [e.message for e in queue.events(task.id)]
    assert "waiting on a process job on host local" in messages
    assert_timelines_consistent(queue, [task.id])


def test_a_job_that_vanishes_without_its_outcome_fails_the_task(
    queue: Queue, tmp_path: Path
) -> None:
    """The process ends without writing `done`: a failure that says so, never a success."""
    task = queue.submit("proc.run", {"dir": str(tmp_path), "seconds": 0.5, "succeed": False})
    with dispatching(queue, workers=1):
        [ended] = queue.wait(task.id, timeout=20)
    assert ended.state is State.FAILED
    assert "ended without writing its outcome" in error_of(ended)["message"]
    assert State.WAITING in {e.to_state for e in queue.events(task.id)}


def test_cancelling_a_waiting_task_aborts_its_job_and_ends_it_once_gone(
    queue: Queue, tmp_path: Path
) -> None:
    """Cancel asks the host to abort; the task stays `waiting` until the job is gone, then
    ends cancelled, with the request and the abort in its timeline; its dependent too."""
    task = queue.submit("proc.run", {"dir": str(tmp_path), "seconds": 60.0})
    dependent = queue.submit("noop", after=[task.id])
    with dispatching(queue, workers=1):
        wait_until(lambda: queue.get(task.id).state is State.WAITING, 10, "the task waiting")
        [asked] = queue.cancel(task.id, "not needed any more")
        assert asked.state is State.WAITING
        [ended, dep] = queue.wait([task.id, dependent.id], timeout=20)
    assert ended.state is State.CANCELLED
    assert "not needed any more" in error_of(ended)["message"]
    assert dep.state is State.CANCELLED
    assert not jobproc._alive(jobproc.starts(tmp_path)[0])
    messages = [e.message for e in queue.events(task.id)]
    assert "cancel requested: not needed any more" in messages
    assert "cancel: abort of the process job requested on local" in messages
    assert held_locks(queue) == {}
    assert_timelines_consistent(queue, [task.id, dependent.id])


def test_a_timed_out_job_is_aborted_and_fails_only_once_gone(queue: Queue, tmp_path: Path) -> None:
    """A timeout never fails a task while its job may still run: abort first, then fail."""
    task = queue.submit("proc.run", {"dir": str(tmp_path), "seconds": 60.0}, timeout=1.5)
    with dispatching(queue, workers=1):
        [ended] = queue.wait(task.id, timeout=20)
    assert ended.state is State.FAILED
    error = error_of(ended)
    assert error["type"] == "Timeout"
    assert "timed out after 1.5s" in error["message"]
    assert not jobproc._alive(jobproc.starts(tmp_path)[0])
    events = queue.events(task.id)
    aborted = next(e for e in events if "abort of the process job requested" in e.message)
    failed = events[-1]
    assert failed.to_state is State.FAILED and failed.from_state is State.WAITING
    assert aborted.at <= failed.at
    assert_timelines_consistent(queue, [task.id])


def test_a_dispatcher_taking_over_a_waiting_task_watches_the_same_job(
    db_url: str, registry: Registry, tmp_path: Path
) -> None:
    """The first dispatcher stops while the task waits; the second one adopts the job from
    the database and never starts another process."""
    with open_queue(db_url, registry=registry) as queue:
        task = queue.submit("proc.run", {"dir": str(tmp_path), "seconds": 3.0})
        with dispatching(queue, workers=1, grace=0.1):
            wait_until(lambda: queue.get(task.id).state is State.WAITING, 10, "the task waiting")
        # Stopped while waiting: its lease was handed back at once.
        assert queue.get(task.id).state is State.WAITING
        with dispatching(queue, workers=1):
            [done] = queue.wait(task.id, timeout=30)
    assert done.state is State.COMPLETE
    assert len(jobproc.starts(tmp_path)) == 1
    messages = [e.message for e in queue.events(task.id)]
    assert any(m.startswith("taken over from dispatcher") for m in messages)
