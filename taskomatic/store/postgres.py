"""PostgreSQL, the reference backend: many dispatchers on many machines share one database."""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import psycopg
import psycopg.sql
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg

from taskomatic import defaults
from taskomatic import schema as s
from taskomatic.model import Move, State, Task, sources, target
from taskomatic.store.base import _SCHEDULED, Change, Completed, Moved, Store
from taskomatic.wakeup import readable

log = logging.getLogger(__name__)

# How long one wait for notifications blocks: bounds how late the watcher sees `stop`, which
# `Queue.close()` waits for (seconds).
_SLICE = 0.1

# Errors after which the whole transaction may simply be run again.
RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock detected


class PostgresStore(Store):
    """Claims with SKIP LOCKED; wakes other processes with NOTIFY sent inside the transaction.

    Statements whose result nobody reads (new tasks and their edges, event rows, the
    notification) are not sent on their own: they wait on the connection and go, joined
    into one statement, before the next statement that returns rows or any SQLAlchemy
    statement (so the transaction's order is kept), or with the COMMIT. A submission of
    new tasks is then one statement and one round trip, committed by the server.
    """

    def __init__(self, engine: sa.Engine, conninfo: str) -> None:
        super().__init__(engine)
        self.conninfo = conninfo
        # Set when the role may not create the session's functions (no TEMPORARY privilege).
        self._functions_refused = False
        self._kept_here = threading.local()  # see _kept()
        self._kept_all: set[sa.Connection] = set()
        self._kept_lock = threading.Lock()
        sa.event.listen(engine, "before_cursor_execute", _send_deferred_before)
        sa.event.listen(engine, "commit", _send_deferred)
        sa.event.listen(engine, "rollback", _drop_deferred)

    @contextlib.contextmanager
    def write(self) -> Iterator[sa.Connection]:
        # As Store.write, with the deferred statements and the COMMIT in one round trip.
        with self.engine.connect() as conn, conn.begin():
            yield conn
            _send_deferred(conn, commit=True)

    @classmethod
    def from_url(cls, url: sa.URL, **engine_kwargs: Any) -> PostgresStore:
        engine_kwargs.setdefault("pool_size", 10)
        # Sessions in UTC: timestamps come back in the zone taskomatic uses throughout,
        # with no conversion per value (and psycopg's fastest time zone).
        connect_args = dict(engine_kwargs.pop("connect_args", {}))
        theirs = connect_args.get("options", url.query.get("options")) or ()
        theirs = (theirs,) if isinstance(theirs, str) else tuple(theirs)
        connect_args["options"] = " ".join([*theirs, "-c TimeZone=UTC"])
        engine = sa.create_engine(
            url.set(drivername="postgresql+psycopg"), connect_args=connect_args, **engine_kwargs
        )
        conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        return cls(engine, conninfo)

    def is_transient(self, exc: BaseException) -> bool:
        orig = getattr(exc, "orig", None)
        if getattr(orig, "sqlstate", None) in RETRYABLE_SQLSTATES:
            return True
        return super().is_transient(exc)

    def notify(self, conn: sa.Connection, sender: str) -> None:
        # Delivered only when (and if) this transaction commits; identical payloads in one
        # transaction collapse into one, so a batch costs one notification. The payload is
        # only the sender's token, so a process does not wake itself. Without parameters,
        # the statement can travel with the COMMIT (see `_send_deferred`).
        _defer(conn, _notify_sql(defaults.NOTIFY_CHANNEL, sender), {})

    # -- the dispatcher's hot statements, one round trip each ----------------------------
    #
    # The base class's SQLAlchemy statements, sent straight through psycopg with the rows
    # as arrays: one statement (and one round trip) for a whole batch instead of one
    # executemany pipeline per batch, and none of the per-statement compilation. Same rows,
    # same guards, same event rows.

    def insert_events(
        self,
        conn: sa.Connection,
        events: Iterable[tuple[uuid.UUID, State | None, State, str]],
        actor: str,
        now: datetime,
    ) -> None:
        rows = list(events)
        if rows:
            _defer(conn, *_event_insert(rows, actor, now))

    def claim(
        self, conn: sa.Connection, owner: uuid.UUID, now: datetime, lease: timedelta, limit: int
    ) -> list[Task]:
        # As Store.claim, with the common case in ONE statement: the runnable query picks
        # the candidates (FOR UPDATE SKIP LOCKED), those without lock keys move to running
        # with their event rows in the same statement; those with lock keys come back, still
        # new and locked by this transaction, for Store's path (take the keys, then start).
        claimed: list[Task] = []
        conn.info.pop(_DUE, None)
        while len(claimed) < limit:
            sql, constants = _claim_sql(limit - len(claimed))
            names, values = _fetch(
                conn,
                sql,
                {
                    **constants,
                    "now": now,
                    "owner": owner,
                    "lease_until": now + lease,
                    "actor": f"dispatcher:{owner}",
                },
            )
            rows = _in_dispatch_order([_Row(names, v) for v in values])
            if rows:  # when the next delayed task is due, read in the same statement
                conn.info[_DUE] = (now, rows[0]._mapping["next_due"])
            place = {r._mapping["id"]: i for i, r in enumerate(rows)}
            started = [Task.from_row(r) for r in rows if r._mapping["started"]]
            keyed = [Task.from_row(r) for r in rows if not r._mapping["started"]]
            chosen = [c for c in keyed if self._take_locks(conn, c, now)]
            started += self._start(conn, owner, chosen, now, lease)
            claimed += sorted(started, key=lambda task: place[task.id])
            if len(chosen) == len(keyed):
                break  # no lock conflict: nothing more to find
        return claimed

    @property
    def completes_in_one_step(self) -> bool:
        return not self._functions_refused

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
        # One call of a function of this session (`_cycle_function`), made of the same
        # statements as `move`, `release_dependents` and `claim`: one round trip, committed
        # by the server as the call ends.
        columns = tuple(sorted(done[0].values)) if done else ()
        message = done[0].message if done else ""
        if self._functions_refused or any(
            tuple(sorted(c.values)) != columns or c.message != message for c in done
        ):
            return None
        with self._kept() as conn:
            return self._complete_and_claim(
                conn, owner, done, columns, now, lease, limit, sender, quiet
            )

    @contextlib.contextmanager
    def _kept(self) -> Iterator[sa.Connection]:
        """This thread's own connection, kept from one call to the next (a dispatcher's
        cycle: no checkout and return per cycle), dropped after any error. Each call is its
        own transaction: the connection stays in autocommit while kept, not switched in
        and out of it at every cycle (two calls into psycopg, 0.02 ms each when cold)."""
        conn = getattr(self._kept_here, "conn", None)
        if conn is None or conn.closed or conn.invalidated:
            conn = self._kept_here.conn = self.engine.connect()
            with self._kept_lock:
                self._kept_all.add(conn)
            try:
                _raw(conn).autocommit = True
            except BaseException:
                self._drop_kept(conn)
                raise
        try:
            yield conn
        except BaseException:
            if not conn.invalidated and _raw(conn).broken:
                conn.invalidate()  # not handed back to the pool
            self._drop_kept(conn)
            raise

    def release_kept(self) -> None:
        conn = getattr(self._kept_here, "conn", None)
        if conn is not None:
            self._drop_kept(conn)

    def _drop_kept(self, conn: sa.Connection) -> None:
        self._kept_here.conn = None
        with self._kept_lock:
            self._kept_all.discard(conn)
        _give_back(conn)

    def close(self) -> None:
        with self._kept_lock:
            kept, self._kept_all = self._kept_all, set()
        for conn in kept:
            _give_back(conn)
        super().close()

    def _complete_and_claim(
        self,
        conn: sa.Connection,
        owner: uuid.UUID,
        done: Sequence[Change],
        columns: tuple[str, ...],
        now: datetime,
        lease: timedelta,
        limit: int,
        sender: str,
        quiet: bool,
    ) -> Completed | None:
        raw = _raw(conn)
        params: dict[str, Any] = {
            # The ids as an array literal: psycopg's dumping of a list costs more.
            "id": "{" + ",".join(str(c.task_id) for c in done) + "}",
            "msg": done[0].message if done else "",
        }
        uniform = []
        for i, col in enumerate(columns):
            sent = _task_column(col, [c.values[col] for c in done])[1]
            # One value for every task goes as that value: an array costs psycopg more.
            # (Values as sent: JSON as text, so that 1 and true differ.)
            one = all(v == sent[0] for v in sent)
            params[f"c{i}"] = sent[0] if one else sent
            uniform.append(one)
        name, create, call = _cycle_function(columns, tuple(uniform))
        params.update(
            now=now,
            actor=f"dispatcher:{owner}",
            owner=owner,
            lease_until=now + lease,
            limit=limit,
            sender=sender,
            quiet=quiet,
        )
        created = conn.info.setdefault(_FUNCTIONS, set())
        with _as_dbapi_error(conn, call, params):  # in autocommit (see _kept): no BEGIN
            if name not in created:
                try:
                    raw.execute(create, prepare=False)
                except psycopg.errors.InsufficientPrivilege as exc:
                    log.warning(
                        "cannot create the session's cycle function (%s): each dispatcher "
                        "cycle takes several round trips; GRANT TEMPORARY ON DATABASE to "
                        "this role to make it one",
                        str(exc).strip(),
                    )
                    self._functions_refused = True
                    return None
                created.add(name)
            cur = raw.execute(call, params)
            names = _names(call, cur, "r_")
            values = cur.fetchall()
        rows = [_Row(names, v) for v in values]
        found = {
            r._mapping["id"]: (State(r._mapping["state"]), r._mapping["owner"])
            for r in rows
            if r._mapping["started"] is None
        }
        picked = _in_dispatch_order([r for r in rows if r._mapping["started"] is not None])
        claimed = [Task.from_row(r) for r in picked if r._mapping["started"]]
        due = picked[0]._mapping["next_due"] if picked else None
        return Completed(
            _sorted_out(done, found, sources(Move.COMPLETE), owner),
            claimed,
            [r._mapping["id"] for r in picked],
            due.astimezone(UTC) if due is not None else None,
            # The function's rule for its NOTIFY (see _cycle_function).
            not quiet or len(picked) >= limit,
        )

    def next_due(self, conn: sa.Connection, now: datetime) -> datetime | None:
        # The claim just before, in this transaction and at this `now`, has read it.
        stashed = conn.info.pop(_DUE, None)
        if stashed is not None and stashed[0] == now:
            due = stashed[1]
            return due.astimezone(UTC) if due is not None else None
        return super().next_due(conn, now)

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
        # As Store.move: lock the rows, refuse those in another state (or of another
        # owner), move the others and append their events; here ONE statement per set of
        # columns does all of it, returning the state and owner it found under the lock.
        # With `known` (rows this transaction locked already), the read is left out.
        if not changes:
            return Moved({}, {})
        allowed = sources(move)
        by_columns: dict[tuple[str, ...], list[Change]] = {}
        for change in changes:
            by_columns.setdefault(tuple(sorted(change.values)), []).append(change)
        found: dict[uuid.UUID, tuple[State, uuid.UUID | None]] = dict(known or {})
        for columns, batch in by_columns.items():
            if known is not None:
                batch = [c for c in batch if _allows(known.get(c.task_id), allowed, owner)]
                if not batch:
                    continue
            source, params = _rows(
                "v",
                {
                    "id": ("uuid", [c.task_id for c in batch]),
                    "msg": ("text", [c.message for c in batch]),
                    **{
                        f"c{i}": _task_column(col, [c.values[col] for c in batch])
                        for i, col in enumerate(columns)
                    },
                },
            )
            params.update(now=now, actor=actor, owner=owner, allowed=[a.value for a in allowed])
            sql = _move_sql(move, columns, owner is not None, known is None, source)
            rows = _fetch(conn, sql, params)[1]
            found.update({r[0]: (State(r[1]), r[2]) for r in rows})
        return _sorted_out(changes, found, allowed, owner)

    def release_dependents(
        self, conn: sa.Connection, completed: Sequence[uuid.UUID], now: datetime
    ) -> None:
        # As Store.release_dependents: the dependents' counts from the prerequisites' index,
        # then each dependent updated by its primary key alone. Not one UPDATE … FROM the
        # counts, nor one with `id = ANY(…)`: with statistics taken before a burst of new
        # tasks, PostgreSQL estimates a handful of new tasks and hash-joins the counts with
        # every new task (17 ms per cycle with 20,000 new tasks over 1,000,000 finished
        # ones) or intersects the ids with the whole state index (1 ms per cycle). Nor in
        # the statement of the completion: if that one waited for a submitter's share lock
        # on the task, its snapshot predates the submitter's new edge.
        if not completed:
            return
        counts = _fetch(conn, _COUNT_DONE, {"ids": list(completed)})[1]
        if not counts:
            return
        with _as_dbapi_error(conn, _RELEASE, None), _raw(conn).cursor() as cur:
            cur.executemany(_RELEASE, [{"n": n, "now": now, "id": tid} for tid, n in counts])

    def insert_tasks(
        self,
        conn: sa.Connection,
        rows: list[dict[str, Any]],
        edges: Sequence[tuple[uuid.UUID, uuid.UUID]],
        locks: Sequence[tuple[uuid.UUID, str]],
    ) -> None:
        # As Store.insert_tasks, each table in one statement of arrays, sent with the next
        # statement (for a submission, with its COMMIT); `seq` comes from its sequence.
        for sql, params in _task_inserts(rows, edges, locks):
            _defer(conn, sql, params)

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
        # The statements `insert_tasks`, `insert_events` and `notify` defer, as the one
        # statement they would make, run on a pooled connection of its own in autocommit:
        # no SQLAlchemy connection, transaction or commit around it. A cold submission
        # (the common one: a user or a web UI submits now and then) spends more time in
        # that bookkeeping than the server spends inserting.
        statements = [
            *_task_inserts(rows, edges, locks),
            _event_insert(events, actor, now),
            (_notify_sql(defaults.NOTIFY_CHANNEL, sender), {}),
        ]
        _autocommit(self.engine, *_combined(statements))
        return True

    def _create_types(self) -> None:
        with self.engine.begin() as conn:
            for domain in s.DOMAINS:
                domain.create(conn, checkfirst=True)

    def _adopt_types(self, conn: sa.Connection) -> None:
        # Version 5 and before checked these columns with the table's CHECK constraints.
        for name in s.REPLACED_CHECKS:
            conn.execute(sa.text(f"ALTER TABLE tasks DROP CONSTRAINT IF EXISTS {name}"))
        columns = ", ".join(
            f"ALTER COLUMN {column} TYPE {domain.name}" for column, domain in s.TASK_DOMAINS.items()
        )
        conn.execute(sa.text(f"ALTER TABLE tasks {columns}"))

    def _insert_ignoring_conflicts(self, table: sa.Table) -> Any:
        return postgresql.insert(table).on_conflict_do_nothing()

    def listener(self, sender: str) -> Listener:
        return Listener(self.conninfo, sender)

    def watch(self, stop: threading.Event, fire: Callable[[], None], sender: str) -> None:
        listener = self.listener(sender)
        try:
            while not stop.is_set():
                if listener.wait(_SLICE):
                    fire()
        finally:
            listener.close()


