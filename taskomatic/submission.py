"""Turning what a caller submits into validated rows, before anything is written."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from taskomatic import errors
from taskomatic.actions.registry import Registry
from taskomatic.model import Task

INT_LIMIT = 2**31 - 1
"""Largest priority or max_attempts: both are 32-bit integer columns on PostgreSQL (count)."""

MAX_TIMEOUT_SECONDS = 10 * 365 * 24 * 3600.0
"""Longest task timeout; beyond it a deadline no longer fits a timestamp (seconds)."""


_JSON_FIELDS = (
    ("action", str, "a string"),
    ("params", dict, "an object"),
    ("id", str, "a UUID string"),
    ("name", str, "a string"),
    ("after", list, "a list of task ids or names"),
    ("locks", list, "a list of lock keys"),
)
"""Fields of a task in JSON whose type is checked before anything reads them."""


@dataclass(frozen=True)
class TaskSpec:
    """One task as a caller describes it.

    `after` names prerequisites: task ids (UUID or its string), or the `name` of another
    spec in the same submission. `locks` are added to the action's default lock keys.
    """

    action: str
    params: Mapping[str, Any] = field(default_factory=dict)
    id: uuid.UUID | str | None = None
    name: str | None = None
    after: Sequence[uuid.UUID | str] = ()
    locks: Sequence[str] = ()
    priority: int = 0
    not_before: datetime | None = None
    timeout: float | None = None
    max_attempts: int | None = None  # None: the action's default (most actions: 1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskSpec:
        """A spec from JSON (the CLI's group files, the HTTP API)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise errors.ValidationError(
                f"unknown task field {unknown[0]!r} (known: {', '.join(sorted(known))})",
                field=unknown[0],
            )
        if "action" not in data:
            raise errors.ValidationError("a task needs an 'action'", field="action")
        values = dict(data)
        for name, kind, described in _JSON_FIELDS:
            if name in values and values[name] is not None and not isinstance(values[name], kind):
                raise errors.ValidationError(
                    f"task field {name!r} must be {described}, got {values[name]!r}", field=name
                )
        if isinstance(values.get("not_before"), str):
            values["not_before"] = parse_time(values["not_before"])
        return cls(**values)


@dataclass(frozen=True)
class Expansion:
    """What an action returns to add tasks to its own group as it completes.

    The tasks are inserted in the transaction that records the completion, and every task
    that depends on the expanding one waits for them too ("clear a host" lists the host's
    VMs when it runs and adds one migration per VM). `after` inside `tasks` may name other
    specs of the expansion. A spec without an id gets one derived from the expanding task,
    so an action re-run after a crash adds the same tasks, not a second set.
    """

    tasks: Sequence[TaskSpec]
    result: Any = None


@dataclass(frozen=True)
class Prepared:
    """A validated spec: its id, normalized params, locks and prerequisite ids."""

    id: uuid.UUID
    action: str
    params: dict[str, Any]
    after: tuple[uuid.UUID, ...]
    locks: tuple[str, ...]
    priority: int
    not_before: datetime | None
    timeout: float | None
    max_attempts: int
    chosen: bool = True  # the id came from the caller (it may exist already)

    def differences(self, task: Task, group_id: uuid.UUID | None) -> list[str]:
        """The fields in which an existing task differs from this spec (for idempotency)."""
        mine = (
            self.action,
            self.params,
            self.priority,
            self.max_attempts,
            self.timeout,
            self.locks,
            tuple(sorted(self.after)),
            group_id,
        )
        theirs = (
            task.action,
            dict(task.params),
            task.priority,
            task.max_attempts,
            task.timeout,
            tuple(task.locks),
            tuple(sorted(task.prerequisites)),
            task.group_id,
        )
        names = (
            "action",
            "params",
            "priority",
            "max_attempts",
            "timeout",
            "locks",
            "prerequisites",
            "group",
        )
        return [n for n, a, b in zip(names, mine, theirs, strict=True) if a != b]


