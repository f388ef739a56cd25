"""Shared pieces of the contract tests: queues, dispatchers, a movable clock, waiting."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa

from taskomatic import Dispatcher, Queue, Registry, State, Task
from taskomatic import schema as s
from taskomatic.model import MOVES
from taskomatic.queue import Cycle, Outcome
from taskomatic.store import connect

T = TypeVar("T")

TABLES = (
    s.tasks,
    s.task_prerequisites,
    s.task_locks,
    s.task_events,
    s.task_groups,
    s.held_locks,
)
"""Every table a submission or a transition writes to."""


def wait_until(pred: Callable[[], T], timeout: float = 5.0, what: str = "the condition") -> T:
    """Poll `pred` until it returns something truthy (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class OffsetClock:
    """Real UTC time plus an offset a test moves forward, for `Queue(store, clock=...)`."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@contextlib.contextmanager
def open_queue(
    url: str,
    *,
    registry: Registry | None = None,
    clock: Callable[[], datetime] | None = None,
    actor: str = "api",
) -> Iterator[Queue]:
    """A Queue over `url` with a private registry (the built-ins plus what the test adds)."""
    kwargs: dict[str, Any] = {"clock": clock} if clock is not None else {}
    queue = Queue(connect(url), registry=registry or Registry(), actor=actor, **kwargs)
    try:
        yield queue
    finally:
        queue.close()


@contextlib.contextmanager
def running_dispatcher(queue: Queue, *, grace: float = 5.0, **kwargs: Any) -> Iterator[Dispatcher]:
    """An in-process dispatcher for the duration of a `with` block."""
    dispatcher = Dispatcher(queue, **kwargs).start()
    try:
        yield dispatcher
    finally:
        dispatcher.stop(grace=grace)


def row_counts(queue: Queue) -> dict[str, int]:
    """Rows in each table, to prove a refused submission wrote nothing."""
    with queue.store.read() as conn:
        return {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in TABLES
        }


def audit(queue: Queue) -> list[str]:
    """The store's invariant violations (empty when healthy)."""
    with queue.store.read() as conn:
        return queue.store.audit(conn)


def held_locks(queue: Queue) -> dict[str, uuid.UUID]:
    """Every lock key held now, with its holder."""
    with queue.store.read() as conn:
        rows = conn.execute(sa.select(s.held_locks.c.key, s.held_locks.c.task_id))
        return {r.key: r.task_id for r in rows}


def assert_timelines_consistent(queue: Queue, task_ids: Iterable[uuid.UUID]) -> None:
    """Each task's events chain legal moves from its submission to its current state."""
    legal = {(src, dst) for _, src, dst in MOVES}
    for tid in task_ids:
        task, events = queue.get(tid), queue.events(tid)
        assert (events[0].from_state, events[0].to_state) == (None, State.NEW), tid
        for before, after in itertools.pairwise(events):
            assert after.from_state == before.to_state, f"{tid}: gap in {events}"
            assert (after.from_state, after.to_state) in legal, f"{tid}: illegal {after}"
            assert after.at >= before.at
        assert events[-1].to_state == task.state, f"{tid}: last event disagrees with the row"


def error_of(task: Task) -> Mapping[str, Any]:
    """The task's error, which must be there."""
    assert task.error is not None, f"task {task.id} has no error"
    return task.error


# -- driving the dispatcher's side by hand, one transaction at a time ----------------------


def claim(queue: Queue, owner: uuid.UUID, n: int = 1, lease: float = 30.0) -> list[Task]:
    """Claim up to `n` runnable tasks for `owner`, as a dispatcher cycle does."""
    return queue.cycle(owner, [], n, lease).claimed


def complete(queue: Queue, owner: uuid.UUID, task: Task, result: Any = None) -> Cycle:
    """Report a successful run of `task` by `owner`."""
    return queue.cycle(owner, [Outcome(task, True, result=result)], 0, 30.0)


def fail(
    queue: Queue, owner: uuid.UUID, task: Task, message: str = "boom", permanent: bool = False
) -> Cycle:
    """Report a failed run of `task` by `owner`."""
    error: Mapping[str, Any] = {"type": "RuntimeError", "message": message}
    return queue.cycle(owner, [Outcome(task, False, error=error, permanent=permanent)], 0, 30.0)


def finish_and_claim(
    queue: Queue, owner: uuid.UUID, task: Task, n: int = 5, ok: bool = True
) -> list[Task]:
    """End `task` (completed, or failed for good) and claim up to `n`, in ONE transaction."""
    error = None if ok else {"type": "RuntimeError", "message": "boom"}
    outcome = Outcome(task, ok, error=error, permanent=not ok)
    return queue.cycle(owner, [outcome], n, 30.0).claimed


def run_to_failure(queue: Queue, task: Task, message: str = "boom") -> Task:
    """Claim `task` (it must be the only runnable one) and fail it for good."""
    owner = uuid.uuid4()
    (claimed,) = claim(queue, owner)
    assert claimed.id == task.id
    fail(queue, owner, claimed, message, permanent=True)
    return queue.get(task.id)


def run_to_completion(queue: Queue, task: Task, result: Any = None) -> Task:
    """Claim `task` (it must be the only runnable one) and complete it."""
    owner = uuid.uuid4()
    (claimed,) = claim(queue, owner)
    assert claimed.id == task.id
    complete(queue, owner, claimed, result)
    return queue.get(task.id)


class Gate:
    """A release switch for actions that must stay running until the test says so."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()

    def wait(self, timeout: float = 30.0) -> None:
        """Called by an action: announce it runs, then block until the test opens the gate."""
        self.entered.set()
        self.opened.wait(timeout)

    def open(self) -> None:
        self.opened.set()
