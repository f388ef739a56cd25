"""Every libvirt action against real libvirt (the test driver): end states, idempotence, the
`check` hook after a dispatcher died, and what the driver refuses becoming a clean failure.

The hosts are node files of libvirt's test driver (tests/virt.py); assertions read them with
plain libvirt calls on the fleet's own connection. SQLite only: the backend does not matter to
an action, and tests/integration/test_hosts.py covers the host rows on both backends.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import libvirt
import pytest
from virt import NETWORK, POOL, Lab, domain_xml, vm, xml_of

from taskomatic import Check, State, defaults
from taskomatic.actions import vm as vm_actions
from taskomatic.model import HostState

H1, H2 = "h1", "h2"
NEW_UUID = "0000abcd-0000-0000-0000-000000000001"
SCRATCH = "<pool type='dir'><name>scratch</name><target><path>/scratch</path></target></pool>"


def _nothing(lab: Lab) -> None:
    """No preparation: the node file already holds what the action needs."""


def _scratch_pool(lab: Lab) -> None:
    """A defined, inactive pool `scratch` on h1."""
    lab.conn(H1).storagePoolDefineXML(SCRATCH, 0)


def _snapshot_s0(lab: Lab) -> None:
    """Snapshot `s0` of the stopped VM h1-off."""
    dom = lab.domain(H1, vm(H1, "off"))
    assert dom is not None
    dom.snapshotCreateXML("<domainsnapshot><name>s0</name></domainsnapshot>", 0)


def _maintenance_h2(lab: Lab) -> None:
    lab.queue.hosts.set_state(H2, HostState.MAINTENANCE)


def _vm_is(host: str, name: str, state: str | None) -> Callable[[Lab], None]:
    def verify(lab: Lab) -> None:
        assert lab.state(host, name) == state

    return verify


def _defined_from_spec(lab: Lab) -> None:
    """The spec became a stopped VM with that memory, vCPUs, pool disk and network NIC."""
    dom = lab.domain(H1, "new")
    assert dom is not None and lab.state(H1, "new") == "shutoff"
    root = xml_of(dom)
    assert int(root.findtext("memory", "0")) == 128 * 1024  # KiB
    assert root.findtext("vcpu") == "2"
    source = root.find("devices/disk/source")
    assert source is not None and source.attrib == {"pool": POOL, "volume": "spare.qcow2"}
    nic = root.find("devices/interface/source")
    assert nic is not None and nic.get("network") == NETWORK
    assert lab.where("new") == [H1]


def _defined_from_xml(lab: Lab) -> None:
    dom = lab.domain(H1, "new")
    assert dom is not None and dom.UUIDString() == NEW_UUID
    assert lab.where("new") == [H1]


def _migrated(lab: Lab) -> None:
    """Only on h2 now, stopped, with the UUID it had on h1."""
    name = vm(H1, "off")
    assert lab.where(name) == [H2]
    dom = lab.domain(H2, name)
    assert dom is not None and dom.UUIDString() == "00000001-0000-0000-0000-000000000003"
    assert lab.state(H2, name) == "shutoff"


def _snapshots_are(name: str, expected: set[str]) -> Callable[[Lab], None]:
    def verify(lab: Lab) -> None:
        assert lab.snapshots(H1, name) == expected

    return verify


def _pool_is(name: str, active: bool | None) -> Callable[[Lab], None]:
    """Pool `name` on h1 is active / inactive, or (None) not defined."""

    def verify(lab: Lab) -> None:
        pool = lab.pool(H1, name)
        if active is None:
            assert pool is None
        else:
            assert pool is not None and bool(pool.isActive()) is active

    return verify


def _volume_created(lab: Lab) -> None:
    pool = lab.pool(H1)
    assert pool is not None
    _kind, capacity, _ = pool.storageVolLookupByName("data.qcow2").info()
    assert capacity == 64 * 1024 * 1024


def _volume_gone(lab: Lab) -> None:
    assert "spare.qcow2" not in lab.volumes(H1)
    assert f"{vm(H1, 'off')}.qcow2" in lab.volumes(H1), "only the named volume goes"


def _host_is(state: HostState) -> Callable[[Lab], None]:
    def verify(lab: Lab) -> None:
        assert lab.host_state(H2) is state

    return verify


@dataclass(frozen=True)
class Case:
    """An action, the world it starts from, and how its end state looks in libvirt."""

    id: str
    action: str
    params: dict[str, Any]
    verify: Callable[[Lab], None]
    prepare: Callable[[Lab], None] = field(default=_nothing)
    rechecks: bool = True
    """False: the check never reports done (the action is cheap and simply runs again)."""


CASES = [
    Case(
        "vm.define-spec",
        "vm.define",
        {
            "name": "new",
            "host": H1,
            "memory_mib": 128,
            "vcpus": 2,
            "disks": [{"pool": POOL, "volume": "spare.qcow2"}],
            "network": NETWORK,
        },
        _defined_from_spec,
    ),
    Case(
        "vm.define-xml",
        "vm.define",
        {"name": "new", "host": H1, "xml": domain_xml("new", uuid_=NEW_UUID)},
        _defined_from_xml,
    ),
    Case("vm.start", "vm.start", {"name": vm(H1, "off")}, _vm_is(H1, vm(H1, "off"), "running")),
    Case(
        "vm.start-paused",
        "vm.start",
        {"name": vm(H1, "paused")},
        _vm_is(H1, vm(H1, "paused"), "running"),
    ),
    Case(
        "vm.shutdown",
        "vm.shutdown",
        {"name": vm(H1, "running")},
        _vm_is(H1, vm(H1, "running"), "shutoff"),
    ),
    Case(
        "vm.destroy",
        "vm.destroy",
        {"name": vm(H1, "running"), "host": H1},
        _vm_is(H1, vm(H1, "running"), "shutoff"),
    ),
    Case(
        "vm.suspend",
        "vm.suspend",
        {"name": vm(H1, "running")},
        _vm_is(H1, vm(H1, "running"), "paused"),
    ),
    Case(
        "vm.resume",
        "vm.resume",
        {"name": vm(H1, "paused")},
        _vm_is(H1, vm(H1, "paused"), "running"),
    ),
    Case("vm.undefine", "vm.undefine", {"name": vm(H1, "off")}, _vm_is(H1, vm(H1, "off"), None)),
    Case("vm.migrate-offline", "vm.migrate", {"name": vm(H1, "off"), "to": H2}, _migrated),
    Case(
        "snapshot.create",
        "snapshot.create",
        {"vm": vm(H1, "running"), "name": "s1", "description": "before the upgrade"},
        _snapshots_are(vm(H1, "running"), {"s1"}),
    ),
    Case(
        "snapshot.delete",
        "snapshot.delete",
        {"vm": vm(H1, "off"), "name": "s0"},
        _snapshots_are(vm(H1, "off"), set()),
        prepare=_snapshot_s0,
    ),
    Case(
        "pool.define",
        "pool.define",
        {"host": H1, "name": "scratch", "path": "/scratch"},
        _pool_is("scratch", active=False),
    ),
    Case(
        "pool.build",
        "pool.build",
        {"host": H1, "name": "scratch"},
        _pool_is("scratch", active=False),
        prepare=_scratch_pool,
        rechecks=False,
    ),
    Case(
        "pool.start",
        "pool.start",
        {"host": H1, "name": "scratch"},
        _pool_is("scratch", active=True),
        prepare=_scratch_pool,
    ),
    Case("pool.stop", "pool.stop", {"host": H1, "name": POOL}, _pool_is(POOL, active=False)),
    Case(
        "pool.delete",
        "pool.delete",
        {"host": H1, "name": "scratch"},
        _pool_is("scratch", active=None),
        prepare=_scratch_pool,
    ),
    Case(
        "pool.refresh",
        "pool.refresh",
        {"host": H1, "name": POOL},
        _pool_is(POOL, active=True),
        rechecks=False,
    ),
    Case(
        "volume.create",
        "volume.create",
        {"host": H1, "pool": POOL, "name": "data.qcow2", "capacity_mib": 64, "format": "qcow2"},
        _volume_created,
    ),
    Case(
        "volume.delete",
        "volume.delete",
        {"host": H1, "pool": POOL, "name": "spare.qcow2"},
        _volume_gone,
    ),
    Case("host.maintenance", "host.maintenance", {"name": H2}, _host_is(HostState.MAINTENANCE)),
    Case(
        "host.activate",
        "host.activate",
        {"name": H2},
        _host_is(HostState.ACTIVE),
        prepare=_maintenance_h2,
    ),
]
BY_CASE = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


# --- end states and idempotence -----------------------------------------------------------------


@BY_CASE
def test_an_action_reaches_its_end_state_and_a_second_run_changes_nothing(
    lab: Lab, case: Case
) -> None:
    """Run as a task, each action ensures its end state; submitted again (by a restarted
    dispatcher on the same hosts) it completes without error and leaves the world as it was."""
    case.prepare(lab)
    first = lab.run(case.action, case.params)
    assert first.state is State.COMPLETE, first.error
    assert first.attempt == 1
    case.verify(lab)
    after_first = lab.world()

    second = lab.run(case.action, case.params)
    assert second.state is State.COMPLETE, second.error
    case.verify(lab)
    assert lab.world() == after_first


def test_results_say_where_the_vm_is_and_what_changed(lab: Lab) -> None:
    """Results tell the caller the VM's host, UUID and state, and whether this run did it."""
    define = {"name": "new", "host": H1, "xml": domain_xml("new", uuid_=NEW_UUID)}
    first, second = lab.run("vm.define", define), lab.run("vm.define", define)
    described = {"vm": "new", "host": H1, "uuid": NEW_UUID, "state": "shutoff"}
    assert first.result == {**described, "defined": True}
    assert second.result == {**described, "defined": False}

    moved = lab.run("vm.migrate", {"name": "new", "to": H2})
    assert moved.result == {**described, "host": H2, "from": H1}
    gone = [lab.run("vm.undefine", {"name": "new"}) for _ in range(2)]
    assert [t.result for t in gone] == [
        {"vm": "new", "host": H2, "undefined": True},
        {"vm": "new", "undefined": False},
    ]


