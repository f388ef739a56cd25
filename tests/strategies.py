"""Hypothesis strategies for the property tests: random task DAGs with locks, fates and retries."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from hypothesis import strategies as st

from taskomatic.model import State

LOCK_POOL = ("vm:a", "vm:b", "host:h")
"""Few lock keys, so tasks that share one are common."""

OK = "ok"
"""An attempt that succeeds."""

FAIL = "fail"
"""An attempt that raises an ordinary exception: retried while attempts are left."""

FATAL = "fatal"
"""An attempt that raises `ActionFailed`: the task fails at once, attempts left or not."""


@dataclass(frozen=True)
class PlannedTask:
    """One task of a random DAG: prerequisites (indexes of earlier tasks), locks and fate."""

    after: tuple[int, ...]
    locks: tuple[str, ...]
    priority: int
    max_attempts: int
    outcomes: tuple[str, ...]
    """What attempt 1, 2, … does; exactly one entry per allowed attempt."""
    pause: float
    """How long each attempt of the action runs (seconds)."""

    def fate(self) -> tuple[State, int]:
        """The state the task ends in once it runs, and the attempts that takes."""
        for attempt, outcome in enumerate(self.outcomes, start=1):
            if outcome == OK:
                return State.COMPLETE, attempt
            if outcome == FATAL:
                return State.FAILED, attempt
        return State.FAILED, self.max_attempts


@dataclass(frozen=True)
class Plan:
    """A random DAG, how it is submitted, and how many workers run it."""

    tasks: tuple[PlannedTask, ...]
    cuts: tuple[int, ...]
    """Submission boundaries: each submission is tasks[a:b] for consecutive boundaries."""
    grouped: bool
    """Submit each part as a group (command) rather than as loose tasks."""
    start_first: bool
    """Start the dispatcher before submitting (else submit everything, then start it)."""
    workers: int

    def batches(self) -> list[range]:
        """The index ranges submitted together, in submission order."""
        edges = [0, *self.cuts, len(self.tasks)]
        return [range(a, b) for a, b in itertools.pairwise(edges)]

    def expected(self) -> list[tuple[State, int]]:
        """Each task's final state and attempt count, whatever order things ran in."""
        out: list[tuple[State, int]] = []
        for task in self.tasks:
            if all(out[p][0] is State.COMPLETE for p in task.after):
                out.append(task.fate())
            else:
                out.append((State.CANCELLED, 0))
        return out

    def descendants(self, roots: Iterable[int]) -> set[int]:
        """Every task downstream of `roots`, transitively (the roots themselves excluded)."""
        found: set[int] = set()
        sinking = set(roots)
        for i, task in enumerate(self.tasks):  # prerequisites always come first
            if any(p in sinking or p in found for p in task.after):
                found.add(i)
        return found - set(roots)

    def describe(self) -> str:
        """The plan as lines a person can read back from a failure report."""
        lines = [
            f"{len(self.tasks)} tasks, {self.workers} workers, submitted as "
            f"{[f'{r.start}-{r.stop - 1}' for r in self.batches()]}"
            f"{' in groups' if self.grouped else ''}, dispatcher started "
            f"{'before' if self.start_first else 'after'} submitting"
        ]
        for i, t in enumerate(self.tasks):
            lines.append(
                f"  task {i}: after={list(t.after)} locks={list(t.locks)} priority={t.priority} "
                f"attempts={'/'.join(t.outcomes)} pause={t.pause * 1000:g}ms"
            )
        return "\n".join(lines)


@st.composite
def plans(draw: st.DrawFn, max_tasks: int = 25) -> Plan:
    """Random DAGs of 1 to `max_tasks` tasks, edges only from later to earlier tasks."""
    n = draw(st.integers(1, max_tasks))
    tasks = []
    for i in range(n):
        after = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        max_attempts = draw(st.integers(1, 3))
        tasks.append(
            PlannedTask(
                after=tuple(sorted(after)),
                locks=tuple(sorted(draw(st.sets(st.sampled_from(LOCK_POOL), max_size=2)))),
                priority=draw(st.integers(0, 2)),
                max_attempts=max_attempts,
                # Mostly successes, so that DAGs get deep before a failure sinks them.
                outcomes=tuple(
                    draw(
                        st.lists(
                            st.sampled_from((OK, OK, OK, FAIL, FATAL)),
                            min_size=max_attempts,
                            max_size=max_attempts,
                        )
                    )
                ),
                pause=draw(st.sampled_from((0.0, 0.001, 0.004))),
            )
        )
    cuts = draw(st.sets(st.integers(1, n - 1), max_size=3)) if n > 1 else set()
    return Plan(
        tasks=tuple(tasks),
        cuts=tuple(sorted(cuts)),
        grouped=draw(st.booleans()),
        start_first=draw(st.booleans()),
        workers=draw(st.integers(1, 4)),
    )
