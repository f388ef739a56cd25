"""The bounded pool of worker threads, and how one run of an action becomes an Outcome."""

from __future__ import annotations

import collections
import json
import logging
import queue as stdqueue
import threading
import traceback
from collections.abc import Callable, Mapping

from taskomatic import errors
from taskomatic.actions.registry import Check, Context, Registry
from taskomatic.jobs import HostJob
from taskomatic.model import Task
from taskomatic.queue import Outcome
from taskomatic.submission import Expansion

log = logging.getLogger(__name__)


def execute(registry: Registry, task: Task, ctx: Context, recovered: bool) -> Outcome:
    """Run the task's action; after a takeover, first `check` what really happened."""
    try:
        action = registry.get(task.action)
    except errors.UnknownAction:
        return failure(
            task,
            "UnknownAction",
            f"action {task.action!r} is not registered in this dispatcher; start it "
            "with --actions MODULE, then retry the task",
            permanent=True,
        )

    def run() -> Outcome:
        if recovered and action.check is not None:
            found = action.check(ctx)
            if found.status == Check.DONE:
                return success(task, found.result)
            if found.status == Check.DIVERGED:
                return failure(task, "Diverged", found.message, permanent=True)
        return success(task, action.run(ctx))

    return guarded(task, run)


def guarded(task: Task, fn: Callable[[], Outcome]) -> Outcome:
    """`fn()`, with any exception it raises turned into the failure it means."""
    try:
        return fn()
    except errors.ActionError as exc:
        return failure(
            task, type(exc).__name__, exc.message, permanent=exc.permanent, details=exc.details
        )
    except Exception as exc:
        where = "".join(traceback.format_exception(exc)[-3:])[-2000:]
        return failure(task, type(exc).__name__, str(exc) or type(exc).__name__, traceback=where)


def success(task: Task, result: object) -> Outcome:
    """What a run returned: a result, a host job to wait on, or tasks to add to its group."""
    if isinstance(result, HostJob):
        return Outcome(task, True, job=result)
    expansion = None
    if isinstance(result, Expansion):
        expansion, result = list(result.tasks), result.result
    try:
        json.dumps(result)
    except (TypeError, ValueError) as exc:
        return failure(
            task, "BadResult", f"action returned a result that is not JSON: {exc}", permanent=True
        )
    return Outcome(task, True, result=result, expansion=expansion)


def failure(
    task: Task,
    kind: str,
    message: str,
    permanent: bool = False,
    traceback: str | None = None,
    details: Mapping[str, object] | None = None,
) -> Outcome:
    error: dict[str, object] = {"type": kind, "message": message}
    error.update({k: v for k, v in (details or {}).items() if v is not None})
    if traceback:
        error["traceback"] = traceback
    return Outcome(task, False, error=error, permanent=permanent)


class WorkerPool:
    """`size` threads running actions; finished runs are collected with `drain()`."""

    def __init__(self, size: int, registry: Registry, on_done: Callable[[], None]) -> None:
        if size < 1:
            raise errors.ValidationError("a dispatcher needs at least one worker", field="workers")
        self.size = size
        self._registry = registry
        self._on_done = on_done
        self._jobs: stdqueue.SimpleQueue[tuple[Task, Context, bool] | None] = stdqueue.SimpleQueue()
        self._done: collections.deque[Outcome] = collections.deque()
        self._threads = [
            threading.Thread(target=self._work, name=f"taskomatic-worker-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, task: Task, ctx: Context, recovered: bool = False) -> None:
        self._jobs.put((task, ctx, recovered))

    def drain(self) -> list[Outcome]:
        """Outcomes finished since the last call."""
        out = []
        while self._done:
            out.append(self._done.popleft())
        return out

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            task, ctx, recovered = job
            outcome = execute(self._registry, task, ctx, recovered)
            self._done.append(outcome)
            self._on_done()

    def stop(self) -> None:
        """Let idle threads exit; busy ones finish their action first (they are daemons)."""
        for _ in self._threads:
            self._jobs.put(None)