# --- the check hook -----------------------------------------------------------------------------


@BY_CASE
def test_check_reports_done_only_once_the_work_is_on_the_host(lab: Lab, case: Case) -> None:
    """A dispatcher that died before the side effect: the check says not started. One that died
    after it, before reporting: the check says done, with a result agreeing with the run's."""
    case.prepare(lab)
    ctx = lab.context(case.action, case.params)
    assert lab.check(ctx).status == Check.NOT_STARTED

    result = lab.call(ctx)
    found = lab.check(ctx)
    if case.rechecks:
        assert found.status == Check.DONE
        assert found.result.items() <= result.items()
    else:
        assert found.status == Check.NOT_STARTED


@BY_CASE
@pytest.mark.parametrize("died", ["before", "after"], ids=["died_before", "died_after"])
def test_a_taken_over_task_is_checked_and_run_again_only_if_needed(
    lab: Lab, case: Case, died: str
) -> None:
    """The task of a dispatcher that died (lease expired) is taken over by the next one, which
    asks the check first: work already on the host is completed without running it again."""
    case.prepare(lab)
    orphan = lab.orphan(case.action, case.params)
    if died == "after":
        lab.call(lab.context(case.action, case.params, orphan.id))
    lab.drain()

    done = lab.queue.get(orphan.id)
    assert done.state is State.COMPLETE, done.error
    assert done.attempt == 1, "a takeover continues the attempt"
    ran_before = int(died == "after")
    ran_again = int(died == "before" or not case.rechecks)
    assert lab.registry.checks[case.action] == 1
    assert lab.registry.runs[case.action] == ran_before + ran_again
    case.verify(lab)


