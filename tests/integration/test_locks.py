"""Locks: tasks sharing a key never overlap, older first, released the moment the holder ends."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from helpers import (
    Gate,
    audit,
    claim,
    finish_and_claim,
    held_locks,
    open_queue,
    running_dispatcher,
)

from taskomatic import Context, Param, Queue, Registry, State, TaskSpec
from taskomatic.queue import Outcome


@pytest.fixture
def queue(db_url: str) -> Iterator[Queue]:
    with open_queue(db_url) as q:
        yield q


def test_tasks_sharing_a_key_never_overlap(db_url: str) -> None:
    """With many workers, runs of tasks that share any key are disjoint in time."""
    registry = Registry()
    guard = threading.Lock()
    spans: list[tuple[frozenset[str], float, float]] = []

    @registry.action("touch", params={"keys": list, "seconds": Param(float, default=0.02)})
    def touch(ctx: Context) -> None:
        started = time.monotonic()
        time.sleep(ctx.params["seconds"])
        with guard:
            spans.append((frozenset(ctx.params["keys"]), started, time.monotonic()))

    key_sets = [["vm:a"], ["vm:b"], ["vm:c"], ["vm:a", "host:1"], ["vm:b", "host:1"], ["host:1"]]
    specs = [TaskSpec("touch", {"keys": keys}, locks=keys) for _ in range(4) for keys in key_sets]
    with open_queue(db_url, registry=registry) as queue:
        tasks = queue.submit_many(specs)
        with running_dispatcher(queue, workers=4):
            done = queue.wait([t.id for t in tasks], timeout=30)
        assert all(t.state is State.COMPLETE for t in done)
        assert held_locks(queue) == {}
        assert audit(queue) == []
    assert len(spans) == len(specs)
    for i, (keys_a, start_a, end_a) in enumerate(spans):
        for keys_b, start_b, end_b in spans[i + 1 :]:
            if keys_a & keys_b:
                assert end_a <= start_b or end_b <= start_a, f"{keys_a} overlapped {keys_b}"
    # The check is not vacuous: tasks without a common key did run side by side.
    assert any(
        not (ka & kb) and sa < eb and sb < ea
        for i, (ka, sa, ea) in enumerate(spans)
        for kb, sb, eb in spans[i + 1 :]
    )


def test_older_first_among_tasks_sharing_a_key(queue: Queue) -> None:
    """When the holder ends, the oldest waiter gets the key, then the next, in order."""
    owner = uuid.uuid4()
    queue.submit("noop", locks=["vm:x"])
    (current,) = claim(queue, owner)
    waiters = [queue.submit("noop", locks=["vm:x"]).id for _ in range(3)]
    order = []
    for _ in waiters:
        claimed = finish_and_claim(queue, owner, current)
        assert len(claimed) == 1, "only one task may hold vm:x"
        current = claimed[0]
        order.append(current.id)
    assert order == waiters


def test_priority_outranks_age_among_waiters(queue: Queue) -> None:
    """Older first applies among equal priorities; an urgent task goes before older ones."""
    owner = uuid.uuid4()
    queue.submit("noop", locks=["vm:x"])
    (holder,) = claim(queue, owner)
    queue.submit("noop", locks=["vm:x"])
    urgent = queue.submit("noop", locks=["vm:x"], priority=10)
    assert [t.id for t in finish_and_claim(queue, owner, holder)] == [urgent.id]


@pytest.mark.parametrize("ok", [True, False], ids=["complete", "fail"])
def test_the_end_of_a_holder_releases_its_keys_in_the_same_transaction(
    queue: Queue, ok: bool
) -> None:
    """The transaction that records the outcome already frees the key for the next task."""
    owner = uuid.uuid4()
    queue.submit("noop", locks=["vm:x", "host:h"])
    (holder,) = claim(queue, owner)
    assert held_locks(queue) == {"vm:x": holder.id, "host:h": holder.id}
    waiter = queue.submit("noop", locks=["vm:x"])
    assert claim(queue, owner) == []
    claimed = finish_and_claim(queue, owner, holder, ok=ok)
    assert [t.id for t in claimed] == [waiter.id]
    assert held_locks(queue) == {"vm:x": waiter.id}
    assert queue.get(holder.id).state is (State.COMPLETE if ok else State.FAILED)
    assert audit(queue) == []


def test_a_retry_later_releases_the_keys_until_the_next_attempt(queue: Queue) -> None:
    """A task waiting out its backoff does not sit on its keys; it queues for them again."""
    owner = uuid.uuid4()
    first = queue.submit("noop", locks=["vm:x"], max_attempts=3)
    (holder,) = claim(queue, owner)
    waiter = queue.submit("noop", locks=["vm:x"])
    error = {"type": "RuntimeError", "message": "flaky"}
    cycle = queue.cycle(owner, [Outcome(holder, False, error=error)], 5, 30.0)
    assert [t.id for t in cycle.claimed] == [waiter.id]
    assert queue.get(first.id).state is State.NEW
    assert held_locks(queue) == {"vm:x": waiter.id}


def test_multi_key_tasks_take_all_their_keys_or_none(queue: Queue) -> None:
    """A task needing two keys, one of them taken, leaves the other free for someone else."""
    owner = uuid.uuid4()
    a = queue.submit("noop", locks=["k1"])
    both = queue.submit("noop", locks=["k1", "k2"])
    b = queue.submit("noop", locks=["k2"])
    claimed = claim(queue, owner, 3)
    assert {t.id for t in claimed} == {a.id, b.id}
    assert held_locks(queue) == {"k1": a.id, "k2": b.id}
    by_id = {t.id: t for t in claimed}
    assert finish_and_claim(queue, owner, by_id[a.id]) == [], "k2 is still held"
    (got,) = finish_and_claim(queue, owner, by_id[b.id])
    assert got.id == both.id
    assert held_locks(queue) == {"k1": both.id, "k2": both.id}
    why = queue.why(queue.submit("noop", locks=["k2"]).id)
    assert [(x.kind, x.task_id) for x in why.blockers] == [("lock", both.id)]


def test_a_timeout_releases_the_keys_while_the_action_still_runs(db_url: str) -> None:
    """The next task sharing the key runs as soon as the holder times out."""
    registry = Registry()
    gate = Gate()

    @registry.action("stuck")
    def stuck(ctx: Context) -> None:
        gate.wait()  # ignores ctx.stop, like a hypervisor call that does not return

    with open_queue(db_url, registry=registry) as queue:
        holder = queue.submit("stuck", locks=["vm:x"], timeout=0.3)
        waiter = queue.submit("noop", locks=["vm:x"])
        try:
            with running_dispatcher(queue, workers=2, grace=0.5):
                (done,) = queue.wait(waiter.id, timeout=10)
                timed_out = queue.get(holder.id)
                assert not gate.opened.is_set() and gate.entered.is_set()
        finally:
            gate.open()
        assert done.state is State.COMPLETE
        assert timed_out.state is State.FAILED
        assert timed_out.error is not None and timed_out.error["type"] == "Timeout"
        assert done.started_at is not None and timed_out.finished_at is not None
        assert done.started_at >= timed_out.finished_at
        assert held_locks(queue) == {}
