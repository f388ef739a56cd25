"""The monitor of host jobs: polls what waiting tasks wait on, until the hosts are done.

One thread per dispatcher. Each waiting task is polled through its action's `JobHooks`,
host by host (one connection, one pass over that host's jobs), at an interval that backs
off while nothing happens and snaps back when libvirt reports a block job or a domain job
ending. A stop request (cancel, timeout) is passed on to the host as an abort; the task
keeps waiting until its job is really gone. When it is, `finish` says what the host did,
and that becomes the task's outcome, collected by the dispatcher with `drain()` as it
collects its workers' outcomes. The monitor never writes to the database itself.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import libvirt

from taskomatic import defaults, errors
from taskomatic.actions.registry import Context, Registry
from taskomatic.jobs import HostJob, JobHooks
from taskomatic.model import Task
from taskomatic.queue import Outcome
from taskomatic.virt.fleet import Fleet
from taskomatic.workers import failure, guarded, success

log = logging.getLogger(__name__)

_WAKING_EVENTS = ("VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2", "VIR_DOMAIN_EVENT_ID_JOB_COMPLETED")
"""libvirt domain events that mean "a job may have ended: look now" (if the driver has them)."""


@dataclass(frozen=True)
class Note:
    """Something to record in a waiting task's timeline without changing its state."""

    task: Task
    message: str
    job: Mapping[str, Any] | None = None  # the job's description with its latest progress


@dataclass
class _Watch:
    task: Task
    job: HostJob
    ctx: Context
    hooks: JobHooks
    stop: Mapping[str, Any] | None = None  # the stop request, once there is one
    aborted: bool = False  # abort sent to the host
    interval: float = defaults.JOB_POLL_FIRST_SECONDS
    due: float = field(default_factory=time.monotonic)
    progress: Mapping[str, Any] | None = None
    failures: int = 0  # polls in a row that could not reach the host