def test_a_taken_over_define_agrees_with_its_run_about_the_pinned_host(lab: Lab) -> None:
    """A VM of that name found on another host than the task pins is not this task's work:
    after a takeover the task fails as its run would, instead of completing on the wrong host."""
    orphan = lab.orphan("vm.define", {"name": vm(H1, "off"), "host": H2})
    lab.drain()
    done = lab.queue.get(orphan.id)
    assert done.state is State.FAILED
    assert done.error is not None and done.error["type"] == "ActionFailed"
    assert "already defined on host 'h1', not 'h2'" in done.error["message"]
    assert lab.where(vm(H1, "off")) == [H1]


@pytest.mark.parametrize(
    ("died_in", "copies", "moves_again"),
    [("_offline_migrate", [H1], 1), ("_finish_move", [H1, H2], 0)],
    ids=["after_stamping_the_source", "after_defining_on_the_target"],
)
def test_an_offline_migration_that_died_half_way_is_finished_and_moves_once(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, died_in: str, copies: list[str], moves_again: int
) -> None:
    """The dispatcher died inside a migration; the takeover's re-run completes it. Died after
    defining the VM on the target, before undefining it on the source (on both hosts now), the
    re-run recognises the target copy by the migration stamp (its own task id) and only removes
    the source copy: the VM is never moved twice."""
    name = vm(H1, "off")
    params = {"name": name, "to": H2}
    orphan = lab.orphan("vm.migrate", params)

    class Died(Exception):
        """The dispatcher process ended here."""

    def die(*args: Any) -> None:
        raise Died

    with monkeypatch.context() as m:
        m.setattr(vm_actions, died_in, die)
        with pytest.raises(Died):
            lab.call(lab.context("vm.migrate", params, orphan.id))
    assert sorted(lab.where(name)) == copies
    ctx = lab.context("vm.migrate", params, orphan.id)
    assert lab.check(ctx).status == Check.NOT_STARTED, "not moved, or both copies left"

    moves: list[Any] = []
    real_move = vm_actions._offline_migrate

    def counted_move(*args: Any) -> None:
        moves.append(args)
        real_move(*args)

    monkeypatch.setattr(vm_actions, "_offline_migrate", counted_move)
    lab.drain()

    done = lab.queue.get(orphan.id)
    assert done.state is State.COMPLETE, done.error
    assert (done.result["host"], done.result["from"]) == (H2, H1)
    assert len(moves) == moves_again
    _migrated(lab)
    target = lab.domain(H2, name)
    assert target is not None
    assert f'task="{orphan.id}"' in target.metadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, vm_actions.MIGRATION_NS, 0
    )
    assert lab.check(ctx).status == Check.DONE
    # The stamp is this task's: another migrate task that never ran is not taken as done.
    assert lab.check(lab.context("vm.migrate", params)).status == Check.NOT_STARTED


