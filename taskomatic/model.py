"""The task model: states, the one table of legal moves, and rows as frozen dataclasses."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class State(enum.StrEnum):
    """Where a task is in its life; the UI and the CLI show these names."""

    NEW = "new"
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({State.COMPLETE, State.FAILED, State.CANCELLED})
LIVE = frozenset(State) - TERMINAL


class Move(enum.StrEnum):
    """A named change of state; every change the code makes is one of these."""

    CLAIM = "claim"
    COMPLETE = "complete"
    AWAIT_JOB = "await_job"
    RETRY_LATER = "retry_later"
    FAIL = "fail"
    CANCEL = "cancel"
    RETRY = "retry"
    TAKE_OVER = "take_over"
    REQUEST_STOP = "request_stop"  # cancel or timeout asked of a running or waiting task
    STOPPED = "stopped"  # its run or host job ended after a cancel request
    NOTE = "note"  # an event in a running or waiting task's timeline (abort sent…)


# The table of legal moves: (move, from, to). Nothing else may change a task's state.
MOVES: tuple[tuple[Move, State, State], ...] = (
    (Move.CLAIM, State.NEW, State.RUNNING),
    (Move.COMPLETE, State.RUNNING, State.COMPLETE),
    (Move.COMPLETE, State.WAITING, State.COMPLETE),
    (Move.AWAIT_JOB, State.RUNNING, State.WAITING),
    (Move.RETRY_LATER, State.RUNNING, State.NEW),
    (Move.RETRY_LATER, State.WAITING, State.NEW),
    (Move.FAIL, State.RUNNING, State.FAILED),
    (Move.FAIL, State.WAITING, State.FAILED),
    (Move.CANCEL, State.NEW, State.CANCELLED),
    (Move.RETRY, State.FAILED, State.NEW),
    (Move.RETRY, State.CANCELLED, State.NEW),
    (Move.TAKE_OVER, State.RUNNING, State.RUNNING),
    (Move.TAKE_OVER, State.WAITING, State.WAITING),
    (Move.REQUEST_STOP, State.RUNNING, State.RUNNING),
    (Move.REQUEST_STOP, State.WAITING, State.WAITING),
    (Move.NOTE, State.RUNNING, State.RUNNING),
    (Move.NOTE, State.WAITING, State.WAITING),
    (Move.STOPPED, State.RUNNING, State.CANCELLED),
    (Move.STOPPED, State.WAITING, State.CANCELLED),
)


def sources(move: Move) -> tuple[State, ...]:
    """The states a task may be in for `move` to apply (the guard of its UPDATE)."""
    return tuple(src for m, src, _ in MOVES if m is move)


def target(move: Move, src: State) -> State:
    """The state `move` leads to from `src`; raises ValueError for an illegal move."""
    for m, s, dst in MOVES:
        if m is move and s is src:
            return dst
    raise ValueError(f"{move} is not a legal move from {src}")


def _state(value: Any) -> State:
    return value if isinstance(value, State) else State(value)


@dataclass(frozen=True)
class Task:
    """One unit of work: which action, with what, and where it is in its life."""

    id: uuid.UUID
    action: str
    params: Mapping[str, Any]
    state: State
    priority: int
    not_before: datetime
    timeout: float | None
    max_attempts: int
    attempt: int
    locks: tuple[str, ...]
    group_id: uuid.UUID | None
    result: Any
    error: Mapping[str, Any] | None
    created_by: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    owner: uuid.UUID | None
    lease_until: datetime | None
    deadline: datetime | None
    pending: int
    collected_at: datetime | None
    prerequisites: tuple[uuid.UUID, ...] = field(default=())
    job: Mapping[str, Any] | None = None  # the host job it waits on (kept once it ends)
    stop_request: Mapping[str, Any] | None = None  # {"reason": cancel|timeout, "message", "at"}
    compensates: uuid.UUID | None = None  # the task this one undoes (group compensation)

    @classmethod
    def from_row(cls, row: Any, prerequisites: tuple[uuid.UUID, ...] = ()) -> Task:
        m = row._mapping
        return cls(
            id=m["id"],
            action=m["action"],
            params=m["params"] or {},
            state=_state(m["state"]),
            priority=m["priority"],
            not_before=m["not_before"],
            timeout=m["timeout"],
            max_attempts=m["max_attempts"],
            attempt=m["attempt"],
            locks=tuple(m["locks"]),
            group_id=m["group_id"],
            result=m["result"],
            error=m["error"],
            created_by=m["created_by"],
            created_at=m["created_at"],
            updated_at=m["updated_at"],
            started_at=m["started_at"],
            finished_at=m["finished_at"],
            owner=m["owner"],
            lease_until=m["lease_until"],
            deadline=m["deadline"],
            pending=m["pending"],
            collected_at=m["collected_at"],
            prerequisites=prerequisites,
            job=m["job"],
            stop_request=m["stop_request"],
            compensates=m["compensates"],
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view for the CLI and the HTTP API."""
        return {
            "id": str(self.id),
            "action": self.action,
            "params": dict(self.params),
            "state": self.state.value,
            "priority": self.priority,
            "not_before": _iso(self.not_before),
            "timeout": self.timeout,
            "max_attempts": self.max_attempts,
            "attempt": self.attempt,
            "locks": list(self.locks),
            "after": [str(p) for p in self.prerequisites],
            "group": str(self.group_id) if self.group_id else None,
            "result": self.result,
            "error": self.error,
            "created_by": self.created_by,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "owner": str(self.owner) if self.owner else None,
            "lease_until": _iso(self.lease_until),
            "collected_at": _iso(self.collected_at),
            "job": self.job,
            "stop_request": self.stop_request,
            "compensates": str(self.compensates) if self.compensates else None,
        }