class JobMonitor:
    """Polls the host jobs of this dispatcher's waiting tasks (see the module)."""

    def __init__(self, registry: Registry, fleet: Fleet, on_done: Callable[[], None]) -> None:
        self._registry = registry
        self._fleet = fleet
        self._on_done = on_done
        self._watches: dict[uuid.UUID, _Watch] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._outcomes: collections.deque[Outcome] = collections.deque()
        self._notes: collections.deque[Note] = collections.deque()
        self._events: dict[str, libvirt.virConnect] = {}  # host -> connection with callbacks
        self._thread: threading.Thread | None = None

    # -- the dispatcher's side -------------------------------------------------------------

    def watch(self, task: Task, job: HostJob, ctx: Context, stop: Mapping[str, Any] | None) -> bool:
        """Start polling `job` for `task`; False (and the task is failed) if its action has
        no job hooks in this dispatcher."""
        try:
            hooks = self._registry.get(task.action).job
        except errors.UnknownAction:
            hooks = None
        if hooks is None:
            self._finished(
                failure(
                    task,
                    "UnknownAction",
                    f"task waits on a {job.kind} job but action {task.action!r} has no job "
                    "hooks in this dispatcher; start it with the module that defines it",
                    permanent=True,
                )
            )
            return False
        with self._lock:
            self._watches[task.id] = _Watch(task, job, ctx, hooks, stop)
        self._start()
        self._wake.set()
        return True

    def request_stop(self, task_id: uuid.UUID, request: Mapping[str, Any]) -> None:
        """Abort the task's job at the next pass (cancel or timeout)."""
        with self._lock:
            watch = self._watches.get(task_id)
            if watch is not None and watch.stop is None:
                watch.stop = request
                watch.due = time.monotonic()
        self._wake.set()

    def forget(self, task_id: uuid.UUID) -> None:
        """Stop polling a task that is no longer ours (its lease was lost)."""
        with self._lock:
            self._watches.pop(task_id, None)

    def waiting(self) -> int:
        with self._lock:
            return len(self._watches)

    def drain(self) -> tuple[list[Outcome], list[Note]]:
        """Outcomes of jobs that ended, and notes for timelines, since the last call."""
        outcomes = [self._outcomes.popleft() for _ in range(len(self._outcomes))]
        notes = [self._notes.popleft() for _ in range(len(self._notes))]
        return outcomes, notes

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=defaults.SHUTDOWN_GRACE_SECONDS)

    # -- the monitor's thread --------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="taskomatic-job-monitor", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            now = time.monotonic()
            with self._lock:
                due = [w for w in self._watches.values() if w.due <= now]
                soonest = min((w.due for w in self._watches.values()), default=now + 3600)
            by_host: dict[str, list[_Watch]] = {}
            for w in due:
                by_host.setdefault(w.job.host, []).append(w)
            for host, watches in sorted(by_host.items()):
                self._listen(host)
                for w in watches:
                    if self._stopped.is_set():
                        return
                    self._poll(w)
            if due:
                continue  # the pass took time: look again before sleeping
            self._wake.wait(max(soonest - time.monotonic(), 0.0))
            self._wake.clear()

    def _poll(self, w: _Watch) -> None:
        if w.stop is not None and not w.aborted:
            w.aborted = True
            reason = w.stop.get("reason", "cancel")
            try:
                w.hooks.abort(w.ctx, w.job)
                self._note(w, f"{reason}: abort of the {w.job.kind} job requested on {w.job.host}")
            except errors.ActionError as exc:
                self._note(w, f"{reason}: abort of the {w.job.kind} job failed: {exc.message}")
            w.interval = defaults.JOB_POLL_FIRST_SECONDS
        try:
            status = w.hooks.poll(w.ctx, w.job)
        except errors.ActionError as exc:
            # Never end a task while its job may still run: an unreachable host is asked
            # again later. A permanent error (the VM is gone) means the job is gone too.
            if exc.permanent:
                self._finish(w)
                return
            w.failures += 1
            if w.failures == 1 or w.failures % 10 == 0:
                log.warning("task %s: polling its job failed: %s", w.task.id, exc.message)
            self._reschedule(w)
            return
        except Exception:
            log.exception("task %s: polling its %s job crashed", w.task.id, w.job.kind)
            self._reschedule(w)
            return
        w.failures = 0
        if status.running:
            if status.progress is not None and status.progress != w.progress:
                w.progress = status.progress
                w.interval = defaults.JOB_POLL_FIRST_SECONDS  # it moves: keep looking closely
                job = {**w.job.to_dict(), "progress": dict(status.progress)}
                self._notes.append(Note(w.task, "", job))
                self._on_done()  # wake the dispatcher to record it
            self._reschedule(w)
            return
        self._finish(w)

    def _finish(self, w: _Watch) -> None:
        outcome = guarded(w.task, lambda: success(w.task, w.hooks.finish(w.ctx, w.job)))
        with self._lock:
            self._watches.pop(w.task.id, None)
        self._finished(outcome)

    def _finished(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)
        self._on_done()

    def _reschedule(self, w: _Watch) -> None:
        w.due = time.monotonic() + w.interval
        w.interval = min(w.interval * defaults.JOB_POLL_BACKOFF, defaults.JOB_POLL_MAX_SECONDS)

    def _note(self, w: _Watch, message: str) -> None:
        log.info("task %s: %s", w.task.id, message)
        self._notes.append(Note(w.task, message))
        self._on_done()

    # -- libvirt events --------------------------------------------------------------------

    def _listen(self, host: str) -> None:
        """Have the host's connection wake us when a job ends (once per connection)."""
        try:
            conn = self._fleet.connect(self._fleet.host(host))
        except errors.ActionError:
            return  # polling will report it
        if self._events.get(host) is conn:
            return
        self._events[host] = conn
        for name in _WAKING_EVENTS:
            event = getattr(libvirt, name, None)
            if event is None:
                continue
            # A driver without the event leaves polling alone to notice.
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventRegisterAny(None, event, self._poke, host)

    def _poke(self, _conn: Any, _dom: Any, *args: Any) -> None:
        host = args[-1]
        now = time.monotonic()
        with self._lock:
            for w in self._watches.values():
                if w.job.host == host:
                    w.due = now
                    w.interval = defaults.JOB_POLL_FIRST_SECONDS
        self._wake.set()
