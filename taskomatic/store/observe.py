"""The reads of the dashboard and of /metrics: aggregates over tasks and their events.

Mixed into `Store`. Everything the dashboard lists goes through the indexed, limited reads
of the queue; the aggregates here scan the history once per call (a /metrics scrape), which
is what makes them correct across processes: the events table records every transition.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

from taskomatic import schema as s
from taskomatic.model import State

t = s.tasks
e = s.task_events


class _Seconds(sa.sql.expression.FunctionElement[float]):
    """Seconds from one timestamp column to another (the backends spell it differently)."""

    type = sa.Float()
    name = "seconds_between"
    inherit_cache = True


@compiles(_Seconds)
def _seconds_postgresql(element: _Seconds, compiler: SQLCompiler, **kw: Any) -> str:
    start, end = list(element.clauses)
    return f"EXTRACT(EPOCH FROM ({compiler.process(end, **kw)} - {compiler.process(start, **kw)}))"


@compiles(_Seconds, "sqlite")
def _seconds_sqlite(element: _Seconds, compiler: SQLCompiler, **kw: Any) -> str:
    start, end = list(element.clauses)
    return (
        f"((julianday({compiler.process(end, **kw)}) - "
        f"julianday({compiler.process(start, **kw)})) * 86400.0)"
    )


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts (one per upper bound, in order), the count and the sum."""

    labels: tuple[tuple[str, str], ...]
    buckets: tuple[int, ...]
    count: int
    sum: float


class ObserveStatements:
    """Every statement of the dashboard and the metrics, each a named method."""

    def recent_group_ids(self, conn: sa.Connection, scan: int, limit: int) -> list[uuid.UUID]:
        """The groups of the newest `scan` tasks, newest first (an index walk, never all)."""
        newest = (
            sa.select(t.c.group_id, t.c.seq)
            .where(t.c.group_id.is_not(None))
            .order_by(t.c.seq.desc())
            .limit(scan)
            .subquery()
        )
        rows = conn.execute(
            sa.select(newest.c.group_id, sa.func.max(newest.c.seq).label("last"))
            .group_by(newest.c.group_id)
            .order_by(sa.desc("last"))
            .limit(limit)
        )
        return [r.group_id for r in rows]

    def runnable_count(self, conn: sa.Connection, now: datetime) -> int:
        """Tasks runnable now that no dispatcher has claimed (the runnable query, counted)."""
        from taskomatic.store.base import Store

        runnable = Store.runnable_query(now).order_by(None).subquery()
        return int(conn.execute(sa.select(sa.func.count()).select_from(runnable)).scalar() or 0)

    def start_latency(self, conn: sa.Connection, bounds: Sequence[float]) -> Histogram:
        """Seconds from each task's submission to its first start (its first claim event)."""
        first = (
            sa.select(e.c.task_id, sa.func.min(e.c.at).label("first"))
            .where(e.c.from_state == State.NEW.value, e.c.to_state == State.RUNNING.value)
            .group_by(e.c.task_id)
            .subquery()
        )
        seconds = _Seconds(t.c.created_at, first.c.first)
        query = _histogram(seconds, bounds).select_from(first.join(t, t.c.id == first.c.task_id))
        row = conn.execute(query).one()
        return _to_histogram((), row, bounds)

    def action_durations(self, conn: sa.Connection, bounds: Sequence[float]) -> list[Histogram]:
        """Seconds the last attempt of each finished task ran, by action and outcome."""
        seconds = _Seconds(t.c.started_at, t.c.finished_at)
        query = (
            _histogram(seconds, bounds)
            .add_columns(t.c.action, t.c.state)
            .where(
                t.c.state.in_([State.COMPLETE.value, State.FAILED.value]),
                t.c.started_at.is_not(None),
                t.c.finished_at.is_not(None),
            )
            .group_by(t.c.action, t.c.state)
            .order_by(t.c.action, t.c.state)
        )
        return [
            _to_histogram((("action", r.action), ("outcome", r.state)), r, bounds)
            for r in conn.execute(query)
        ]

    def failed_attempts(self, conn: sa.Connection) -> dict[str, int]:
        """Attempts that failed, by action: a move to failed, or a retry later (running -> new)."""
        failed = sa.or_(
            sa.and_(
                e.c.to_state == State.FAILED.value,
                e.c.from_state.in_([State.RUNNING.value, State.WAITING.value]),
            ),
            sa.and_(e.c.from_state == State.RUNNING.value, e.c.to_state == State.NEW.value),
        )
        rows = conn.execute(
            sa.select(t.c.action, sa.func.count())
            .select_from(e.join(t, t.c.id == e.c.task_id))
            .where(failed)
            .group_by(t.c.action)
        )
        return {action: int(n) for action, n in rows}

    def takeovers(self, conn: sa.Connection) -> int:
        """Lease takeovers: the only move that leaves a task in its state (running, waiting)."""
        query = sa.select(sa.func.count()).where(e.c.from_state == e.c.to_state)
        return int(conn.execute(query).scalar() or 0)

    def waiting_jobs(self, conn: sa.Connection, limit: int) -> list[tuple[Any, Any, Any]]:
        """(job, params, result) of up to `limit` waiting tasks: where each one's job runs."""
        rows = conn.execute(
            sa.select(t.c.job, t.c.params, t.c.result)
            .where(t.c.state == State.WAITING.value)
            .order_by(t.c.seq)
            .limit(limit)
        )
        return [(r.job, r.params, r.result) for r in rows]


def _histogram(seconds: sa.ColumnElement[float], bounds: Sequence[float]) -> sa.Select[Any]:
    """count, sum and one cumulative count per bound, as columns b0, b1, …"""
    columns: list[Any] = [
        sa.func.count().label("n"),
        sa.func.coalesce(sa.func.sum(seconds), 0.0).label("total"),
    ]
    columns += [
        sa.func.coalesce(sa.func.sum(sa.case((seconds <= bound, 1), else_=0)), 0).label(f"b{i}")
        for i, bound in enumerate(bounds)
    ]
    return sa.select(*columns)


def _to_histogram(
    labels: tuple[tuple[str, str], ...], row: Any, bounds: Sequence[float]
) -> Histogram:
    m = row._mapping
    return Histogram(
        labels,
        tuple(int(m[f"b{i}"]) for i in range(len(bounds))),
        int(m["n"]),
        float(m["total"] or 0.0),
    )
