"""The dashboard's live stream (server-sent events): a snapshot at once and another when the
queue changes; streams are capped apart from the API's request slots, and a closed stream
gives its slot back."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from taskomatic import defaults
from taskomatic.http import Server
from taskomatic.queue import Queue
from taskomatic.tokens import Tokens

READ_SECONDS = 30.0
"""Longest a read of the stream may block (seconds); a bound, not a speed check."""


@pytest.fixture
def served(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Server, str, str]]:
    """A server allowing one stream and one request at a time; a session cookie; a token."""
    monkeypatch.setattr(defaults, "TOKEN_SCRYPT_N", 2**10)
    queue = Queue.open(db_url)
    secret = Tokens(queue).create("eyes", "viewer")[1]
    server = Server(queue, ("127.0.0.1", 0), max_requests=1, max_streams=1).start()
    conn = _conn(server)
    conn.request(
        "POST",
        "/ui/login",
        urllib.parse.urlencode({"token": secret}),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    resp = conn.getresponse()
    assert resp.status == 303
    cookie = resp.headers["Set-Cookie"].split(";")[0]
    conn.close()
    try:
        yield server, cookie, secret
    finally:
        server.stop()
        queue.close()


def _conn(server: Server) -> http.client.HTTPConnection:
    host, port = server.server_address[:2]
    return http.client.HTTPConnection(str(host), port, timeout=READ_SECONDS)


def _open(server: Server, cookie: str, query: str = "") -> http.client.HTTPResponse:
    conn = _conn(server)
    conn.request("GET", "/ui/live" + query, headers={"Cookie": cookie})
    return conn.getresponse()


def _snapshots(resp: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The `snapshot` events of a stream, parsed, as they arrive."""
    event = None
    while True:
        line = resp.fp.readline()
        assert line, "the stream ended"
        if line.startswith(b"event: "):
            event = line[7:].strip()
        elif line.startswith(b"data: ") and event == b"snapshot":
            yield json.loads(line[6:])


def test_a_stream_sends_a_new_snapshot_when_the_queue_changes(
    served: tuple[Server, str, str],
) -> None:
    server, cookie, _ = served
    resp = _open(server, cookie)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-store"
    stream = _snapshots(resp)
    first = next(stream)
    assert first["counts"]["new"] == 0 and first["blocked"] == []
    task = server.queue.submit("noop")
    second = next(stream)
    assert second["counts"]["new"] == 1
    [row] = second["blocked"]
    assert row["id"] == str(task.id) and "no dispatcher is alive" in row["why"]
    resp.close()


def test_streams_are_capped_apart_from_requests_and_closing_frees_the_slot(
    served: tuple[Server, str, str],
) -> None:
    server, cookie, secret = served
    task = server.queue.submit("noop")
    held = _open(server, cookie, f"?task={task.id}")
    assert held.status == 200
    assert next(_snapshots(held))["task"]["id"] == str(task.id)

    # The only stream slot is taken: another stream is refused at once…
    refused = _open(server, cookie)
    assert refused.status == 503
    assert json.loads(refused.read())["code"] == "busy"
    # …while the API, with its one request slot, still answers: the stream holds none.
    conn = _conn(server)
    conn.request("GET", "/v1/status", headers={"Authorization": f"Bearer {secret}"})
    assert conn.getresponse().status == 200
    conn.close()

    # Closing the stream gives its slot back (the server notices within a poll).
    held.close()
    deadline = time.monotonic() + READ_SECONDS
    while True:
        again = _open(server, cookie)
        if again.status == 200:
            break
        again.close()
        assert time.monotonic() < deadline, "the closed stream's slot never came back"
        time.sleep(0.2)
    again.close()


def test_a_stream_of_an_unknown_or_malformed_id_is_refused(
    served: tuple[Server, str, str],
) -> None:
    server, cookie, _ = served
    for query, status, field in (
        ("?task=nope", 400, "task"),
        ("?group=00000000-0000-0000-0000-000000000000", 404, None),
    ):
        resp = _open(server, cookie, query)
        assert resp.status == status, query
        assert json.loads(resp.read())["field"] == field
    assert _open(server, "taskomatic_session=forged").status == 401
