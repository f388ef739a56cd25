"""The dashboard, the API's lists and /metrics with 100,000 tasks in the database: every page
answers and holds a bounded number of rows (no page loads everything). No timing is asserted;
bench/ is where speed is measured."""

from __future__ import annotations

import http.cookiejar
import json
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from taskomatic import defaults, metrics
from taskomatic import schema as s
from taskomatic.http import Server
from taskomatic.http import live as live_view
from taskomatic.model import State
from taskomatic.queue import Queue
from taskomatic.tokens import Tokens

TASKS = 100_000
GROUP_SIZE = 600  # more than a group page draws (live.GROUP_TASKS), in one long chain
STATES = ["complete"] * 90 + ["failed"] * 5 + ["new"] * 3 + ["running"] * 1 + ["cancelled"] * 1


def _seed(queue: Queue) -> uuid.UUID:
    """TASKS task rows written by the store's bulk insert, cloned from one submitted task;
    the last GROUP_SIZE of them form one group, each after the one before. Returns its id."""
    template = queue.submit("noop")
    with queue.store.read() as conn:
        found = conn.execute(sa.select(s.tasks).where(s.tasks.c.id == template.id)).one()
        row = dict(found._mapping)
    del row["seq"]
    group = uuid.uuid4()
    now = queue.now()
    previous = template.id
    with queue.store.write() as conn:
        queue.store.insert_group(conn, group, "big", "test", now)
        for start in range(0, TASKS, 10_000):
            rows, events, edges = [], [], []
            for i in range(start, min(start + 10_000, TASKS)):
                tid = uuid.uuid4()
                state = STATES[i % len(STATES)]
                rows.append(
                    {
                        **row,
                        "id": tid,
                        "state": state,
                        "action": ("noop", "sleep", "fail")[i % 3],
                        "params": {"host": f"kvm{i % 7}"},
                        "created_at": now - timedelta(seconds=TASKS - i),
                        "group_id": group if i >= TASKS - GROUP_SIZE else None,
                    }
                )
                events.append((tid, None, State.NEW, "submitted"))
                if i > TASKS - GROUP_SIZE:
                    edges.append((tid, rows[-2]["id"] if len(rows) > 1 else previous))
                previous = tid
            queue.store.insert_tasks(conn, rows, edges, [])
            queue.store.insert_events(conn, events, "test", now)
    return group


@pytest.fixture
def big(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Server, Any, str, uuid.UUID]]:
    """A server over 100,000 tasks, a browser-like opener signed in, a viewer token."""
    monkeypatch.setattr(defaults, "TOKEN_SCRYPT_N", 2**10)
    queue = Queue.open(db_url)
    group = _seed(queue)
    secret = Tokens(queue).create("eyes", "viewer")[1]
    server = Server(queue, ("127.0.0.1", 0)).start()
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )
    signed_in = opener.open(
        server.url + "/ui/login", data=urllib.parse.urlencode({"token": secret}).encode()
    )
    assert signed_in.url.endswith("/ui/")
    try:
        yield server, opener, secret, group
    finally:
        server.stop()
        queue.close()


def _get(opener: Any, url: str) -> str:
    with opener.open(url, timeout=60) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def _bearer(url: str, secret: str) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {secret}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return bytes(resp.read())


def test_pages_answer_with_bounded_rows_over_100k_tasks(
    big: tuple[Server, Any, str, uuid.UUID],
) -> None:
    server, opener, secret, group = big
    base = server.url

    # The tasks page: one page of LIST_LIMIT rows and a link to the next, filtered or not.
    page = _get(opener, base + "/ui/tasks")
    assert page.count("<tr data-task=") == defaults.LIST_LIMIT and 'id="next-page"' in page
    cursor = page.split('href="/ui/tasks?cursor=')[1].split('"')[0]
    older = _get(opener, f"{base}/ui/tasks?cursor={cursor}")
    assert older.count("<tr data-task=") == defaults.LIST_LIMIT
    assert set(older.split("<tbody>")[1].split("data-task=")[1:]).isdisjoint(
        page.split("<tbody>")[1].split("data-task=")[1:]
    )
    failed = _get(opener, base + "/ui/tasks?state=failed")
    assert failed.count("<tr data-task=") == defaults.LIST_LIMIT
    assert failed.count('class="state state-failed"') == defaults.LIST_LIMIT

    # A group larger than a page draws: the first GROUP_TASKS, and says so.
    drawn = _get(opener, f"{base}/ui/groups/{group}")
    assert drawn.count('<g class="node') == live_view.GROUP_TASKS
    assert f"Showing the first {live_view.GROUP_TASKS} tasks" in drawn
    assert drawn.count("<line ") == live_view.GROUP_TASKS - 1  # the chain among those drawn

    # The live overview's first snapshot: counts of everything, bounded lists.
    with opener.open(base + "/ui/live", timeout=60) as stream:
        lines = [stream.readline() for _ in range(4)]
    snapshot = json.loads(lines[3].removeprefix(b"data: "))
    assert sum(snapshot["counts"].values()) == TASKS + 1  # and the template task
    for key, bound in (("running", live_view.LIST_ROWS), ("blocked", live_view.LIST_ROWS)):
        assert len(snapshot[key]) == bound
    assert len(snapshot["failures"]) == live_view.FAILURE_ROWS
    assert snapshot["failures"][0]["host"].startswith("kvm")
    assert [g["name"] for g in snapshot["groups"]] == ["big"]
    assert all(b["why"] for b in snapshot["blocked"])

    # A task page and the hosts page answer.
    one = snapshot["failures"][0]["id"]
    assert "Timeline" in _get(opener, f"{base}/ui/tasks/{one}")
    assert "Hosts" in _get(opener, f"{base}/ui/hosts")

    # The API's largest page is MAX_LIST_LIMIT tasks; /metrics counts all of them.
    listed = json.loads(_bearer(f"{base}/v1/tasks?limit={defaults.MAX_LIST_LIMIT}", secret))
    assert len(listed["tasks"]) == defaults.MAX_LIST_LIMIT and listed["next_cursor"]
    scraped = metrics.parse(_bearer(base + "/metrics", secret).decode())
    assert scraped[("taskomatic_tasks", frozenset({("state", "complete")}))] == TASKS * 90 // 100
    assert scraped[("taskomatic_tasks_runnable", frozenset())] == TASKS * 3 // 100 + 1
