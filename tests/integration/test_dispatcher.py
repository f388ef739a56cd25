"""The in-process dispatcher: order, timers, retries, timeouts, wake-ups, takeover and shutdown."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from helpers import (
    Gate,
    OffsetClock,
    assert_timelines_consistent,
    audit,
    claim,
    complete,
    held_locks,
    open_queue,
    running_dispatcher,
    wait_until,
)

from taskomatic import (
    Check,
    Context,
    Dispatcher,
    Param,
    Queue,
    Registry,
    State,
    TaskSpec,
    defaults,
)
from taskomatic.errors import ActionFailed
from taskomatic.model import Dispatcher as DispatcherRow


def _recording_registry() -> tuple[Registry, list[Any], threading.Lock]:
    """A registry whose `record` action appends its `n` parameter to a shared list."""
    registry = Registry()
    seen: list[Any] = []
    guard = threading.Lock()

    @registry.action("record", params={"n": Param(int, default=0)})
    def record(ctx: Context) -> int:
        with guard:
            seen.append(ctx.params["n"])
        return int(ctx.params["n"])

    return registry, seen, guard


# -- order and timers ---------------------------------------------------------------------


def test_priority_then_age_with_one_worker(db_url: str) -> None:
    """One worker runs higher priorities first and, among equals, older first."""
    registry, seen, _ = _recording_registry()
    priorities = [0, 5, 0, 10, 5, -1, 10, 0]
    with open_queue(db_url, registry=registry) as queue:
        tasks = queue.submit_many(
            [TaskSpec("record", {"n": i}, priority=p) for i, p in enumerate(priorities)]
        )
        with running_dispatcher(queue, workers=1):
            queue.wait([t.id for t in tasks], timeout=15)
    expected = sorted(range(len(priorities)), key=lambda i: (-priorities[i], i))
    assert seen == expected


def test_wakes_on_insert_and_on_each_state_change_without_polling(db_url: str) -> None:
    """A 20-task chain submitted to an idle dispatcher runs hop to hop, not poll to poll."""
    with open_queue(db_url) as queue, running_dispatcher(queue, poll=30, workers=2):
        time.sleep(0.1)  # idle, asleep until its 30 s poll
        started = time.monotonic()
        specs = [TaskSpec("noop", name="t0")]
        specs += [TaskSpec("noop", name=f"t{i}", after=[f"t{i - 1}"]) for i in range(1, 20)]
        tasks = queue.submit_many(specs)
        done = queue.wait([t.id for t in tasks], timeout=25)
        elapsed = time.monotonic() - started
        assert all(t.state is State.COMPLETE for t in done)
        assert elapsed < 10, f"20 hops took {elapsed:.1f}s"
        starts = [t.started_at for t in done]
        assert starts == sorted(starts)  # type: ignore[type-var]


def test_not_before_is_respected_and_met_by_a_timer(db_url: str) -> None:
    """A delayed task starts no earlier than not_before, and soon after it, not at the poll."""
    registry = Registry()
    started: list[datetime] = []

    with open_queue(db_url, registry=registry) as queue:

        @registry.action("stamp")
        def stamp(ctx: Context) -> None:
            started.append(queue.now())

        with running_dispatcher(queue, poll=30):
            when = queue.now() + timedelta(seconds=0.6)
            task = queue.submit("stamp", not_before=when)
            (done,) = queue.wait(task.id, timeout=20)
    assert done.state is State.COMPLETE
    (at,) = started
    assert at >= when
    assert (at - when).total_seconds() < 3, "started long after not_before: waited for a poll?"


def test_max_attempts_with_backoff(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed attempts are retried after a growing, recorded delay, until one succeeds."""
    monkeypatch.setattr(defaults, "RETRY_BACKOFF_BASE_SECONDS", 0.1)
    registry = Registry()
    starts: list[float] = []

    @registry.action("flaky")
    def flaky(ctx: Context) -> str:
        starts.append(time.monotonic())
        if ctx.attempt < 3:
            raise ConnectionError(f"host unreachable (attempt {ctx.attempt})")
        return "up"

    with open_queue(db_url, registry=registry) as queue:
        task = queue.submit("flaky", max_attempts=3)
        with running_dispatcher(queue, poll=30):
            (done,) = queue.wait(task.id, timeout=15)
        assert (done.state, done.attempt, done.result) == (State.COMPLETE, 3, "up")
        assert done.error is None, "a completed task carries no error of an earlier attempt"
        events = queue.events(task.id)
        retries = [e for e in events if (e.from_state, e.to_state) == (State.RUNNING, State.NEW)]
        assert [e.message.split("; retry at ")[0] for e in retries] == [
            "attempt 1 failed: host unreachable (attempt 1)",
            "attempt 2 failed: host unreachable (attempt 2)",
        ]
        assert all("; retry at " in e.message for e in retries)
        assert_timelines_consistent(queue, [task.id])
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.1 * 0.8 and gaps[1] >= 0.2 * 0.8, gaps
    assert max(gaps) < 5