# --- shutdown of a guest that ignores it --------------------------------------------------------


def test_shutdown_fails_at_its_timeout_or_forces_the_vm_off(lab: Lab) -> None:
    """A guest that ignores the shutdown request: without force the task fails after `timeout`
    saying what to do, and the VM still runs; with force it is powered off."""
    name = vm(H1, "stubborn")
    polite = lab.run("vm.shutdown", {"name": name, "timeout": 0.3})
    assert (polite.state, polite.attempt) == (State.FAILED, 1)
    assert polite.error is not None
    assert polite.error["type"] == "ActionFailed"
    assert "did not power off within 0.3s; retry with force=true" in polite.error["message"]
    assert lab.state(H1, name) == "running"

    forced = lab.run("vm.shutdown", {"name": name, "timeout": 0.3, "force": True})
    assert forced.state is State.COMPLETE, forced.error
    assert forced.result is not None
    assert (forced.result["state"], forced.result["forced"]) == ("shutoff", True)
    assert lab.state(H1, name) == "shutoff"


# --- failures -----------------------------------------------------------------------------------


ERRORS = [
    pytest.param(
        "vm.migrate",
        {"name": vm(H1, "running"), "to": H2},
        _nothing,
        {"type": "HostError", "libvirt_code": "VIR_ERR_ARGUMENT_UNSUPPORTED", "host": H1},
        "p2p migration is not supported",
        id="live_migrate_unsupported",
    ),
    pytest.param(
        "snapshot.create",
        {"vm": vm(H1, "running"), "name": "d1", "disk_only": True},
        _nothing,
        {"type": "HostError", "libvirt_code": "VIR_ERR_INVALID_ARG", "host": H1},
        "unsupported flags",
        id="disk_only_snapshot_unsupported",
    ),
    pytest.param(
        "vm.define",
        {"name": "bad", "host": H2, "xml": "<domain type='test'><name>bad</name></domain>"},
        _nothing,
        {"type": "HostError", "libvirt_code": "VIR_ERR_XML_ERROR", "host": H2},
        "an os <type> must be specified",
        id="invalid_domain_xml",
    ),
    pytest.param(
        "vm.start",
        {"name": "ghost"},
        _nothing,
        {"type": "ActionFailed"},
        "no vm named 'ghost' on any host; define it first",
        id="no_such_vm",
    ),
    pytest.param(
        "vm.start",
        {"name": vm(H1, "off"), "host": "h9"},
        _nothing,
        {"type": "ActionFailed"},
        "no host named 'h9'",
        id="no_such_host",
    ),
    pytest.param(
        "vm.define",
        {"name": vm(H1, "off"), "host": H2},
        _nothing,
        {"type": "ActionFailed"},
        "already defined on host 'h1', not 'h2'; move it with vm.migrate",
        id="define_pinned_elsewhere",
    ),
    pytest.param(
        "vm.suspend",
        {"name": vm(H1, "off")},
        _nothing,
        {"type": "ActionFailed"},
        "is shutoff; only a running VM can be suspended",
        id="suspend_stopped_vm",
    ),
    pytest.param(
        "vm.undefine",
        {"name": vm(H1, "running")},
        _nothing,
        {"type": "ActionFailed"},
        "is running; stop it first",
        id="undefine_running_vm",
    ),
    pytest.param(
        "vm.migrate",
        {"name": vm(H1, "off"), "to": H2},
        _snapshot_s0,
        {"type": "ActionFailed"},
        "has 1 snapshot(s)",
        id="offline_migrate_with_snapshots",
    ),
    pytest.param(
        "snapshot.delete",
        {"vm": vm(H1, "running"), "name": "s1"},
        lambda lab: lab.call(
            lab.context("snapshot.create", {"vm": vm(H1, "running"), "name": "s1"})
        ),
        {"type": "ActionFailed"},
        "stop it before deleting a snapshot",
        id="delete_snapshot_of_running_vm",
    ),
    pytest.param(
        "pool.delete",
        {"host": H1, "name": POOL},
        _nothing,
        {"type": "ActionFailed"},
        "is running; stop it first (pool.stop)",
        id="delete_running_pool",
    ),
    pytest.param(
        "volume.create",
        {"host": H1, "pool": "nopool", "name": "v", "capacity_mib": 1},
        _nothing,
        {"type": "ActionFailed"},
        "no storage pool 'nopool' on host 'h1'; define it first",
        id="volume_in_missing_pool",
    ),
]


