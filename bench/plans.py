"""Query plans of the dispatcher's per-cycle statements, taken as the store really sends them.

The store's own methods (claim, release of dependents, the next-due timer, the safety poll's
runnable query) run once in a transaction that is rolled back, with a listener recording
each statement and its parameters; each recorded statement is then explained with the same
parameters: `EXPLAIN (ANALYZE, BUFFERS)` on PostgreSQL (twice, the second run is kept, so
caches are warm as in a long-running dispatcher), `EXPLAIN QUERY PLAN` plus a timing loop on
SQLite. On PostgreSQL the claim is also explained as a generic plan, which is what a
prepared statement (psycopg prepares after 5 executions) may switch to.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from bench.profiling import signature
from taskomatic import Queue, schema
from taskomatic.store.base import Store

Call = Callable[[Store, sa.Connection, datetime, list[uuid.UUID]], Any]


def _claim(limit: int) -> Call:
    def call(store: Store, conn: sa.Connection, now: datetime, ids: list[uuid.UUID]) -> Any:
        claimed = store.claim(conn, uuid.uuid4(), now, timedelta(seconds=30), limit)
        ids.extend(task.id for task in claimed)

    return call


HOT_CALLS: tuple[tuple[str, Callable[[int], Call]], ...] = (
    ("claim", _claim),
    ("release_dependents", lambda _: lambda s, c, now, ids: s.release_dependents(c, ids, now)),
    ("next_due", lambda _: lambda s, c, now, ids: s.next_due(c, now)),
    ("safety poll (runnable)", lambda n: lambda s, c, now, ids: s.runnable(c, now, n)),
)

# A whole-table read; a SQLite SCAN of a partial index over live tasks reads only those.
HISTORY_SCAN = re.compile(
    r"Seq Scan on (tasks|task_events)\b"
    r"|\bSCAN (tasks|task_events)\b(?! USING (COVERING )?INDEX tasks_(ready|scheduled|leased)\b)"
)


@dataclass
class Captured:
    call: str
    statement: str
    params: Any


def capture(store: Store, limit: int) -> tuple[list[Captured], list[str]]:
    """The statements (not executemany) of each hot store call, and calls that failed."""
    captured: list[Captured] = []
    current: list[str | None] = [None]
    failed: list[str] = []

    def listen(conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool) -> None:
        if current[0] and not many and not statement.lstrip().upper().startswith("BEGIN"):
            captured.append(Captured(current[0], statement, params))

    sa.event.listen(store.engine, "before_cursor_execute", listen)
    try:
        with store.engine.connect() as conn:
            # The PostgreSQL store sends its hot statements straight through psycopg.
            raw = conn.connection.driver_connection
            if store.engine.dialect.name == "postgresql":
                send = raw.execute

                def execute(query: Any, params: Any = None, **kwargs: Any) -> Any:
                    if current[0]:
                        captured.append(Captured(current[0], str(query), params))
                    return send(query, params, **kwargs)

                raw.execute = execute
            tx = conn.begin()
            now, ids = datetime.now(UTC), []
            for name, make in HOT_CALLS:
                current[0] = name
                try:
                    make(limit)(store, conn, now, ids)
                except Exception as exc:  # the store's API moved on: say so, explain the rest
                    failed.append(f"{name}: {type(exc).__name__}: {exc}")
                current[0] = None
            tx.rollback()
            if store.engine.dialect.name == "postgresql":
                del raw.execute
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", listen)
    return captured, failed


def explain(url: str, limit: int) -> dict[str, Any]:
    """Plans and timings of the hot statements on the database at `url` as it is now."""
    queue = Queue.open(url, actor="bench")
    store = queue.store
    try:
        captured, failed = capture(store, limit)
        pg = store.engine.dialect.name == "postgresql"
        entries = []
        with store.engine.connect() as conn:
            for c in captured:
                entry: dict[str, Any] = {"call": c.call, "statement": signature(c.statement)}
                entry.update(_pg(conn, c) if pg else _sqlite(conn, c))
                entry["scans_history"] = bool(HISTORY_SCAN.search(entry["plan"]))
                entries.append(entry)
            out: dict[str, Any] = {"statements": entries, "failed_calls": failed}
            if pg:
                out["claim_generic_plan"] = _pg_generic_claim(conn, limit)
            t = schema.tasks
            live = t.c.state.in_(("new", "running", "waiting"))
            with conn.begin():
                out["live_tasks"] = conn.execute(sa.select(sa.func.count()).where(live)).scalar()
                out["all_tasks"] = conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()
        return out
    finally:
        queue.close()


def _pg(conn: sa.Connection, c: Captured) -> dict[str, Any]:
    rows: list[Any] = []
    for _ in range(2):
        tx = conn.begin()
        try:
            rows = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {c.statement}", c.params).all()
        finally:
            tx.rollback()
    plan = "\n".join(str(r[0]) for r in rows)
    return {
        "plan": plan,
        "planning_ms": _number(r"Planning Time: ([\d.]+) ms", plan),
        "execution_ms": _number(r"Execution Time: ([\d.]+) ms", plan),
        "buffers": next((ln.strip() for ln in plan.splitlines() if "Buffers:" in ln), ""),
    }


def _sqlite(conn: sa.Connection, c: Captured, runs: int = 20) -> dict[str, Any]:
    tx = conn.begin()
    try:
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {c.statement}", c.params).all()
        started = time.perf_counter()
        for _ in range(runs):
            conn.exec_driver_sql(c.statement, c.params)
        took = (time.perf_counter() - started) / runs * 1000
    finally:
        tx.rollback()
    return {"plan": "\n".join(f"{r[0]}|{r[1]}| {r[3]}" for r in rows), "execution_ms": took}


def _pg_generic_claim(conn: sa.Connection, limit: int) -> dict[str, Any]:
    """The claim as a prepared statement forced to its generic plan: the store's own
    one-statement claim (taskomatic.store.postgres), or the SQLAlchemy one before it."""
    try:
        from taskomatic.store.postgres import _claim_sql
    except ImportError:
        _claim_sql = None
    if _claim_sql is not None:
        sql, constants = _claim_sql(limit)
        now = datetime.now(UTC)
        values = {
            **constants,
            "now": now,
            "owner": str(uuid.uuid4()),
            "lease_until": now + timedelta(seconds=30),
            "actor": "bench",
        }
        order: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in order:
                order.append(match.group(1))
            return f"${order.index(match.group(1)) + 1}"

        statement = re.sub(r"%\((\w+)\)[sb]", number, sql)  # text or binary
        args = ", ".join(_pg_literal(values[k]) for k in order)
    else:
        query = (
            Store.runnable_query(datetime.now(UTC))
            .limit(limit)
            .with_for_update(skip_locked=True, of=schema.tasks)
        )
        compiled = query.compile(dialect=postgresql.dialect(paramstyle="numeric_dollar"))
        statement = str(compiled)
        args = ", ".join(_pg_literal(compiled.params[k]) for k in compiled.positiontup or ())
    tx = conn.begin()
    try:
        conn.exec_driver_sql(f"PREPARE bench_claim AS {statement}")
        conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
        sql = f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_claim({args})"
        plan = "\n".join(str(r[0]) for r in conn.exec_driver_sql(sql).all())
    finally:
        tx.rollback()
    # Prepared statements outlive transactions; leave psycopg's own ones alone.
    conn.exec_driver_sql("DEALLOCATE bench_claim")
    conn.commit()
    return {
        "plan": plan,
        "execution_ms": _number(r"Execution Time: ([\d.]+) ms", plan),
        "scans_history": bool(HISTORY_SCAN.search(plan)),
    }


def _pg_literal(value: Any) -> str:
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def _number(pattern: str, text: str) -> float | None:
    found = re.search(pattern, text)
    return float(found.group(1)) if found else None
