"""Properties of the queue over random inputs (hypothesis), on SQLite and on PostgreSQL.

* `test_random_dags`: random DAGs with random lock keys, outcomes and retries, run by a real
  dispatcher, end exactly as their plan says, in an order that prerequisites and locks allow.
* `test_queue_model`: a state machine drives the Queue without a dispatcher and checks after
  every step that the runnable query, the claim path and a definition written in Python agree.

Every example gets a fresh database; runs are derandomized, so CI sees the same examples.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pgcluster import ExternalPostgres, PostgresCluster
from strategies import FAIL, FATAL, LOCK_POOL, OK, Plan, plans

from taskomatic import defaults, errors
from taskomatic import schema as s
from taskomatic.actions.registry import Context, Param, Registry
from taskomatic.dispatcher import Dispatcher
from taskomatic.model import MOVES, TERMINAL, Event, State, Task
from taskomatic.queue import Outcome, Queue
from taskomatic.store import connect
from taskomatic.store.base import Store
from taskomatic.submission import TaskSpec

Cluster = PostgresCluster | ExternalPostgres

LEGAL = frozenset((src, dst) for _, src, dst in MOVES)
"""(from, to) pairs that the table of legal moves allows."""

WAIT_SECONDS = 30.0
"""How long a random DAG may take to finish before the test gives up on it (seconds)."""

STALL_CHECK_SECONDS = 0.5
"""Interval at which a run is checked for tasks that nothing can move any more (seconds)."""


def _settings(examples: int, **extra: Any) -> settings:
    """Reproducible (derandomized, no example database) and without per-example deadlines."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
        **extra,
    )


# --- a fresh database per example ----------------------------------------------------------------