@dataclass(frozen=True)
class Event:
    """One transition of a task, as the audit trail and the timeline show it."""

    id: int
    task_id: uuid.UUID
    from_state: State | None
    to_state: State
    at: datetime
    actor: str
    message: str

    @classmethod
    def from_row(cls, row: Any) -> Event:
        m = row._mapping
        return cls(
            id=m["id"],
            task_id=m["task_id"],
            from_state=_state(m["from_state"]) if m["from_state"] else None,
            to_state=_state(m["to_state"]),
            at=m["at"],
            actor=m["actor"],
            message=m["message"] or "",
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": str(self.task_id),
            "from": self.from_state.value if self.from_state else None,
            "to": self.to_state.value,
            "at": _iso(self.at),
            "actor": self.actor,
            "message": self.message,
        }


@dataclass(frozen=True)
class Group:
    """Tasks submitted together as one command; its state derives from its tasks."""

    id: uuid.UUID
    name: str | None
    created_by: str | None
    created_at: datetime
    counts: Mapping[State, int]  # its tasks by state, compensation tasks apart
    compensation: Mapping[State, int] = field(default_factory=dict)  # compensation tasks
    on_failure: str = "stop"  # or "continue": see Queue.submit_group

    @property
    def state(self) -> str:
        """Derived from its tasks: running, complete, failed, cancelled — or, once a failure
        made it undo what was done, compensating, then compensated (or failed, when a
        compensation failed too)."""
        if self.compensation:
            if any(self.compensation.get(s, 0) for s in LIVE):
                return "compensating"
            if any(self.compensation.get(s, 0) for s in (State.FAILED, State.CANCELLED)):
                return State.FAILED.value
            return "compensated"
        if any(self.counts.get(s, 0) for s in LIVE):
            return "running"
        for bad in (State.FAILED, State.CANCELLED):
            if self.counts.get(bad, 0):
                return bad.value
        return State.COMPLETE.value

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "state": self.state,
            "created_by": self.created_by,
            "created_at": _iso(self.created_at),
            "counts": {s.value: n for s, n in self.counts.items()},
            "compensation": {s.value: n for s, n in self.compensation.items()},
            "on_failure": self.on_failure,
        }


@dataclass(frozen=True)
class Dispatcher:
    """A running (or lately running) dispatcher process, known by its heartbeat."""

    id: uuid.UUID
    hostname: str
    pid: int
    workers: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> Dispatcher:
        m = row._mapping
        return cls(**{f: m[f] for f in cls.__dataclass_fields__})


class HostState(enum.StrEnum):
    """Whether new work may be placed on a host."""

    ACTIVE = "active"
    MAINTENANCE = "maintenance"


@dataclass(frozen=True)
class Host:
    """A hypervisor taskomatic drives: its libvirt URI, state and capacity (most VMs)."""

    name: str
    uri: str
    state: HostState
    capacity: int | None
    created_at: datetime
    changed_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> Host:
        m = row._mapping
        values = {f: m[f] for f in cls.__dataclass_fields__}
        return cls(**{**values, "state": HostState(values["state"])})

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uri": self.uri,
            "state": self.state.value,
            "capacity": self.capacity,
            "created_at": _iso(self.created_at),
            "changed_at": _iso(self.changed_at),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
