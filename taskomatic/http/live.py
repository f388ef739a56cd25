"""What the dashboard's live view shows, as JSON snapshots, and the server-sent event stream
that pushes a new one whenever it changes.

Every list is a bounded, indexed read (`Queue.list` walks the (state, seq) index), so a
snapshot costs the same with 100 tasks or 100,000. A snapshot is computed at most once per
`SHARED_SECONDS` for all the browsers watching the same thing.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa

from taskomatic import errors, explain
from taskomatic.metrics import host_of
from taskomatic.model import State, Task
from taskomatic.queue import Queue

LIST_ROWS = 20
"""Rows of each live list (running, waiting, blocked); the tasks page pages through all."""

FAILURE_ROWS = 10
"""Recent failures shown on the overview."""

GROUP_ROWS = 10
"""Recent groups shown on the overview."""

GROUP_TASKS = 500
"""Tasks of a group drawn and watched at most (the rest are listed on the tasks page)."""

POLL_SECONDS = 1.0
"""How often a stream looks for changes made by other processes (in-process ones wake it)."""

SHARED_SECONDS = 0.5
"""How long one computed snapshot serves every stream watching the same thing."""

KEEPALIVE_SECONDS = 15.0
"""A comment line this often keeps proxies from closing an idle stream."""

STREAM_SECONDS = 300.0
"""A stream ends after this long; the browser's EventSource reconnects by itself, so no
connection holds a stream slot forever."""


def task_summary(task: Task) -> dict[str, Any]:
    """The few fields a live row shows of a task."""
    error = task.error or {}
    return {
        "id": str(task.id),
        "action": task.action,
        "state": task.state.value,
        "host": host_of(task.job, task.params, task.result),
        "job": task.job.get("kind") if isinstance(task.job, dict) else None,
        "group": str(task.group_id) if task.group_id else None,
        "attempt": task.attempt,
        "started_at": task.started_at.isoformat() if task.started_at else None,
        "finished_at": task.finished_at.isoformat() if task.finished_at else None,
        "error": error.get("message") if isinstance(error, dict) else None,
        "after": [str(p) for p in task.prerequisites],
    }


class Live:
    """Snapshots of the queue for the dashboard, shared between streams for a moment."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def snapshot(self, key: str) -> dict[str, Any]:
        """The snapshot `key` names: "overview", "group:<id>" or "task:<id>"."""
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and now - cached[0] < SHARED_SECONDS:
            return cached[1]
        kind, _, ident = key.partition(":")
        makers: dict[str, Callable[[str], dict[str, Any]]] = {
            "overview": self.overview,
            "group": self.group,
            "task": self.task,
        }
        value = makers[kind](ident)
        with self._lock:
            if len(self._cache) > 1000:
                self._cache.clear()
            self._cache[key] = (now, value)
        return value

    def overview(self, _: str = "") -> dict[str, Any]:
        """Counts by state; what runs and where; what waits on which host job; what is blocked
        and on what; recent failures; recent groups."""
        q = self.queue
        counts = q.counts()
        new = q.list(state=State.NEW, limit=LIST_ROWS).tasks

        def explain_all(conn: sa.Connection) -> list[explain.Why]:
            now = q.now()
            return [explain.why(q.store, conn, task, now) for task in new]

        blocked = [
            {**task_summary(w.task), "why": w.summary, **_blockers(w)} for w in q._read(explain_all)
        ]
        groups = []
        for gid in q._read(lambda conn: q.store.recent_group_ids(conn, 500, GROUP_ROWS)):
            try:
                groups.append(q.group(gid).to_dict())
            except errors.GroupNotFound:
                continue  # pruned meanwhile
        return {
            "counts": {st.value: counts.get(st, 0) for st in State},
            "running": _rows(q, State.RUNNING, LIST_ROWS),
            "waiting": _rows(q, State.WAITING, LIST_ROWS),
            "blocked": blocked,
            "failures": _rows(q, State.FAILED, FAILURE_ROWS),
            "groups": groups,
            "dispatchers": len(q.dispatchers()),
        }

    def group(self, ident: str) -> dict[str, Any]:
        """A group's state and the state of each of its (first GROUP_TASKS) tasks."""
        group = self.queue.group(ident)
        page = self.queue.list(group=group.id, limit=GROUP_TASKS)
        return {
            "group": group.to_dict(),
            "tasks": {str(t.id): task_summary(t) for t in page.tasks},
        }

    def task(self, ident: str) -> dict[str, Any]:
        """A task and its timeline."""
        task = self.queue.get(ident)
        return {
            "task": {**task_summary(task), "error_detail": task.error},
            "events": [e.to_dict() for e in self.queue.events(task.id)],
        }

    def stream(self, key: str, stop: threading.Event) -> Iterator[bytes]:
        """Server-sent events: a `snapshot` at once and whenever it changes, until `stop`.

        An empty chunk on each quiet poll lets the server notice a closed connection and free
        the stream's slot within a second."""
        yield b"retry: 2000\n\n"
        started = last_sent = time.monotonic()
        previous = None
        while not stop.is_set() and time.monotonic() - started < STREAM_SECONDS:
            seen = self.queue.signal.generation
            try:
                data = json.dumps(self.snapshot(key), default=str, sort_keys=True)
            except errors.TaskomaticError as exc:
                data = json.dumps({"error": exc.message})
            if data != previous:
                previous, last_sent = data, time.monotonic()
                yield b"event: snapshot\ndata: " + data.encode() + b"\n\n"
            elif time.monotonic() - last_sent > KEEPALIVE_SECONDS:
                last_sent = time.monotonic()
                yield b": keepalive\n\n"
            else:
                yield b""  # nothing to send: the server checks whether the browser left
            self.queue.signal.wait(seen, POLL_SECONDS)
            if self.queue.signal.generation != seen:
                time.sleep(0.05)  # let a burst of changes land before reading again


class Stream:
    """An event stream that gives back its slot when closed, started or not."""

    def __init__(self, chunks: Iterator[bytes], release: Callable[[], None]) -> None:
        self._chunks = chunks
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        if hasattr(self._chunks, "close"):
            self._chunks.close()
        release, self._release = self._release, None
        if release is not None:
            release()


def snapshot_key(group: str | None, task: str | None) -> str:
    """The key of what a stream watches; ids are checked here so a typo is a 400."""
    for name, value in (("group", group), ("task", task)):
        if value is not None:
            try:
                return f"{name}:{uuid.UUID(value)}"
            except ValueError:
                message = f"{name} {value!r} is not a UUID"
                raise errors.ValidationError(message, field=name) from None
    return "overview"


def _rows(q: Queue, state: State, limit: int) -> list[dict[str, Any]]:
    return [task_summary(t) for t in q.list(state=state, limit=limit).tasks]


def _blockers(why: explain.Why) -> dict[str, Any]:
    return {"blockers": [b.to_dict() for b in why.blockers]}
