"""The dispatcher: wake, record outcomes and claim in one transaction, hand work to workers."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from taskomatic import defaults, errors
from taskomatic.actions.registry import Context
from taskomatic.failpoints import crash_point
from taskomatic.jobs import HostJob
from taskomatic.model import Dispatcher as DispatcherRow
from taskomatic.model import State, Task
from taskomatic.monitor import JobMonitor
from taskomatic.queue import Outcome, Queue
from taskomatic.virt.connections import Connections
from taskomatic.virt.fleet import Fleet
from taskomatic.virt.inventory import InventoryKeeper
from taskomatic.wakeup import Waiter
from taskomatic.workers import WorkerPool

log = logging.getLogger(__name__)


@dataclass
class _Running:
    task: Task
    ctx: Context
    deadline: float | None  # time.monotonic() after which the task times out
    ended: bool = field(default=False)  # failed by us (timeout) or lost; outcome will be refused
    waiting: bool = field(default=False)  # on a host job, watched by the monitor, no worker
    stop: Mapping[str, Any] | None = field(default=None)  # a cancel or timeout asked of it


class Dispatcher:
    """Runs tasks from a Queue on a bounded pool of threads; embeddable or as a process.

    One thread does all database work in cycles: each cycle commits the outcomes that
    finished and claims as many runnable tasks as there are free workers, in one
    transaction. It sleeps until a wake-up (a change in this process, a NOTIFY, a
    SQLite commit elsewhere), a timer (lease renewal, recovery, a due `not_before`, a
    deadline) or the safety poll — which logs a WARNING for any task it had to find.
    """

    def __init__(
        self,
        queue: Queue,
        *,
        workers: int = defaults.WORKERS,
        lease: float = defaults.LEASE_SECONDS,
        poll: float = defaults.SAFETY_POLL_SECONDS,
        recovery: float = defaults.RECOVERY_SECONDS,
        fleet: Fleet | None = None,
        inventory: bool = False,
        inventory_interval: float = defaults.INVENTORY_SYNC_SECONDS,
    ) -> None:
        self.queue = queue
        # Host connections outlive a dispatcher when the caller passes them (tests, embedding).
        self.fleet = fleet or Fleet(queue.hosts, Connections())
        # Keeps the inventory of the hosts current, on this fleet's connections (the CLI's
        # dispatcher does; embedded ones ask for it).
        self.inventory = (
            InventoryKeeper(self.fleet.inventory, self.fleet, inventory_interval)
            if inventory
            else None
        )
        self.id = uuid.uuid4()
        self.lease = lease
        self.poll = poll
        self.recovery = recovery
        self.pool = WorkerPool(workers, queue.registry, queue.signal.fire)
        self.monitor = JobMonitor(queue.registry, self.fleet, queue.signal.fire)
        self.running: dict[uuid.UUID, _Running] = {}  # running and waiting tasks we hold
        self.missed_wakeups = 0
        self._stop = threading.Event()
        self._grace = defaults.SHUTDOWN_GRACE_SECONDS  # set by stop(), possibly before run()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Dispatcher:
        """Run in a background thread (for embedding); `stop()` ends it."""
        self._thread = threading.Thread(target=self.run, name="taskomatic-dispatcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, grace: float = defaults.SHUTDOWN_GRACE_SECONDS, wait: bool = True) -> None:
        """Stop claiming; let running actions finish for up to `grace` seconds."""
        self._grace = grace
        self._stop.set()
        self.queue.signal.fire()
        if wait and self._thread is not None:
            self._thread.join()

    def run(self, until_empty: bool = False) -> None:
        """The dispatch loop; returns after `stop()` (or once no task is left, if asked)."""
        self.queue.register_dispatcher(
            DispatcherRow(
                self.id,
                socket.gethostname(),
                os.getpid(),
                self.pool.size,
                self.queue.now(),
                self.queue.now(),
                None,
            )
        )
        waiter = self.queue.waiter()
        log.info("dispatcher %s started with %d workers", self.id, self.pool.size)
        try:
            if self.inventory is not None:
                self.inventory.start()
            self._loop(until_empty, waiter)
        finally:
            try:
                self._shutdown()
            finally:
                waiter.close()
                self.queue.cycles_done()
                if self.inventory is not None:
                    self.inventory.stop()

    # -- the loop ------------------------------------------------------------------------

    def _loop(self, until_empty: bool, waiter: Waiter) -> None:
        signal = self.queue.signal
        now = time.monotonic()
        next_renew = now + self._renew_interval()
        next_recovery = now  # start-up is recovery: the same sweep runs now and periodically
        next_poll = now + self.poll
        next_stops = now + defaults.STOP_CHECK_SECONDS
        pending: list[Outcome] = []
        due: datetime | None = None
        # Other processes hear of our changes at most every NOTIFY_COALESCE_SECONDS while
        # we are busy: when we last told them, and by when we must tell them again.
        coalesce = defaults.NOTIFY_COALESCE_SECONDS
        announced_at = -math.inf
        announce_by: float | None = None
        while not self._stop.is_set():
            seen = signal.generation  # read BEFORE looking, so no change slips between
            own = signal.fired_here()
            now = time.monotonic()
            try:
                if now >= next_poll:
                    self._safety_poll()
                    next_poll = now + self.poll
                if now >= next_recovery:
                    self._recover()
                    next_recovery = now + self.recovery
                if now >= next_renew:
                    self._renew()
                    next_renew = now + self._renew_interval()
                if now >= next_stops and self.running:
                    self._look_for_stops()
                    next_stops = now + defaults.STOP_CHECK_SECONDS
                self._expire_overdue(now)
                pending += self.pool.drain()
                ended, notes = self.monitor.drain()
                pending += ended
                if notes:
                    self._notes(notes)
                pending = self._route(pending)
                ending = {o.task.id for o in pending}
                busy = sum(
                    1 for tid, r in self.running.items() if not r.waiting and tid not in ending
                )
                result = self.queue.cycle(
                    self.id,
                    pending,
                    self.pool.size - busy,
                    self.lease,
                    quiet=now - announced_at < coalesce,
                )
            except errors.TaskomaticError as exc:
                log.error("dispatcher cycle failed, retrying: %s", exc)
                self._stop.wait(defaults.DB_RETRY_MAX_SECONDS)
                continue
            for outcome in pending:
                self.running.pop(outcome.task.id, None)
                if outcome.ok and self.inventory is not None:
                    self.inventory.note(outcome.result)  # e.g. a snapshot: no libvirt event
            for tid, state in result.refused.items():
                log.info(
                    "outcome of task %s discarded: it is %s, no longer ours",
                    tid,
                    state.value if state else "gone",
                )
            pending = []
            if result.announced:
                announced_at, announce_by = now, None
            elif result.unannounced and announce_by is None:
                announce_by = announced_at + coalesce
            if announce_by is not None and now >= announce_by:
                # This cycle was not quiet but had nothing to tell: tell what the last did.
                try:
                    self.queue.announce()
                except errors.TaskomaticError as exc:
                    log.warning("could not notify other processes, retrying: %s", exc)
                else:
                    announced_at, announce_by = now, None
            for task in result.claimed:
                self._start(task, recovered=False)
            # Our own commits need not wake us; anyone else's still does.
            seen = signal.absorb(seen, signal.fired_here() - own)
            due = result.next_due
            if until_empty and not self.running and self.queue.live_count() == 0:
                return
            soonest = min(next_poll, next_renew, next_recovery, self._next_deadline())
            if self.running:
                soonest = min(soonest, next_stops)
            if announce_by is not None:
                soonest = min(soonest, announce_by)
            timeout = soonest - now
            if due is not None:
                timeout = min(timeout, (due - self.queue.now()).total_seconds())
            waiter.wait(seen, max(timeout, 0.001))

    def _start(self, task: Task, recovered: bool) -> None:
        r = self._hold(task)
        if task.state is State.WAITING and task.job is not None:
            # Taken over while waiting: watch its job again, never start a second one.
            r.waiting = True
            self.monitor.watch(task, HostJob.from_dict(task.job), r.ctx, r.stop)
            return
        if r.stop is not None:
            r.ctx.stop.set()
        self.pool.submit(task, r.ctx, recovered)

    def _hold(self, task: Task) -> _Running:
        ctx = Context(task.id, task.action, task.params, task.attempt, fleet=self.fleet)
        deadline = None
        if task.deadline is not None:
            deadline = time.monotonic() + (task.deadline - self.queue.now()).total_seconds()
        r = self.running[task.id] = _Running(task, ctx, deadline, stop=task.stop_request)
        return r

    # -- host jobs, stop requests, expansion ------------------------------------------------

    def _route(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Record the outcomes that are not plain ends (a host job started, a run stopped
        by a cancel, an expansion), each kind in its own transaction; return the rest for
        the cycle. A kind whose write fails stays in the list, to be tried again."""
        rest = []
        jobs, stopped, expanding = [], [], []
        for o in outcomes:
            r = self.running.get(o.task.id)
            stop = r.stop if r is not None else None
            if o.job is not None:
                jobs.append(o)
            elif not o.ok and stop is not None and stop.get("reason") == "cancel":
                stopped.append(replace(o, task=replace(o.task, stop_request=stop)))
            elif not o.ok and stop is not None and stop.get("reason") == "timeout":
                cause = (o.error or {}).get("message", "")
                error = {"type": "Timeout", "message": f"{stop.get('message')}: {cause}"}
                rest.append(replace(o, error=error, permanent=True))
            elif o.ok and o.expansion is not None:
                expanding.append(o)
            else:
                rest.append(o)
        if jobs:
            try:
                self._await_jobs(jobs)
            except errors.TaskomaticError:
                return rest + jobs + stopped + expanding
        if stopped:
            try:
                refused = self.queue.end_stopped(self.id, stopped)
            except errors.TaskomaticError:
                return rest + stopped + expanding
            for o in stopped:
                self.running.pop(o.task.id, None)
                if o.task.id in refused:
                    log.info("task %s ended elsewhere before its cancellation", o.task.id)
        while expanding:
            o = expanding[0]
            crash_point("dispatcher:before-expansion")
            try:
                refused_by = self.queue.complete_expanding(self.id, o)
            except errors.TaskomaticError:
                return rest + expanding
            expanding.pop(0)
            self.running.pop(o.task.id, None)
            if refused_by is not None:
                log.info("expansion of task %s discarded: it is %s", o.task.id, refused_by)
        return rest

    def _await_jobs(self, jobs: list[Outcome]) -> None:
        crash_point("dispatcher:before-waiting")
        refused = self.queue.await_job(self.id, jobs)
        for o in jobs:
            assert o.job is not None
            r = self.running.get(o.task.id)
            if o.task.id in refused or r is None or r.ended:
                # Someone else holds the task now; its takeover adopts the job it finds.
                log.warning(
                    "task %s started a %s job on %s but is no longer ours",
                    o.task.id,
                    o.job.kind,
                    o.job.host,
                )
                self.running.pop(o.task.id, None)
                continue
            r.waiting = True
            task = replace(o.task, state=State.WAITING, job=o.job.to_dict())
            self.monitor.watch(task, o.job, r.ctx, r.stop)

    def _notes(self, notes: list[Any]) -> None:
        try:
            self.queue.note(self.id, [(n.task.id, n.message, n.job) for n in notes])
        except errors.TaskomaticError as exc:
            log.warning("could not record %d note(s) of waiting tasks: %s", len(notes), exc)

    def _stop_task(self, tid: uuid.UUID, request: Mapping[str, Any]) -> None:
        """Pass a stop request on: to the monitor (abort the job) or to the running action."""
        r = self.running[tid]
        r.stop = request
        if r.waiting:
            self.monitor.request_stop(tid, request)
        else:
            r.ctx.stop.set()

    def _has_job(self, action: str) -> bool:
        return action in self.queue.registry and self.queue.registry.get(action).job is not None

    def _next_deadline(self) -> float:
        deadlines = [r.deadline for r in self.running.values() if r.deadline and not r.ended]
        return min(deadlines, default=float("inf"))

    def _expire_overdue(self, now: float) -> None:
        overdue = {
            tid: r
            for tid, r in self.running.items()
            if r.deadline is not None and not r.ended and r.deadline <= now
        }
        if not overdue:
            return
        # A task with a host job is not failed while the job may still run: the job is
        # aborted, and the task fails (or completes) once the host is done with it.
        for tid, r in list(overdue.items()):
            if r.waiting or self._has_job(r.task.action):
                del overdue[tid]
                text = f"timed out after {r.task.timeout:g}s"
                request = {"reason": "timeout", "message": text, "at": self.queue.now().isoformat()}
                self.queue.request_stop(self.id, tid, request, f"{text}: stop requested")
                r.deadline = None  # recorded: not again (a failed write is tried next cycle)
                self._stop_task(tid, request)
        if not overdue:
            return
        failures = {
            tid: {
                "type": "Timeout",
                "message": f"timed out after {r.task.timeout:g}s",
                "attempt": r.task.attempt,
            }
            for tid, r in overdue.items()
        }
        self.queue.fail_running(self.id, failures)
        for r in overdue.values():
            r.ended = True
            r.ctx.stop.set()  # a cooperative action stops; its late outcome will be refused
            log.warning("task %s timed out after %gs", r.task.id, r.task.timeout)

    def _renew_interval(self) -> float:
        """Leases are renewed well before they expire, and the heartbeat (same write) must
        come often enough that `why` never takes a long-lease dispatcher for dead."""
        return min(self.lease * defaults.LEASE_RENEW_FRACTION, defaults.HEARTBEAT_SECONDS)

    def _renew(self) -> None:
        mine = [tid for tid, r in self.running.items() if not r.ended]
        kept = self.queue.renew(self.id, mine, self.lease)
        for tid in set(mine) - kept:
            log.error("lost the lease of task %s (taken over or finished elsewhere)", tid)
            self.running[tid].ended = True
            self.running[tid].ctx.stop.set()
            if self.running[tid].waiting:
                self.monitor.forget(tid)
                del self.running[tid]

    def _look_for_stops(self) -> None:
        """Pass on cancels recorded since the last look (by any process) to what we hold."""
        mine = [tid for tid, r in self.running.items() if not r.ended and r.stop is None]
        for tid, request in self.queue.stop_requests(self.id, mine).items():
            if tid in self.running and self.running[tid].stop is None:
                log.info("task %s: %s requested", tid, request.get("reason"))
                self._stop_task(tid, request)

    def _recover(self) -> None:
        free = self.pool.size - self._busy_workers()
        for task in self.queue.take_over(self.id, free, self.lease):
            log.warning(
                "took over task %s (%s) from dispatcher %s; checking before re-running",
                task.id,
                task.action,
                task.owner,
            )
            self._start(task, recovered=True)

    def _safety_poll(self) -> None:
        """Find runnable tasks the wake-ups should already have dispatched: each is a bug."""
        free = self.pool.size - self._busy_workers()
        if free <= 0:
            return
        cutoff = self.queue.now() - timedelta(
            seconds=self.poll + defaults.MISSED_WAKE_GRACE_SECONDS
        )
        for task in self.queue.runnable(limit=free):
            if max(task.updated_at, task.not_before) < cutoff:
                self.missed_wakeups += 1
                log.warning(
                    "safety poll found task %s runnable since %s with free workers: "
                    "a wake-up was missed",
                    task.id,
                    task.updated_at.isoformat(),
                )

    def _shutdown(self) -> None:
        """Finish what runs within the grace period; hand the rest to other dispatchers."""
        deadline = time.monotonic() + self._grace
        signal = self.queue.signal
        try:
            while self._working() and time.monotonic() < deadline:
                seen = signal.generation
                outcomes = self._route(self.pool.drain())
                if outcomes:
                    self.queue.cycle(self.id, outcomes, 0, self.lease)
                    for o in outcomes:
                        self.running.pop(o.task.id, None)
                    continue
                signal.wait(seen, min(1.0, max(deadline - time.monotonic(), 0.001)))
            leftover = [tid for tid, r in self.running.items() if not r.ended]
            if leftover:
                log.warning(
                    "stopping with %d task(s) still running; other dispatchers will take them over",
                    len(leftover),
                )
            for tid in leftover:
                # Another dispatcher re-runs it; a cooperative action must not go on alongside.
                self.running[tid].ctx.stop.set()
            self.queue.dispatcher_stopped(self.id, leftover)
        except errors.TaskomaticError as exc:
            log.error("could not record the shutdown cleanly: %s", exc)
        finally:
            self.monitor.stop()
            self.pool.stop()
            log.info("dispatcher %s stopped", self.id)

    def _busy_workers(self) -> int:
        """Workers running an action now (a waiting task holds none)."""
        return sum(1 for r in self.running.values() if not r.waiting)

    def _working(self) -> bool:
        """Some task is in a worker (waiting ones are left to whoever takes them over)."""
        return any(not r.waiting for r in self.running.values())
