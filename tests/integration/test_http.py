"""The HTTP API served in-process on an ephemeral port, called with urllib as any client would:
every endpoint, every class of bad input answered 4xx with the JSON error shape, and tokens."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from taskomatic import defaults
from taskomatic import schema as s
from taskomatic.dispatcher import Dispatcher
from taskomatic.http import ROUTES, Server
from taskomatic.http.openapi import document
from taskomatic.queue import Queue
from taskomatic.tokens import Tokens

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Client:
    """urllib against the server; `call` returns the status and the parsed JSON body."""

    url: str
    tokens: dict[str, str]

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        role: str | None = "admin",
        token: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        secret = token if token is not None else (self.tokens[role] if role else None)
        if secret is not None:
            req.add_header("Authorization", f"Bearer {secret}")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            payload = json.loads(exc.read())
            assert set(payload) == {"code", "message", "field"}, payload
            return exc.code, payload

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, payload = self.call(method, path, body, **kw)
        assert status == 200, (status, payload)
        return payload


@pytest.fixture
def served(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Client, Queue]]:
    """A server and a dispatcher on a fresh database, with a token of each role."""
    monkeypatch.setattr(defaults, "TOKEN_SCRYPT_N", 2**10)  # fast tests; the hash is the same
    queue = Queue.open(db_url)
    tokens = Tokens(queue)
    secrets = {role: tokens.create(role, role)[1] for role in ("viewer", "operator", "admin")}
    server = Server(queue, ("127.0.0.1", 0)).start()
    dispatcher = Dispatcher(queue, workers=2, poll=0.5).start()
    try:
        yield Client(server.url, secrets), queue
    finally:
        server.stop()
        dispatcher.stop(grace=5)
        queue.close()


def test_every_endpoint_answers_its_happy_path(served: tuple[Client, Queue]) -> None:
    api, _ = served
    assert api.call("GET", "/v1/health", role=None) == (200, {"status": "ok"})
    assert api.ok("GET", "/v1/ready", role="viewer")["schema_version"] >= 3
    assert "/v1/tasks" in api.ok("GET", "/v1/openapi.json", role="viewer")["paths"]

    # Submit, idempotently: the same id and content is the same task; other content conflicts.
    tid = str(uuid.uuid4())
    task = api.ok("POST", "/v1/tasks", {"action": "noop", "id": tid}, role="operator")
    assert task["id"] == tid and task["created_by"] == "token:operator"
    again = api.ok("POST", "/v1/tasks", {"action": "noop", "id": tid}, role="operator")
    assert (again["id"], again["created_at"]) == (tid, task["created_at"])
    status, err = api.call("POST", "/v1/tasks", {"action": "sleep", "id": tid}, role="operator")
    assert (status, err["code"]) == (409, "conflict")

    done = api.ok("GET", f"/v1/tasks/{tid}/wait?timeout=20", role="viewer")
    assert done["timed_out"] is False and done["task"]["state"] == "complete"
    assert api.ok("GET", f"/v1/tasks/{tid}")["state"] == "complete"
    events = api.ok("GET", f"/v1/tasks/{tid}/events")["events"]
    assert [e["to"] for e in events] == ["new", "running", "complete"]
    assert api.ok("GET", f"/v1/tasks/{tid}/why")["state"] == "complete"
    collected = api.ok("POST", f"/v1/tasks/{tid}/collect", role="operator")
    assert collected["collected_at"] is not None

    # A group, as the CLI's submit-group file.
    group = api.ok(
        "POST",
        "/v1/groups",
        {
            "name": "pair",
            "tasks": [
                {"name": "a", "action": "noop"},
                {"action": "fail", "after": ["a"], "params": {"message": "boom"}},
            ],
        },
        role="operator",
    )
    gid = group["group"]["id"]
    failing = group["tasks"][1]["id"]
    ended = api.ok("GET", f"/v1/tasks/{failing}/wait?timeout=20")
    assert ended["task"]["state"] == "failed" and ended["task"]["error"]["message"] == "boom"
    shown = api.ok("GET", f"/v1/groups/{gid}")
    assert shown["group"]["state"] == "failed" and len(shown["tasks"]) == 2
    retried = api.ok("POST", f"/v1/tasks/{failing}/retry", role="operator")["tasks"]
    assert retried[0]["state"] == "new"

    # Cancel a task that waits for its time.
    later = api.ok("POST", "/v1/tasks", {"action": "noop", "not_before": "2999-01-01T00:00:00Z"})
    cancelled = api.ok("POST", f"/v1/tasks/{later['id']}/cancel", {"reason": "no longer needed"})
    assert cancelled["tasks"][0]["state"] == "cancelled"
    assert cancelled["tasks"][0]["error"]["message"] == "no longer needed"

    # Listing: filters and pages.
    page = api.ok("GET", "/v1/tasks?limit=2")
    assert len(page["tasks"]) == 2 and page["next_cursor"] is not None
    rest = api.ok("GET", f"/v1/tasks?limit=50&cursor={page['next_cursor']}")
    assert len(page["tasks"]) + len(rest["tasks"]) == 4
    assert [t["id"] for t in api.ok("GET", "/v1/tasks?state=cancelled")["tasks"]] == [later["id"]]
    assert len(api.ok("GET", f"/v1/tasks?group={gid}&action=fail")["tasks"]) == 1
    assert api.ok("GET", "/v1/status")["counts"]["cancelled"] == 1

    # Hosts.
    host = api.ok("POST", "/v1/hosts", {"name": "kvm1", "uri": "test:///default"})
    assert host["state"] == "active"
    assert api.ok("POST", "/v1/hosts", {"name": "kvm1", "uri": "test:///default"}) == host
    assert api.ok("POST", "/v1/hosts/kvm1/maintenance")["state"] == "maintenance"
    assert api.ok("GET", "/v1/hosts?state=maintenance")["hosts"][0]["name"] == "kvm1"
    assert api.ok("POST", "/v1/hosts/kvm1/activate")["state"] == "active"
    assert api.ok("GET", "/v1/hosts/kvm1", role="viewer")["uri"] == "test:///default"

    assert len(api.ok("GET", "/v1/dispatchers")["dispatchers"]) == 1

    # Tokens over the API: created (shown once), listed without secrets, revoked.
    made = api.ok("POST", "/v1/tokens", {"name": "ci", "role": "viewer"})
    assert api.ok("GET", "/v1/ready", token=made["token"])["status"] == "ready"
    listed = api.ok("GET", "/v1/tokens")["tokens"]
    assert "ci" in [t["name"] for t in listed] and all("token" not in t for t in listed)
    assert api.ok("POST", "/v1/tokens/ci/revoke")["revoked_at"] is not None
    assert api.call("GET", "/v1/ready", token=made["token"])[0] == 401


def test_wait_is_a_bounded_long_poll_woken_by_completion(served: tuple[Client, Queue]) -> None:
    api, _ = served
    slow = api.ok("POST", "/v1/tasks", {"action": "sleep", "params": {"seconds": 0.5}})
    started = time.monotonic()
    answer = api.ok("GET", f"/v1/tasks/{slow['id']}/wait?timeout=30")
    assert answer["task"]["state"] == "complete"
    assert time.monotonic() - started < 5  # woken, not the full timeout

    blocked = api.ok("POST", "/v1/tasks", {"action": "noop", "not_before": "2999-01-01T00:00:00Z"})
    started = time.monotonic()
    answer = api.ok("GET", f"/v1/tasks/{blocked['id']}/wait?timeout=0.3")
    assert answer == {"task": answer["task"], "timed_out": True}
    assert answer["task"]["state"] == "new" and time.monotonic() - started < 5


def test_tokens_and_roles(served: tuple[Client, Queue]) -> None:
    api, queue = served
    assert api.call("GET", "/v1/tasks", role=None)[0] == 401
    for bad in ("nonsense", "tkm_000000000000_wrong", api.tokens["viewer"] + "x"):
        status, err = api.call("GET", "/v1/tasks", token=bad)
        assert (status, err["code"]) == (401, "unauthorized")
        assert bad not in err["message"]
    status, err = api.call("GET", "/v1/tasks", headers={"Authorization": "Basic abc"}, role=None)
    assert status == 401
    # Each role: what it may do, and the first thing it may not.
    assert api.call("GET", "/v1/tasks", role="viewer")[0] == 200
    assert api.call("POST", "/v1/tasks", {"action": "noop"}, role="viewer")[0] == 403
    assert api.call("POST", "/v1/tasks", {"action": "noop"}, role="operator")[0] == 200
    status, err = api.call(
        "POST", "/v1/hosts", {"name": "h", "uri": "test:///default"}, role="operator"
    )
    assert (status, err["code"]) == (403, "forbidden")
    assert api.call("GET", "/v1/tokens", role="operator")[0] == 403
    # Revocation takes effect at once, even for a token checked a moment ago (and cached).
    assert api.call("GET", "/v1/tasks", role="operator")[0] == 200
    Tokens(queue).revoke("operator")
    assert api.call("GET", "/v1/tasks", role="operator")[0] == 401


BAD_INPUTS = [
    # (method, path, body, raw body, extra headers, status, code)
    ("GET", "/v1/nothing", None, None, {}, 404, "not_found"),
    ("DELETE", "/v1/tasks", None, None, {}, 405, "method_not_allowed"),
    ("POST", "/v1/tasks", None, b"{not json", {}, 400, "bad_json"),
    ("POST", "/v1/tasks", None, b"\xff\xfe", {}, 400, "bad_json"),
    ("POST", "/v1/tasks", None, b"[" * 100_000, {}, 400, "bad_json"),
    (
        "POST",
        "/v1/tasks",
        None,
        b'{"action": "noop"}',
        {"Content-Type": "text/plain"},
        415,
        "unsupported_media_type",
    ),
    ("POST", "/v1/tasks", [1, 2], None, {}, 400, "invalid"),
    ("POST", "/v1/tasks", None, None, {}, 400, "invalid"),
    ("POST", "/v1/tasks", {"action": "nope"}, None, {}, 400, "unknown_action"),
    ("POST", "/v1/tasks", {"action": 5}, None, {}, 400, "invalid"),
    (
        "POST",
        "/v1/tasks",
        {"action": "sleep", "params": {"seconds": "x"}},
        None,
        {},
        400,
        "invalid_params",
    ),
    ("POST", "/v1/tasks", {"action": "noop", "priority": "high"}, None, {}, 400, "invalid"),
    ("POST", "/v1/tasks", {"action": "noop", "timeout": -1}, None, {}, 400, "invalid"),
    ("POST", "/v1/tasks", {"action": "noop", "id": "not-a-uuid"}, None, {}, 400, "invalid"),
    ("POST", "/v1/tasks", {"action": "noop", "colour": "red"}, None, {}, 400, "invalid"),
    ("POST", "/v1/tasks", {"action": "noop", "not_before": "tomorrow"}, None, {}, 400, "invalid"),
    (
        "POST",
        "/v1/tasks",
        {"action": "noop", "after": [str(uuid.UUID(int=1))]},
        None,
        {},
        400,
        "unknown_prerequisite",
    ),
    (
        "POST",
        "/v1/groups",
        {
            "tasks": [
                {"name": "a", "action": "noop", "after": ["b"]},
                {"name": "b", "action": "noop", "after": ["a"]},
            ]
        },
        None,
        {},
        400,
        "cycle",
    ),
    ("POST", "/v1/groups", {"tasks": []}, None, {}, 400, "invalid"),
    ("POST", "/v1/groups", {"tasks": ["noop"]}, None, {}, 400, "invalid"),
    ("POST", "/v1/groups", {"tasks": [{"action": "noop"}], "id": "x"}, None, {}, 400, "invalid"),
    ("GET", "/v1/tasks/not-a-uuid", None, None, {}, 400, "invalid"),
    ("GET", f"/v1/tasks/{uuid.UUID(int=2)}", None, None, {}, 404, "not_found"),
    ("GET", f"/v1/tasks/{uuid.UUID(int=2)}/events", None, None, {}, 404, "not_found"),
    ("GET", f"/v1/tasks/{uuid.UUID(int=2)}/why", None, None, {}, 404, "not_found"),
    ("GET", f"/v1/tasks/{uuid.UUID(int=2)}/wait?timeout=0", None, None, {}, 404, "not_found"),
    ("GET", f"/v1/tasks/{uuid.UUID(int=2)}/wait?timeout=soon", None, None, {}, 400, "invalid"),
    ("GET", f"/v1/tasks/{uuid.UUID(int=2)}/wait?timeout=nan", None, None, {}, 400, "invalid"),
    ("POST", f"/v1/tasks/{uuid.UUID(int=2)}/cancel", None, None, {}, 404, "not_found"),
    ("POST", f"/v1/tasks/{uuid.UUID(int=2)}/cancel", {"reason": 5}, None, {}, 400, "invalid"),
    ("POST", f"/v1/tasks/{uuid.UUID(int=2)}/retry", None, None, {}, 404, "not_found"),
    ("POST", f"/v1/tasks/{uuid.UUID(int=2)}/collect", None, None, {}, 404, "not_found"),
    ("GET", f"/v1/groups/{uuid.UUID(int=2)}", None, None, {}, 404, "not_found"),
    ("GET", "/v1/tasks?state=lost", None, None, {}, 400, "invalid"),
    ("GET", "/v1/tasks?limit=0", None, None, {}, 400, "invalid"),
    ("GET", "/v1/tasks?limit=many", None, None, {}, 400, "invalid"),
    ("GET", "/v1/tasks?group=nope", None, None, {}, 400, "invalid"),
    ("GET", "/v1/hosts?state=gone", None, None, {}, 400, "invalid"),
    ("GET", "/v1/hosts/none", None, None, {}, 404, "host_not_found"),
    ("POST", "/v1/hosts", {"name": "h", "uri": "http://x"}, None, {}, 400, "invalid"),
    (
        "POST",
        "/v1/hosts",
        {"name": "h", "uri": "test:///default", "capacity": "lots"},
        None,
        {},
        400,
        "invalid",
    ),
    ("POST", "/v1/hosts", {"name": 5, "uri": "test:///default"}, None, {}, 400, "invalid"),
    ("POST", "/v1/hosts/none/maintenance", None, None, {}, 404, "host_not_found"),
    ("POST", "/v1/tokens", {"name": "x", "role": "god"}, None, {}, 400, "invalid"),
    ("POST", "/v1/tokens", {"name": "admin", "role": "viewer"}, None, {}, 409, "conflict"),
    ("POST", "/v1/tokens/none/revoke", None, None, {}, 404, "not_found"),
    # Found by fuzzing: each was a 500 or was silently ignored.
    ("GET", "/v1/tasks?cursor=99999999999999999999", None, None, {}, 400, "invalid"),
    ("GET", "/v1/tasks?cursor=-1", None, None, {}, 400, "invalid"),
    ("GET", "/v1/tasks?group=", None, None, {}, 400, "invalid"),
    ("GET", "/v1/tasks?colour=red", None, None, {}, 400, "invalid"),
    ("GET", "/v1/vms?host=kvm%001", None, None, {}, 400, "invalid"),
    ("GET", "/v1/tokens?revoked=maybe", None, None, {}, 400, "invalid"),
    (
        "POST",
        "/v1/tasks",
        {"action": "noop", "params": {"x": "a\u0000b"}},
        None,
        {},
        400,
        "invalid",
    ),
    (
        "POST",
        "/v1/hosts",
        {"name": "h", "uri": "test:///default", "capacity": 10**20},
        None,
        {},
        400,
        "invalid",
    ),
    ("OPTIONS", "/v1/tasks", None, None, {}, 405, "method_not_allowed"),
    ("TRACE", "/v1/health", None, None, {}, 405, "method_not_allowed"),
]


def test_every_bad_input_is_a_4xx_with_the_json_error_shape(
    served: tuple[Client, Queue],
) -> None:
    api, _ = served
    wrong = []
    for method, path, body, raw, headers, status, code in BAD_INPUTS:
        got, err = api.call(method, path, body, raw=raw, headers=headers)
        if (got, err["code"]) != (status, code):
            wrong.append(f"{method} {path} {body or raw!r:.60}: {got} {err}")
    assert not wrong, "\n".join(wrong)
    # Invalid transitions are conflicts.
    new = api.ok("POST", "/v1/tasks", {"action": "noop", "not_before": "2999-01-01T00:00:00Z"})
    assert api.call("POST", f"/v1/tasks/{new['id']}/retry")[1]["code"] == "invalid_state"
    assert api.call("POST", f"/v1/tasks/{new['id']}/collect")[0] == 409


def test_an_oversized_body_is_refused_with_413(served: tuple[Client, Queue]) -> None:
    api, _ = served
    huge = b'{"action": "noop", "params": {"x": "' + b"a" * defaults.HTTP_MAX_BODY_BYTES + b'"}}'
    status, err = api.call("POST", "/v1/tasks", raw=huge)
    assert (status, err["code"]) == (413, "too_large")
    assert str(defaults.HTTP_MAX_BODY_BYTES) in err["message"]


def test_the_checked_in_openapi_document_is_current_and_lists_every_route() -> None:
    checked_in = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert checked_in == document(), "regenerate: python -m taskomatic.http.openapi"
    for route in ROUTES:
        assert route.method.lower() in checked_in["paths"][route.pattern], route


def test_db_init_adds_the_tokens_table_to_a_version_2_database(db_url: str) -> None:
    """A database from before the API tokens (schema version 2) gets their table from
    `db init`, then records the current version; what was queued stays."""
    with Queue.open(db_url) as queue:
        kept = queue.submit("noop")
        with queue.store.write() as conn:
            conn.execute(sa.text(f"DROP TABLE {s.api_tokens.name}"))
            conn.execute(s.schema_version.delete())
            conn.execute(s.schema_version.insert().values(version=2, applied_at=queue.now()))
        assert queue.init_db() == s.SCHEMA_VERSION
        assert queue.store.schema_version() == s.SCHEMA_VERSION
        assert Tokens(queue).list() == []
        assert queue.get(kept.id).state == "new"


# -- the inventory over HTTP --------------------------------------------------------------------

FLEET = ROOT / "docs" / "examples" / "fleet"


def test_the_inventory_and_clearing_a_host_over_http(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `taskomatic vms`, `pools`, `hosts show`, `drift` and `hosts clear` give, over
    HTTP: the inventory a dispatcher keeps, and a clear submitted as one group (destroying
    needs its explicit flag; migrating moves the stopped VM and names the ones that cannot)."""
    monkeypatch.setattr(defaults, "TOKEN_SCRYPT_N", 2**10)
    queue = Queue.open(sqlite_url)
    for name in ("kvm1", "kvm2"):
        queue.hosts.add(name, f"test://{FLEET}/{name}.xml")
    secrets = {role: Tokens(queue).create(role, role)[1] for role in ("viewer", "admin")}
    server = Server(queue, ("127.0.0.1", 0)).start()
    dispatcher = Dispatcher(queue, workers=2, poll=0.5, inventory=True).start()
    api = Client(server.url, secrets)
    try:
        deadline = time.monotonic() + 20
        while len(api.ok("GET", "/v1/vms", role="viewer")["vms"]) < 4:
            assert time.monotonic() < deadline, "the inventory never filled"
            time.sleep(0.1)
        running = api.ok("GET", "/v1/vms?host=kvm1&state=running", role="viewer")["vms"]
        assert sorted(vm["name"] for vm in running) == ["db1", "web1"]
        shown = api.ok("GET", "/v1/hosts/kvm1/inventory", role="viewer")
        assert shown["host"]["name"] == "kvm1" and len(shown["vms"]) == 3
        assert [p["name"] for p in api.ok("GET", "/v1/pools?host=kvm2")["pools"]] == ["images"]
        assert api.ok("GET", "/v1/drift", role="viewer") == {"drift": []}
        assert api.call("GET", "/v1/vms?host=nope", role="viewer")[0] == 404

        refusals = [
            api.call("POST", "/v1/hosts/kvm1/clear", {}),
            api.call("POST", "/v1/hosts/kvm1/clear", {"how": "destroy"}),
            api.call("POST", "/v1/hosts/kvm1/clear", {"how": "migrate", "force": True}),
            api.call("POST", "/v1/hosts/kvm1/clear", {"how": "migrate"}, role="viewer"),
        ]
        assert [(status, err["field"]) for status, err in refusals[:3]] == [
            (400, "how"),
            (400, "i_understand_this_destroys_data"),
            (400, "force"),
        ]
        assert refusals[3][0] == 403

        cleared = api.ok("POST", "/v1/hosts/kvm1/clear", {"how": "migrate"})
        assert cleared["group"]["name"].startswith("clear host kvm1 by migrating")
        # The group's tasks, once it has settled (the moves may be added as it runs).
        deadline = time.monotonic() + 30
        while (group := api.ok("GET", f"/v1/groups/{cleared['group']['id']}"))["group"][
            "state"
        ] == "running":
            assert time.monotonic() < deadline, group
            time.sleep(0.2)
        moves = {t["params"]["name"]: t for t in group["tasks"] if t["action"] == "vm.migrate"}
        assert moves["old-ci"]["result"] is not None and moves["old-ci"]["result"]["host"] == "kvm2"
        assert {moves[n]["state"] for n in ("db1", "web1")} == {"failed"}
    finally:
        server.stop()
        dispatcher.stop(grace=5)
        queue.close()


