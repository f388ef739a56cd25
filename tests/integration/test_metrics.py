"""/metrics as Prometheus scrapes it, on both backends: every figure is read from the database,
so it counts what any process did — here a dispatcher's runs, a failure retried then final, a
lease taken over from a dead dispatcher and a task waiting on a host job."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest

from taskomatic import defaults, logs, metrics
from taskomatic.dispatcher import Dispatcher
from taskomatic.http import Server
from taskomatic.jobs import HostJob
from taskomatic.queue import Outcome, Queue
from taskomatic.tokens import Tokens


@pytest.fixture
def queue(db_url: str) -> Iterator[Queue]:
    q = Queue.open(db_url)
    try:
        yield q
    finally:
        q.close()


def _sample(scraped: dict, name: str, **labels: str) -> float:
    return scraped[(name, frozenset(labels.items()))]


def test_metrics_count_what_every_process_did(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(defaults, "TOKEN_SCRYPT_N", 2**10)
    for _ in range(3):
        queue.submit("noop")
    flaky = queue.submit("fail", {"message": "no space"}, max_attempts=2)
    blocked = queue.submit("noop", not_before=queue.now() + timedelta(hours=1))
    dispatcher = Dispatcher(queue, workers=2, poll=0.2).start()
    try:
        queue.wait([flaky.id], timeout=60)  # until it has ended (failed, after its retry)
    finally:
        dispatcher.stop(grace=5)
    assert queue.get(flaky.id).state.value == "failed"

    # A dispatcher that died holding a task (its lease already over), and one that took over.
    dead, rescuer = uuid.uuid4(), uuid.uuid4()
    orphan = queue.submit("noop")
    claimed = queue.cycle(dead, [], 1, lease=0.0).claimed
    assert [t.id for t in claimed] == [orphan.id]
    assert [t.id for t in queue.take_over(rescuer, 10, lease=60)] == [orphan.id]
    # A run that started a host job: the task waits, on that host.
    waiter = queue.submit("noop")
    [running] = queue.cycle(rescuer, [], 1, lease=60).claimed
    assert running.id == waiter.id
    queue.await_job(rescuer, [Outcome(running, ok=True, job=HostJob("kvm7", "migration"))])

    secret = Tokens(queue).create("prometheus", "viewer")[1]
    server = Server(queue, ("127.0.0.1", 0)).start()
    try:
        req = urllib.request.Request(
            server.url + "/metrics", headers={"Authorization": f"Bearer {secret}"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server.url + "/metrics", timeout=30)
        assert refused.value.code == 401
        assert json.loads(refused.value.read())["code"] == "unauthorized"
    finally:
        server.stop()

    scraped = metrics.parse(text)
    assert _sample(scraped, "taskomatic_tasks", state="complete") == 3
    assert _sample(scraped, "taskomatic_tasks", state="failed") == 1
    assert _sample(scraped, "taskomatic_tasks", state="running") == 1  # the orphan
    assert _sample(scraped, "taskomatic_tasks", state="waiting") == 1
    assert _sample(scraped, "taskomatic_tasks", state="new") == 1  # not before an hour
    assert _sample(scraped, "taskomatic_tasks_runnable") == 0  # due in an hour: not runnable
    # Six tasks started: three noops, the flaky one, the orphan, the waiter (the blocked one
    # has not); each counted once, however many attempts.
    started = _sample(scraped, "taskomatic_task_start_latency_seconds_count")
    assert started == 6
    assert _sample(scraped, "taskomatic_task_start_latency_seconds_bucket", le="+Inf") == started
    buckets = [
        _sample(scraped, "taskomatic_task_start_latency_seconds_bucket", le=metrics._number(b))
        for b in metrics.LATENCY_BOUNDS
    ]
    assert buckets == sorted(buckets) and buckets[-1] <= started
    assert (
        _sample(
            scraped, "taskomatic_action_duration_seconds_count", action="noop", outcome="complete"
        )
        == 3
    )
    assert (
        _sample(
            scraped, "taskomatic_action_duration_seconds_count", action="fail", outcome="failed"
        )
        == 1
    )
    # The flaky task failed twice: once retried later, once for good.
    assert _sample(scraped, "taskomatic_action_failed_attempts_total", action="fail") == 2
    assert _sample(scraped, "taskomatic_waiting_host_jobs", host="kvm7") == 1
    assert _sample(scraped, "taskomatic_lease_takeovers_total") == 1
    assert _sample(scraped, "taskomatic_results_uncollected") == 4
    assert _sample(scraped, "taskomatic_dispatchers_alive") == 0  # the real one stopped
    assert queue.get(blocked.id).attempt == 0
    for line in text.splitlines():  # the exposition format: comments or `name{labels} value`
        assert line.startswith("# ") or float(line.rsplit(" ", 1)[1]) >= 0, line


def test_json_logs_carry_the_task_and_never_the_token() -> None:
    import logging

    formatter = logs.JsonFormatter()
    tid = uuid.uuid4()
    record = logging.makeLogRecord(
        {"name": "taskomatic.dispatcher", "levelno": 30, "levelname": "WARNING",
         "msg": "task %s timed out after %gs", "args": (tid, 5.0)}
    )  # fmt: skip
    line = json.loads(formatter.format(record))
    assert line["task"] == str(tid) and line["level"] == "warning"
    assert line["message"] == f"task {tid} timed out after 5s"
    request = logging.makeLogRecord(
        {"msg": "%s %s %d", "args": ("GET", f"/v1/tasks/{tid}/events", 200),
         "http": {"method": "GET", "status": 200}}
    )  # fmt: skip
    line = json.loads(formatter.format(request))
    assert line["task"] == str(tid) and line["http"]["status"] == 200