class Databases:
    """Makes a fresh database holding the schema for each example, and removes it afterwards."""

    def __init__(
        self, backend: str, tmp: Path, cluster: Cluster | None, template: str | None
    ) -> None:
        self.backend = backend
        self.tmp = tmp
        self.cluster = cluster
        self.template = template

    @contextlib.contextmanager
    def fresh(self) -> Iterator[str]:
        name = f"taskomatic_prop_{uuid.uuid4().hex[:12]}"
        if self.cluster is None:
            path = self.tmp / f"{name}.db"
            store = connect(f"sqlite:///{path}")
            try:
                store.init_schema(datetime.now(UTC))
            finally:
                store.close()
            try:
                yield f"sqlite:///{path}"
            finally:
                for leftover in self.tmp.glob(f"{name}.db*"):
                    leftover.unlink()
            return
        self.cluster.create_database(name, template=self.template)
        try:
            yield self.cluster.url(name)
        finally:
            try:
                self.cluster.terminate_connections(name)
                self.cluster.drop_database(name)
            except psycopg.Error as exc:  # a leaked connection must not hide the real failure
                print(f"could not drop test database {name}: {exc}")


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def databases(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Databases:
    """Fresh databases on each backend in turn; test ids end in [sqlite] or [postgresql]."""
    tmp = tmp_path_factory.mktemp("properties")
    if request.param == "sqlite":
        return Databases("sqlite", tmp, None, None)
    # Resolved lazily, so `-k sqlite` runs never start PostgreSQL.
    cluster = request.getfixturevalue("pg_cluster")
    template = request.getfixturevalue("pg_template")
    return Databases("postgresql", tmp, cluster, template)


def _name(tid: uuid.UUID) -> str:
    """Test task ids are small integers, so messages can say `task 3`."""
    return f"task {tid.int - 1}"


def _tid(index: int) -> uuid.UUID:
    return uuid.UUID(int=index + 1)


def _all_events(store: Store) -> dict[uuid.UUID, list[Event]]:
    """Every task's events, oldest first, in one query."""
    e = s.task_events
    with store.read() as conn:
        rows = conn.execute(sa.select(e).order_by(e.c.id))
        out: dict[uuid.UUID, list[Event]] = {}
        for row in rows:
            event = Event.from_row(row)
            out.setdefault(event.task_id, []).append(event)
    return out


def _held_locks(store: Store) -> set[tuple[str, uuid.UUID]]:
    with store.read() as conn:
        return {(r.key, r.task_id) for r in conn.execute(sa.select(s.held_locks))}


def _audit(store: Store) -> list[str]:
    with store.read() as conn:
        return store.audit(conn)


def _path_problem(task: Task, events: Sequence[Event]) -> str | None:
    """Why the events are not a legal path from (None -> new) to the task's state, if so."""
    if not events or (events[0].from_state, events[0].to_state) != (None, State.NEW):
        first = (events[0].from_state, events[0].to_state) if events else None
        return f"{_name(task.id)}: first event is {first}, not (None -> new)"
    for before, after in itertools.pairwise(events):
        if after.from_state is not before.to_state:
            return (
                f"{_name(task.id)}: event {after.from_state} -> {after.to_state} follows one "
                f"that ended in {before.to_state}"
            )
        if (after.from_state, after.to_state) not in LEGAL:
            return f"{_name(task.id)}: {after.from_state} -> {after.to_state} is not a legal move"
    if events[-1].to_state is not task.state:
        return f"{_name(task.id)}: last event leads to {events[-1].to_state}, task is {task.state}"
    return None


# --- property 1: random DAGs through a real dispatcher -------------------------------------------


@dataclass(frozen=True)
class Run:
    """One attempt of the test action: which task, which attempt, and its start and end ticks."""

    index: int
    attempt: int
    start: int
    end: int


@dataclass
class Recorder:
    """The test action: each attempt does what the plan says and records when it ran."""

    plan: Plan
    runs: list[Run] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ticks: Iterator[int] = field(default_factory=itertools.count)

    def tick(self) -> int:
        with self._lock:
            return next(self._ticks)

    def __call__(self, ctx: Context) -> dict[str, int]:
        index = ctx.params["index"]
        task = self.plan.tasks[index]
        start = self.tick()
        time.sleep(task.pause)
        # An attempt beyond max_attempts is recorded (and fails the test), never planned.
        outcome = task.outcomes[ctx.attempt - 1] if ctx.attempt <= len(task.outcomes) else FATAL
        end = self.tick()
        with self._lock:
            self.runs.append(Run(index, ctx.attempt, start, end))
        if outcome == OK:
            return {"index": index, "attempt": ctx.attempt}
        if outcome == FAIL:
            raise RuntimeError(f"planned failure of attempt {ctx.attempt}")
        raise errors.ActionFailed(f"planned permanent failure of attempt {ctx.attempt}")


@dataclass(frozen=True)
class Observed:
    """What a run of a plan left behind, read before the database went away."""

    tasks: list[Task]
    events: dict[uuid.UUID, list[Event]]
    runs: list[Run]
    audit: list[str]
    held: set[tuple[str, uuid.UUID]]


def _stuck(queue: Queue, ids: Sequence[uuid.UUID]) -> list[Task]:
    """Live tasks that nothing can move any more: none runs, none is runnable or delayed."""
    with queue.store.read() as conn:
        now = queue.now()
        tasks = queue.store.get_many(conn, ids)
        if queue.store.runnable(conn, now, 1) or queue.store.next_due(conn, now) is not None:
            return []
    if any(t.state in (State.RUNNING, State.WAITING) for t in tasks):
        return []
    return [t for t in tasks if t.state not in TERMINAL]


def _wait_for_all(queue: Queue, ids: Sequence[uuid.UUID]) -> list[Task]:
    """Wait until every task is terminal; fail fast (saying why) once the run is stuck."""
    deadline = time.monotonic() + WAIT_SECONDS
    stuck_checks = 0
    while True:
        try:
            return queue.wait(ids, timeout=STALL_CHECK_SECONDS)
        except errors.WaitTimeout:
            pass
        stuck = _stuck(queue, ids)
        stuck_checks = stuck_checks + 1 if stuck else 0
        if stuck_checks >= 3 or time.monotonic() > deadline:
            with queue.store.read() as conn:
                live = [t for t in queue.store.get_many(conn, ids) if t.state not in TERMINAL]
            lines = [f"{_name(t.id)} is {t.state}: {queue.why(t.id)}" for t in live]
            what = "stuck" if stuck else f"not finished after {WAIT_SECONDS}s"
            pytest.fail(f"tasks {what}:\n" + "\n".join(lines))


def _run_plan(url: str, plan: Plan) -> Observed:
    """Submit the plan's tasks and let an in-process dispatcher run them all to the end."""
    recorder = Recorder(plan)
    registry = Registry()
    registry.action("planned", params={"index": Param(int)})(recorder)
    ids = [_tid(i) for i in range(len(plan.tasks))]
    with Queue(connect(url), registry=registry) as queue:
        dispatcher = Dispatcher(queue, workers=plan.workers)
        if plan.start_first:
            dispatcher.start()
        try:
            for k, part in enumerate(plan.batches()):
                specs = [
                    TaskSpec(
                        "planned",
                        {"index": i},
                        id=ids[i],
                        after=[ids[p] for p in plan.tasks[i].after],
                        locks=plan.tasks[i].locks,
                        priority=plan.tasks[i].priority,
                        max_attempts=plan.tasks[i].max_attempts,
                    )
                    for i in part
                ]
                if plan.grouped:
                    # "continue": prerequisites alone decide what runs (the model's rules);
                    # a group's stop at its first failure is tested in test_groups.py.
                    queue.submit_group(specs, name=f"part {k}", on_failure="continue")
                else:
                    queue.submit_many(specs)
            if not plan.start_first:
                dispatcher.start()
            tasks = _wait_for_all(queue, ids)
        finally:
            dispatcher.stop(grace=10)
        return Observed(
            tasks,
            _all_events(queue.store),
            recorder.runs,
            _audit(queue.store),
            _held_locks(queue.store),
        )


def _check_plan(plan: Plan, seen: Observed) -> None:
    """Every invariant a finished run of `plan` must satisfy; fails naming the first broken one."""
    by_index = {t.id.int - 1: t for t in seen.tasks}
    runs: dict[int, list[Run]] = {}
    for r in seen.runs:
        runs.setdefault(r.index, []).append(r)
    timeline = "\n".join(
        f"  tick {r.start}-{r.end}: task {r.index} attempt {r.attempt}"
        for r in sorted(seen.runs, key=lambda r: r.start)
    )
    note(f"actions ran:\n{timeline}")

    # (c) every task ends in a terminal state, and (beyond the brief) in the one its plan implies.
    for i, task in by_index.items():
        assert task.state in TERMINAL, f"task {i} ended {task.state}, not terminal"
    for i, (state, attempts) in enumerate(plan.expected()):
        got = (by_index[i].state, by_index[i].attempt)
        assert got == (state, attempts), (
            f"task {i} ended {got[0]} after {got[1]} attempt(s); its plan means {state} after "
            f"{attempts}"
        )

    # (d) failures cancel exactly their transitive dependents; each names what sank it.
    failed = {i for i, t in by_index.items() if t.state is State.FAILED}
    cancelled = {i for i, t in by_index.items() if t.state is State.CANCELLED}
    downstream = plan.descendants(failed)
    assert cancelled == downstream, (
        f"cancelled {sorted(cancelled)}, but the dependents of failed {sorted(failed)} are "
        f"{sorted(downstream)}"
    )
    for i in cancelled:
        error = by_index[i].error or {}
        named = uuid.UUID(error.get("prerequisite", str(uuid.UUID(int=0)))).int - 1
        assert named in plan.tasks[i].after and named in failed | cancelled, (
            f"cancelled task {i} names prerequisite {named} ({error}); its prerequisites are "
            f"{list(plan.tasks[i].after)}, the failed or cancelled ones are "
            f"{sorted((failed | cancelled) & set(plan.tasks[i].after))}"
        )

    # (a) no attempt starts before every prerequisite completed: by the action's own clock,
    # and in the audit trail (the claim's event follows each prerequisite's completion).
    completion: dict[int, Run] = {}
    for i, task in by_index.items():
        if task.state is State.COMPLETE:
            completion[i] = max(runs[i], key=lambda r: r.attempt)
    for i, planned in enumerate(plan.tasks):
        for r in runs.get(i, []):
            for p in planned.after:
                done = completion.get(p)
                assert done is not None and done.end < r.start, (
                    f"task {i} attempt {r.attempt} started at tick {r.start}, but prerequisite "
                    f"{p} {'never completed' if done is None else f'completed at {done.end}'}"
                )
        claims = [e.id for e in seen.events[_tid(i)] if e.to_state is State.RUNNING]
        for p in planned.after:
            done_at = [e.id for e in seen.events[_tid(p)] if e.to_state is State.COMPLETE]
            assert not claims or (done_at and min(claims) > done_at[0]), (
                f"task {i} was claimed (event {min(claims)}) before prerequisite {p} completed "
                f"(events {done_at})"
            )

    # (b) two tasks sharing a lock key never run at the same time.
    for i, j in itertools.combinations(range(len(plan.tasks)), 2):
        shared = set(plan.tasks[i].locks) & set(plan.tasks[j].locks)
        if not shared:
            continue
        for a, b in itertools.product(runs.get(i, []), runs.get(j, [])):
            assert a.end < b.start or b.end < a.start, (
                f"tasks {i} and {j} share lock(s) {sorted(shared)} but overlapped: task {i} "
                f"attempt {a.attempt} ran ticks {a.start}-{a.end}, task {j} attempt "
                f"{b.attempt} ran ticks {b.start}-{b.end}"
            )

    # (e) attempts stay within max_attempts; events form a legal path through the moves.
    for i, task in by_index.items():
        mine = runs.get(i, [])
        assert len(mine) == task.attempt <= task.max_attempts, (
            f"task {i} ran {len(mine)} time(s), records attempt {task.attempt}, allows "
            f"{task.max_attempts}"
        )
        problem = _path_problem(task, seen.events.get(task.id, []))
        assert problem is None, problem
        claimed = sum(e.to_state is State.RUNNING for e in seen.events[task.id])
        assert claimed == task.attempt, f"task {i}: {claimed} claims for {task.attempt} attempts"

    # (f) the fast paths agree with the rows; (g) no lock outlives its holder.
    assert seen.audit == [], f"audit found: {seen.audit}"
    assert seen.held == set(), f"locks still held at the end: {sorted(seen.held)}"


def _label(plan: Plan) -> None:
    """Tell the statistics (--hypothesis-show-statistics) what this example exercises."""
    fates = {t.fate()[0] for t in plan.tasks}
    event(f"tasks: {(len(plan.tasks) - 1) // 5 * 5 + 1}-{(len(plan.tasks) - 1) // 5 * 5 + 5}")
    event("has a task that fails" if State.FAILED in fates else "no task fails")
    event("has a retry" if any(t.outcomes[0] == FAIL for t in plan.tasks) else "no retry")
    shares = any(set(a.locks) & set(b.locks) for a, b in itertools.combinations(plan.tasks, 2))
    event("tasks share a lock" if shares else "no shared lock")
    event(f"{len(plan.batches())} submission(s)")


@_settings(25)
@given(plan=plans())
def test_random_dags(databases: Databases, plan: Plan) -> None:
    """Random DAGs run by a dispatcher respect prerequisites, locks, attempts and cancellation.

    Proves, for any DAG of up to 25 tasks with frequent lock conflicts, planned successes,
    failures and permanent failures, 1-3 attempts and 1-4 workers: no attempt starts before
    its prerequisites completed; tasks sharing a lock never overlap; every task ends terminal,
    exactly as its plan implies; failures cancel exactly their transitive dependents, each
    naming a sunk prerequisite; attempts never exceed max_attempts and every event is a legal
    move; and at the end the audit is clean and no lock is held.
    """
    note(plan.describe())
    _label(plan)
    with databases.fresh() as url, pytest.MonkeyPatch.context() as mp:
        # Backoff is not under test here; a real one would make each retry cost a second.
        mp.setattr(defaults, "RETRY_BACKOFF_BASE_SECONDS", 0.001)
        seen = _run_plan(url, plan)
    _check_plan(plan, seen)


# --- property 2: the queue against a model, step by step -----------------------------------------

START = datetime(2030, 1, 1, tzinfo=UTC)
"""Where the model's fake clock starts."""

LEASE = 30.0
"""The lease of a claim in the model (seconds); past it, another owner may take over."""

OWNERS = (uuid.UUID(int=0xAAAAAAAA << 96), uuid.UUID(int=0xBBBBBBBB << 96))
"""Two dispatchers, as far as the queue can tell."""

SINKING = frozenset({State.FAILED, State.CANCELLED})


@dataclass
class Known:
    """What the model expects of one task."""

    id: uuid.UUID
    order: int
    prereqs: tuple[uuid.UUID, ...]
    locks: tuple[str, ...]
    priority: int
    max_attempts: int
    not_before: datetime
    state: State = State.NEW
    attempt: int = 0
    owner: uuid.UUID | None = None
    lease_until: datetime | None = None
    sunk_by: uuid.UUID | None = None
    """The prerequisite a dependency-cancelled task names as the one that sank it."""


@dataclass(frozen=True)
class SpecPlan:
    """One task of a random submission.

    `outside` picks prerequisites among existing tasks (by number, modulo their count),
    `inside` among earlier tasks of the same submission (by position; later ones ignored).
    """

    outside: tuple[int, ...]
    inside: tuple[int, ...]
    locks: tuple[str, ...]
    priority: int
    delay: float | None
    """not_before relative to now (seconds), or None for the default (now)."""
    max_attempts: int


spec_plans = st.builds(
    SpecPlan,
    outside=st.lists(st.integers(0, 63), max_size=2).map(tuple),
    inside=st.lists(st.integers(0, 3), max_size=2).map(tuple),
    locks=st.sets(st.sampled_from(LOCK_POOL), max_size=2).map(lambda ks: tuple(sorted(ks))),
    priority=st.integers(0, 2),
    delay=st.sampled_from([None, -5.0, 3.0, 30.0]),
    max_attempts=st.integers(1, 3),
)


def _greedy(runnable: Sequence[Task], n: int) -> list[uuid.UUID]:
    """What a claim of `n` must take: in dispatch order, each task whose keys are still free."""
    taken: list[uuid.UUID] = []
    keys: set[str] = set()
    for task in runnable:
        if len(taken) == n:
            break
        if keys.isdisjoint(task.locks):
            taken.append(task.id)
            keys.update(task.locks)
    return taken


class QueueMachine(RuleBasedStateMachine):
    """Drives a Queue directly (no dispatcher) and checks it against a model after every step."""

    databases: ClassVar[Databases]

    def __init__(self) -> None:
        super().__init__()
        self._cleanup = contextlib.ExitStack()
        url = self._cleanup.enter_context(self.databases.fresh())
        self.now = START
        self.queue = Queue(connect(url), registry=Registry(), clock=lambda: self.now)
        self._cleanup.callback(self.queue.close)
        self.model: dict[uuid.UUID, Known] = {}
        self.batches: list[tuple[list[TaskSpec], uuid.UUID | None]] = []

    def teardown(self) -> None:
        self._cleanup.close()

    # -- what the model predicts ---------------------------------------------------------

    def _pick(self, which: int, state: State | None = None) -> Known:
        pool = [k for k in self.model.values() if state is None or k.state is state]
        return pool[which % len(pool)]

    def _has(self, state: State | None = None) -> bool:
        return any(state is None or k.state is state for k in self.model.values())

    def _sink(self, roots: Sequence[uuid.UUID]) -> dict[uuid.UUID, set[uuid.UUID]]:
        """Cancel every new task downstream of `roots`; returns each with the prerequisites
        through which the failure reached it (the one its error names must be among them)."""
        reached: dict[uuid.UUID, set[uuid.UUID]] = {}
        frontier = set(roots)
        while frontier:
            layer = {
                k.id: frontier & set(k.prereqs)
                for k in self.model.values()
                if k.state is State.NEW and frontier & set(k.prereqs)
            }
            for tid in layer:
                self.model[tid].state = State.CANCELLED
            reached.update(layer)
            frontier = set(layer)
        return reached

    def _adopt_sunk(self, reached: dict[uuid.UUID, set[uuid.UUID]]) -> None:
        """Check that each dependency-cancelled task names a prerequisite that sank it."""
        for task in self.queue._read(lambda c: self.queue.store.get_many(c, list(reached))):
            error = task.error or {}
            named = uuid.UUID(error["prerequisite"]) if "prerequisite" in error else None
            assert task.state is State.CANCELLED and named in reached[task.id], (
                f"{_name(task.id)} is {task.state} with error {error}; expected it cancelled "
                f"naming one of "
                f"{sorted(_name(p) for p in reached[task.id])}"
            )
            self.model[task.id].sunk_by = named

    def _revive(self, tid: uuid.UUID) -> set[uuid.UUID]:
        """A retried task is new again, and so, transitively, is every task it had sunk;
        a revived task that still has a failed or cancelled prerequisite is sunk again by it
        at once (else it would wait forever). Returns every task revived."""
        revived: set[uuid.UUID] = set()
        frontier = {tid}
        while frontier:
            for r in frontier:
                k = self.model[r]
                k.state, k.attempt, k.not_before, k.sunk_by = State.NEW, 0, self.now, None
            revived |= frontier
            frontier = {
                k.id
                for k in self.model.values()
                if k.state is State.CANCELLED and k.sunk_by in frontier
            }
        still = {
            p for r in revived for p in self.model[r].prereqs if self.model[p].state in SINKING
        }
        self._adopt_sunk(self._sink(sorted(still)))
        return revived

    def _submit(self, specs: list[TaskSpec], group: uuid.UUID | None) -> list[Task]:
        if group is None:
            return self.queue.submit_many(specs)
        # "continue": the model knows prerequisites, not a group's stop at a failure.
        _, tasks = self.queue.submit_group(
            specs, group_id=group, name="random", on_failure="continue"
        )
        return tasks

    # -- rules ---------------------------------------------------------------------------

    @rule(plans=st.lists(spec_plans, min_size=1, max_size=4), grouped=st.booleans())
    def submit(self, plans: list[SpecPlan], grouped: bool) -> None:
        existing, base = list(self.model), len(self.model)
        specs, afters = [], []
        for k, p in enumerate(plans):
            after = [existing[o % len(existing)] for o in p.outside] if existing else []
            after += [_tid(base + i) for i in p.inside if i < k]
            afters.append(list(dict.fromkeys(after)))
            specs.append(
                TaskSpec(
                    "noop",
                    id=_tid(base + k),
                    after=afters[-1],
                    locks=p.locks,
                    priority=p.priority,
                    not_before=None if p.delay is None else self.now + timedelta(seconds=p.delay),
                    max_attempts=p.max_attempts,
                )
            )
            note(f"{_name(_tid(base + k))}: after {[_name(a) for a in afters[-1]]}")
        group = uuid.UUID(int=(len(self.batches) + 1) << 64) if grouped else None
        sunk = {a for after in afters for a in after if a in self.model} & {
            k.id for k in self.model.values() if k.state in SINKING
        }
        got = self._submit(specs, group)
        self.batches.append((specs, group))
        assert [t.id for t in got] == [spec.id for spec in specs]
        for spec, after, task in zip(specs, afters, got, strict=True):
            assert task.prerequisites == tuple(sorted(after)), (
                f"{_name(task.id)} has prerequisites {task.prerequisites}, submitted {after}"
            )
            self.model[task.id] = Known(
                task.id,
                len(self.model),
                tuple(after),
                tuple(sorted(spec.locks)),
                spec.priority,
                spec.max_attempts,
                spec.not_before or self.now,
            )
        self._adopt_sunk(self._sink(sorted(sunk)))

    @precondition(lambda self: bool(self.batches))
    @rule(which=st.integers(0, 63))
    def resubmit(self, which: int) -> None:
        """Submitting the same tasks again returns them and changes nothing."""
        specs, group = self.batches[which % len(self.batches)]
        before = sum(len(es) for es in _all_events(self.queue.store).values())
        got = self._submit(specs, group)
        assert [t.id for t in got] == [spec.id for spec in specs]
        after = sum(len(es) for es in _all_events(self.queue.store).values())
        assert after == before, f"resubmitting wrote {after - before} event(s)"

    @rule(owner=st.sampled_from(OWNERS), n=st.integers(1, 4))
    def claim(self, owner: uuid.UUID, n: int) -> None:
        before = self.queue.runnable()
        order = [t.id for t in before]
        cycle = self.queue.cycle(owner, [], n, LEASE)
        got = [t.id for t in cycle.claimed]
        names = [_name(g) for g in got]
        assert set(got) <= set(order), (
            f"claimed {names}, but only {[_name(r) for r in order]} were runnable"
        )
        positions = [order.index(g) for g in got]
        assert positions == sorted(positions), f"claimed {names} out of priority-then-age order"
        for a, b in itertools.combinations(cycle.claimed, 2):
            assert not set(a.locks) & set(b.locks), (
                f"one claim took {_name(a.id)} and {_name(b.id)}, which share "
                f"{sorted(set(a.locks) & set(b.locks))}"
            )
        want = _greedy(before, n)
        assert got == want, f"claimed {names}; the runnable order implies {_greedy(before, n)}"
        if len(got) < n:
            due = [
                k.not_before
                for k in self.model.values()
                if k.state is State.NEW
                and k.not_before > self.now
                and all(self.model[p].state is State.COMPLETE for p in k.prereqs)
            ]
            assert cycle.next_due == min(due, default=None), (
                f"next_due {cycle.next_due}, the earliest delayed unblocked task is due "
                f"{min(due, default=None)}"
            )
        for task in cycle.claimed:
            k = self.model[task.id]
            k.state, k.attempt, k.owner = State.RUNNING, k.attempt + 1, owner
            k.lease_until = self.now + timedelta(seconds=LEASE)
            assert (task.state, task.attempt, task.owner) == (k.state, k.attempt, owner)

    @precondition(lambda self: self._has(State.RUNNING))
    @rule(which=st.integers(0, 15), outcome=st.sampled_from([OK, FAIL, FATAL]))
    def finish(self, which: int, outcome: str) -> None:
        k = self._pick(which, State.RUNNING)
        task = self.queue.get(k.id)
        if outcome == OK:
            done = Outcome(task, True, result={"ok": True})
        else:
            error = {"type": "Planned", "message": f"planned {outcome}"}
            done = Outcome(task, False, error=error, permanent=outcome == FATAL)
        cycle = self.queue.cycle(k.owner or OWNERS[0], [done], 0, LEASE)
        assert cycle.refused == {}, f"the owner's outcome for {_name(k.id)} was refused"
        k.lease_until = None
        if outcome == OK:
            k.state = State.COMPLETE
        elif outcome == FATAL or k.attempt >= k.max_attempts:
            k.state = State.FAILED
            self._adopt_sunk(self._sink([k.id]))
        else:
            k.state, k.owner = State.NEW, None
            k.not_before = self.queue.get(k.id).not_before
            base = min(
                defaults.RETRY_BACKOFF_BASE_SECONDS * 2 ** (k.attempt - 1),
                defaults.RETRY_BACKOFF_MAX_SECONDS,
            )
            delay = (k.not_before - self.now).total_seconds()
            low, high = base * (1 - defaults.RETRY_JITTER), base * (1 + defaults.RETRY_JITTER)
            assert low - 1e-6 <= delay <= high + 1e-6, (
                f"retry of {_name(k.id)} after attempt {k.attempt} is due in {delay}s, "
                f"not within [{low}, {high}]"
            )

    @precondition(lambda self: self._has())
    @rule(which=st.integers(0, 63), ok=st.booleans())
    def stale_finish(self, which: int, ok: bool) -> None:
        """An outcome from a dispatcher that does not own the task is refused, changing nothing."""
        k = self._pick(which)
        if k.state is State.RUNNING:
            owner = OWNERS[1] if k.owner == OWNERS[0] else OWNERS[0]
        else:
            owner = OWNERS[which % 2]
        error = {"type": "Planned", "message": "late"}
        cycle = self.queue.cycle(owner, [Outcome(self.queue.get(k.id), ok, error=error)], 0, LEASE)
        assert cycle.refused == {k.id: k.state}, (
            f"a stale outcome for {_name(k.id)} ({k.state}) came back refused={cycle.refused}"
        )

    @precondition(lambda self: self._has())
    @rule(which=st.integers(0, 63))
    def cancel(self, which: int) -> None:
        k = self._pick(which)
        if k.state in (State.RUNNING, State.WAITING):
            # Asked to stop, not cancelled: it stays where it is until its run has ended.
            [asked] = self.queue.cancel(k.id, reason="changed my mind")
            assert (asked.id, asked.state) == (k.id, k.state)
            assert asked.stop_request and asked.stop_request["reason"] == "cancel"
            return
        if k.state is not State.NEW:
            with pytest.raises(errors.InvalidTransition):
                self.queue.cancel(k.id)
            return
        got = {t.id for t in self.queue.cancel(k.id, reason="changed my mind")}
        k.state, k.sunk_by = State.CANCELLED, None
        reached = self._sink([k.id])
        assert got == {k.id, *reached}, (
            f"cancelling {_name(k.id)} cancelled {sorted(map(_name, got))}, expected "
            f"{sorted(map(_name, {k.id, *reached}))}"
        )
        self._adopt_sunk(reached)

    @precondition(lambda self: self._has())
    @rule(which=st.integers(0, 63))
    def retry(self, which: int) -> None:
        k = self._pick(which)
        blocked = [p for p in k.prereqs if self.model[p].state in SINKING]
        if k.state not in SINKING or blocked:
            with pytest.raises(errors.InvalidTransition):
                self.queue.retry(k.id)
            return
        got = {t.id for t in self.queue.retry(k.id)}
        revived = self._revive(k.id)
        assert got == revived, (
            f"retrying {_name(k.id)} revived {sorted(map(_name, got))}, expected "
            f"{sorted(map(_name, revived))}"
        )

    @rule(owner=st.sampled_from(OWNERS), limit=st.integers(1, 4))
    def take_over(self, owner: uuid.UUID, limit: int) -> None:
        """Tasks whose lease expired go to whoever takes them over, earliest lease first."""
        expired = [
            k
            for k in self.model.values()
            if k.state is State.RUNNING and k.lease_until and k.lease_until < self.now
        ]
        got = {t.id for t in self.queue.take_over(owner, limit, LEASE)}
        assert got <= {k.id for k in expired} and len(got) == min(limit, len(expired)), (
            f"took over {sorted(map(_name, got))} (limit {limit}); expired: "
            f"{sorted(_name(k.id) for k in expired)}"
        )
        taken = [k for k in expired if k.id in got]
        left = [k for k in expired if k.id not in got]
        if taken and left:
            assert max(k.lease_until for k in taken if k.lease_until) <= min(
                k.lease_until for k in left if k.lease_until
            ), "take_over skipped an earlier-expired lease"
        for k in taken:
            k.owner, k.lease_until = owner, self.now + timedelta(seconds=LEASE)

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, 5.0, 15.0, 40.0]))
    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    # -- after every step ------------------------------------------------------------------

    @invariant()
    def agrees(self) -> None:
        """The rows match the model, and the runnable query matches its definition."""
        rows = {t.id: t for t in self.queue.list(limit=defaults.MAX_LIST_LIMIT).tasks}
        assert set(rows) == set(self.model)
        for k in self.model.values():
            t = rows[k.id]
            got = (t.state, t.attempt, t.not_before)
            assert got == (k.state, k.attempt, k.not_before), (
                f"{_name(k.id)} is {got}, the model expects {(k.state, k.attempt, k.not_before)}"
            )
            if k.state is State.RUNNING:
                assert (t.owner, t.lease_until) == (k.owner, k.lease_until), (
                    f"{_name(k.id)} runs for {t.owner} until {t.lease_until}; the model says "
                    f"{k.owner} until {k.lease_until}"
                )

        held = {
            key
            for t in rows.values()
            if t.state in (State.RUNNING, State.WAITING)
            for key in t.locks
        }
        definition = sorted(
            (
                t
                for t in rows.values()
                if t.state is State.NEW
                and all(rows[p].state is State.COMPLETE for p in self.model[t.id].prereqs)
                and t.not_before <= self.now
                and held.isdisjoint(t.locks)
            ),
            key=lambda t: (-t.priority, self.model[t.id].order),
        )
        query = self.queue.runnable()
        assert [t.id for t in query] == [t.id for t in definition], (
            f"runnable() says {[_name(t.id) for t in query]}, the definition says "
            f"{[_name(t.id) for t in definition]}"
        )

        for t in rows.values():
            sinking = [p for p in self.model[t.id].prereqs if rows[p].state in SINKING]
            assert t.state is not State.NEW or not sinking, (
                f"{_name(t.id)} is new, but its prerequisite {_name(sinking[0])} is "
                f"{rows[sinking[0]].state}: it would wait forever"
            )
            named = (t.error or {}).get("prerequisite") if t.state is State.CANCELLED else None
            if named is not None:
                assert rows[uuid.UUID(named)].state in SINKING, (
                    f"{_name(t.id)} is cancelled naming prerequisite {_name(uuid.UUID(named))}, "
                    f"which is {rows[uuid.UUID(named)].state}"
                )

        holders = {
            (key, t.id)
            for t in rows.values()
            if t.state in (State.RUNNING, State.WAITING)
            for key in t.locks
        }
        assert _held_locks(self.queue.store) == holders, "held locks differ from running tasks"
        problems = _audit(self.queue.store)
        assert problems == [], f"audit found: {problems}"
        events = _all_events(self.queue.store)
        for t in rows.values():
            problem = _path_problem(t, events.get(t.id, []))
            assert problem is None, problem


def test_queue_model(databases: Databases) -> None:
    """The fast dispatch path and the one runnable definition always agree.

    Proves, over random sequences of submit (groups, edges to existing tasks, locks,
    priorities, delays), resubmit, claim, finish (success, retryable or permanent failure),
    stale outcomes, cancel, retry, lease takeover and clock advances: after every step the
    rows match a model of the state machine; `runnable()` equals a definition written here
    (new, prerequisites complete, due, no key held by a running task) in priority-then-age
    order; each claim takes exactly what that order and the locks allow, never two tasks
    sharing a key; no new task waits on a failed or cancelled prerequisite; held locks are
    exactly the running tasks' keys; the audit is clean; events are legal moves.
    """

    class Machine(QueueMachine):
        pass

    Machine.databases = databases
    run_state_machine_as_test(Machine, settings=_settings(20, stateful_step_count=30))