def test_requests_beyond_the_limit_are_refused_at_once_but_health_answers(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server at its limit of requests in progress (here one long-poll) answers more with
    503 `busy` at once instead of piling up threads; liveness still answers, and once the
    long-poll ends the next request is served."""
    monkeypatch.setattr(defaults, "TOKEN_SCRYPT_N", 2**10)
    queue = Queue.open(sqlite_url)
    secrets = {"viewer": Tokens(queue).create("viewer", "viewer")[1]}
    server = Server(queue, ("127.0.0.1", 0), max_requests=1).start()
    api = Client(server.url, secrets)
    try:
        task = queue.submit("noop")  # no dispatcher: it stays new, so the wait lasts
        poll = threading.Thread(
            target=api.ok,
            args=("GET", f"/v1/tasks/{task.id}/wait?timeout=2"),
            kwargs={"role": "viewer"},
            daemon=True,
        )
        poll.start()
        deadline = time.monotonic() + 5
        while server.slots.acquire(blocking=False):  # until the long-poll holds the slot
            server.slots.release()
            assert time.monotonic() < deadline, "the long-poll never started"
            time.sleep(0.01)
        status, err = api.call("GET", "/v1/status", role="viewer")
        assert (status, err["code"]) == (503, "busy") and "limit of 1 requests" in err["message"]
        assert api.call("GET", "/v1/health", role=None) == (200, {"status": "ok"})
        poll.join(10)
        assert api.ok("GET", "/v1/status", role="viewer")["counts"]["new"] == 1
    finally:
        server.stop()
        queue.close()
