"""Why a task is not running yet — prerequisites, locks, not_before, workers, dispatchers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from taskomatic import defaults
from taskomatic.model import TERMINAL, State, Task
from taskomatic.store.base import Store


@dataclass(frozen=True)
class Blocker:
    """One thing a task waits for: `kind` is prerequisite, lock, not_before, worker, dispatcher."""

    kind: str
    message: str
    task_id: uuid.UUID | None = None
    since: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "task": str(self.task_id) if self.task_id else None,
            "since": self.since.isoformat() if self.since else None,
        }


@dataclass(frozen=True)
class Why:
    """The answer to "why is this task not running?"."""

    task: Task
    summary: str
    blockers: tuple[Blocker, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": str(self.task.id),
            "state": self.task.state.value,
            "summary": self.summary,
            "blockers": [b.to_dict() for b in self.blockers],
        }


def why(store: Store, conn: sa.Connection, task: Task, now: datetime) -> Why:
    """Explain `task` as of `now`, reading what blocks it."""
    if task.state in TERMINAL:
        detail = (task.error or {}).get("message") if task.error else None
        return Why(task, f"{task.state.value}" + (f": {detail}" if detail else ""))
    if task.state is State.RUNNING:
        return Why(
            task,
            f"running on dispatcher {task.owner} since {_t(task.started_at)} "
            f"(attempt {task.attempt} of {task.max_attempts})",
        )
    if task.state is State.WAITING:
        return Why(task, f"waiting for a host job, tracked by dispatcher {task.owner}")
    blockers = _new_task_blockers(store, conn, task, now)
    if blockers:
        return Why(task, "; ".join(b.message for b in blockers), tuple(blockers))
    return Why(task, *_capacity(store, conn, now))


def _new_task_blockers(
    store: Store, conn: sa.Connection, task: Task, now: datetime
) -> list[Blocker]:
    out = [
        Blocker(
            "prerequisite", f"waits for prerequisite {pid} ({action}), which is {st.value}", pid
        )
        for pid, action, st in store.prerequisite_states(conn, task.id)
        if st is not State.COMPLETE
    ]
    out += [
        Blocker(
            "lock",
            f"lock {key} is held by task {holder} ({st.value}) since {_t(since)}",
            holder,
            since,
        )
        for key, holder, since, st in store.lock_holders(conn, task.locks)
    ]
    if task.not_before > now:
        out.append(
            Blocker("not_before", f"not before {_t(task.not_before)}", since=task.not_before)
        )
    return out


def _capacity(store: Store, conn: sa.Connection, now: datetime) -> tuple[str, tuple[Blocker, ...]]:
    alive = store.alive_dispatchers(
        conn, now - timedelta(seconds=defaults.DISPATCHER_DEAD_AFTER_SECONDS)
    )
    if not alive:
        msg = "runnable, but no dispatcher is alive: start one with `taskomatic dispatcher`"
        return msg, (Blocker("dispatcher", msg),)
    workers = sum(d.workers for d in alive)
    busy = store.busy(conn, [d.id for d in alive])
    if busy >= workers:
        msg = (
            f"runnable, but no free worker: all {workers} workers of {len(alive)} "
            "dispatcher(s) are busy"
        )
        return msg, (Blocker("worker", msg),)
    return (
        f"runnable; {workers - busy} free worker(s) on {len(alive)} dispatcher(s) "
        "should claim it momentarily"
    ), ()


def _t(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "?"
