"""The inventory's rows on both backends: what a sync, events and an unreachable host write,
what readers see, what drift reads of the task history, and the upgrade that added the tables.

No libvirt here: the records are written as the keeper would write them
(tests/integration/test_inventory.py drives the real thing on the test driver).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from helpers import claim, complete, open_queue

from taskomatic import Queue
from taskomatic import schema as s
from taskomatic.drift import VM_ACTIONS
from taskomatic.inventory import (
    Changes,
    Disk,
    HostRecord,
    Inventory,
    PoolRecord,
    Survey,
    VmRecord,
    VolumeRecord,
)

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
"""What the keeper's records carry before the writer stamps them."""

VALID = 60.0


@pytest.fixture
def queue(db_url: str) -> Iterator[Queue]:
    with open_queue(db_url) as q:
        for name in ("h1", "h2"):
            q.hosts.add(name, f"qemu+ssh://root@{name}.example.com/system")
        yield q


def _host(name: str, memory_kib: int = 16 * 1024**2) -> HostRecord:
    return HostRecord(
        name,
        True,
        EPOCH,
        None,
        name,
        "9.0.0",
        "QEMU 7.2.0",
        8,
        memory_kib,
        1024,
        EPOCH,
        EPOCH,
        EPOCH,
    )


def _vm(host: str, name: str, state: str = "running", **changes: object) -> VmRecord:
    record = VmRecord(
        host=host,
        uuid=f"uuid-{name}",
        name=name,
        state=state,
        reason="booted" if state == "running" else None,
        since=EPOCH,
        persistent=True,
        vcpus=2,
        memory_kib=1024**2,
        max_memory_kib=2 * 1024**2,
        disks=(Disk("vda", f"/images/{name}.qcow2", "qcow2", ("/images/base.qcow2",)),),
        snapshots=(),
        confirmed_at=EPOCH,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def _pool(host: str, name: str, *volumes: str, state: str = "running") -> PoolRecord:
    vols = tuple(VolumeRecord(host, name, v, f"/{name}/{v}", "file", 10, 1, EPOCH) for v in volumes)
    return PoolRecord(host, name, f"uuid-{name}", state, True, False, 100, 10, 90, EPOCH, vols)


def _raw_vms(queue: Queue, host: str) -> dict[str, VmRecord]:
    with queue.store.read() as conn:
        return {v.name: v for v in queue.store.inventory_vms(conn, host)}


def test_a_sync_is_stored_and_an_unchanged_one_rewrites_no_row(queue: Queue) -> None:
    """Everything a sync found reads back; syncing the same again rewrites no VM row, yet
    every row reads as confirmed by that later sync; a change of state moves `since`."""
    inventory = Inventory(queue)
    survey = Survey(
        _host("h1"),
        [_vm("h1", "web"), _vm("h1", "db", "shutoff")],
        [_pool("h1", "images", "a.qcow2", "b.qcow2")],
    )
    assert inventory.record_survey(survey, VALID)
    first = {v.name: v for v in inventory.vms(host="h1")}
    assert first["web"] == dataclasses.replace(
        survey.vms[0], since=first["web"].since, confirmed_at=first["web"].confirmed_at
    )
    assert first["web"].since > EPOCH
    (pool,) = inventory.pools(host="h1")
    assert [v.name for v in pool.volumes] == ["a.qcow2", "b.qcow2"]
    raw = _raw_vms(queue, "h1")

    assert inventory.record_survey(survey, VALID)
    assert _raw_vms(queue, "h1") == raw, "nothing changed: no row rewritten"
    record = inventory.host("h1").record
    assert record is not None and record.synced_at is not None
    assert {v.confirmed_at for v in inventory.vms(host="h1")} == {record.synced_at}
    assert record.since == first["web"].since, "reachable since the first sync"

    moved = Survey(
        _host("h1"),
        [_vm("h1", "web", "paused"), _vm("h1", "db", "shutoff")],
        [_pool("h1", "images", "a.qcow2")],
    )
    inventory.record_survey(moved, VALID)
    after = {v.name: v for v in inventory.vms(host="h1")}
    assert after["web"].state == "paused" and after["web"].since > first["web"].since
    assert after["db"].since == first["db"].since
    assert [v.name for v in inventory.pools(host="h1")[0].volumes] == ["a.qcow2"]


def test_changes_amend_only_the_objects_they_name(queue: Queue) -> None:
    """Events change, add and remove the VMs and pools they name (by UUID or by name, and a
    VM of that name under another UUID goes); everything else stays as the last sync left."""
    inventory = Inventory(queue)
    assert inventory.record_changes("h1", Changes(vms=[_vm("h1", "early")]), VALID)
    assert inventory.vms() == [], "before the first sync there is nothing to amend"
    inventory.record_survey(
        Survey(
            _host("h1"),
            [_vm("h1", n) for n in ("a", "b", "c", "d")],
            [_pool("h1", "p1", "x"), _pool("h1", "p2")],
        ),
        VALID,
    )
    inventory.record_survey(Survey(_host("h2"), [_vm("h2", "a2")], []), VALID)
    changes = Changes(
        vms=[_vm("h1", "a", "shutoff"), _vm("h1", "new"), _vm("h1", "d", uuid="uuid-d2")],
        gone_vms=["uuid-b"],
        gone_vm_names=["c"],
        pools=[_pool("h1", "p1", "x", "y", state="running")],
        gone_pools=["p2"],
    )
    assert inventory.record_changes("h1", changes, VALID)
    assert {(v.name, v.uuid, v.state) for v in inventory.vms(host="h1")} == {
        ("a", "uuid-a", "shutoff"),
        ("new", "uuid-new", "running"),
        ("d", "uuid-d2", "running"),
    }
    (pool,) = inventory.pools(host="h1")
    assert (pool.name, [v.name for v in pool.volumes]) == ("p1", ["x", "y"])
    assert [v.name for v in inventory.vms(host="h2")] == ["a2"]


def test_an_unreachable_host_reads_unknown_since_it_stopped_answering(queue: Queue) -> None:
    """Marked unreachable twice, it stays unreachable since the first time; its VMs read
    unknown with their last state; a host never reached has a row saying so."""
    inventory = Inventory(queue)
    inventory.record_survey(Survey(_host("h1"), [_vm("h1", "web")], []), VALID)
    assert inventory.record_unreachable("h1", "connection refused", VALID)
    first = inventory.host("h1").record
    assert first is not None and not first.reachable and first.error == "connection refused"
    inventory.record_unreachable("h1", "still refused", VALID)
    again = inventory.host("h1").record
    assert again is not None and again.since == first.since and again.error == "still refused"
    (web,) = inventory.vms(host="h1")
    assert (web.state, web.last_state, web.since) == ("unknown", "running", first.since)
    assert inventory.vms(state="unknown") == [web]
    assert inventory.rooms() == {}

    assert inventory.record_unreachable("h2", "no route to host", VALID)
    never = inventory.host("h2").record
    assert never is not None and (never.reachable, never.cpus) == (False, None)
    assert not inventory.record_unreachable("gone", "x", VALID), "not a registered host"


def test_room_counts_vms_and_the_memory_promised_to_running_ones(queue: Queue) -> None:
    inventory = Inventory(queue)
    vms = [_vm("h1", "a"), _vm("h1", "b", "paused"), _vm("h1", "c", "shutoff")]
    inventory.record_survey(Survey(_host("h1", memory_kib=10 * 1024**2), vms, []), VALID)
    inventory.record_survey(Survey(_host("h2"), [], []), VALID)
    rooms = inventory.rooms()
    assert (rooms["h1"].vms, rooms["h1"].unpromised_kib) == (3, 6 * 1024**2)
    assert (rooms["h2"].vms, rooms["h2"].unpromised_kib) == (0, 16 * 1024**2)


def test_removing_a_host_removes_its_inventory(queue: Queue) -> None:
    inventory = Inventory(queue)
    inventory.record_survey(
        Survey(_host("h1"), [_vm("h1", "web")], [_pool("h1", "images", "a")]), VALID
    )
    queue.hosts.remove("h1")
    assert (inventory.hosts(), inventory.vms(), inventory.pools()) == ([], [], [])
    assert not inventory.record_survey(Survey(_host("h1"), [], []), VALID)


def test_the_last_completed_vm_task_of_each_vm(queue: Queue) -> None:
    """Drift reads, per VM name, the last completed VM task (a JSON parameter on both
    backends); failed tasks and other actions do not count."""
    owner = uuid.uuid4()
    for action, name in (
        ("vm.start", "web"),
        ("vm.destroy", "web"),
        ("vm.start", "db"),
        ("snapshot.create", "web"),
    ):
        params = {"vm": name, "name": "s1"} if action.startswith("snapshot") else {"name": name}
        queue.submit(action, params)
        (task,) = claim(queue, owner)
        complete(queue, owner, task, {"vm": name})
    queue.submit("vm.start", {"name": "web"})
    with queue.store.read() as conn:
        last = queue.store.last_vm_tasks(conn, VM_ACTIONS)
    assert [(t.action, t.params["name"]) for t in last] == [
        ("vm.destroy", "web"),
        ("vm.start", "db"),
    ]


def test_db_init_adds_the_inventory_to_a_version_1_database(queue: Queue) -> None:
    """A database from before the inventory (schema version 1) gets its tables from `db init`,
    and then records the current version; nothing else changes."""
    inventory = [s.volume_inventory, s.pool_inventory, s.vm_inventory, s.host_inventory]
    with queue.store.write() as conn:
        for table in inventory:
            conn.execute(sa.text(f"DROP TABLE {table.name}"))
        conn.execute(s.schema_version.delete())
        conn.execute(s.schema_version.insert().values(version=1, applied_at=EPOCH))
    assert queue.init_db() == s.SCHEMA_VERSION
    assert all(sa.inspect(queue.store.engine).has_table(t.name) for t in inventory)
    assert [h.name for h in queue.hosts.list()] == ["h1", "h2"]
