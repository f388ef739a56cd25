"""Queue: the one way in — submit, get, list, wait, cancel, retry, collect, why."""

from __future__ import annotations

import builtins
import dataclasses
import functools
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa

from taskomatic import defaults, errors, explain, wakeup
from taskomatic.actions.registry import Registry
from taskomatic.actions.registry import registry as default_registry
from taskomatic.hosts import Hosts
from taskomatic.jobs import HostJob
from taskomatic.model import TERMINAL, Dispatcher, Event, Group, Move, State, Task
from taskomatic.store.base import Change, Completed, Store, open_store
from taskomatic.submission import Prepared, TaskSpec, prepare

log = logging.getLogger(__name__)
T = TypeVar("T")
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Page:
    """One page of a task listing; pass `next_cursor` back to get the following page."""

    tasks: list[Task]
    next_cursor: int | None


@dataclass(frozen=True)
class Cycle:
    """What one dispatcher cycle did: tasks claimed, outcomes refused, when work is next due."""

    claimed: list[Task]
    refused: dict[uuid.UUID, State | None]
    next_due: datetime | None
    announced: bool = False  # it notified other processes of its changes
    unannounced: bool = False  # a quiet cycle changed the queue without notifying: announce()


@dataclass(frozen=True)
class Outcome:
    """How one run of an action ended, as the dispatcher reports it back."""

    task: Task
    ok: bool
    result: Any = None
    error: Mapping[str, Any] | None = None
    permanent: bool = False
    job: HostJob | None = None  # the run started a host job: the task waits for it
    expansion: Sequence[TaskSpec] | None = None  # tasks to add to its group as it completes


