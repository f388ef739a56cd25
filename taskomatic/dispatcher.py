"""The dispatcher: wake, record outcomes and claim in one transaction, hand work to workers."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from taskomatic import defaults, errors
from taskomatic.actions.registry import Context
from taskomatic.model import Dispatcher as DispatcherRow
from taskomatic.model import Task
from taskomatic.queue import Outcome, Queue
from taskomatic.virt.connections import Connections
from taskomatic.virt.fleet import Fleet
from taskomatic.virt.inventory import InventoryKeeper
from taskomatic.workers import WorkerPool

log = logging.getLogger(__name__)


@dataclass
class _Running:
    task: Task
    ctx: Context
    deadline: float | None  # time.monotonic() after which the task times out
    ended: bool = field(default=False)  # failed by us (timeout) or lost; outcome will be refused


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
        self.running: dict[uuid.UUID, _Running] = {}
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
        self.queue._watcher.ensure_started()
        log.info("dispatcher %s started with %d workers", self.id, self.pool.size)
        try:
            if self.inventory is not None:
                self.inventory.start()
            self._loop(until_empty)
        finally:
            try:
                self._shutdown()
            finally:
                if self.inventory is not None:
                    self.inventory.stop()

    # -- the loop ------------------------------------------------------------------------

    def _loop(self, until_empty: bool) -> None:
        signal = self.queue.signal
        now = time.monotonic()
        next_renew = now + self._renew_interval()
        next_recovery = now  # start-up is recovery: the same sweep runs now and periodically
        next_poll = now + self.poll
        pending: list[Outcome] = []
        due: datetime | None = None
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
                self._expire_overdue(now)
                pending += self.pool.drain()
                free = self.pool.size - len(self.running) + len(pending)
                result = self.queue.cycle(self.id, pending, free, self.lease)
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
            for task in result.claimed:
                self._start(task, recovered=False)
            # Our own commits need not wake us; anyone else's still does.
            seen = signal.absorb(seen, signal.fired_here() - own)
            due = result.next_due
            if until_empty and not self.running and self.queue.live_count() == 0:
                return
            timeout = min(next_poll, next_renew, next_recovery, self._next_deadline()) - now
            if due is not None:
                timeout = min(timeout, (due - self.queue.now()).total_seconds())
            signal.wait(seen, max(timeout, 0.001))

    def _start(self, task: Task, recovered: bool) -> None:
        ctx = Context(task.id, task.action, task.params, task.attempt, fleet=self.fleet)
        deadline = None
        if task.deadline is not None:
            deadline = time.monotonic() + (task.deadline - self.queue.now()).total_seconds()
        self.running[task.id] = _Running(task, ctx, deadline)
        self.pool.submit(task, ctx, recovered)

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

    def _recover(self) -> None:
        free = self.pool.size - len(self.running)
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
        free = self.pool.size - len(self.running)
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
            while self.running and time.monotonic() < deadline:
                seen = signal.generation
                outcomes = self.pool.drain()
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
            self.pool.stop()
            log.info("dispatcher %s stopped", self.id)