@pytest.mark.parametrize(("action", "params", "prepare", "expected", "says"), ERRORS)
def test_a_refused_operation_fails_its_task_at_once_and_changes_nothing(
    lab: Lab,
    action: str,
    params: dict[str, Any],
    prepare: Callable[[Lab], None],
    expected: dict[str, str],
    says: str,
) -> None:
    """What libvirt refuses (or taskomatic refuses before asking it) fails the task on the first
    attempt although host actions allow several: the error names its type, the host and
    libvirt's code, and says what happened; nothing on the hosts changed."""
    prepare(lab)
    before = lab.world()
    task = lab.run(action, params)
    assert task.state is State.FAILED
    assert (task.attempt, task.max_attempts) == (1, defaults.HOST_ACTION_MAX_ATTEMPTS)
    assert task.error is not None
    assert expected.items() <= task.error.items()
    assert says in task.error["message"]
    if expected["type"] == "HostError":
        assert f"on host '{expected['host']}' failed" in task.error["message"]
        assert task.error["libvirt_domain"].startswith("VIR_FROM_")
    assert lab.world() == before


def test_a_logical_pool_is_defined_over_its_volume_group(lab: Lab) -> None:
    """pool.define type=logical describes an LVM volume group on the given devices; the test
    driver keeps it in memory, which is enough to see the XML libvirt accepted."""
    params = {
        "host": H1,
        "name": "vg-fast",
        "type": "logical",
        "devices": ["/dev/sdb", "/dev/sdc"],
        "source_name": "fast",
    }
    task = lab.run("pool.define", params)
    assert task.state == "complete", task.error
    pool = lab.pool(H1, "vg-fast")
    assert pool is not None
    root = ET.fromstring(pool.XMLDesc(0))
    assert root.get("type") == "logical"
    assert [d.get("path") for d in root.findall("source/device")] == ["/dev/sdb", "/dev/sdc"]
    assert root.findtext("source/name") == "fast"
    assert root.findtext("target/path") == "/dev/fast"
    assert lab.run("pool.define", params).result == task.result  # kept as it is


def test_a_pool_type_that_is_not_built_in_fails_with_what_to_do(lab: Lab) -> None:
    """Unknown pool types need full XML; the task says so and nothing is defined."""
    task = lab.run("pool.define", {"host": H1, "name": "odd", "type": "zfs", "path": "/tank"})
    assert task.state == "failed" and task.attempt == 1
    assert (
        task.error is not None and "give 'xml', or a type of: dir, logical" in task.error["message"]
    )
    assert lab.pool(H1, "odd") is None
