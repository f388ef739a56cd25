"""Every SQL statement taskomatic runs, each a named method; backends override a few."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa

from taskomatic import errors
from taskomatic import schema as s
from taskomatic.model import (
    TERMINAL,
    Dispatcher,
    Event,
    Group,
    Host,
    Move,
    State,
    Task,
    sources,
    target,
)
from taskomatic.store.inventory import InventoryStatements
from taskomatic.store.observe import ObserveStatements

t = s.tasks

# Written as SQL literals, not parameters, so that the partial indexes on live tasks
# (tasks_ready, tasks_scheduled: "state = 'new' AND pending = 0") stay usable when
# PostgreSQL switches a prepared statement to its generic plan; with parameters that plan
# cannot prove the index predicate and scans the history.
_IS_NEW = t.c.state == sa.literal_column(f"'{State.NEW.value}'")
_READY = sa.and_(_IS_NEW, t.c.pending == sa.literal_column("0"))
# Ready tasks as the index of delayed ones names them (see tasks_scheduled in schema.py).
_SCHEDULED = sa.and_(_READY, t.c.priority.is_not(None))


@dataclass(frozen=True)
class Change:
    """One row to move: the task, the values to set besides its state, and the event text."""

    task_id: uuid.UUID
    values: Mapping[str, Any]
    message: str


@dataclass(frozen=True)
class Moved:
    """What a guarded move did: the tasks it moved (with their old state) and those it could not."""

    moved: dict[uuid.UUID, State]
    refused: dict[uuid.UUID, State | None]


@dataclass(frozen=True)
class Completed:
    """What `Store.complete_and_claim` did, in its one transaction."""

    moved: Moved
    claimed: list[Task]  # those of `picked` without lock keys, started
    picked: list[uuid.UUID]  # the runnable tasks it found, in dispatch order
    next_due: datetime | None  # as `next_due`, read only when it picked something
    announced: bool  # it notified other processes (of changes, if it made any)


class Listener(Protocol):
    """Other processes' commits, as a socket to wait on (see PostgresStore's)."""

    def fileno(self) -> int | None:
        """The socket to wait on; None while disconnected."""

    def due_in(self) -> float:
        """Seconds until `read` is due even if the socket stays quiet."""

    def read(self) -> bool:
        """Take what arrived; True if someone else may have changed the queue."""

    def close(self) -> None: ...


class Store(InventoryStatements, ObserveStatements):
    """SQL for both backends; a subclass per backend supplies the few dialect differences.

    The inventory's statements are in `store/inventory.py`, mixed in here.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    # -- connections ---------------------------------------------------------------------

    @contextlib.contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """A read-write transaction, committed on success."""
        with self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A read-only transaction."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    def is_transient(self, exc: BaseException) -> bool:
        """True for errors that retrying the whole transaction may cure (lost connection)."""
        if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
            return True
        return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError)

    def notify(self, conn: sa.Connection, sender: str) -> None:
        """Tell other processes, once this transaction commits, that the queue changed."""

    def watch(self, stop: threading.Event, fire: Callable[[], None], sender: str) -> None:
        """Call `fire` whenever someone other than `sender` commits a change, until `stop`."""
        raise NotImplementedError

    def listener(self, sender: str) -> Listener | None:
        """A connection a thread can wait on with poll() for commits by others than
        `sender`, or None where the store has none (SQLite: `watch` polls)."""
        return None

    def _assign_seq(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
        """Give new task rows their submission order (PostgreSQL does it with a sequence)."""

    def _insert_ignoring_conflicts(self, table: sa.Table) -> Any:
        """INSERT … ON CONFLICT DO NOTHING for `table`."""
        raise NotImplementedError

    # -- schema --------------------------------------------------------------------------

    def init_schema(self, now: datetime) -> int:
        """Create missing tables and record the schema version (idempotent)."""
        self._create_types()
        s.metadata.create_all(self.engine, checkfirst=True)
        with self.write() as conn:
            found = conn.execute(sa.select(s.schema_version.c.version)).scalars().all()
            if not found:
                conn.execute(
                    s.schema_version.insert().values(version=s.SCHEMA_VERSION, applied_at=now)
                )
            elif max(found) in s.ADDITIVE_UPGRADES:
                # create_all above added the tables that version lacked; add its columns
                # and re-create the indexes defined since.
                self._add_columns(conn, max(found))
                self._replace_indexes(conn, max(found))
                self._adopt_types(conn)
                conn.execute(
                    s.schema_version.insert().values(version=s.SCHEMA_VERSION, applied_at=now)
                )
            elif max(found) != s.SCHEMA_VERSION:
                raise errors.SchemaError(
                    f"database has schema version {max(found)}, this taskomatic expects "
                    f"{s.SCHEMA_VERSION}"
                )
        return s.SCHEMA_VERSION

    def _create_types(self) -> None:
        """Create the types the tables use that are missing (PostgreSQL's domains)."""

    def _adopt_types(self, conn: sa.Connection) -> None:
        """Give existing columns the types the tables now declare (PostgreSQL's domains)."""

    def _add_columns(self, conn: sa.Connection, since: int) -> None:
        """ALTER TABLE … ADD COLUMN for each column versions after `since` added."""
        for version in range(since + 1, s.SCHEMA_VERSION + 1):
            for table, column in s.ADDED_COLUMNS.get(version, ()):
                if column in {c["name"] for c in sa.inspect(conn).get_columns(table)}:
                    continue  # the table itself is new: create_all made it whole
                spec = sa.schema.CreateColumn(s.metadata.tables[table].c[column])
                ddl = spec.compile(dialect=conn.dialect)
                conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {ddl}"))

    def _replace_indexes(self, conn: sa.Connection, since: int) -> None:
        """DROP and CREATE each index versions after `since` redefined."""
        indexes = {str(i.name): i for table in s.metadata.tables.values() for i in table.indexes}
        for version in range(since + 1, s.SCHEMA_VERSION + 1):
            for name in s.REPLACED_INDEXES.get(version, ()):
                conn.execute(sa.text(f"DROP INDEX IF EXISTS {name}"))
                indexes[name].create(conn)

    def schema_version(self) -> int | None:
        """The recorded schema version, or None when `db init` has not run."""
        if not sa.inspect(self.engine).has_table("schema_version"):
            return None
        with self.read() as conn:
            return conn.execute(sa.select(sa.func.max(s.schema_version.c.version))).scalar()

    # -- submit --------------------------------------------------------------------------

    def insert_group(
        self,
        conn: sa.Connection,
        group_id: uuid.UUID,
        name: str | None,
        by: str | None,
        now: datetime,
        on_failure: str | None = None,
    ) -> None:
        """Record a group unless it exists."""
        row = {"id": group_id, "name": name, "created_by": by, "created_at": now}
        conn.execute(
            self._insert_ignoring_conflicts(s.task_groups), [{**row, "on_failure": on_failure}]
        )

    def insert_tasks(
        self,
        conn: sa.Connection,
        rows: list[dict[str, Any]],
        edges: Sequence[tuple[uuid.UUID, uuid.UUID]],
        locks: Sequence[tuple[uuid.UUID, str]],
    ) -> None:
        """Insert new tasks with their prerequisite edges and lock keys."""
        self._assign_seq(conn, rows)
        conn.execute(t.insert(), rows)
        if edges:
            conn.execute(
                s.task_prerequisites.insert(),
                [{"task_id": a, "prerequisite_id": b} for a, b in edges],
            )
        if locks:
            conn.execute(s.task_locks.insert(), [{"task_id": a, "key": k} for a, k in locks])

    def insert_alone(
        self,
        rows: list[dict[str, Any]],
        edges: Sequence[tuple[uuid.UUID, uuid.UUID]],
        locks: Sequence[tuple[uuid.UUID, str]],
        events: Sequence[tuple[uuid.UUID, State | None, State, str]],
        actor: str,
        now: datetime,
        sender: str,
    ) -> bool:
        """New tasks that need nothing read first, as a transaction of their own: insert
        them with their edges, lock keys and event rows (as `insert_tasks` and
        `insert_events`), notify as `sender`, commit. False where the backend has no
        quicker way than `write()`: the caller takes that."""
        return False

    def insert_events(
        self,
        conn: sa.Connection,
        events: Iterable[tuple[uuid.UUID, State | None, State, str]],
        actor: str,
        now: datetime,
    ) -> None:
        """Append transitions (task, from, to, message) to the audit trail."""
        rows = [
            {
                "task_id": tid,
                "from_state": src,
                "to_state": dst,
                "at": now,
                "actor": actor,
                "message": msg,
            }
            for tid, src, dst, msg in events
        ]
        if rows:
            conn.execute(s.task_events.insert(), rows)

    def states(
        self, conn: sa.Connection, ids: Iterable[uuid.UUID], share: bool = False
    ) -> dict[uuid.UUID, State]:
        """The current state of each of `ids` that exists.

        With `share`, the rows stay share-locked until commit: a transaction that counts on
        these states (a new dependent's `pending`) is ordered with any that changes them,
        so a prerequisite completing concurrently is never missed by both.
        """
        ids = list(ids)
        if not ids:
            return {}
        query = sa.select(t.c.id, t.c.state).where(t.c.id.in_(ids))
        rows = conn.execute(query.with_for_update(read=True) if share else query)
        return {r.id: State(r.state) for r in rows}

    # -- the runnable query ----------------------------------------------------------------

    @staticmethod
    def runnable_query(now: datetime) -> sa.Select[Any]:
        """THE definition of runnable: new, no incomplete prerequisite, due, no lock held.

        `pending` counts incomplete prerequisites and is kept in the transaction that
        completes one; `audit` proves it agrees with the prerequisite rows.
        """
        lock_held = (
            sa.select(sa.literal(1))
            .select_from(s.task_locks.join(s.held_locks, s.held_locks.c.key == s.task_locks.c.key))
            .where(s.task_locks.c.task_id == t.c.id)
        )
        return (
            sa.select(t)
            .where(_READY, t.c.not_before <= now)
            .where(~lock_held.exists())
            .order_by(t.c.priority.desc(), t.c.seq)
            # SQLite otherwise reads every new task by state and sorts them (7 ms per claim
            # with 20,000 new tasks); PostgreSQL finds the index itself.
            .with_hint(t, "INDEXED BY tasks_ready", "sqlite")
        )

    def runnable(self, conn: sa.Connection, now: datetime, limit: int | None = None) -> list[Task]:
        """Runnable tasks in dispatch order, without claiming them."""
        return [Task.from_row(r) for r in conn.execute(self.runnable_query(now).limit(limit))]

    def next_due(self, conn: sa.Connection, now: datetime) -> datetime | None:
        """When the next unblocked task's not_before passes (to set the dispatcher's timer)."""
        return conn.execute(
            sa.select(sa.func.min(t.c.not_before))
            .where(_SCHEDULED, t.c.not_before > now)
            .with_hint(t, "INDEXED BY tasks_scheduled", "sqlite")
        ).scalar()

    @property
    def completes_in_one_step(self) -> bool:
        """Whether `complete_and_claim` can do its work here (so it is worth a transaction)."""
        return False

    def complete_and_claim(
        self,
        owner: uuid.UUID,
        done: Sequence[Change],
        now: datetime,
        lease: timedelta,
        limit: int,
        sender: str,
        quiet: bool = False,
    ) -> Completed | None:
        """The dispatcher's common cycle as ONE step on the server, a transaction of its
        own: complete `done` (running tasks of `owner` without lock keys or group, all with
        the same columns), release their dependents, claim up to `limit` tasks without lock
        keys, notify as `sender` if anything moved, commit. With `quiet`, it does not notify
        when it claimed fewer than `limit` (no runnable work is left for others; the caller
        announces its changes later). None where the backend has no such step: the caller
        takes the general path."""
        return None

    def release_kept(self) -> None:
        """Give back the connection the calling thread kept for `complete_and_claim`."""

    # -- claim -----------------------------------------------------------------------------

    def claim(
        self, conn: sa.Connection, owner: uuid.UUID, now: datetime, lease: timedelta, limit: int
    ) -> list[Task]:
        """Move up to `limit` runnable tasks to running for `owner`, taking their locks."""
        claimed: list[Task] = []
        while len(claimed) < limit:
            query = self.runnable_query(now).limit(limit - len(claimed))
            candidates = [
                Task.from_row(r)
                for r in conn.execute(query.with_for_update(skip_locked=True, of=t))
            ]
            chosen = [c for c in candidates if self._take_locks(conn, c, now)]
            claimed += self._start(conn, owner, chosen, now, lease)
            if len(chosen) == len(candidates):
                break  # no lock conflict inside this batch: nothing more to find
            # Candidates that lost a lock to one just chosen are now excluded by the
            # runnable query itself (the lock is held); look again for others.
        return claimed

    def _take_locks(self, conn: sa.Connection, task: Task, now: datetime) -> bool:
        """Hold all of the task's lock keys, or none of them."""
        if not task.locks:
            return True
        keys = sorted(task.locks)
        got = (
            conn.execute(
                self._insert_ignoring_conflicts(s.held_locks)
                .values([{"key": k, "task_id": task.id, "since": now} for k in keys])
                .returning(s.held_locks.c.key)
            )
            .scalars()
            .all()
        )
        if len(got) == len(keys):
            return True
        self.release_locks(conn, [task.id])
        return False

    def _start(
        self,
        conn: sa.Connection,
        owner: uuid.UUID,
        tasks: list[Task],
        now: datetime,
        lease: timedelta,
    ) -> list[Task]:
        """new -> running for tasks already locked by this transaction."""
        changes = [
            Change(
                c.id,
                {
                    "owner": owner,
                    "lease_until": now + lease,
                    "attempt": c.attempt + 1,
                    "deadline": now + timedelta(seconds=c.timeout) if c.timeout else None,
                    "started_at": now,
                },
                f"attempt {c.attempt + 1} of {c.max_attempts}",
            )
            for c in tasks
        ]
        # The claim selected these rows FOR UPDATE in this transaction: their state is known.
        known = {c.id: (State.NEW, None) for c in tasks}
        self.move(conn, Move.CLAIM, changes, now, f"dispatcher:{owner}", known=known)
        return [
            dataclasses.replace(
                c,
                state=State.RUNNING,
                owner=owner,
                attempt=c.attempt + 1,
                lease_until=now + lease,
                started_at=now,
                updated_at=now,
                deadline=ch.values["deadline"],
            )
            for c, ch in zip(tasks, changes, strict=True)
        ]

    # -- guarded moves -----------------------------------------------------------------

    def move(
        self,
        conn: sa.Connection,
        move: Move,
        changes: Sequence[Change],
        now: datetime,
        actor: str,
        owner: uuid.UUID | None = None,
        known: Mapping[uuid.UUID, tuple[State, uuid.UUID | None]] | None = None,
    ) -> Moved:
        """Apply `move` to each task still in a state (and with the owner) it allows.

        The rows are locked first, so the check and the UPDATE see the same state; a task
        found elsewhere is `refused`, never overwritten (a late rescuer must not undo a real
        completion). Each moved task gets its event row in the same transaction. `known`
        gives (state, owner) of rows this transaction has locked already, saving the read.
        """
        if not changes:
            return Moved({}, {})
        allowed = sources(move)
        if known is None:
            query = sa.select(t.c.id, t.c.state, t.c.owner).where(
                t.c.id.in_([c.task_id for c in changes])
            )
            found = {r.id: (State(r.state), r.owner) for r in conn.execute(query.with_for_update())}
        else:
            found = dict(known)
        moved: dict[uuid.UUID, State] = {}
        refused: dict[uuid.UUID, State | None] = {}
        for change in changes:
            state, row_owner = found.get(change.task_id, (None, None))
            if state in allowed and (owner is None or row_owner == owner):
                moved[change.task_id] = state
            else:
                refused[change.task_id] = state
        todo = [c for c in changes if c.task_id in moved]
        by_columns: dict[tuple[str, ...], list[Change]] = {}
        for change in todo:
            by_columns.setdefault(tuple(sorted(change.values)), []).append(change)
        for columns, batch in by_columns.items():
            # executemany cannot expand IN lists; spell the guard as ORs.
            in_allowed = sa.or_(*(t.c.state == state for state in allowed))
            stmt = t.update().where(t.c.id == sa.bindparam("b_id"), in_allowed)
            if owner is not None:
                stmt = stmt.where(t.c.owner == owner)
            values: dict[str, Any] = {"updated_at": now, "state": sa.bindparam("b_state")}
            values.update({col: sa.bindparam(f"b_{col}", type_=t.c[col].type) for col in columns})
            conn.execute(
                stmt.values(**values),
                [
                    {
                        "b_id": c.task_id,
                        "b_state": target(move, moved[c.task_id]),
                        **{f"b_{k}": v for k, v in c.values.items()},
                    }
                    for c in batch
                ],
            )
        self.insert_events(
            conn,
            (
                (c.task_id, moved[c.task_id], target(move, moved[c.task_id]), c.message)
                for c in todo
            ),
            actor,
            now,
        )
        return Moved(moved, refused)

    def release_locks(self, conn: sa.Connection, ids: Sequence[uuid.UUID]) -> None:
        """Free the lock keys held by these tasks."""
        if ids:
            conn.execute(s.held_locks.delete().where(s.held_locks.c.task_id.in_(ids)))

    def release_dependents(
        self, conn: sa.Connection, completed: Sequence[uuid.UUID], now: datetime
    ) -> None:
        """Count the completion of `completed` in each dependent's `pending`."""
        if not completed:
            return
        p = s.task_prerequisites
        # Two index lookups rather than one UPDATE … WHERE id IN (subquery): PostgreSQL
        # plans that as a join over the whole table, whose cost grows with history.
        counts = conn.execute(
            sa.select(p.c.task_id, sa.func.count().label("done"))
            .where(p.c.prerequisite_id.in_(completed))
            .group_by(p.c.task_id)
        ).all()
        if not counts:
            return
        conn.execute(
            t.update()
            .where(t.c.id == sa.bindparam("tid"), _IS_NEW)
            .values(pending=t.c.pending - sa.bindparam("done"), updated_at=now),
            [{"tid": tid, "done": done} for tid, done in counts],
        )

    def dependents(
        self, conn: sa.Connection, ids: Sequence[uuid.UUID], state: State
    ) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """(dependent, prerequisite) edges from `ids` to dependents now in `state`."""
        if not ids:
            return []
        p = s.task_prerequisites
        rows = conn.execute(
            sa.select(p.c.task_id, p.c.prerequisite_id)
            .join(t, t.c.id == p.c.task_id)
            .where(p.c.prerequisite_id.in_(ids), t.c.state == state)
            .order_by(t.c.seq)
        )
        return [(r.task_id, r.prerequisite_id) for r in rows]

    def recount_pending(self, conn: sa.Connection, ids: Sequence[uuid.UUID], now: datetime) -> None:
        """Recompute `pending` from the prerequisite rows (after a retry revives tasks)."""
        if not ids:
            return
        # Share-lock the prerequisites first, so one completing concurrently is counted
        # either by this recount or by its own release of these (now new) dependents.
        p = s.task_prerequisites
        prerequisites = sa.select(p.c.prerequisite_id).where(p.c.task_id.in_(ids))
        conn.execute(sa.select(t.c.id).where(t.c.id.in_(prerequisites)).with_for_update(read=True))
        conn.execute(
            t.update()
            .where(t.c.id.in_(ids))
            .values(pending=_incomplete_prerequisites(), updated_at=now)
        )

    def mark_collected(self, conn: sa.Connection, task_id: uuid.UUID, now: datetime) -> None:
        """Record that the caller has read a finished task's result."""
        conn.execute(
            t.update()
            .where(t.c.id == task_id, t.c.state.in_(TERMINAL), t.c.collected_at.is_(None))
            .values(collected_at=now)
        )

    # -- retention -----------------------------------------------------------------------

    def prunable(
        self, conn: sa.Connection, before: datetime, force: bool, limit: int
    ) -> list[uuid.UUID]:
        """Up to `limit` of the oldest tasks retention may remove: finished before `before`,
        collected (or `force`), and not a prerequisite, directly or transitively, of a task
        that stays (a live one, or a finished one not removable): a task that stays keeps
        its whole history of prerequisites, which `why` and `retry` read."""

        def removable(task: Any) -> sa.ColumnElement[bool]:
            done = sa.and_(task.c.state.in_(list(TERMINAL)), task.c.finished_at < before)
            return done if force else sa.and_(done, task.c.collected_at.is_not(None))

        p, up = s.task_prerequisites, s.task_prerequisites.alias("up")
        dependent = t.alias("dependent")
        staying = (
            sa.select(p.c.prerequisite_id.label("id"))
            .join(dependent, dependent.c.id == p.c.task_id)
            .where(~removable(dependent))
            .cte("staying", recursive=True)
        )
        staying = staying.union(
            sa.select(up.c.prerequisite_id).join(staying, up.c.task_id == staying.c.id)
        )
        query = (
            sa.select(t.c.id)
            .where(removable(t), t.c.id.not_in(sa.select(staying.c.id)))
            .order_by(t.c.seq)
            .limit(limit)
        )
        return list(conn.execute(query).scalars())

    def delete_tasks(self, conn: sa.Connection, ids: Sequence[uuid.UUID]) -> None:
        """Remove finished tasks with their events, locks and edges, and groups left empty."""
        if not ids:
            return
        p = s.task_prerequisites
        groups = set(
            conn.execute(sa.select(t.c.group_id).where(t.c.id.in_(ids)).distinct()).scalars()
        ) - {None}
        conn.execute(s.task_events.delete().where(s.task_events.c.task_id.in_(ids)))
        conn.execute(s.task_locks.delete().where(s.task_locks.c.task_id.in_(ids)))
        conn.execute(p.delete().where(p.c.task_id.in_(ids) | p.c.prerequisite_id.in_(ids)))
        conn.execute(t.delete().where(t.c.id.in_(ids)))
        if groups:
            in_use = sa.select(t.c.id).where(t.c.group_id == s.task_groups.c.id)
            conn.execute(
                s.task_groups.delete().where(s.task_groups.c.id.in_(list(groups)), ~in_use.exists())
            )

    def uncollected(self, conn: sa.Connection) -> int:
        """Finished tasks whose result no caller has collected yet."""
        query = sa.select(sa.func.count()).where(
            t.c.state.in_(list(TERMINAL)), t.c.collected_at.is_(None)
        )
        return int(conn.execute(query).scalar() or 0)

    # -- leases and dispatchers -----------------------------------------------------------

    def renew_leases(
        self, conn: sa.Connection, owner: uuid.UUID, ids: Sequence[uuid.UUID], until: datetime
    ) -> set[uuid.UUID]:
        """Extend the leases of tasks `owner` still holds; returns those renewed."""
        if not ids:
            return set()
        rows = conn.execute(
            t.update()
            .where(t.c.id.in_(ids), t.c.owner == owner, t.c.state.in_(sources(Move.TAKE_OVER)))
            .values(lease_until=until)
            .returning(t.c.id)
        )
        return set(rows.scalars())

    def expired(self, conn: sa.Connection, now: datetime, limit: int) -> list[Task]:
        """Tasks whose dispatcher stopped renewing their lease, locked for takeover."""
        query = (
            sa.select(t)
            .where(t.c.state.in_(sources(Move.TAKE_OVER)), t.c.lease_until < now)
            .order_by(t.c.lease_until)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return [Task.from_row(r) for r in conn.execute(query)]

    def overdue(self, conn: sa.Connection, owner: uuid.UUID, now: datetime) -> list[uuid.UUID]:
        """Running tasks of `owner` past their deadline."""
        query = sa.select(t.c.id).where(
            t.c.state == State.RUNNING, t.c.owner == owner, t.c.deadline < now
        )
        return list(conn.execute(query).scalars())

    def register_dispatcher(self, conn: sa.Connection, d: Dispatcher) -> None:
        """Announce a dispatcher (its heartbeat row)."""
        conn.execute(s.dispatchers.insert().values(**dataclasses.asdict(d)))

    def heartbeat(
        self, conn: sa.Connection, dispatcher_id: uuid.UUID, now: datetime, stopped: bool = False
    ) -> None:
        """Record that a dispatcher is alive (or has stopped)."""
        values: dict[str, Any] = {"heartbeat_at": now}
        if stopped:
            values["stopped_at"] = now
        conn.execute(
            s.dispatchers.update().where(s.dispatchers.c.id == dispatcher_id).values(values)
        )

    def alive_dispatchers(self, conn: sa.Connection, since: datetime) -> list[Dispatcher]:
        """Dispatchers with a heartbeat after `since` that have not stopped."""
        d = s.dispatchers
        rows = conn.execute(sa.select(d).where(d.c.heartbeat_at >= since, d.c.stopped_at.is_(None)))
        return [Dispatcher.from_row(r) for r in rows]

    def busy(self, conn: sa.Connection, owners: Sequence[uuid.UUID]) -> int:
        """How many running tasks these dispatchers hold."""
        if not owners:
            return 0
        query = sa.select(sa.func.count()).where(t.c.state == State.RUNNING, t.c.owner.in_(owners))
        return int(conn.execute(query).scalar() or 0)

    # -- hosts ---------------------------------------------------------------------------

    def hosts(self, conn: sa.Connection, names: Sequence[str] | None = None) -> list[Host]:
        """Every host (or those named), by name."""
        h = s.hosts
        query = sa.select(h).order_by(h.c.name)
        if names is not None:
            query = query.where(h.c.name.in_(list(names)))
        return [Host.from_row(r) for r in conn.execute(query)]

    def host_by_uri(self, conn: sa.Connection, uri: str) -> Host | None:
        row = conn.execute(sa.select(s.hosts).where(s.hosts.c.uri == uri)).first()
        return Host.from_row(row) if row else None

    def insert_host(self, conn: sa.Connection, host: Host) -> None:
        conn.execute(s.hosts.insert().values(dataclasses.asdict(host)))

    def update_host(self, conn: sa.Connection, name: str, values: Mapping[str, Any]) -> bool:
        """Set `values` on host `name`; False if there is no such host."""
        result = conn.execute(s.hosts.update().where(s.hosts.c.name == name).values(values))
        return result.rowcount > 0

    def delete_host(self, conn: sa.Connection, name: str) -> bool:
        """Forget a host; its inventory rows go with it (ON DELETE CASCADE)."""
        return conn.execute(s.hosts.delete().where(s.hosts.c.name == name)).rowcount > 0

    # -- reads ---------------------------------------------------------------------------

    def get_many(self, conn: sa.Connection, ids: Sequence[uuid.UUID]) -> list[Task]:
        """Tasks by id (with prerequisites), in the order of `ids`; missing ones left out."""
        if not ids:
            return []
        prereqs = self._prerequisites_of(conn, ids)
        rows = {r.id: r for r in conn.execute(sa.select(t).where(t.c.id.in_(ids)))}
        return [Task.from_row(rows[i], prereqs.get(i, ())) for i in ids if i in rows]

    def _prerequisites_of(
        self, conn: sa.Connection, ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, tuple[uuid.UUID, ...]]:
        """The prerequisite ids of each of `ids` that has any, sorted."""
        if not ids:
            return {}
        p = s.task_prerequisites
        found: dict[uuid.UUID, list[uuid.UUID]] = {}
        for r in conn.execute(sa.select(p).where(p.c.task_id.in_(ids))):
            found.setdefault(r.task_id, []).append(r.prerequisite_id)
        return {tid: tuple(sorted(pre)) for tid, pre in found.items()}

    def list_tasks(
        self,
        conn: sa.Connection,
        *,
        states: Sequence[State] = (),
        action: str | None = None,
        group_id: uuid.UUID | None = None,
        limit: int,
        before: int | None = None,
    ) -> tuple[list[Task], int | None]:
        """A page of tasks, newest first; returns the cursor of the next page."""
        query = sa.select(t).order_by(t.c.seq.desc()).limit(limit + 1)
        if states:
            query = query.where(t.c.state.in_(states))
        if action:
            query = query.where(t.c.action == action)
        if group_id:
            query = query.where(t.c.group_id == group_id)
        if before is not None:
            query = query.where(t.c.seq < before)
        rows = list(conn.execute(query))
        cursor = rows[limit - 1].seq if len(rows) > limit else None
        rows = rows[:limit]
        prereqs = self._prerequisites_of(conn, [r.id for r in rows])
        return [Task.from_row(r, prereqs.get(r.id, ())) for r in rows], cursor

    def events(self, conn: sa.Connection, task_id: uuid.UUID) -> list[Event]:
        """The timeline of one task, oldest first."""
        e = s.task_events
        rows = conn.execute(sa.select(e).where(e.c.task_id == task_id).order_by(e.c.id))
        return [Event.from_row(r) for r in rows]

    def group(self, conn: sa.Connection, group_id: uuid.UUID) -> Group | None:
        """A group with its task counts by state."""
        g = conn.execute(sa.select(s.task_groups).where(s.task_groups.c.id == group_id)).first()
        if g is None:
            return None
        undoes = t.c.compensates.is_not(None).label("undoes")
        rows = conn.execute(
            sa.select(t.c.state, undoes, sa.func.count())
            .where(t.c.group_id == group_id)
            .group_by(t.c.state, undoes)
        )
        counts: dict[State, int] = {}
        compensation: dict[State, int] = {}
        for state, is_compensation, n in rows:
            (compensation if is_compensation else counts)[State(state)] = n
        policy = g.on_failure or "stop"
        return Group(g.id, g.name, g.created_by, g.created_at, counts, compensation, policy)

    def lock_group(self, conn: sa.Connection, group_id: uuid.UUID) -> str:
        """Serialize the transactions that end tasks of one group (to settle it once);
        returns the group's failure policy."""
        g = s.task_groups
        query = sa.select(g.c.on_failure).where(g.c.id == group_id).with_for_update()
        return conn.execute(query).scalar() or "stop"

    def group_has_ended_badly(self, conn: sa.Connection, group_id: uuid.UUID) -> bool:
        """Whether a task of the group (not a compensation) failed or was cancelled."""
        query = sa.select(t.c.id).where(
            t.c.group_id == group_id,
            t.c.compensates.is_(None),
            t.c.state.in_([State.FAILED, State.CANCELLED]),
        )
        return conn.execute(query.limit(1)).first() is not None

    def group_tasks(self, conn: sa.Connection, group_id: uuid.UUID) -> list[Task]:
        """Every task of a group (with its prerequisites), in submission order."""
        rows = list(conn.execute(sa.select(t).where(t.c.group_id == group_id).order_by(t.c.seq)))
        prereqs = self._prerequisites_of(conn, [r.id for r in rows])
        return [Task.from_row(r, prereqs.get(r.id, ())) for r in rows]

    def stop_requests(
        self, conn: sa.Connection, owner: uuid.UUID, ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, Mapping[str, Any]]:
        """The stop requests (cancel, timeout) on these tasks of `owner`."""
        if not ids:
            return {}
        rows = conn.execute(
            sa.select(t.c.id, t.c.stop_request).where(
                t.c.id.in_(ids), t.c.owner == owner, t.c.stop_request.is_not(None)
            )
        )
        return {r.id: r.stop_request for r in rows}

    def update_job(
        self, conn: sa.Connection, owner: uuid.UUID, task_id: uuid.UUID, job: Mapping[str, Any]
    ) -> None:
        """Record a waiting task's job with its latest progress (no event: not a transition)."""
        conn.execute(
            t.update()
            .where(t.c.id == task_id, t.c.owner == owner, t.c.state == State.WAITING)
            .values(job=job)
        )

    def add_prerequisites(
        self, conn: sa.Connection, edges: Sequence[tuple[uuid.UUID, uuid.UUID]], now: datetime
    ) -> None:
        """New edges (task, prerequisite) to incomplete prerequisites of `new` tasks."""
        if not edges:
            return
        conn.execute(
            s.task_prerequisites.insert(),
            [{"task_id": a, "prerequisite_id": b} for a, b in edges],
        )
        added: dict[uuid.UUID, int] = {}
        for a, _ in edges:
            added[a] = added.get(a, 0) + 1
        conn.execute(
            t.update()
            .where(t.c.id == sa.bindparam("tid"), _IS_NEW)
            .values(pending=t.c.pending + sa.bindparam("more"), updated_at=now),
            [{"tid": tid, "more": n} for tid, n in added.items()],
        )

    def live_count(self, conn: sa.Connection) -> int:
        """Tasks not yet finished."""
        query = sa.select(sa.func.count()).where(
            t.c.state.in_([State.NEW, State.RUNNING, State.WAITING])
        )
        return int(conn.execute(query).scalar() or 0)

    def counts(self, conn: sa.Connection) -> dict[State, int]:
        """Number of tasks in each state."""
        rows = conn.execute(sa.select(t.c.state, sa.func.count()).group_by(t.c.state))
        return {State(st): n for st, n in rows}

    def prerequisite_states(
        self, conn: sa.Connection, task_id: uuid.UUID
    ) -> list[tuple[uuid.UUID, str, State]]:
        """(id, action, state) of each prerequisite of a task."""
        p = s.task_prerequisites
        rows = conn.execute(
            sa.select(t.c.id, t.c.action, t.c.state)
            .join(p, p.c.prerequisite_id == t.c.id)
            .where(p.c.task_id == task_id)
            .order_by(t.c.seq)
        )
        return [(r.id, r.action, State(r.state)) for r in rows]

    def prerequisites_in(
        self, conn: sa.Connection, ids: Sequence[uuid.UUID], states: Iterable[State]
    ) -> set[uuid.UUID]:
        """The prerequisites of any of `ids` that are now in one of `states`."""
        if not ids:
            return set()
        p = s.task_prerequisites
        rows = conn.execute(
            sa.select(p.c.prerequisite_id)
            .join(t, t.c.id == p.c.prerequisite_id)
            .where(p.c.task_id.in_(ids), t.c.state.in_(list(states)))
            .distinct()
        )
        return set(rows.scalars())

    def lock_holders(
        self, conn: sa.Connection, keys: Sequence[str]
    ) -> list[tuple[str, uuid.UUID, datetime, State]]:
        """(key, holder, since, holder state) for each of `keys` that is held."""
        if not keys:
            return []
        h = s.held_locks
        rows = conn.execute(
            sa.select(h.c.key, h.c.task_id, h.c.since, t.c.state)
            .join(t, t.c.id == h.c.task_id)
            .where(h.c.key.in_(keys))
            .order_by(h.c.key)
        )
        return [(r.key, r.task_id, r.since, State(r.state)) for r in rows]

    def audit(self, conn: sa.Connection) -> list[str]:
        """Invariant violations (empty when healthy): the fast paths agree with the rows."""
        problems = []
        wrong_pending = conn.execute(
            sa.select(t.c.id, t.c.pending, _incomplete_prerequisites().label("real")).where(
                t.c.state == State.NEW
            )
        )
        problems += [
            f"task {r.id}: pending={r.pending} but {r.real} prerequisites are incomplete"
            for r in wrong_pending
            if r.pending != r.real
        ]
        stale_locks = conn.execute(
            sa.select(s.held_locks.c.key, t.c.id, t.c.state)
            .join(t, t.c.id == s.held_locks.c.task_id)
            .where(t.c.state.not_in([State.RUNNING, State.WAITING]))
        )
        problems += [f"lock {r.key} held by task {r.id}, which is {r.state}" for r in stale_locks]
        return problems


def _incomplete_prerequisites() -> sa.ScalarSelect[Any]:
    """Correlated count of a task's prerequisites that are not complete."""
    p, pt = s.task_prerequisites, t.alias("pt")
    return (
        sa.select(sa.func.count())
        .select_from(p.join(pt, pt.c.id == p.c.prerequisite_id))
        .where(p.c.task_id == t.c.id, pt.c.state != State.COMPLETE)
        .scalar_subquery()
    )


def open_store(url: str, **engine_kwargs: Any) -> Store:
    """The store for `url`: PostgreSQL through psycopg 3, or SQLite."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise errors.ValidationError(f"not a database URL: {url!r}", field="database_url") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        from taskomatic.store.sqlite import SQLiteStore

        return SQLiteStore.from_url(parsed, **engine_kwargs)
    if backend == "postgresql":
        from taskomatic.store.postgres import PostgresStore

        return PostgresStore.from_url(parsed, **engine_kwargs)
    raise errors.ValidationError(
        f"unsupported database {backend!r}: use postgresql://… or sqlite:///…",
        field="database_url",
    )