class Listener:
    """A LISTEN connection that one thread waits on with poll(): other processes' commits.

    The watcher thread waits on one; so does a dispatcher's own loop, next to its wake-up
    pipe, so that another process's submission wakes it directly: through the watcher
    thread, the hand-over (a thread switch, then the GIL's) took 0.3 ms per wake-up.
    """

    def __init__(self, conninfo: str, sender: str) -> None:
        self._conninfo = conninfo
        self._sender = sender
        self._conn: psycopg.Connection[Any] | None = None
        self._retry_at = 0.0  # monotonic time of the next connection attempt
        self._delay = defaults.DB_RETRY_BASE_SECONDS
        self._heard_at = 0.0  # monotonic time of the last sign of life

    def fileno(self) -> int | None:
        """The socket to wait on; None while disconnected (then `due_in` says when to retry)."""
        return None if self._conn is None else self._conn.fileno()

    def due_in(self) -> float:
        """Seconds until `read` is due even if the socket stays quiet: to reconnect, or to
        ping an idle connection (a half-open socket raises only when used)."""
        if self._conn is None:
            return max(0.0, self._retry_at - time.monotonic())
        return max(0.0, self._heard_at + defaults.LISTEN_PING_SECONDS - time.monotonic())

    def read(self) -> bool:
        """Take what arrived, and (re)connect or ping when due. True if someone else may
        have changed the queue: a notification from another sender, or a new connection
        (what was committed while nobody listened is unknown)."""
        try:
            if self._conn is None:
                if time.monotonic() < self._retry_at:
                    return False
                self._connect()
                return True
            if time.monotonic() - self._heard_at >= defaults.LISTEN_PING_SECONDS:
                self._conn.execute("SELECT 1")
                self._heard_at = time.monotonic()
            got = [n.payload for n in self._conn.notifies(timeout=0)]
        except psycopg.Error as exc:
            self._lost(exc)
            return False
        if not got:
            return False
        self._heard_at = time.monotonic()
        return any(payload != self._sender for payload in got)

    def wait(self, timeout: float) -> bool:
        """Block for up to `timeout` seconds; as `read`."""
        fd = self.fileno()
        pause = min(timeout, self.due_in())
        if fd is None:
            time.sleep(pause)
        else:
            readable([fd], pause)
        return self.read()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connect(self) -> None:
        conn = psycopg.connect(self._conninfo, autocommit=True)
        try:
            conn.execute(f"LISTEN {defaults.NOTIFY_CHANNEL}")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._heard_at = time.monotonic()
        self._delay = defaults.DB_RETRY_BASE_SECONDS

    def _lost(self, exc: psycopg.Error) -> None:
        log.warning("LISTEN connection lost (%s); reconnecting in %.1fs", exc, self._delay)
        with contextlib.suppress(psycopg.Error):
            self.close()
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, defaults.DB_RETRY_MAX_SECONDS)


