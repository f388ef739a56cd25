"""The multi-step commands over HTTP: create a VM (undone on failure), remove a snapshot, and
where a group is (`/why`), against two hosts served by libvirt's test driver."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from integration.test_http import FLEET, Client

from taskomatic import defaults
from taskomatic.dispatcher import Dispatcher
from taskomatic.http import Server
from taskomatic.queue import Queue
from taskomatic.tokens import Tokens


@pytest.fixture
def api(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    monkeypatch.setattr(defaults, "TOKEN_SCRYPT_N", 2**10)
    queue = Queue.open(sqlite_url)
    for name in ("kvm1", "kvm2"):
        queue.hosts.add(name, f"test://{FLEET}/{name}.xml")
    secrets = {role: Tokens(queue).create(role, role)[1] for role in ("viewer", "operator")}
    server = Server(queue, ("127.0.0.1", 0)).start()
    dispatcher = Dispatcher(queue, workers=2, poll=0.5).start()
    try:
        yield Client(server.url, secrets)
    finally:
        server.stop()
        dispatcher.stop(grace=5)
        queue.close()


def _settled(api: Client, submitted: dict[str, Any]) -> dict[str, Any]:
    """The group once it has ended (tasks it adds as it runs included)."""
    deadline = time.monotonic() + 30
    path = f"/v1/groups/{submitted['group']['id']}"
    while (group := api.ok("GET", path, role="viewer"))["group"]["state"] in (
        "running",
        "compensating",
    ):
        assert time.monotonic() < deadline, group
        time.sleep(0.2)
    return group  # type: ignore[no-any-return]


def test_creating_a_vm_over_http_and_its_undoing_when_a_step_fails(api: Client) -> None:
    spec = {"name": "web2", "host": "kvm1", "pool": "images", "disk_mib": 8, "memory_mib": 64}
    created = _settled(api, api.ok("POST", "/v1/vms", spec, role="operator"))
    assert created["group"]["state"] == "complete"
    assert {t["action"] for t in created["tasks"]} == {"volume.create", "vm.define", "vm.start"}

    taken = {**spec, "name": "cache1"}  # defined on kvm2 already
    undone = _settled(api, api.ok("POST", "/v1/vms", taken, role="operator"))
    assert undone["group"]["state"] == "compensated"
    [undo] = [t for t in undone["tasks"] if t["compensates"]]
    assert (undo["action"], undo["state"]) == ("volume.delete", "complete")
    why = api.ok("GET", f"/v1/groups/{undone['group']['id']}/why", role="viewer")
    assert why["state"] == "compensated" and "already defined on host 'kvm2'" in why["summary"]


def test_a_snapshot_removal_is_submitted_and_a_missing_snapshot_is_done_already(
    api: Client,
) -> None:
    submitted = api.ok("POST", "/v1/vms/db1/snapshots/never-taken/remove", {}, role="operator")
    group = _settled(api, submitted)
    assert group["group"]["name"] == "remove snapshot never-taken of vm db1"
    [plan] = group["tasks"]
    assert plan["state"] == "complete" and plan["result"]["removed"] is False


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/v1/vms", {"name": "x", "host": "kvm1", "pool": "images"}, 400, "disk_mib"),
        ("/v1/vms", {"name": "x", "host": "kvm1", "pool": "p", "disk_mib": "8"}, 400, "disk_mib"),
        ("/v1/vms", {"name": "x", "host": "kvm1", "pool": "p", "disk_mib": 0}, 400, "disk_mib"),
        ("/v1/vms", {"name": "", "host": "kvm1", "pool": "p", "disk_mib": 8}, 400, "name"),
        (
            "/v1/vms",
            {"name": "x", "host": "kvm1", "pool": "p", "disk_mib": 8, "cpu": 2},
            400,
            "cpu",
        ),
        ("/v1/vms", {"name": "x", "host": "nope", "pool": "p", "disk_mib": 8}, 404, None),
        ("/v1/vms/db1/snapshots/s/remove", {"bandwidth": 0}, 400, "bandwidth"),
        ("/v1/vms/db1/snapshots/s/remove", {"bandwidth": True}, 400, "bandwidth"),
        ("/v1/vms/db1/snapshots/s/remove", [], 400, None),
    ],
)
def test_bad_flow_requests_are_refused_and_submit_nothing(
    api: Client, path: str, body: Any, status: int, field: str | None
) -> None:
    got, error = api.call("POST", path, body, role="operator")
    assert (got, error["field"]) == (status, field), error
    assert api.ok("GET", "/v1/tasks", role="viewer")["tasks"] == []


def test_a_viewer_cannot_submit_the_flows(api: Client) -> None:
    spec = {"name": "x", "host": "kvm1", "pool": "images", "disk_mib": 8}
    assert api.call("POST", "/v1/vms", spec, role="viewer")[0] == 403
    assert api.call("POST", "/v1/vms/db1/snapshots/s/remove", role="viewer")[0] == 403
