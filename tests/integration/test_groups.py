"""Groups as commands: they stop at a failure, undo what was done in reverse order, and
grow by expansion atomically with the completion of the task that expands them."""

from __future__ import annotations

from pathlib import Path

import jobproc
import pytest
from helpers import assert_timelines_consistent, error_of, open_queue
from helpers import running_dispatcher as dispatching

from taskomatic import Registry, State, TaskSpec
from taskomatic.queue import Queue


@pytest.fixture
def registry() -> Registry:
    registry = Registry()
    jobproc.register(registry)
    # A step whose undoing fails: the group must end failed, with both errors.
    registry.action(
        "mark.stuck",
        params={"dir": str, "name": str},
        compensate=lambda p, _r: ("mark.fail", {"dir": p["dir"], "message": "cannot undo"}),
    )(jobproc.mark)
    return registry


@pytest.fixture
def queue(db_url: str, registry: Registry) -> Queue:
    with open_queue(db_url, registry=registry) as queue:
        yield queue


def _undone(where: Path) -> list[str]:
    path = where / "undone"
    return path.read_text().split() if path.exists() else []


def test_a_failed_step_undoes_the_completed_ones_in_reverse_order(
    queue: Queue, tmp_path: Path
) -> None:
    """a → b → c → boom: boom fails, c, b and a are undone in that order, each by a durable
    compensation task; the group reads `compensated`."""
    d = str(tmp_path)
    group, tasks = queue.submit_group(
        [
            TaskSpec("mark", {"dir": d, "name": "a"}, name="a"),
            TaskSpec("mark", {"dir": d, "name": "b"}, name="b", after=["a"]),
            TaskSpec("mark", {"dir": d, "name": "c"}, name="c", after=["b"]),
            TaskSpec("mark.fail", {"dir": d}, name="boom", after=["c"]),
        ],
        name="three marks and a failure",
    )
    with dispatching(queue, workers=2):
        queue.wait([t.id for t in tasks], timeout=20)
        undo = queue.list(group=group.id, limit=50).tasks
        queue.wait([t.id for t in undo], timeout=20)
    assert _undone(tmp_path) == ["c", "b", "a"]
    assert not any((tmp_path / n).exists() for n in "abc")
    final = queue.group(group.id)
    assert final.state == "compensated"
    assert final.compensation == {State.COMPLETE: 3}
    compensations = [t for t in queue.list(group=group.id, limit=50).tasks if t.compensates]
    assert {t.compensates for t in compensations} == {t.id for t in tasks[:3]}
    assert all(t.state is State.COMPLETE for t in compensations)
    assert_timelines_consistent(queue, [t.id for t in compensations])


def test_compensation_waits_for_running_siblings_and_stops_the_rest(
    queue: Queue, tmp_path: Path
) -> None:
    """While a sibling still runs (a host job), nothing is undone; new steps of the group
    are cancelled at once; once the sibling ends its work is undone too, last done first."""
    d = str(tmp_path)
    (tmp_path / "job").mkdir()
    group, tasks = queue.submit_group(
        [
            TaskSpec("mark", {"dir": d, "name": "a"}, name="a"),
            TaskSpec("proc.run", {"dir": str(tmp_path / "job"), "seconds": 2.0}, name="slow"),
            TaskSpec("mark.fail", {"dir": d}, name="boom", after=["a"]),
            TaskSpec("mark", {"dir": d, "name": "never"}, name="never", after=["slow", "boom"]),
            TaskSpec("mark", {"dir": d, "name": "later"}, name="later", after=["slow"]),
        ]
    )
    a, slow, boom, never, later = tasks
    with dispatching(queue, workers=2):
        queue.wait(boom.id, timeout=20)
        assert queue.get(slow.id).state in (State.RUNNING, State.WAITING)
        assert queue.group(group.id).state == "running"
        assert not [t for t in queue.list(group=group.id, limit=50).tasks if t.compensates]
        queue.wait([t.id for t in tasks], timeout=30)
        undo = [t for t in queue.list(group=group.id, limit=50).tasks if t.compensates]
        queue.wait([t.id for t in undo], timeout=20)
    assert queue.get(later.id).state is State.CANCELLED
    assert error_of(queue.get(later.id))["type"] == "GroupFailed"
    assert str(boom.id) in error_of(queue.get(later.id))["message"]
    assert queue.get(never.id).state is State.CANCELLED
    assert _undone(tmp_path) == ["a"]  # a ran first; slow's undo wrote into its own dir
    assert _undone(tmp_path / "job") == ["done"]
    assert {t.compensates for t in undo} == {a.id, slow.id}
    assert queue.group(group.id).state == "compensated"


def test_a_failing_compensation_leaves_the_group_failed_with_both_errors(
    queue: Queue, tmp_path: Path
) -> None:
    d = str(tmp_path)
    group, tasks = queue.submit_group(
        [
            TaskSpec("mark.stuck", {"dir": d, "name": "a"}, name="a"),
            TaskSpec("mark.fail", {"dir": d, "message": "step failed"}, name="boom", after=["a"]),
        ]
    )
    with dispatching(queue, workers=1):
        queue.wait([t.id for t in tasks], timeout=20)
        [undo] = [t for t in queue.list(group=group.id, limit=50).tasks if t.compensates]
        [undo] = queue.wait(undo.id, timeout=20)
    final = queue.group(group.id)
    assert final.state == "failed"
    assert error_of(queue.get(tasks[1].id))["message"] == "step failed"
    assert undo.state is State.FAILED and error_of(undo)["message"] == "cannot undo"
    assert (tmp_path / "a").exists()  # nothing pretended to undo it


def test_expansion_adds_tasks_and_makes_dependents_wait_for_them(
    queue: Queue, tmp_path: Path
) -> None:
    """`mark.many` adds one task per name to its group as it completes; `after` (which
    depended on it) runs only once they are all complete."""
    d = str(tmp_path)
    group, [fan, after] = queue.submit_group(
        [
            TaskSpec("mark.many", {"dir": d, "names": ["x", "y", "z"]}, name="fan"),
            TaskSpec("mark", {"dir": d, "name": "after"}, name="after", after=["fan"]),
        ]
    )
    with dispatching(queue, workers=3):
        [done] = queue.wait(after.id, timeout=20)
    added = [
        t for t in queue.list(group=group.id, limit=50).tasks if t.id not in {fan.id, after.id}
    ]
    assert sorted(t.params["name"] for t in added) == ["x", "y", "z"]
    assert all(t.state is State.COMPLETE and t.group_id == group.id for t in added)
    assert done.state is State.COMPLETE
    assert set(done.prerequisites) == {fan.id, *(t.id for t in added)}
    assert all(
        t.finished_at and done.started_at and t.finished_at <= done.started_at for t in added
    )
    assert queue.get(fan.id).result == {"added": 3}
    assert queue.group(group.id).state == "complete"
