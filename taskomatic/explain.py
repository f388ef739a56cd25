"""Why a task is not running yet — prerequisites, locks, not_before, workers, dispatchers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from taskomatic import defaults
from taskomatic.model import TERMINAL, Group, State, Task
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
    stop = _stop(task)
    if task.state is State.RUNNING:
        return Why(
            task,
            f"running on dispatcher {task.owner} since {_t(task.started_at)} "
            f"(attempt {task.attempt} of {task.max_attempts}){stop}",
        )
    if task.state is State.WAITING:
        job = task.job or {}
        progress = job.get("progress")
        return Why(
            task,
            f"waiting for a {job.get('kind', 'host')} job on host {job.get('host', '?')}, "
            f"tracked by dispatcher {task.owner}"
            + (f"; progress {progress}" if progress else "")
            + stop,
        )
    blockers = _new_task_blockers(store, conn, task, now)
    if blockers:
        return Why(task, "; ".join(b.message for b in blockers), tuple(blockers))
    return Why(task, *_capacity(store, conn, now))


def _stop(task: Task) -> str:
    if not task.stop_request:
        return ""
    request = task.stop_request
    return (
        f"; {request.get('reason', 'stop')} requested at {request.get('at', '?')}"
        f" ({request.get('message', '')}): it ends once its work has stopped"
    )


@dataclass(frozen=True)
class GroupWhy:
    """The answer to "where is this command?": its state, what sank it, what it waits on."""

    group: Group
    summary: str
    tasks: tuple[Why, ...]  # the live tasks, each explained

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": str(self.group.id),
            "state": self.group.state,
            "summary": self.summary,
            "tasks": [w.to_dict() for w in self.tasks],
        }


def why_group(
    store: Store, conn: sa.Connection, group: Group, tasks: list[Task], now: datetime
) -> GroupWhy:
    """Explain a group: the failure that stopped it (if any) and why each live task is
    where it is."""
    failed = [t for t in tasks if t.state is State.FAILED and t.compensates is None]
    undo = [t for t in tasks if t.compensates is not None]
    parts = [f"{group.state}"]
    if failed:
        first = failed[0]
        parts.append(
            f"task {first.id} ({first.action}) failed: {(first.error or {}).get('message')}"
        )
    if undo:
        done = sum(t.state is State.COMPLETE for t in undo)
        parts.append(f"{done} of {len(undo)} compensation task(s) done")
        for t in undo:
            if t.state is State.FAILED:
                parts.append(
                    f"compensation {t.id} ({t.action}) failed: {(t.error or {}).get('message')}"
                )
    live = tuple(why(store, conn, t, now) for t in tasks if not t.state.terminal)
    return GroupWhy(group, "; ".join(parts), live)


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