def prepare(specs: Sequence[TaskSpec], registry: Registry) -> list[Prepared]:
    """Validate specs and resolve their references; raises before anything is written."""
    if not specs:
        raise errors.ValidationError("nothing to submit: no tasks given", field="tasks")
    ids = [_task_id(s) for s in specs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise errors.ValidationError(f"task id {dup} appears twice in one submission", field="id")
    names: dict[str, uuid.UUID] = {}
    for spec, tid in zip(specs, ids, strict=True):
        if spec.name is not None:
            if spec.name in names:
                raise errors.ValidationError(f"task name {spec.name!r} appears twice", field="name")
            names[spec.name] = tid
    prepared = [_prepare_one(s, tid, names, registry) for s, tid in zip(specs, ids, strict=True)]
    _reject_cycles(prepared)
    return prepared


def _prepare_one(
    spec: TaskSpec, tid: uuid.UUID, names: Mapping[str, uuid.UUID], registry: Registry
) -> Prepared:
    action = registry.get(spec.action)
    params = action.validate(spec.params)
    after = tuple(dict.fromkeys(_ref(a, names) for a in spec.after))
    if tid in after:
        raise errors.CycleError([tid, tid])
    if not _is_int(spec.priority) or not -INT_LIMIT <= spec.priority <= INT_LIMIT:
        raise errors.ValidationError(
            f"priority must be an integer between {-INT_LIMIT} and {INT_LIMIT}, "
            f"got {spec.priority!r}",
            field="priority",
        )
    attempts = action.max_attempts if spec.max_attempts is None else spec.max_attempts
    if not _is_int(attempts) or not 1 <= attempts <= INT_LIMIT:
        raise errors.ValidationError(
            f"max_attempts must be an integer of at least 1 (at most {INT_LIMIT}), "
            f"got {attempts!r}",
            field="max_attempts",
        )
    if spec.timeout is not None and not (
        isinstance(spec.timeout, int | float)
        and not isinstance(spec.timeout, bool)
        and 0 < spec.timeout <= MAX_TIMEOUT_SECONDS
    ):
        raise errors.ValidationError(
            f"timeout must be a positive number of seconds (at most {MAX_TIMEOUT_SECONDS:g}), "
            f"got {spec.timeout!r}",
            field="timeout",
        )
    if spec.not_before is not None and spec.not_before.tzinfo is None:
        raise errors.ValidationError(
            "not_before needs a timezone (e.g. 2030-01-01T00:00Z)", field="not_before"
        )
    locks = set(action.lock_keys(params))
    for key in spec.locks:
        if not isinstance(key, str) or not key.strip():
            raise errors.ValidationError(
                f"lock keys must be non-empty strings, got {key!r}", field="locks"
            )
        locks.add(key)
    return Prepared(
        tid,
        spec.action,
        params,
        after,
        tuple(sorted(locks)),
        spec.priority,
        spec.not_before,
        float(spec.timeout) if spec.timeout else None,
        attempts,
        chosen=spec.id is not None,
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def new_task_id() -> uuid.UUID:
    """A task id of our choosing: a UUID version 7 (RFC 9562), whose first 48 bits are the
    time in milliseconds. New tasks' keys then go to the end of the primary-key and event
    indexes, as their rows do to the end of the table: random ids would scatter them over
    the pages of a history of millions, most of them out of the database's cache."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # the RFC's variant
    return uuid.UUID(int=value)


def _task_id(spec: TaskSpec) -> uuid.UUID:
    if spec.id is None:
        return new_task_id()
    if isinstance(spec.id, uuid.UUID):
        return spec.id
    try:
        return uuid.UUID(str(spec.id))
    except ValueError:
        raise errors.ValidationError(f"task id {spec.id!r} is not a UUID", field="id") from None


def _ref(ref: uuid.UUID | str, names: Mapping[str, uuid.UUID]) -> uuid.UUID:
    if isinstance(ref, uuid.UUID):
        return ref
    if ref in names:
        return names[ref]
    try:
        return uuid.UUID(ref)
    except ValueError:
        raise errors.ValidationError(
            f"prerequisite {ref!r} is neither a task id nor the name of a task in this submission",
            field="after",
        ) from None


def _reject_cycles(prepared: Iterable[Prepared]) -> None:
    """Depth-first search over the submitted edges; reports one cycle as a path."""
    edges = {p.id: p.after for p in prepared}
    done: set[uuid.UUID] = set()
    for start in edges:
        if start in done:
            continue
        path: list[uuid.UUID] = []
        on_path: set[uuid.UUID] = set()
        stack: list[tuple[uuid.UUID, Iterable[uuid.UUID]]] = [(start, iter(edges[start]))]
        path.append(start)
        on_path.add(start)
        while stack:
            node, children = stack[-1]
            child = next((c for c in children if c in edges and c not in done), None)
            if child is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif child in on_path:
                cycle = [*path[path.index(child) :], child]
                raise errors.CycleError(cycle)
            else:
                stack.append((child, iter(edges[child])))
                path.append(child)
                on_path.add(child)


def parse_time(text: str) -> datetime:
    """An ISO 8601 timestamp with a timezone."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise errors.ValidationError(
            f"not an ISO 8601 time: {text!r}", field="not_before"
        ) from None
    if value.tzinfo is None:
        raise errors.ValidationError(
            f"time {text!r} needs a timezone, e.g. {text}Z", field="not_before"
        )
    return value