class Queue:
    """All access to the task tables goes through here, so every change wakes the dispatcher."""

    def __init__(
        self,
        store: Store,
        *,
        registry: Registry | None = None,
        clock: Clock = utcnow,
        actor: str = "api",
        give_up: float = defaults.DB_RETRY_GIVE_UP_SECONDS,
    ) -> None:
        self.store = store
        self.give_up = give_up  # seconds of database outage after which a call fails
        self._abandoned = threading.Event()  # see abandon_retries()
        self.registry = registry or default_registry
        self.now = clock
        self.actor = actor
        self.signal = wakeup.Signal()
        self.token = uuid.uuid4().hex[:16]  # marks our NOTIFYs, so we do not wake ourselves
        self._watcher = wakeup.Watcher(store, self.signal, self.token)

    @classmethod
    def open(cls, url: str, **kwargs: Any) -> Queue:
        """A queue over the database at `url` (postgresql://… or sqlite:///path)."""
        return cls(open_store(url), **kwargs)

    def close(self) -> None:
        self._watcher.stop()
        self.store.close()

    def waiter(self) -> wakeup.Waiter:
        """For a thread that waits for changes in a loop (a dispatcher): with the store's
        listener in its own poll() where there is one, else through the watcher thread.
        Close it when done."""
        listener = self.store.listener(self.token)
        if listener is None:
            self._watcher.ensure_started()
        return wakeup.Waiter(self.signal, listener)

    @functools.cached_property
    def hosts(self) -> Hosts:
        """The hosts this queue's libvirt actions drive."""
        return Hosts(self)

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def init_db(self) -> int:
        """Create the schema if missing (idempotent); returns the schema version."""
        return self._retrying(lambda: self.store.init_schema(self.now()))

    # -- transactions ------------------------------------------------------------------

    def _retrying(self, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying it whole after a transient database error, with backoff."""
        delay = defaults.DB_RETRY_BASE_SECONDS
        give_up = time.monotonic() + self.give_up
        while True:
            try:
                return fn()
            except sa.exc.IntegrityError:
                raise  # a racing submitter; the caller decides whether to look again
            except sa.exc.DBAPIError as exc:
                hopeless = time.monotonic() > give_up or self._abandoned.is_set()
                if hopeless or not self.store.is_transient(exc):
                    raise _database_error(exc) from exc
                log.warning("database error, retrying in %.2fs: %s", delay, _first_line(exc))
            # Abandoning cuts the wait short: one last try, which raises if it fails too.
            self._abandoned.wait(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, defaults.DB_RETRY_MAX_SECONDS)

    def abandon_retries(self) -> None:
        """From now on a database outage fails calls at once instead of being ridden out,
        including calls waiting to retry: for a process that was asked to stop, so that
        SIGTERM during an outage ends it in seconds (leases recover what it held)."""
        self._abandoned.set()

    def _write(
        self, fn: Callable[[sa.Connection, datetime], T], changed: Callable[[T], bool] | None = None
    ) -> T:
        """One read-write transaction: notify (if `changed` says it changed anything), commit,
        then wake this process's waiters."""

        def attempt() -> tuple[T, bool]:
            with self.store.write() as conn:
                out = fn(conn, self.now())
                did = changed is None or changed(out)
                if did:
                    self.store.notify(conn, self.token)
            return out, did

        out, did = self._retrying(attempt)
        if did:
            self.signal.fire()
        return out

    def _as_left(
        self, fn: Callable[[sa.Connection, datetime], builtins.list[uuid.UUID]]
    ) -> Callable[[sa.Connection, datetime], builtins.list[Task]]:
        """Wrap a write that returns task ids so that it returns those tasks as it left them:
        read after the commit, a dispatcher could already have claimed one."""

        def write(conn: sa.Connection, now: datetime) -> builtins.list[Task]:
            return self.store.get_many(conn, fn(conn, now))

        return write

    def _read(self, fn: Callable[[sa.Connection], T]) -> T:
        def attempt() -> T:
            with self.store.read() as conn:
                return fn(conn)

        return self._retrying(attempt)

    # -- submit --------------------------------------------------------------------------

    def submit(self, action: str, params: Mapping[str, Any] | None = None, **spec: Any) -> Task:
        """Submit one task; keyword arguments are the fields of `TaskSpec`."""
        by = spec.pop("created_by", None)
        return self.submit_many([TaskSpec(action, params or {}, **spec)], created_by=by)[0]

    def submit_group(
        self,
        specs: Sequence[TaskSpec],
        *,
        name: str | None = None,
        group_id: uuid.UUID | None = None,
        created_by: str | None = None,
        on_failure: str = "stop",
    ) -> tuple[Group, builtins.list[Task]]:
        """Submit tasks as one command (a group), in one transaction.

        When a task of the group fails, `on_failure="stop"` cancels the group's tasks not
        yet started; "continue" lets every task that does not depend on the failed one run.
        Either way, once nothing of the group runs any more, completed tasks whose action
        can undo its work get compensation tasks, run in reverse order of completion.
        """
        if on_failure not in GROUP_POLICIES:
            raise errors.ValidationError(
                f"on_failure must be one of {', '.join(GROUP_POLICIES)}, got {on_failure!r}",
                field="on_failure",
            )
        gid = group_id or uuid.uuid4()
        tasks = self.submit_many(specs, group=(gid, name, on_failure), created_by=created_by)
        return self.group(gid), tasks

    def submit_many(
        self,
        specs: Sequence[TaskSpec],
        *,
        group: tuple[uuid.UUID, str | None, str] | None = None,
        created_by: str | None = None,
    ) -> builtins.list[Task]:
        """Submit tasks with edges among them and to existing tasks, all or nothing.

        Resubmitting a task id with the same content returns the existing task; with
        different content it raises `Conflict`. Ids are fixed before the first attempt, so
        a retry after a lost connection cannot create a task twice.
        """
        prepared = prepare(specs, self.registry)
        group_id = group[0] if group else None

        def write(
            conn: sa.Connection, now: datetime, everything: bool = False
        ) -> builtins.list[Task]:
            ids = [p.id for p in prepared]
            # Only an id the caller chose can exist already (ours are new UUIDs), unless an
            # earlier attempt of this call committed but its reply was lost.
            chosen = ids if everything else [p.id for p in prepared if p.chosen]
            existing = {t.id: t for t in self.store.get_many(conn, chosen)}
            for p in prepared:
                if p.id in existing:
                    diff = p.differences(existing[p.id], group_id)
                    if diff:
                        raise errors.Conflict(p.id, diff)
            fresh = [p for p in prepared if p.id not in existing]
            if not fresh:
                return [existing[i] for i in ids]
            inside = {p.id for p in prepared}
            outside = {a for p in fresh for a in p.after if a not in inside}
            states = self.store.states(conn, outside | set(existing), share=True)
            for p in fresh:
                for a in p.after:
                    if a not in inside and a not in states:
                        raise errors.UnknownPrerequisite(p.id, a)
            if group:
                self.store.insert_group(conn, group[0], group[1], created_by, now, group[2])
            fresh_inside = inside - set(existing)
            rows = [_row(p, now, group_id, created_by, states, fresh_inside) for p in fresh]
            self.store.insert_tasks(
                conn,
                rows,
                [(p.id, a) for p in fresh for a in p.after],
                [(p.id, k) for p in fresh for k in p.locks],
            )
            actor = created_by or self.actor
            self.store.insert_events(
                conn, ((p.id, None, State.NEW, "submitted") for p in fresh), actor, now
            )
            sunk = {a for p in fresh for a in p.after if states.get(a) in _SINKING}
            if existing or sunk:
                self._cancel_dependents(conn, sunk, states, now, actor)
                return self.store.get_many(conn, ids)
            # All new and none cancelled at birth: the rows just written are the tasks.
            return [_new_task(row, p.after) for row, p in zip(rows, fresh, strict=True)]

        try:
            if group is None and _stands_alone(prepared):
                quick = self._insert_alone(prepared, created_by)
                if quick is not None:
                    return quick
            return self._write(write)
        except sa.exc.IntegrityError:
            # Another submitter inserted one of these ids first, or our own attempt did:
            # compare with what is there.
            return self._write(functools.partial(write, everything=True))

    def _insert_alone(
        self, prepared: Sequence[Prepared], created_by: str | None
    ) -> builtins.list[Task] | None:
        """`submit_many` for tasks that need nothing read first, where the store has a
        quicker way than a transaction of statements; None where it has not."""
        inside = {p.id for p in prepared}
        edges = [(p.id, a) for p in prepared for a in p.after]
        locks = [(p.id, k) for p in prepared for k in p.locks]
        events = [(p.id, None, State.NEW, "submitted") for p in prepared]
        actor = created_by or self.actor

        def attempt() -> builtins.list[dict[str, Any]] | None:
            now = self.now()
            rows = [_row(p, now, None, created_by, {}, inside) for p in prepared]
            inserted = self.store.insert_alone(rows, edges, locks, events, actor, now, self.token)
            return rows if inserted else None

        rows = self._retrying(attempt)
        if rows is None:
            return None
        self.signal.fire()
        return [_new_task(row, p.after) for row, p in zip(rows, prepared, strict=True)]

    # -- reads ---------------------------------------------------------------------------

    def get(self, task_id: uuid.UUID | str) -> Task:
        """One task, with its prerequisites; `TaskNotFound` if there is none."""
        tid = _uuid(task_id)
        found = self._read(lambda conn: self.store.get_many(conn, [tid]))
        if not found:
            raise errors.TaskNotFound(tid)
        return found[0]

    def list(
        self,
        *,
        state: State | str | Iterable[State | str] | None = None,
        action: str | None = None,
        group: uuid.UUID | str | None = None,
        limit: int = defaults.LIST_LIMIT,
        cursor: int | None = None,
    ) -> Page:
        """Tasks newest first, filtered by state(s), action or group, a page at a time."""
        states = [_state(s) for s in ([state] if isinstance(state, str | State) else state or [])]
        if not 1 <= limit <= defaults.MAX_LIST_LIMIT:
            raise errors.ValidationError(
                f"limit must be between 1 and {defaults.MAX_LIST_LIMIT}", field="limit"
            )
        gid = _uuid(group) if group else None
        tasks, nxt = self._read(
            lambda conn: self.store.list_tasks(
                conn, states=states, action=action, group_id=gid, limit=limit, before=cursor
            )
        )
        return Page(tasks, nxt)

    def events(self, task_id: uuid.UUID | str) -> builtins.list[Event]:
        """The task's transitions, oldest first."""
        tid = _uuid(task_id)
        self.get(tid)
        return self._read(lambda conn: self.store.events(conn, tid))

    def group(self, group_id: uuid.UUID | str) -> Group:
        """A group with its derived state and counts."""
        gid = _uuid(group_id)
        found = self._read(lambda conn: self.store.group(conn, gid))
        if found is None:
            raise errors.GroupNotFound(gid)
        return found

    def counts(self) -> dict[State, int]:
        """Number of tasks in each state."""
        return self._read(self.store.counts)

    def runnable(self, limit: int | None = None) -> builtins.list[Task]:
        """Tasks runnable now, in dispatch order (the one runnable query, without claiming)."""
        return self._read(lambda conn: self.store.runnable(conn, self.now(), limit))

    def why(self, task_id: uuid.UUID | str) -> explain.Why:
        """Why the task is not running (or what it is doing); see `explain`."""
        task = self.get(task_id)
        return self._read(lambda conn: explain.why(self.store, conn, task, self.now()))

    def why_group(self, group_id: uuid.UUID | str) -> explain.GroupWhy:
        """Where a group is: its derived state, what sank it, why each live task waits."""
        group = self.group(group_id)
        return self._read(
            lambda conn: explain.why_group(
                self.store, conn, group, self.store.group_tasks(conn, group.id), self.now()
            )
        )

    def wait(
        self,
        task_ids: uuid.UUID | str | Sequence[uuid.UUID | str],
        timeout: float | None = None,
        on_change: Callable[[builtins.list[Task]], None] | None = None,
    ) -> builtins.list[Task]:
        """Block until every task is terminal; `WaitTimeout` after `timeout` seconds.

        Woken by the queue's own changes and by other processes' commits (NOTIFY on
        PostgreSQL, data_version on SQLite); a slow re-check covers a lost wake-up.
        """
        ids = (
            [_uuid(task_ids)]
            if isinstance(task_ids, str | uuid.UUID)
            else [_uuid(t) for t in task_ids]
        )

        def look() -> tuple[builtins.list[Task], bool]:
            tasks = self._read(lambda conn: self.store.get_many(conn, ids))
            if len(tasks) != len(ids):
                missing = next(i for i in ids if i not in {t.id for t in tasks})
                raise errors.TaskNotFound(missing)
            return tasks, all(t.state in TERMINAL for t in tasks)

        def late(tasks: builtins.list[Task]) -> str:
            busy = sum(t.state not in TERMINAL for t in tasks)
            return f"{busy} of {len(ids)} tasks not finished after {timeout}s"

        return self._wait_for(look, late, timeout, on_change)

    def wait_group(
        self,
        group_id: uuid.UUID | str,
        timeout: float | None = None,
        on_change: Callable[[builtins.list[Task]], None] | None = None,
    ) -> tuple[Group, builtins.list[Task]]:
        """Block until the group has ended (complete, failed, cancelled, compensated) —
        including the tasks it adds to itself as it runs and its compensation."""
        gid = self.group(group_id).id

        def look() -> tuple[builtins.list[Task], bool]:
            tasks = self._read(lambda conn: self.store.group_tasks(conn, gid))
            return tasks, all(t.state in TERMINAL for t in tasks)

        def late(tasks: builtins.list[Task]) -> str:
            busy = sum(t.state not in TERMINAL for t in tasks)
            return f"group {gid}: {busy} of {len(tasks)} tasks not finished after {timeout}s"

        tasks = self._wait_for(look, late, timeout, on_change)
        return self.group(gid), tasks

    def _wait_for(
        self,
        look: Callable[[], tuple[builtins.list[Task], bool]],
        late: Callable[[builtins.list[Task]], str],
        timeout: float | None,
        on_change: Callable[[builtins.list[Task]], None] | None,
    ) -> builtins.list[Task]:
        """Look until `look` says done, woken by changes; WaitTimeout(`late(...)`) after
        `timeout` seconds."""
        self._watcher.ensure_started()
        deadline = None if timeout is None else time.monotonic() + timeout
        last: builtins.list[Task] | None = None
        while True:
            seen = self.signal.generation
            tasks, done = look()
            if on_change and tasks != last:
                on_change(tasks)
            last = tasks
            if done:
                return tasks
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise errors.WaitTimeout(late(tasks))
            self.signal.wait(
                seen,
                min(left, defaults.SAFETY_POLL_SECONDS) if left else defaults.SAFETY_POLL_SECONDS,
            )

    # -- cancel, retry, collect --------------------------------------------------------

    def cancel(
        self, task_id: uuid.UUID | str, reason: str = "cancelled", *, actor: str | None = None
    ) -> builtins.list[Task]:
        """Cancel a `new` task and, transitively, its dependents; returns them as cancelled.

        A running or waiting task is asked to stop instead (a host job is aborted): it stays
        where it is, with its `stop_request`, until its run or job has ended, then ends
        cancelled — or complete, if the work finished before the stop took effect.
        """
        tid = _uuid(task_id)
        who = actor or self.actor

        def write(conn: sa.Connection, now: datetime) -> builtins.list[uuid.UUID]:
            change = Change(
                tid, {"error": {"type": "Cancelled", "message": reason}, "finished_at": now}, reason
            )
            moved = self.store.move(conn, Move.CANCEL, [change], now, who)
            if moved.refused.get(tid) in (State.RUNNING, State.WAITING):
                # Its action (or host job) is asked to stop; it ends once it has.
                request = {"reason": "cancel", "message": reason, "at": now.isoformat()}
                text = f"cancel requested: {reason}"
                stop = Change(tid, {"stop_request": request}, text)
                if self.store.move(conn, Move.REQUEST_STOP, [stop], now, who).moved:
                    return [tid]
            if tid in moved.refused:
                raise _refused(tid, moved.refused[tid], Move.CANCEL)
            cancelled = [
                tid,
                *self._cancel_dependents(conn, {tid}, {tid: State.CANCELLED}, now, who),
            ]
            self._settle_groups(conn, cancelled, now, who)
            return cancelled

        return self._write(self._as_left(write))

    def retry(self, task_id: uuid.UUID | str, *, actor: str | None = None) -> builtins.list[Task]:
        """Send a failed or cancelled task back to `new`, reviving the dependents it sank;
        returns them as the retry left them (a dispatcher may claim them at once)."""
        tid = _uuid(task_id)
        who = actor or self.actor

        def write(conn: sa.Connection, now: datetime) -> builtins.list[uuid.UUID]:
            blocked = [
                (pid, st)
                for pid, _, st in self.store.prerequisite_states(conn, tid)
                if st in _SINKING
            ]
            if blocked:
                state = self.store.states(conn, [tid]).get(tid, State.NEW)
                raise errors.InvalidTransition(
                    tid,
                    state,
                    State.NEW,
                    f"its prerequisite {blocked[0][0]} is {blocked[0][1]}; retry that first",
                )
            fresh = {
                "attempt": 0,
                "error": None,
                "result": None,
                "not_before": now,
                "finished_at": None,
                "owner": None,
                "lease_until": None,
                "deadline": None,
                "collected_at": None,
            }
            moved = self.store.move(conn, Move.RETRY, [Change(tid, fresh, "retried")], now, who)
            if tid in moved.refused:
                raise _refused(tid, moved.refused[tid], Move.RETRY)
            revived, frontier = [tid], [tid]
            while frontier:
                sunk = [
                    dep
                    for dep, pre in self.store.dependents(conn, frontier, State.CANCELLED)
                    if _sunk_by(self.store.get_many(conn, [dep])[0], pre)
                ]
                frontier = list(
                    self.store.move(
                        conn,
                        Move.RETRY,
                        [Change(d, fresh, f"revived with prerequisite {tid}") for d in sunk],
                        now,
                        who,
                    ).moved
                )
                revived += frontier
            # A revived task that has another failed or cancelled prerequisite would sit in
            # new forever: it ends again at once, now naming that prerequisite.
            still_sunk = self.store.prerequisites_in(conn, revived, _SINKING)
            self._cancel_dependents(conn, still_sunk, {}, now, who)
            self.store.recount_pending(conn, revived, now)
            return revived

        return self._write(self._as_left(write))

    def collect(self, task_id: uuid.UUID | str) -> Task:
        """Mark a finished task's result as collected (retention may then prune it)."""
        task = self.get(task_id)
        if task.state not in TERMINAL:
            raise errors.InvalidTransition(
                task.id, task.state, "collected", "only finished tasks can be collected"
            )
        self._write(lambda conn, now: self.store.mark_collected(conn, task.id, now))
        return self.get(task.id)

    def prune(self, older_than: timedelta, *, force: bool = False) -> int:
        """Remove tasks finished more than `older_than` ago whose results were collected
        (all finished ones with `force`), with their events; returns how many.

        Tasks that a remaining task depends on stay, so nothing still waiting loses a
        prerequisite. Runs in batches, each its own transaction, oldest first.
        """
        if older_than < timedelta(0):
            raise errors.ValidationError("older_than must not be negative", field="older_than")
        before = self.now() - older_than
        removed = 0
        while True:

            def batch(conn: sa.Connection, _now: datetime) -> int:
                ids = self.store.prunable(conn, before, force, defaults.PRUNE_BATCH)
                self.store.delete_tasks(conn, ids)
                return len(ids)

            count = self._write(batch, changed=lambda _: False)
            removed += count
            if count < defaults.PRUNE_BATCH:
                return removed

    def uncollected(self) -> int:
        """How many finished tasks hold a result no caller has collected."""
        return self._read(self.store.uncollected)

    # -- the dispatcher's side ---------------------------------------------------------

    def cycle(
        self,
        owner: uuid.UUID,
        outcomes: Sequence[Outcome],
        claim: int,
        lease: float,
        quiet: bool = False,
    ) -> Cycle:
        """Record finished runs and claim new work in ONE transaction (one commit per cycle).

        A `quiet` cycle that leaves no runnable work for others may skip notifying other
        processes (where the store completes in one step); it then says so (`unannounced`),
        and the caller must `announce()` soon. This process's waiters are woken at once."""
        lease_td = timedelta(seconds=lease)

        def write(conn: sa.Connection, now: datetime) -> Cycle:
            refused = self._finish(conn, owner, outcomes, now)
            claimed = self.store.claim(conn, owner, now, lease_td, claim) if claim else []
            # Only an under-full claim needs to know when the next delayed task is due.
            due = self.store.next_due(conn, now) if len(claimed) < claim else None
            changed = bool(claimed) or len(refused) < len(outcomes)
            return Cycle(claimed, refused, due, announced=changed)

        if not outcomes and not claim:
            return Cycle([], {}, None)
        if self.store.completes_in_one_step and all(_completes_plainly(o) for o in outcomes):
            quick = self._complete_and_claim(owner, outcomes, claim, lease_td, quiet)
            if quick is not None:
                return quick
        return self._write(write, lambda c: c.announced)

    def announce(self) -> None:
        """Tell other processes that the queue changed: what quiet cycles left unannounced."""
        self._write(lambda conn, now: None)

    def _complete_and_claim(
        self,
        owner: uuid.UUID,
        outcomes: Sequence[Outcome],
        claim: int,
        lease: timedelta,
        quiet: bool,
    ) -> Cycle | None:
        """`cycle` in one step on the server, where the store has one; None otherwise."""

        def attempt() -> Completed | None:
            now = self.now()
            done = [Change(o.task.id, _completion(o, now), "completed") for o in outcomes]
            return self.store.complete_and_claim(owner, done, now, lease, claim, self.token, quiet)

        did = self._retrying(attempt)
        if did is None:
            return None
        changed = bool(did.moved.moved or did.picked)
        if did.moved.moved or did.claimed:
            self.signal.fire()
        claimed, due = did.claimed, did.next_due
        rest = claim - len(claimed)
        if len(did.picked) > len(claimed) and rest:
            # Runnable tasks with lock keys: the general claim takes their keys.
            more = self._write(
                lambda conn, now: (
                    self.store.claim(conn, owner, now, lease, rest),
                    self.store.next_due(conn, now),
                ),
                lambda c: bool(c[0]),
            )
            place = {tid: i for i, tid in enumerate(did.picked)}
            claimed = sorted(claimed + more[0], key=lambda t: place.get(t.id, len(place)))
            due = more[1]
        elif rest and not did.picked:
            due = self._read(lambda conn: self.store.next_due(conn, self.now()))
        return Cycle(
            claimed,
            did.moved.refused,
            due if len(claimed) < claim else None,
            announced=changed and did.announced,
            unannounced=changed and not did.announced,
        )

    def cycles_done(self) -> None:
        """The calling thread makes no more cycles: give back the connection the store
        kept for them (a dispatcher's loop, as it ends)."""
        self.store.release_kept()

    def take_over(self, owner: uuid.UUID, limit: int, lease: float) -> builtins.list[Task]:
        """Adopt up to `limit` tasks whose dispatcher's lease expired (it died)."""

        def write(conn: sa.Connection, now: datetime) -> builtins.list[Task]:
            orphans = self.store.expired(conn, now, limit)
            changes = [
                Change(
                    o.id,
                    {"owner": owner, "lease_until": now + timedelta(seconds=lease)},
                    f"taken over from dispatcher {o.owner}, whose lease expired at "
                    f"{o.lease_until:%H:%M:%S}",
                )
                for o in orphans
            ]
            moved = self.store.move(conn, Move.TAKE_OVER, changes, now, f"dispatcher:{owner}")
            return self.store.get_many(conn, list(moved.moved))

        return self._write(write, bool) if limit > 0 else []

    def renew(
        self, owner: uuid.UUID, task_ids: Sequence[uuid.UUID], lease: float
    ) -> set[uuid.UUID]:
        """Heartbeat the dispatcher and extend its tasks' leases; returns the tasks still held."""

        def write(conn: sa.Connection, now: datetime) -> set[uuid.UUID]:
            self.store.heartbeat(conn, owner, now)
            return self.store.renew_leases(conn, owner, task_ids, now + timedelta(seconds=lease))

        return self._retrying(lambda: self._plain_write(write))

    def register_dispatcher(self, info: Dispatcher) -> None:
        """Announce a dispatcher, so `why` can tell whether anyone is there to run work."""
        self._retrying(
            lambda: self._plain_write(lambda conn, now: self.store.register_dispatcher(conn, info))
        )

    def dispatcher_stopped(self, owner: uuid.UUID, leftover: Sequence[uuid.UUID]) -> None:
        """Mark a dispatcher stopped and hand its unfinished tasks to others at once."""

        def write(conn: sa.Connection, now: datetime) -> None:
            self.store.heartbeat(conn, owner, now, stopped=True)
            self.store.renew_leases(conn, owner, leftover, now)

        self._write(write)

    def dispatchers(self) -> builtins.list[Dispatcher]:
        """Dispatchers alive now (heartbeat recent, not stopped)."""
        since = self.now() - timedelta(seconds=defaults.DISPATCHER_DEAD_AFTER_SECONDS)
        return self._read(lambda conn: self.store.alive_dispatchers(conn, since))

    def live_count(self) -> int:
        """Tasks not yet finished (new, running or waiting)."""
        return self._read(self.store.live_count)

    def _plain_write(self, fn: Callable[[sa.Connection, datetime], T]) -> T:
        """A write that changes no task state: no notification needed."""
        with self.store.write() as conn:
            return fn(conn, self.now())

    def _finish(
        self, conn: sa.Connection, owner: uuid.UUID, outcomes: Sequence[Outcome], now: datetime
    ) -> dict[uuid.UUID, State | None]:
        actor = f"dispatcher:{owner}"
        done, later, failed = [], [], []
        for o in outcomes:
            ended = {"lease_until": None, "deadline": None}
            if o.ok:
                done.append(Change(o.task.id, _completion(o, now), "completed"))
                continue
            error = {**(o.error or {}), "attempt": o.task.attempt}
            text = f"attempt {o.task.attempt} failed: {error.get('message', '')}"
            if o.permanent or o.task.attempt >= o.task.max_attempts:
                failed.append(
                    Change(o.task.id, {**ended, "error": error, "finished_at": now}, text)
                )
            else:
                at = now + timedelta(seconds=backoff(o.task.attempt))
                later.append(
                    Change(
                        o.task.id,
                        {**ended, "error": error, "not_before": at, "owner": None},
                        f"{text}; retry at {at:%H:%M:%S}",
                    )
                )
        refused: dict[uuid.UUID, State | None] = {}
        ended_ids: builtins.list[uuid.UUID] = []
        for move, changes in (
            (Move.COMPLETE, done),
            (Move.RETRY_LATER, later),
            (Move.FAIL, failed),
        ):
            moved = self.store.move(conn, move, changes, now, actor, owner=owner)
            refused.update(moved.refused)
            ended_ids += moved.moved
            if move is Move.COMPLETE:
                self.store.release_dependents(conn, list(moved.moved), now)
            elif move is Move.FAIL:
                self._cancel_dependents(conn, set(moved.moved), {}, now, actor)
        locked = {o.task.id for o in outcomes if o.task.locks}
        self.store.release_locks(conn, [i for i in ended_ids if i in locked])
        self._settle_groups(conn, [o.task.id for o in outcomes if o.task.group_id], now, actor)
        return refused

    def fail_running(
        self, owner: uuid.UUID | None, failures: Mapping[uuid.UUID, Mapping[str, Any]]
    ) -> set[uuid.UUID]:
        """Fail running tasks now (timeouts, unknown actions); returns those failed."""

        def write(conn: sa.Connection, now: datetime) -> set[uuid.UUID]:
            changes = [
                Change(
                    tid,
                    {"error": dict(err), "finished_at": now, "lease_until": None, "deadline": None},
                    str(err.get("message", "failed")),
                )
                for tid, err in failures.items()
            ]
            moved = self.store.move(
                conn, Move.FAIL, changes, now, f"dispatcher:{owner}", owner=owner
            )
            self.store.release_locks(conn, list(moved.moved))
            self._cancel_dependents(conn, set(moved.moved), {}, now, f"dispatcher:{owner}")
            self._settle_groups(conn, list(moved.moved), now, f"dispatcher:{owner}")
            return set(moved.moved)

        return self._write(write)

    # -- host jobs, stop requests, expansion: the dispatcher's slower paths ----------------

    def await_job(
        self, owner: uuid.UUID, outcomes: Sequence[Outcome]
    ) -> dict[uuid.UUID, State | None]:
        """running -> waiting for tasks whose run started a host job (locks and lease stay);
        returns those no longer ours."""
        changes = [
            Change(
                o.task.id,
                {"job": o.job.to_dict()},
                f"waiting on a {o.job.kind} job on host {o.job.host}",
            )
            for o in outcomes
            if o.job is not None
        ]
        actor = f"dispatcher:{owner}"
        return self._write(
            lambda conn, now: (
                self.store.move(conn, Move.AWAIT_JOB, changes, now, actor, owner=owner).refused
            )
        )

    def note(
        self,
        owner: uuid.UUID,
        notes: Sequence[tuple[uuid.UUID, str, Mapping[str, Any] | None]],
    ) -> None:
        """Record (task, message, job) notes of running or waiting tasks of `owner`: an event
        for each message, the job's latest progress for each job."""

        def write(conn: sa.Connection, now: datetime) -> None:
            for tid, _, job in notes:
                if job is not None:
                    self.store.update_job(conn, owner, tid, job)
            changes = [Change(tid, {}, message) for tid, message, _ in notes if message]
            self.store.move(conn, Move.NOTE, changes, now, f"dispatcher:{owner}", owner=owner)

        self._retrying(lambda: self._plain_write(write))

    def request_stop(
        self, owner: uuid.UUID, task_id: uuid.UUID, request: Mapping[str, Any], message: str
    ) -> bool:
        """Record a stop request (a timeout) on a running or waiting task of `owner`."""
        change = Change(task_id, {"stop_request": dict(request)}, message)
        actor = f"dispatcher:{owner}"
        moved = self._write(
            lambda conn, now: self.store.move(
                conn, Move.REQUEST_STOP, [change], now, actor, owner=owner
            )
        )
        return task_id in moved.moved

    def stop_requests(
        self, owner: uuid.UUID, task_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, Mapping[str, Any]]:
        """Stop requests (cancel, timeout) recorded on these tasks of `owner`."""
        return self._read(lambda conn: self.store.stop_requests(conn, owner, task_ids))

    def end_stopped(
        self, owner: uuid.UUID, outcomes: Sequence[Outcome]
    ) -> dict[uuid.UUID, State | None]:
        """Cancel tasks whose run or host job ended, without their work, after a cancel
        request; their dependents are cancelled as for any cancellation."""
        actor = f"dispatcher:{owner}"

        def write(conn: sa.Connection, now: datetime) -> dict[uuid.UUID, State | None]:
            changes = []
            for o in outcomes:
                request = o.task.stop_request or {}
                reason = str(request.get("message") or "cancelled")
                what = (o.error or {}).get("message", "it stopped")
                error = {"type": "Cancelled", "message": f"{reason}: {what}"}
                changes.append(
                    Change(
                        o.task.id,
                        {"error": error, "finished_at": now, "lease_until": None, "deadline": None},
                        f"cancelled: {what}",
                    )
                )
            moved = self.store.move(conn, Move.STOPPED, changes, now, actor, owner=owner)
            self.store.release_locks(conn, list(moved.moved))
            ended = {tid: State.CANCELLED for tid in moved.moved}
            sunk = self._cancel_dependents(conn, set(moved.moved), ended, now, actor)
            self._settle_groups(conn, [*moved.moved, *sunk], now, actor)
            return moved.refused

        return self._write(write)

    def complete_expanding(self, owner: uuid.UUID, outcome: Outcome) -> State | None:
        """Complete a task that adds tasks to its group, in ONE transaction: its new tasks
        are inserted and every dependent of it waits for them too. Returns None, or the
        state that refused the completion (the task is no longer ours)."""
        parent = outcome.task
        specs = [
            spec
            if spec.id is not None
            else dataclasses.replace(
                spec, id=uuid.uuid5(parent.id, f"{i}:{spec.name or spec.action}")
            )
            for i, spec in enumerate(outcome.expansion or ())
        ]
        prepared = prepare(specs, self.registry) if specs else []
        actor = f"dispatcher:{owner}"

        def write(conn: sa.Connection, now: datetime) -> State | None:
            done = Change(
                parent.id,
                {
                    "result": outcome.result,
                    "error": None,
                    "finished_at": now,
                    "lease_until": None,
                    "deadline": None,
                },
                f"completed, adding {len(prepared)} task(s) to its group",
            )
            moved = self.store.move(conn, Move.COMPLETE, [done], now, actor, owner=owner)
            if parent.id in moved.refused:
                return moved.refused[parent.id]
            fresh = {p.id for p in prepared} - {
                t.id for t in self.store.get_many(conn, [p.id for p in prepared])
            }
            todo = [p for p in prepared if p.id in fresh]
            inside = {p.id for p in prepared}
            outside = {a for p in todo for a in p.after if a not in inside}
            states = self.store.states(conn, outside, share=True)
            self.store.insert_tasks(
                conn,
                [_row(p, now, parent.group_id, actor, states, inside) for p in todo],
                [(p.id, a) for p in todo for a in p.after],
                [(p.id, k) for p in todo for k in p.locks],
            )
            self.store.insert_events(
                conn,
                ((p.id, None, State.NEW, f"added by task {parent.id}") for p in todo),
                actor,
                now,
            )
            dependents = [d for d, _ in self.store.dependents(conn, [parent.id], State.NEW)]
            self.store.add_prerequisites(conn, [(d, p.id) for d in dependents for p in todo], now)
            self.store.release_dependents(conn, [parent.id], now)
            self.store.release_locks(conn, [parent.id])
            self._settle_groups(conn, [parent.id], now, actor)
            return None

        return self._write(write)

    # -- groups: compensation --------------------------------------------------------------

    def _settle_groups(
        self, conn: sa.Connection, ended: Sequence[uuid.UUID], now: datetime, actor: str
    ) -> None:
        """After tasks ended: a group with a failed task stops (its new tasks are cancelled)
        and, once nothing of it runs any more, undoes its completed work — one compensation
        task per completed task whose action can undo, run in reverse order of completion.

        Runs in the transaction that ended the tasks, with the group row locked, so two
        dispatchers ending a group's last tasks at once settle it exactly once.
        """
        if not ended:
            return
        groups = {t.group_id for t in self.store.get_many(conn, list(ended)) if t.group_id}
        for gid in sorted(groups, key=str):
            policy = self.store.lock_group(conn, gid)
            if not self.store.group_has_ended_badly(conn, gid):
                continue  # the common case, without reading the whole group
            members = self.store.group_tasks(conn, gid)
            if any(m.compensates for m in members):
                continue  # settled already: its compensation runs or ran
            roots = [m for m in members if _sinks_group(m)]
            if not roots:
                continue
            root = roots[0]
            verb = "failed" if root.state is State.FAILED else "was cancelled"
            text = f"group stopped: task {root.id} ({root.action}) {verb}"
            error = {"type": "GroupFailed", "message": text, "root": str(root.id)}
            stopped = [
                Change(m.id, {"error": error, "finished_at": now}, text)
                for m in members
                if m.state is State.NEW
            ]
            if policy == "stop":
                self.store.move(conn, Move.CANCEL, stopped, now, actor)
            elif any(m.state is State.NEW for m in members):
                continue  # "continue": what does not depend on the failure still runs
            if any(m.state in (State.RUNNING, State.WAITING) for m in members):
                continue  # settled again when the last of them ends
            self._compensate(conn, gid, members, root, now)

    def _compensate(
        self,
        conn: sa.Connection,
        gid: uuid.UUID,
        members: Sequence[Task],
        root: Task,
        now: datetime,
    ) -> None:
        done = [m for m in members if m.state is State.COMPLETE]
        done.sort(key=lambda m: m.finished_at or now, reverse=True)
        specs: builtins.list[TaskSpec] = []
        undoes: dict[uuid.UUID, uuid.UUID] = {}
        for m in done:
            if m.action not in self.registry:
                continue
            undo = self.registry.get(m.action).compensate
            planned = undo(m.params, m.result) if undo else None
            if planned is None:
                continue
            action, params = planned
            sid = uuid.uuid5(m.id, "compensate")
            specs.append(
                TaskSpec(action, params, id=sid, after=[specs[-1].id] if specs else [])  # type: ignore[list-item]
            )
            undoes[sid] = m.id
        if not specs:
            return
        prepared = prepare(specs, self.registry)
        actor = "compensation"
        inside = set(undoes)
        rows = [_row(p, now, gid, actor, {}, inside) for p in prepared]
        for row in rows:
            row["compensates"] = undoes[row["id"]]
        self.store.insert_tasks(
            conn,
            rows,
            [(p.id, a) for p in prepared for a in p.after],
            [(p.id, k) for p in prepared for k in p.locks],
        )
        self.store.insert_events(
            conn,
            (
                (p.id, None, State.NEW, f"undoes task {undoes[p.id]}: task {root.id} failed")
                for p in prepared
            ),
            actor,
            now,
        )

    def _cancel_dependents(
        self,
        conn: sa.Connection,
        roots: set[uuid.UUID],
        states: Mapping[uuid.UUID, State],
        now: datetime,
        actor: str,
    ) -> builtins.list[uuid.UUID]:
        """Cancel every `new` task downstream of `roots`, naming the prerequisite that sank it."""
        if not roots:
            return []
        root_state = {r: states.get(r) or self.store.states(conn, [r])[r] for r in roots}
        root_of = {r: r for r in roots}
        cancelled: builtins.list[uuid.UUID] = []
        frontier = list(roots)
        while frontier:
            changes, seen = [], set()
            for dep, pre in self.store.dependents(conn, frontier, State.NEW):
                if dep in seen:
                    continue
                seen.add(dep)
                root = root_of[dep] = root_of[pre]
                verb = "failed" if root_state[root] is State.FAILED else "was cancelled"
                text = (
                    f"prerequisite {pre} {verb}"
                    if pre == root
                    else f"prerequisite {pre} was cancelled because task {root} {verb}"
                )
                error = {
                    "type": "PrerequisiteFailed",
                    "message": text,
                    "prerequisite": str(pre),
                    "root": str(root),
                }
                changes.append(Change(dep, {"error": error, "finished_at": now}, text))
            frontier = list(self.store.move(conn, Move.CANCEL, changes, now, actor).moved)
            cancelled += frontier
        return cancelled


_SINKING = frozenset({State.FAILED, State.CANCELLED})

GROUP_POLICIES = ("stop", "continue")
"""What a failed task does to the rest of its group; see `Queue.submit_group`."""


def _sinks_group(task: Task) -> bool:
    """A failure of its own (not a consequence of another's), in a task that is not itself
    a compensation: it makes its group stop and compensate."""
    if task.compensates is not None:
        return False
    if task.state is State.FAILED:
        return True
    kind = (task.error or {}).get("type")
    return task.state is State.CANCELLED and kind not in ("PrerequisiteFailed", "GroupFailed")


def _completion(o: Outcome, now: datetime) -> dict[str, Any]:
    """The values a successful run sets on its task as it completes."""
    # An earlier attempt's error stays in the events, not on a success.
    return {
        "lease_until": None,
        "deadline": None,
        "result": o.result,
        "error": None,
        "finished_at": now,
    }


def _completes_plainly(o: Outcome) -> bool:
    """A success whose completion needs no lock keys freed and no group settled."""
    return (
        o.ok
        and not o.task.locks
        and o.task.group_id is None
        and o.job is None
        and o.expansion is None
    )


def backoff(attempt: int) -> float:
    """Seconds before retrying after failed attempt number `attempt`: exponential, jittered."""
    # The exponent is capped: 2**1024 no longer converts to a float, and a task allowed that
    # many attempts would otherwise crash the cycle that records its failure.
    base = min(
        defaults.RETRY_BACKOFF_BASE_SECONDS * 2.0 ** min(attempt - 1, 64),
        defaults.RETRY_BACKOFF_MAX_SECONDS,
    )
    return base * random.uniform(1 - defaults.RETRY_JITTER, 1 + defaults.RETRY_JITTER)


def _stands_alone(prepared: Sequence[Prepared]) -> bool:
    """Whether a submission needs nothing read before it is written: ids of our own
    making (none can exist yet), prerequisites among its own tasks only."""
    inside = {p.id for p in prepared}
    return not any(p.chosen for p in prepared) and all(
        a in inside for p in prepared for a in p.after
    )


def _row(
    p: Prepared,
    now: datetime,
    group_id: uuid.UUID | None,
    by: str | None,
    states: Mapping[uuid.UUID, State],
    fresh_inside: set[uuid.UUID],
) -> dict[str, Any]:
    pending = sum(1 for a in p.after if a in fresh_inside or states.get(a) is not State.COMPLETE)
    return {
        "id": p.id,
        "action": p.action,
        "params": p.params,
        "state": State.NEW,
        "priority": p.priority,
        "not_before": p.not_before or now,
        "timeout": p.timeout,
        "max_attempts": p.max_attempts,
        "attempt": 0,
        "locks": list(p.locks),
        "group_id": group_id,
        "created_by": by,
        "created_at": now,
        "updated_at": now,
        "pending": pending,
    }


def _new_task(row: Mapping[str, Any], after: Sequence[uuid.UUID]) -> Task:
    """The Task a fresh row (from `_row`) describes, as reading it back would give it."""
    return Task(
        id=row["id"],
        action=row["action"],
        params=row["params"],
        state=State.NEW,
        priority=row["priority"],
        not_before=row["not_before"].astimezone(UTC),  # stored as UTC
        timeout=row["timeout"],
        max_attempts=row["max_attempts"],
        attempt=0,
        locks=tuple(row["locks"]),
        group_id=row["group_id"],
        result=None,
        error=None,
        created_by=row["created_by"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=None,
        finished_at=None,
        owner=None,
        lease_until=None,
        deadline=None,
        pending=row["pending"],
        collected_at=None,
        prerequisites=tuple(sorted(after)),
    )


def _sunk_by(task: Task, prerequisite: uuid.UUID) -> bool:
    return bool(task.error) and task.error.get("prerequisite") == str(prerequisite)  # type: ignore[union-attr]


def _refused(tid: uuid.UUID, state: State | None, move: Move) -> errors.TaskomaticError:
    if state is None:
        return errors.TaskNotFound(tid)
    hints = {
        Move.CANCEL: "a finished task cannot be cancelled",
        Move.RETRY: "only failed or cancelled tasks can be retried",
    }
    wanted = State.CANCELLED if move is Move.CANCEL else State.NEW
    return errors.InvalidTransition(tid, state, wanted, hints.get(move, ""))


def _state(value: State | str) -> State:
    try:
        return State(value)
    except ValueError:
        known = ", ".join(st.value for st in State)
        raise errors.ValidationError(
            f"unknown state {value!r}; states are: {known}", field="state"
        ) from None


def _uuid(value: uuid.UUID | str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise errors.ValidationError(f"{value!r} is not a task id (a UUID)", field="id") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _database_error(exc: sa.exc.DBAPIError) -> errors.TaskomaticError:
    # Checked first: SQLite reports a missing table as an OperationalError too.
    if (isinstance(exc, sa.exc.ProgrammingError) and "does not exist" in str(exc)) or (
        "no such table" in str(exc)
    ):
        return errors.SchemaError()
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return errors.DatabaseUnavailable(f"database unavailable: {_first_line(exc.orig or exc)}")
    return errors.TaskomaticError(f"database error: {_first_line(exc.orig or exc)}")
