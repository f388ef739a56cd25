"""The `effect` action, for tests that run `taskomatic dispatcher` as a real OS process.

A dispatcher started with `--actions side_effects` (and tests/ on PYTHONPATH) imports this
module, which registers `effect` in the default registry. Each run of `effect` that gets as
far as its side effect writes one row into the `side_effects` table of the database named by
$TASKOMATIC_TEST_EFFECTS_URL. Counting those rows per task tells a test how often the work
really happened, whatever the queue's own tables say. The action's `check` hook looks for the
row, as a real action looks at the host after the dispatcher running it died.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

import sqlalchemy as sa

import taskomatic
from taskomatic import Check, Context, Param, Registry, TaskSpec
from taskomatic.errors import ActionFailed

URL_ENV = "TASKOMATIC_TEST_EFFECTS_URL"
"""Environment variable naming the database (SQLAlchemy URL) that `effect` writes into."""

metadata = sa.MetaData()

side_effects = sa.Table(
    "side_effects",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    # Deliberately not unique: a second run of a task must show up as a second row.
    sa.Column("task_id", sa.Uuid, nullable=False, index=True),
    sa.Column("pid", sa.Integer, nullable=False),
)
"""One row per run of `effect` that did its work: which task, in which process."""


def effect(ctx: Context) -> dict[str, Any]:
    """Wait `before` s, record this run (the side effect), wait `after` s; return the pid.

    A stop request (shutdown past the grace period, timeout) before the side effect ends
    the run without it. One after it is ignored: the work is done, only the report was due.
    """
    if ctx.stop.wait(ctx.params["before"]):
        raise ActionFailed("stopped before the side effect")
    with _engine().begin() as conn:
        conn.execute(side_effects.insert().values(task_id=ctx.task_id, pid=os.getpid()))
    ctx.stop.wait(ctx.params["after"])
    return {"pid": os.getpid()}


def check(ctx: Context) -> Check:
    """After a takeover: done if the side effect is there (with its writer's pid), else not
    started, so the work is redone only if it never happened."""
    with _engine().connect() as conn:
        pid = conn.execute(
            sa.select(side_effects.c.pid).where(side_effects.c.task_id == ctx.task_id).limit(1)
        ).scalar()
    return Check.not_started() if pid is None else Check.done({"pid": pid, "checked": True})


def spec(before: float = 0.0, after: float = 0.0, **options: Any) -> TaskSpec:
    """A task running `effect`; `options` are further TaskSpec fields (priority, …)."""
    return TaskSpec("effect", {"before": before, "after": after}, **options)


def register(registry: Registry) -> None:
    """Add `effect` to `registry`, e.g. the one a test's queue validates submissions with."""
    registry.action(
        "effect",
        params={"before": Param(float, default=0.0), "after": Param(float, default=0.0)},
        check=check,
    )(effect)


_engines: dict[str, sa.Engine] = {}
_engines_lock = threading.Lock()


def _engine() -> sa.Engine:
    """This process's engine for $TASKOMATIC_TEST_EFFECTS_URL, shared by all worker threads."""
    url = os.environ[URL_ENV]
    with _engines_lock:
        if url not in _engines:
            # pre_ping: after a PostgreSQL restart, pooled connections are dead; find out
            # before using one rather than failing the run.
            _engines[url] = sa.create_engine(url, pool_pre_ping=True)
        return _engines[url]


class Ledger:
    """The test's side of the table: create it, then read which task ran how often, where."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, pool_pre_ping=True)

    def create(self) -> None:
        """Create the table (in the test's own database, next to the queue's tables)."""
        metadata.create_all(self.engine)

    def runs(self) -> dict[uuid.UUID, list[int]]:
        """For each task that ran, the pids of the processes whose runs did its work."""
        out: dict[uuid.UUID, list[int]] = {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(side_effects.c.task_id, side_effects.c.pid).order_by(side_effects.c.id)
            )
            for task_id, pid in rows:
                out.setdefault(task_id, []).append(pid)
        return out

    def count(self) -> int:
        """Rows so far: how many runs did their work."""
        with self.engine.connect() as conn:
            query = sa.select(sa.func.count()).select_from(side_effects)
            return int(conn.execute(query).scalar_one())

    def close(self) -> None:
        """Close the pooled connections (before the test database is dropped)."""
        self.engine.dispose()


register(taskomatic.registry)  # what `taskomatic --actions side_effects` imports us for