def test_attempts_run_out(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After max_attempts failures the task fails with the last error and attempt number."""
    monkeypatch.setattr(defaults, "RETRY_BACKOFF_BASE_SECONDS", 0.05)
    with open_queue(db_url) as queue:
        task = queue.submit("fail", {"message": "no such domain"}, max_attempts=2)
        with running_dispatcher(queue):
            (done,) = queue.wait(task.id, timeout=10)
    assert (done.state, done.attempt) == (State.FAILED, 2)
    assert done.error is not None
    assert (done.error["type"], done.error["message"], done.error["attempt"]) == (
        "RuntimeError",
        "no such domain",
        2,
    )
    assert "traceback" in done.error


def test_action_failed_fails_at_once(db_url: str) -> None:
    """ActionFailed means "retrying cannot help": no further attempts."""
    registry = Registry()

    @registry.action("refuse")
    def refuse(ctx: Context) -> None:
        raise ActionFailed("VM web1 is locked by an operator")

    with open_queue(db_url, registry=registry) as queue:
        task = queue.submit("refuse", max_attempts=5)
        with running_dispatcher(queue):
            (done,) = queue.wait(task.id, timeout=10)
    assert (done.state, done.attempt) == (State.FAILED, 1)
    assert done.error is not None
    assert (done.error["type"], done.error["message"]) == (
        "ActionFailed",
        "VM web1 is locked by an operator",
    )


def test_a_result_that_is_not_json_fails_clearly(db_url: str) -> None:
    """An action returning something unstorable fails its task, saying so, without retries."""
    registry = Registry()
    registry.action("odd")(lambda ctx: {"when": object()})
    with open_queue(db_url, registry=registry) as queue:
        task = queue.submit("odd", max_attempts=3)
        with running_dispatcher(queue):
            (done,) = queue.wait(task.id, timeout=10)
    assert (done.state, done.attempt) == (State.FAILED, 1)
    assert done.error is not None and done.error["type"] == "BadResult"
    assert "not JSON" in done.error["message"]


def test_an_action_unknown_to_the_dispatcher_fails_clearly(db_url: str) -> None:
    """A task whose action this dispatcher lacks fails with how to fix it, once."""
    submitter_registry = Registry()
    submitter_registry.action("billing.export")(lambda ctx: None)
    with (
        open_queue(db_url, registry=submitter_registry) as producer,
        open_queue(db_url) as runner,
    ):
        task = producer.submit("billing.export", max_attempts=3)
        with running_dispatcher(runner):
            (done,) = runner.wait(task.id, timeout=10)
    assert (done.state, done.attempt) == (State.FAILED, 1)
    assert done.error is not None and done.error["type"] == "UnknownAction"
    assert "'billing.export' is not registered in this dispatcher" in done.error["message"]
    assert "--actions" in done.error["message"]


# -- timeouts ----------------------------------------------------------------------------------


def test_timeout_fails_a_running_task_and_discards_its_late_outcome(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Past its timeout the task fails at once (no retry); when the action returns, it stays so."""
    caplog.set_level(logging.INFO, logger="taskomatic")
    registry = Registry()
    gate = Gate()
    returned = threading.Event()

    @registry.action("stuck")
    def stuck(ctx: Context) -> str:
        gate.wait()  # a hypervisor call that ignores the stop request
        returned.set()
        return "finished late"

    with open_queue(db_url, registry=registry) as queue:
        task = queue.submit("stuck", timeout=0.3, max_attempts=3)
        with running_dispatcher(queue, grace=2):
            try:
                (failed,) = queue.wait(task.id, timeout=10)
                assert not returned.is_set(), "the action is still running"
            finally:
                gate.open()
            wait_until(returned.is_set, what="the action to return")
            wait_until(
                lambda: any(
                    f"outcome of task {task.id} discarded" in r.getMessage() for r in caplog.records
                ),
                what="the late outcome to be refused",
            )
        final = queue.get(task.id)
        assert failed.state is State.FAILED and failed.attempt == 1
        assert failed.error is not None
        assert failed.error["type"] == "Timeout"
        assert failed.error["message"] == "timed out after 0.3s"
        assert final == failed, "the late outcome changed the task"
        assert [(e.from_state, e.to_state) for e in queue.events(task.id)][-1] == (
            State.RUNNING,
            State.FAILED,
        )


def test_a_cooperative_action_stops_at_its_timeout_and_frees_its_worker(db_url: str) -> None:
    """An action that honours ctx.stop ends at the timeout, so the next task runs at once."""
    with open_queue(db_url) as queue:
        slow = queue.submit("sleep", {"seconds": 30}, timeout=0.3)
        after = queue.submit("noop")
        with running_dispatcher(queue, workers=1):
            started = time.monotonic()
            done = queue.wait([slow.id, after.id], timeout=10)
            elapsed = time.monotonic() - started
    assert [t.state for t in done] == [State.FAILED, State.COMPLETE]
    assert done[0].error is not None and done[0].error["type"] == "Timeout"
    assert elapsed < 5


# -- the safety poll ----------------------------------------------------------------------------


def _insert_behind_the_queues_back(queue: Queue, not_before: datetime) -> uuid.UUID:
    """A task row written straight through the store: no NOTIFY, no in-process signal."""
    tid = uuid.uuid4()
    now = queue.now()
    row = {
        "id": tid,
        "action": "noop",
        "params": {},
        "state": State.NEW,
        "priority": 0,
        "not_before": not_before,
        "timeout": None,
        "max_attempts": 1,
        "attempt": 0,
        "locks": [],
        "group_id": None,
        "created_by": None,
        "created_at": now,
        "updated_at": now,
        "pending": 0,
    }
    with queue.store.write() as conn:
        queue.store.insert_tasks(conn, [row], [], [])
        queue.store.insert_events(conn, [(tid, None, State.NEW, "submitted")], "test", now)
    return tid


def test_safety_poll_warns_about_a_missed_wake_up_and_still_runs_the_task(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A runnable task no wake-up announced is found by the poll, logged with its id, and run."""
    caplog.set_level(logging.WARNING, logger="taskomatic")
    clock = OffsetClock()

    def warned(tid: uuid.UUID) -> bool:
        return any(
            r.levelno == logging.WARNING
            and f"safety poll found task {tid} runnable" in r.getMessage()
            for r in caplog.records
        )

    hidden: list[uuid.UUID] = []
    with (
        open_queue(db_url, clock=clock) as queue,
        running_dispatcher(queue, poll=0.2) as dispatcher,
    ):
        # Each loop turn runs the poll and then a claim; a clock jump landing between the
        # two is claimed without a report (rightly), so the scenario gets a few chances.
        for _ in range(3):
            # Due in an hour: whatever wakes the dispatcher now (SQLite sees every
            # commit) finds nothing to claim.
            hidden.append(_insert_behind_the_queues_back(queue, clock() + timedelta(hours=1)))
            time.sleep(0.3)  # any wake-up that commit caused has come and gone
            clock.advance(2 * 3600)  # due now, and nothing tells the dispatcher
            (done,) = queue.wait(hidden[-1], timeout=10)
            assert done.state is State.COMPLETE
            if warned(hidden[-1]):
                break
        reported = [tid for tid in hidden if warned(tid)]
        assert reported, [r.getMessage() for r in caplog.records]
        assert dispatcher.missed_wakeups == len(reported)


def test_no_safety_poll_warning_in_normal_operation(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Work announced through the API never trips the safety poll."""
    caplog.set_level(logging.WARNING, logger="taskomatic")
    with open_queue(db_url) as queue, running_dispatcher(queue, poll=0.1) as dispatcher:
        for _ in range(3):
            tasks = queue.submit_many([TaskSpec("noop") for _ in range(5)])
            queue.wait([t.id for t in tasks], timeout=10)
            time.sleep(0.15)
        assert dispatcher.missed_wakeups == 0
    assert not [r for r in caplog.records if "safety poll" in r.getMessage()]


# -- the worker pool ------------------------------------------------------------------------------


def test_claims_never_exceed_the_workers(db_url: str) -> None:
    """With two workers, two tasks run and the rest wait for a worker, as `why` says."""
    registry = Registry()
    gate = Gate()
    registry.action("hold")(lambda ctx: gate.wait())
    with open_queue(db_url, registry=registry) as queue:
        tasks = queue.submit_many([TaskSpec("hold") for _ in range(5)])
        try:
            with running_dispatcher(queue, workers=2):
                wait_until(lambda: queue.counts().get(State.RUNNING) == 2, what="two running")
                time.sleep(0.2)
                assert queue.counts() == {State.RUNNING: 2, State.NEW: 3}
                waiting = next(t for t in queue.list(state="new").tasks)
                assert [b.kind for b in queue.why(waiting.id).blockers] == ["worker"]
                gate.open()
                done = queue.wait([t.id for t in tasks], timeout=10)
        finally:
            gate.open()
    assert all(t.state is State.COMPLETE for t in done)


def test_heartbeats_keep_a_long_lease_dispatcher_alive(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dispatcher with a long lease still heartbeats often enough to count as alive."""
    monkeypatch.setattr(defaults, "HEARTBEAT_SECONDS", 0.1)
    clock = OffsetClock()
    with open_queue(db_url, clock=clock) as queue, running_dispatcher(queue, lease=300) as d:
        wait_until(queue.dispatchers, what="the dispatcher to register")
        clock.advance(defaults.DISPATCHER_DEAD_AFTER_SECONDS + 30)
        (alive,) = wait_until(queue.dispatchers, timeout=3, what="a fresh heartbeat")
        assert alive.id == d.id


# -- lease takeover ----------------------------------------------------------------------------


def _orphan(queue: Any, action: str, lease: float = 0.3) -> tuple[uuid.UUID, Any]:
    """Submit and claim a task for a dispatcher that then dies (never renews, never reports)."""
    dead = uuid.uuid4()
    task = queue.submit(action)
    (claimed,) = claim(queue, dead, 1, lease=lease)
    assert claimed.id == task.id
    return dead, claimed


@pytest.mark.parametrize(
    ("check", "state", "result", "ran"),
    [
        (Check.done({"found": "running on h1"}), State.COMPLETE, {"found": "running on h1"}, 0),
        (Check.not_started(), State.COMPLETE, "ran", 1),
        (Check.diverged("VM web1 runs on h2, not h1"), State.FAILED, None, 0),
        (None, State.COMPLETE, "ran", 1),
    ],
    ids=["done", "not_started", "diverged", "no_check"],
)
def test_an_expired_lease_is_taken_over_after_checking(
    db_url: str, check: Check | None, state: State, result: Any, ran: int
) -> None:
    """A live dispatcher adopts a dead one's task and lets `check` decide what to do."""
    registry = Registry()
    runs: list[uuid.UUID] = []
    checks: list[uuid.UUID] = []

    def run(ctx: Context) -> str:
        runs.append(ctx.task_id)
        return "ran"

    def probe(ctx: Context) -> Check:
        checks.append(ctx.task_id)
        assert check is not None
        return check

    registry.action("vm.ensure", check=probe if check else None)(run)
    with open_queue(db_url, registry=registry) as queue:
        dead, orphan = _orphan(queue, "vm.ensure")
        with running_dispatcher(queue, recovery=0.1) as rescuer:
            (done,) = queue.wait(orphan.id, timeout=10)
        assert done.state is state
        assert done.result == result
        assert len(runs) == ran
        assert checks == ([orphan.id] if check else [])
        if state is State.FAILED:
            assert done.error is not None
            assert (done.error["type"], done.error["message"]) == (
                "Diverged",
                "VM web1 runs on h2, not h1",
            )
        events = queue.events(orphan.id)
        takeover = [e for e in events if (e.from_state, e.to_state) == (State.RUNNING,) * 2]
        assert len(takeover) == 1
        assert takeover[0].actor == f"dispatcher:{rescuer.id}"
        assert f"taken over from dispatcher {dead}" in takeover[0].message
        assert done.attempt == 1, "a takeover continues the attempt, it does not start one"
        assert_timelines_consistent(queue, [orphan.id])
        assert audit(queue) == []


def test_a_late_report_from_the_old_owner_cannot_overwrite_the_rescuer(db_url: str) -> None:
    """After a takeover the presumed-dead owner's outcome is refused (guarded by owner)."""
    registry = Registry()
    gate = Gate()

    @registry.action("vm.ensure", locks=lambda params: ["vm:web1"])
    def ensure(ctx: Context) -> str:
        gate.wait()
        return "rescuer's result"

    with open_queue(db_url, registry=registry) as queue:
        dead, orphan = _orphan(queue, "vm.ensure")
        try:
            with running_dispatcher(queue, recovery=0.1) as rescuer:
                assert gate.entered.wait(10), "the rescuer never ran the task"
                cycle = complete(queue, dead, orphan, result="old owner's result")
                assert cycle.refused == {orphan.id: State.RUNNING}
                now = queue.get(orphan.id)
                assert (now.state, now.owner, now.result) == (State.RUNNING, rescuer.id, None)
                assert held_locks(queue) == {"vm:web1": orphan.id}
                gate.open()
                (done,) = queue.wait(orphan.id, timeout=10)
        finally:
            gate.open()
        assert (done.state, done.result) == (State.COMPLETE, "rescuer's result")
        completions = [e for e in queue.events(orphan.id) if e.to_state is State.COMPLETE]
        assert [e.actor for e in completions] == [f"dispatcher:{rescuer.id}"]


def test_a_task_its_owner_completed_is_never_taken_over(db_url: str) -> None:
    """A completion just before the lease would have expired stands; rescuers find nothing."""
    clock = OffsetClock()
    with open_queue(db_url, clock=clock) as queue:
        owner, task = _orphan(queue, "noop", lease=0.3)
        complete(queue, owner, task, result="owner's result")
        clock.advance(60)
        assert queue.take_over(uuid.uuid4(), 10, 5.0) == []
        done = queue.get(task.id)
        assert (done.state, done.result, done.owner) == (State.COMPLETE, "owner's result", owner)
        # Whereas a task still running past its lease is adopted.
        _, other = _orphan(queue, "noop", lease=0.3)
        clock.advance(60)
        rescuer = uuid.uuid4()
        (adopted,) = queue.take_over(rescuer, 10, 5.0)
        assert (adopted.id, adopted.owner, adopted.state) == (other.id, rescuer, State.RUNNING)


# -- shutdown ---------------------------------------------------------------------------------


def test_stop_lets_a_running_action_finish_within_the_grace(db_url: str) -> None:
    """stop(grace) waits for running actions and records their outcome."""
    with open_queue(db_url) as queue:
        task = queue.submit("sleep", {"seconds": 0.3})
        dispatcher = Dispatcher(queue, workers=2).start()
        wait_until(lambda: queue.get(task.id).state is State.RUNNING, what="the task to run")
        dispatcher.stop(grace=10)
        done = queue.get(task.id)
        assert done.state is State.COMPLETE
        assert done.result is not None and done.result["slept"] >= 0.3
        assert queue.events(task.id)[-1].actor == f"dispatcher:{dispatcher.id}"
        assert queue.dispatchers() == []


def test_stop_with_a_short_grace_hands_the_task_over_at_once(db_url: str) -> None:
    """Unfinished work is asked to stop, and its lease expires now, not a full lease later."""
    registry = Registry()
    runs: list[int] = []
    stopped = threading.Event()

    @registry.action("migrate")
    def migrate(ctx: Context) -> str:
        runs.append(ctx.attempt)
        if len(runs) == 1:
            if ctx.stop.wait(10):
                stopped.set()
            raise RuntimeError("interrupted by shutdown")
        return "migrated"

    with open_queue(db_url, registry=registry) as queue:
        task = queue.submit("migrate")
        first = Dispatcher(queue, lease=30).start()
        wait_until(lambda: runs, what="the first run")
        first.stop(grace=0.1)
        left = queue.get(task.id)
        assert left.state is State.RUNNING and left.owner == first.id
        assert left.lease_until is not None and left.lease_until <= queue.now()
        assert stopped.wait(5), "the action was not asked to stop"
        started = time.monotonic()
        with running_dispatcher(queue, lease=30, recovery=0.1) as second:
            (done,) = queue.wait(task.id, timeout=10)
        assert time.monotonic() - started < 5, "waited for the old lease to run out"
        assert (done.state, done.result, done.owner) == (State.COMPLETE, "migrated", second.id)
        assert runs == [1, 1]


def test_a_dead_dispatcher_row_does_not_count_as_a_worker(db_url: str) -> None:
    """`why` reflects dispatchers coming and going, through their heartbeat rows."""
    with open_queue(db_url) as queue:
        task = queue.submit("noop", not_before=queue.now() + timedelta(hours=1))
        row = DispatcherRow(uuid.uuid4(), "h", os.getpid(), 1, queue.now(), queue.now(), None)
        queue.register_dispatcher(row)
        assert [d.id for d in queue.dispatchers()] == [row.id]
        queue.dispatcher_stopped(row.id, [])
        assert queue.dispatchers() == []
        assert [b.kind for b in queue.why(task.id).blockers] == ["not_before"]
