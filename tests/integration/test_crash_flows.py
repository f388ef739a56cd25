"""kill -9 of a real dispatcher process at each step of a flow, then a restart.

The first dispatcher dies by SIGKILL exactly at a crash point (taskomatic.failpoints) or when
the test sees a task waiting; a second one, without the crash point, takes the work over
once the lease has expired. The job is a real process that outlives the dispatcher (as a
libvirt job outlives its client), and every start of it is recorded on disk: the end state
must be right and no step done twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import jobproc
import pytest
from helpers import open_queue, wait_until
from procs import Proc, Processes

from taskomatic import Registry, State, TaskSpec
from taskomatic.failpoints import ENV
from taskomatic.queue import Queue

LEASE = "2"  # seconds: a dead dispatcher's tasks are taken over soon after


@pytest.fixture
def queue(pg_url: str) -> Iterator[Queue]:
    registry = Registry()
    jobproc.register(registry)
    with open_queue(pg_url, registry=registry) as queue:
        yield queue


def _dispatcher(url: str, where: Path, crash_at: str | None = None) -> Proc:
    env = {ENV: crash_at} if crash_at else {}
    procs = Processes(where, env)
    return procs.start(
        "--database-url", url, "--actions", "jobproc", "dispatcher", "--workers", "2",
        "--lease", LEASE,
    )  # fmt: skip


def _killed(proc: Proc) -> None:
    assert proc.wait() == -9, f"expected death by SIGKILL:\n{proc.describe()}"


@pytest.mark.parametrize("point", ["proc.run:before-start", "proc.run:started", "waiting"])
def test_a_job_survives_a_kill_at_each_step_and_starts_once(
    queue: Queue, pg_url: str, tmp_path: Path, point: str
) -> None:
    """Killed before the job starts, after it started but before the task was recorded
    waiting, or while waiting: the restarted dispatcher finds the job (or starts it, once)
    and the task completes with the job's outcome."""
    job = tmp_path / "job"
    job.mkdir()
    task = queue.submit("proc.run", {"dir": str(job), "seconds": 2.0})
    first = _dispatcher(pg_url, tmp_path, None if point == "waiting" else point)
    try:
        if point == "waiting":
            wait_until(lambda: queue.get(task.id).state is State.WAITING, 30, "waiting")
            first.kill()
        else:
            _killed(first)
        second = _dispatcher(pg_url, tmp_path)
        [done] = queue.wait(task.id, timeout=60)
    finally:
        first.kill()
    try:
        assert done.state is State.COMPLETE, done.error
        assert done.result == {"done": True}
        assert len(jobproc.starts(job)) == 1, "the job must start exactly once"
        assert any(e.message.startswith("taken over") for e in queue.events(task.id))
    finally:
        second.kill()


def test_a_kill_during_compensation_finishes_the_undo_once(
    queue: Queue, pg_url: str, tmp_path: Path
) -> None:
    d = str(tmp_path)
    group, _ = queue.submit_group(
        [
            TaskSpec("mark", {"dir": d, "name": "a"}, name="a"),
            TaskSpec("mark", {"dir": d, "name": "b"}, name="b", after=["a"]),
            TaskSpec("mark.fail", {"dir": d}, name="boom", after=["b"]),
        ]
    )
    first = _dispatcher(pg_url, tmp_path, "unmark:a")  # dies undoing a, after b's undo
    _killed(first)
    assert (tmp_path / "undone").read_text().split() == ["b"]
    second = _dispatcher(pg_url, tmp_path)
    try:
        undo = [t for t in queue.list(group=group.id, limit=50).tasks if t.compensates]
        queue.wait([t.id for t in undo], timeout=60)
    finally:
        second.kill()
    assert (tmp_path / "undone").read_text().split() == ["b", "a"]
    assert queue.group(group.id).state == "compensated"


def test_a_kill_before_an_expansion_is_recorded_adds_its_tasks_once(
    queue: Queue, pg_url: str, tmp_path: Path
) -> None:
    """Killed after the action returned its expansion but before the transaction: nothing
    was added; the restarted dispatcher runs it again and adds the same tasks, once."""
    d = str(tmp_path)
    group, [fan, after] = queue.submit_group(
        [
            TaskSpec("mark.many", {"dir": d, "names": ["x", "y"]}, name="fan"),
            TaskSpec("mark", {"dir": d, "name": "after"}, name="after", after=["fan"]),
        ]
    )
    first = _dispatcher(pg_url, tmp_path, "dispatcher:before-expansion")
    _killed(first)
    assert [t.id for t in queue.list(group=group.id, limit=50).tasks] == [after.id, fan.id]
    assert queue.get(fan.id).state is State.RUNNING
    second = _dispatcher(pg_url, tmp_path)
    try:
        [done] = queue.wait(after.id, timeout=60)
    finally:
        second.kill()
    members = queue.list(group=group.id, limit=50).tasks
    added = [t for t in members if t.id not in {fan.id, after.id}]
    assert sorted(t.params["name"] for t in added) == ["x", "y"]
    assert all(isinstance(t.id, uuid.UUID) and t.state is State.COMPLETE for t in added)
    assert (tmp_path / "expansions").read_text().split() == ["ran", "ran"]
    assert done.state is State.COMPLETE