def _give_back(conn: sa.Connection) -> None:
    """Return a kept connection to the pool out of autocommit, as the pool hands them out
    (or drop it, if it cannot even be switched back)."""
    if not conn.invalidated:
        try:
            _raw(conn).autocommit = False
        except psycopg.Error:
            conn.invalidate()
    conn.close()


def _raw(conn: sa.Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under `conn`, inside the same transaction."""
    return conn.connection.driver_connection  # type: ignore[return-value]


# -- statements sent straight through psycopg ---------------------------------------------

_DEFERRED = "taskomatic_deferred"  # conn.info key: [(sql, params)] not yet sent


def _defer(conn: sa.Connection, sql: str, params: dict[str, Any]) -> None:
    """Send `sql` later, with the transaction's next round trip: nobody reads its result.

    An INSERT or a SELECT with named parameters: deferred statements are joined into one,
    whose parts share a snapshot, so none may depend on another's rows but through foreign
    keys (checked at the end of the statement)."""
    conn.info.setdefault(_DEFERRED, []).append((sql, params))


def _fetch(conn: sa.Connection, sql: str, params: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run `sql` after the deferred statements: (column names, rows)."""
    _send_deferred(conn)
    with _as_dbapi_error(conn, sql, params):
        cur = _raw(conn).execute(sql, params)
        return _names(sql, cur), cur.fetchall()


_NAMES: dict[str, list[str]] = {}  # statement -> its column names


def _names(sql: str, cur: psycopg.Cursor[Any], prefix: str = "") -> list[str]:
    """The column names of `sql`'s rows (without `prefix`), read from the first result
    only: psycopg builds a description object per column at every call."""
    names = _NAMES.get(sql)
    if names is None:
        names = _NAMES[sql] = [d.name.removeprefix(prefix) for d in cur.description or ()]
    return names


def _send_deferred(conn: sa.Connection, commit: bool = False) -> None:
    """Send the deferred statements as ONE statement, then COMMIT if asked.

    When nothing of the transaction was sent yet (a submission), that statement is the
    whole transaction: it runs on its own, committed by the server as it ends, so the
    transaction is a single round trip."""
    deferred = conn.info.pop(_DEFERRED, [])
    raw = _raw(conn)
    if not deferred:
        if commit:
            with _as_dbapi_error(conn, "COMMIT", None):
                raw.commit()
        return
    sql, params = _combined(deferred)
    with _as_dbapi_error(conn, sql, params):
        alone = commit and raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if alone:
            raw.autocommit = True  # no BEGIN: one statement is its own transaction
            try:
                raw.execute(sql, params)
            finally:
                raw.autocommit = False
            return
        if commit and not params:
            # Nothing to bind: statement and COMMIT go as one simple query, one round trip.
            raw.execute(f"{sql}; COMMIT", prepare=False)
            return
        raw.execute(sql, params)
        if commit:
            raw.commit()


def _combined(statements: Sequence[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """Statements as one: each a common table expression (data-modifying ones run whether
    read or not; SELECTs are read at the end), parameters renamed apart."""
    if len(statements) == 1:
        return statements[0]
    sql = _combined_sql(tuple(sql for sql, _ in statements))
    params = {f"s{i}_{k}": v for i, (_, values) in enumerate(statements) for k, v in values.items()}
    return sql, params


@functools.cache
def _combined_sql(statements: tuple[str, ...]) -> str:
    parts, selects = [], []
    for i, sql in enumerate(statements):
        renamed = _PARAM.sub(f"%(s{i}_" + r"\1)b", sql)
        parts.append(f"s{i} AS ({renamed})")
        if sql.lstrip().upper().startswith("SELECT"):
            selects.append(f"(SELECT count(*) FROM s{i})")
    return f"WITH {', '.join(parts)} SELECT {', '.join(selects) or '1'}"


_PARAM = re.compile(r"%\((\w+)\)b")


def _send_deferred_before(conn: sa.Connection, *_: Any) -> None:
    """SQLAlchemy's `before_cursor_execute`: what was deferred goes first, keeping order."""
    if not conn.invalidated and conn.info.get(_DEFERRED):
        _send_deferred(conn)


def _drop_deferred(conn: sa.Connection) -> None:
    """SQLAlchemy's `rollback`: what was deferred was never sent and is not to be. (An
    invalidated connection has lost its `info`, and what was deferred with it.)"""
    if not conn.invalidated:
        conn.info.pop(_DEFERRED, None)


@contextlib.contextmanager
def _as_dbapi_error(conn: sa.Connection, sql: str, params: Any) -> Iterator[None]:
    """psycopg's errors as SQLAlchemy's, as if SQLAlchemy had run the statement: the queue's
    retries and messages see one kind of error."""
    try:
        yield
    except psycopg.Error as exc:
        conn.info.pop(_DEFERRED, None)
        # A broken connection is dropped by SQLAlchemy's rollback, which follows.
        raise _dbapi_error(exc, sql, params, _raw(conn)) from exc


def _autocommit(engine: sa.Engine, sql: str, params: dict[str, Any]) -> None:
    """Run `sql` as a transaction of its own on a pooled connection, outside SQLAlchemy's
    connections; psycopg's errors raised as SQLAlchemy's, a broken connection dropped."""
    try:
        pooled = engine.raw_connection()
    except psycopg.Error as exc:  # could not connect
        raise sa.exc.DBAPIError.instance(sql, params, exc, psycopg.Error) from exc
    raw = cast("psycopg.Connection[Any]", pooled.driver_connection)
    try:
        raw.autocommit = True
        try:
            raw.execute(sql, params)
        finally:
            if not raw.broken:
                raw.autocommit = False
    except psycopg.Error as exc:
        if raw.broken:
            pooled.invalidate()  # not handed back to the pool
        raise _dbapi_error(exc, sql, params, raw) from exc
    finally:
        pooled.close()


def _dbapi_error(
    exc: psycopg.Error, sql: str, params: Any, raw: psycopg.Connection[Any]
) -> sa.exc.StatementError:
    """`exc` as the SQLAlchemy error SQLAlchemy would have raised for it."""
    return sa.exc.DBAPIError.instance(
        sql, params, exc, psycopg.Error, connection_invalidated=raw.broken
    )


@functools.cache
def _notify_sql(channel: str, payload: str) -> str:
    """pg_notify with its arguments as literals, quoted by psycopg."""
    statement = psycopg.sql.SQL("SELECT pg_notify({}, {})").format(
        psycopg.sql.Literal(channel), psycopg.sql.Literal(payload)
    )
    return statement.as_string(None)


@functools.cache
def _task_insert(
    columns: tuple[str, ...], one: bool
) -> tuple[str, tuple[tuple[str, str, Callable[[Any], Any]], ...]]:
    """INSERT of task rows with `columns` (one row, or arrays of them), and what it takes:
    (parameter, column, converter) each. Worked out once per shape: a submission of one
    task spends less time here than the server spends inserting it."""
    plan = tuple((f"c{i}", c, _array_of(c)[1]) for i, c in enumerate(columns))
    source = _source("v", tuple((name, _array_of(c)[0]) for name, c, _ in plan), one)
    values = ", ".join(_element(f"v.{name}", c) for name, c, _ in plan)
    # `seq` from its sequence, in the order of the rows: the order of submission.
    sql = (
        f"INSERT INTO tasks (seq, {', '.join(columns)}) "
        f"SELECT nextval('{s.task_seq.name}'), {values} FROM {source}"
    )
    return sql, plan


def _task_inserts(
    rows: list[dict[str, Any]],
    edges: Sequence[tuple[uuid.UUID, uuid.UUID]],
    locks: Sequence[tuple[uuid.UUID, str]],
) -> list[tuple[str, dict[str, Any]]]:
    """INSERTs of task rows, their prerequisite edges and lock keys: (SQL, parameters) each,
    a table's rows in one statement."""
    if not rows:
        return []
    one = len(rows) == 1
    sql, plan = _task_insert(tuple(rows[0]), one)
    if one:
        columns = {name: convert(rows[0][column]) for name, column, convert in plan}
    else:
        columns = {name: [convert(r[column]) for r in rows] for name, column, convert in plan}
    statements = [(sql, columns)]
    if edges:
        source, columns = _rows(
            "e", {"a": ("uuid", [a for a, _ in edges]), "b": ("uuid", [b for _, b in edges])}
        )
        statements.append(
            (
                f"INSERT INTO task_prerequisites (task_id, prerequisite_id) SELECT * FROM {source}",
                columns,
            )
        )
    if locks:
        source, columns = _rows(
            "k", {"a": ("uuid", [a for a, _ in locks]), "b": ("text", [k for _, k in locks])}
        )
        statements.append(
            (f"INSERT INTO task_locks (task_id, key) SELECT * FROM {source}", columns)
        )
    return statements


def _event_insert(
    rows: Sequence[tuple[uuid.UUID, State | None, State, str]], actor: str, now: datetime
) -> tuple[str, dict[str, Any]]:
    """INSERT of event rows (task, from, to, message), all by `actor` at `now`."""
    source, columns = _rows(
        "e",
        {
            "ids": ("uuid", [r[0] for r in rows]),
            "src": ("text", [r[1].value if r[1] is not None else None for r in rows]),
            "dst": ("text", [r[2].value for r in rows]),
            "msg": ("text", [r[3] for r in rows]),
        },
    )
    return (
        "INSERT INTO task_events (task_id, from_state, to_state, at, actor, message) "
        f"SELECT e.ids, e.src, e.dst, %(at)b, %(actor)b, e.msg FROM {source}",
        {**columns, "at": now, "actor": actor},
    )


def _rows(alias: str, columns: Mapping[str, tuple[str, list[Any]]]) -> tuple[str, dict[str, Any]]:
    """Rows given column by column ({name: (SQL type, values)}) as a FROM item `alias`
    with columns of those names, and its parameters: one array per column (`unnest`), or
    for a single row one value per column (`VALUES`), which psycopg dumps several times
    faster than the same values as arrays (a single submission is the common call)."""
    one = len(next(iter(columns.values()))[1]) == 1
    source = _source(alias, tuple((n, kind) for n, (kind, _) in columns.items()), one)
    return source, {n: values[0] if one else values for n, (_, values) in columns.items()}


@functools.cache
def _source(alias: str, columns: tuple[tuple[str, str], ...], one: bool) -> str:
    names = ", ".join(n for n, _ in columns)
    if one:
        values = ", ".join(f"%({n})b::{_wire(kind)}" for n, kind in columns)
        return f"(VALUES ({values})) AS {alias}({names})"
    arrays = ", ".join(f"%({n})b::{_wire(kind)}[]" for n, kind in columns)
    return f"unnest({arrays}) AS {alias}({names})"


def _wire(kind: str) -> str:
    """The type a value of SQL type `kind` travels as: JSON as text, cast on arrival."""
    return "text" if kind == "jsonb" else kind


@functools.cache
def _claim_sql(limit: int) -> tuple[str, dict[str, Any]]:
    """Pick up to `limit` runnable tasks; start those without lock keys; return all of them
    (`started` tells which), each as its row now is. Built from `Store.runnable_query` and
    compiled once per limit: (SQL, its constant parameters); `now`, `owner`, `lease_until`
    and `actor` are given at each call."""
    # A literal, so that a prepared statement's generic plan still knows how few rows it
    # needs and walks the ready index in order rather than sorting every live task.
    return _claim_text(str(int(limit)))


def _claim_text(limit: str) -> tuple[str, dict[str, Any]]:
    """`_claim_sql` with `limit` as SQL text."""
    t = s.tasks
    now = sa.bindparam("now", type_=s.UTCDateTime)
    keyless = sa.func.jsonb_array_length(t.c.locks) == 0
    picked = (
        Store.runnable_query(cast(datetime, now))
        .with_only_columns(t.c.id, keyless.label("keyless"))
        .limit(sa.literal_column(limit))
        .with_for_update(skip_locked=True, of=t)
        .cte("picked")
    )
    started = (
        t.update()
        .where(t.c.id == picked.c.id, picked.c.keyless)
        .values(
            state=State.RUNNING.value,
            owner=sa.bindparam("owner", type_=sa.Uuid),
            lease_until=sa.bindparam("lease_until", type_=s.UTCDateTime),
            attempt=t.c.attempt + 1,
            deadline=sa.case(
                (
                    t.c.timeout > 0,
                    now + sa.func.make_interval(0, 0, 0, 0, 0, 0, t.c.timeout),
                ),
                else_=sa.null(),
            ),
            started_at=now,
            updated_at=now,
        )
        .returning(*t.c)
        .cte("started")
    )
    e = s.task_events
    events = (
        e.insert()
        .from_select(
            ["task_id", "from_state", "to_state", "at", "actor", "message"],
            sa.select(
                started.c.id,
                sa.literal(State.NEW.value),
                sa.literal(State.RUNNING.value),
                now,
                sa.bindparam("actor", type_=sa.Text),
                sa.func.concat("attempt ", started.c.attempt, " of ", started.c.max_attempts),
            ),
        )
        .cte("started_events")
    )
    due = (
        sa.select(sa.func.min(t.c.not_before))
        .where(_SCHEDULED, t.c.not_before > now)
        .scalar_subquery()
        .label("next_due")
    )
    keyed = (
        sa.select(*t.c, sa.false().label("started"), due)
        .join(picked, picked.c.id == t.c.id)
        .where(sa.not_(picked.c.keyless))
    )
    statement = (
        sa.select(*started.c, sa.true().label("started"), due).union_all(keyed).add_cte(events)
    )
    compiled = statement.compile(dialect=_DIALECT)
    constants = {k: v for k, v in compiled.params.items() if k not in _CLAIM_PARAMS}
    return _PARAM_TEXT.sub(r"%(\1)b", str(compiled)), constants


@functools.cache
def _cycle_function(columns: tuple[str, ...], uniform: tuple[bool, ...]) -> tuple[str, str, str]:
    """A function of the session that completes tasks setting `columns` (as `move` does;
    those `uniform` to one value for all tasks, the others to one value each), releases
    their dependents (as `release_dependents`), claims (as `claim`, leaving tasks with lock
    keys for `claim`) and notifies (unless `p_quiet` and it claimed fewer than `p_limit`):
    (its name, CREATE, call).

    It returns the claimed rows (`r_started` true, or false for one passed over) then one
    row per completed task found (`r_started` NULL; `r_id`, `r_state`, `r_owner` as found
    under the lock). Its columns carry a prefix: a PL/pgSQL variable of a column's name
    would shadow the column in the statements. Created in `pg_temp`, once per session and
    named by a digest of its body, it is always this code's, with no schema change."""
    kinds = {f"c{i}": _wire(_array_of(col)[0]) for i, col in enumerate(columns)}
    one = {name for name, same in zip(kinds, uniform, strict=True) if same}
    arrays = _source(
        "u",
        (("id", "uuid"), *((n, k) for n, k in kinds.items() if n not in one)),
        False,
    )
    scalars = "".join(f", %({n})b AS {n}" for n in ("msg", *(n for n in kinds if n in one)))
    source = f"(SELECT u.*{scalars} FROM {arrays}) AS v"
    allowed = ", ".join(
        psycopg.sql.Literal(a.value).as_string(None) for a in sources(Move.COMPLETE)
    )
    move = _bind(
        _move_ctes(Move.COMPLETE, columns, True, True, source), allowed=f"ARRAY[{allowed}]"
    )
    claim, constants = _claim_text("p_limit")
    claim = _bind(
        claim, **{k: psycopg.sql.Literal(v).as_string(None) for k, v in constants.items()}
    )
    args = {
        "id": "uuid[]",
        "msg": "text",
        **{n: k if n in one else f"{k}[]" for n, k in kinds.items()},
        "now": "timestamptz",
        "actor": "text",
        "owner": "uuid",
        "lease_until": "timestamptz",
        "limit": "integer",
        "sender": "text",
        "quiet": "boolean",
    }
    typed = {c.name: c.type.compile(dialect=_DIALECT) for c in s.tasks.c}
    found = ", ".join(
        f"CAST({'f.' + n if n in ('id', 'state', 'owner') else 'NULL'} AS {kind})"
        for n, kind in typed.items()
    )
    body = f"""
DECLARE
  found_id uuid[]; found_state text[]; found_owner uuid[];
  moved uuid[] := '{{}}'; dep record; claimed bigint := 0;
BEGIN
  IF cardinality(p_id) > 0 THEN
    -- The rows found, and those the guarded update moved, in one statement.
    {move} SELECT array_agg(id), array_agg(state), array_agg(owner),
                  (SELECT coalesce(array_agg(u.id), '{{}}') FROM u)
      INTO found_id, found_state, found_owner, moved FROM old;
    -- Each dependent by its primary key, as release_dependents does (and why).
    FOR dep IN {_bind(_COUNT_DONE, ids="moved")} LOOP
      {_bind(_RELEASE, n="dep.n", id="dep.task_id")};
    END LOOP;
  END IF;
  IF p_limit > 0 THEN
    RETURN QUERY {claim};
    GET DIAGNOSTICS claimed = ROW_COUNT;
  END IF;
  RETURN QUERY SELECT {found}, CAST(NULL AS boolean), CAST(NULL AS timestamptz)
    FROM unnest(found_id, found_state, found_owner) AS f(id, state, owner);
  -- Quiet, it leaves the announcement to its caller unless others may find work.
  IF (cardinality(moved) > 0 OR claimed > 0) AND (NOT p_quiet OR claimed >= p_limit) THEN
    PERFORM pg_notify({psycopg.sql.Literal(defaults.NOTIFY_CHANNEL).as_string(None)}, p_sender);
  END IF;
END"""
    body = _PARAM.sub(r"p_\1", body)
    digest = hashlib.sha1(body.encode()).hexdigest()[:12]
    name = f"pg_temp.taskomatic_cycle_{digest}"
    result = ", ".join(
        [
            *(f"r_{n} {kind}" for n, kind in typed.items()),
            "r_started boolean",
            "r_next_due timestamptz",
        ]
    )
    create = (
        f"CREATE OR REPLACE FUNCTION {name}({', '.join(f'p_{n} {k}' for n, k in args.items())}) "
        f"RETURNS TABLE ({result}) LANGUAGE plpgsql "
        # Planned once per session: each statement's generic plan is what a batch wants
        # (the moves find rows by primary key, the claim walks the ready index), and a
        # custom plan for every call, chosen when arrays of one row look cheaper than the
        # ten rows a generic plan expects, would cost more than the statements themselves.
        "SET plan_cache_mode = force_generic_plan "
        f"AS $taskomatic${body}\n$taskomatic$"
    )
    # The ids go as text, an array literal (see complete_and_claim); the rest as binary.
    sent = ", ".join(f"%({n}){'s' if n == 'id' else 'b'}::{k}" for n, k in args.items())
    call = f"SELECT * FROM {name}({sent})"
    return name, create, call


# A completion's dependents, with how many of their prerequisites it completed; then the
# update of one dependent's count. `(…) IS TRUE` keeps the state out of the index search: with
# statistics taken before a burst of new tasks, PostgreSQL would otherwise look for the
# task among all new ones through `tasks_state_seq` rather than by its primary key.
_COUNT_DONE = (
    "SELECT task_id, count(*) AS n FROM task_prerequisites "
    "WHERE prerequisite_id = ANY(%(ids)b::uuid[]) GROUP BY task_id"
)
_RELEASE = (
    "UPDATE tasks SET pending = pending - %(n)b, updated_at = %(now)b "
    f"WHERE id = %(id)b AND (state = '{State.NEW.value}') IS TRUE"
)


def _bind(sql: str, **expressions: str) -> str:
    """`sql` with some of its parameters replaced by SQL expressions."""
    return _PARAM.sub(lambda m: expressions.get(m[1], m[0]), sql)


_FUNCTIONS = "taskomatic_functions"  # conn.info key: the session's functions created
_CLAIM_PARAMS = ("now", "owner", "lease_until", "actor")
_PARAM_TEXT = re.compile(r"%\((\w+)\)s")  # SQLAlchemy's placeholders, text format
_DUE = "taskomatic_next_due"  # conn.info key: (now, next due) as the last claim read it
_DIALECT = pg_psycopg.dialect()


class _Row:
    """A raw row as `Task.from_row` reads it (timestamps are in UTC: the session's zone)."""

    __slots__ = ("_mapping",)

    def __init__(self, names: Sequence[str], values: Sequence[Any]) -> None:
        self._mapping: dict[str, Any] = dict(zip(names, values, strict=True))


@functools.cache
def _array_of(column: str) -> tuple[str, Callable[[Any], Any]]:
    """(SQL type, Python converter) to pass a column's values as one array parameter.

    JSON goes as text cast to jsonb, a Python None as JSON null, as SQLAlchemy's JSON type
    writes it (unless the column asks for SQL NULL)."""
    col = s.tasks.c[column]
    if isinstance(col.type, sa.JSON):
        if getattr(col.type, "none_as_null", False):
            return "jsonb", lambda v: None if v is None else json.dumps(v)
        return "jsonb", json.dumps
    return col.type.compile(dialect=postgresql.dialect()), _plain


def _task_column(column: str, values: list[Any]) -> tuple[str, list[Any]]:
    """Values of a tasks `column` as `_rows` takes them: (SQL type, values as sent)."""
    kind, convert = _array_of(column)
    return kind, [convert(v) for v in values]


def _plain(value: Any) -> Any:
    """A value as psycopg should send it: an enum member as its value (psycopg would send
    its name)."""
    return value.value if isinstance(value, enum.Enum) else value


def _element(ref: str, column: str) -> str:
    """`ref`, a column of a `_rows` source, as `column`'s type (JSON arrives as text)."""
    return f"{ref}::jsonb" if _array_of(column)[0] == "jsonb" else ref


def _in_dispatch_order(rows: list[_Row]) -> list[_Row]:
    """Claimed rows in the order the runnable query picked them (RETURNING has none)."""
    return sorted(rows, key=lambda r: (-r._mapping["priority"], r._mapping["seq"]))


def _sorted_out(
    changes: Sequence[Change],
    found: Mapping[uuid.UUID, tuple[State, uuid.UUID | None]],
    allowed: tuple[State, ...],
    owner: uuid.UUID | None,
) -> Moved:
    """A guarded move's changes as moved or refused, from the (state, owner) of each row
    as the move found it under its lock."""
    moved: dict[uuid.UUID, State] = {}
    refused: dict[uuid.UUID, State | None] = {}
    for change in changes:
        state, row_owner = found.get(change.task_id, (None, None))
        if state is not None and _allows((state, row_owner), allowed, owner):
            moved[change.task_id] = state
        else:
            refused[change.task_id] = state
    return Moved(moved, refused)


def _allows(
    found: tuple[State, uuid.UUID | None] | None,
    allowed: tuple[State, ...],
    owner: uuid.UUID | None,
) -> bool:
    """Whether a row in this (state, owner) may make the move: Store.move's guard."""
    return found is not None and found[0] in allowed and (owner is None or found[1] == owner)


@functools.cache
def _move_sql(
    move: Move, columns: tuple[str, ...], guard_owner: bool, lock: bool, source: str
) -> str:
    """One guarded move of rows setting `columns`: lock them (if `lock`; otherwise this
    transaction has), update those in an allowed state (and of `owner`), append their events,
    and return (id, state, owner) of every row found, as it was under the lock. `source` is
    the FROM item `v` (id, msg, c0, c1, …) of the rows and their new values (`_rows`)."""
    return (
        f"{_move_ctes(move, columns, guard_owner, lock, source)} SELECT id, state, owner FROM old"
    )


def _move_ctes(
    move: Move, columns: tuple[str, ...], guard_owner: bool, lock: bool, source: str
) -> str:
    """`_move_sql` but its final SELECT: the rows found are the common table `old`."""
    names = "".join(f", v.c{i}" for i in range(len(columns)))
    sets = "".join(f", {col} = {_element(f'old.c{i}', col)}" for i, col in enumerate(columns))
    arrival = " ".join(
        f"WHEN '{src.value}' THEN '{target(move, src).value}'" for src in sources(move)
    )
    owner = " AND old.owner = %(owner)b::uuid" if guard_owner else ""
    locking = " FOR UPDATE" if lock else ""
    # Each row found by its primary key (LATERAL): a generic plan, expecting ten rows from
    # an unnest and statistics from a small table, would otherwise hash the whole table.
    # The new values ride along with the locked rows, so the UPDATE joins `old` to `tasks`
    # by primary key alone: joined to the arrays again, PostgreSQL (expecting ten rows
    # from an unnest) rescans them for every row, quadratic in the batch.
    return (
        f"WITH old AS (SELECT t.id, t.state, t.owner, v.msg{names} FROM {source} "
        "CROSS JOIN LATERAL (SELECT tasks.id, tasks.state, tasks.owner FROM tasks "
        f"WHERE tasks.id = v.id{locking}) AS t), "
        f"u AS (UPDATE tasks SET state = CASE old.state {arrival} END, "
        f"updated_at = %(now)b{sets} FROM old "
        f"WHERE tasks.id = old.id AND old.state = ANY(%(allowed)b::text[]){owner} "
        "RETURNING tasks.id, old.state AS src, tasks.state AS dst, old.msg), "
        "ev AS (INSERT INTO task_events (task_id, from_state, to_state, at, actor, message) "
        "SELECT id, src, dst, %(now)b, %(actor)b, msg FROM u)"
    )
