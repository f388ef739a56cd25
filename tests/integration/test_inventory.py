"""The inventory kept from real libvirt: full syncs, events from other connections and other
processes, unreachable hosts, placement from the inventory, drift, and clearing a host by
destroying what is on it.

On the test driver (tests/virt.py's node files, `test:///default` for a host shared by two
connections of this process) and on a private libvirtd serving the test driver to other
processes; SQLite (the inventory's SQL runs on both backends in test_inventory_store.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from helpers import running_dispatcher, wait_until
from qemu import StorageDaemon, start_storage_daemon
from virt import (
    KINDS,
    POOL,
    VM_MIB,
    HostSpec,
    Lab,
    domain_xml,
    pool_uuid,
    pool_volumes,
    vm,
    vm_uuid,
)

from taskomatic import State, defaults, errors
from taskomatic.drift import drift
from taskomatic.flows.clear import clear_by_destroying, clear_by_migrating
from taskomatic.inventory import Disk
from taskomatic.model import HostState
from taskomatic.virt.fleet import Fleet

H1, H2 = "h1", "h2"
GIB = 1024**3
STATES = {1: "running", 3: "paused", 5: "shutoff"}


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that could not be reached may be tried again at once."""
    monkeypatch.setattr(defaults, "HOST_RETRY_BASE_SECONDS", 0.0)


def _states(lab: Lab, **where: Any) -> dict[str, str]:
    return {v.name: v.state for v in lab.inventory.vms(**where)}


def _take_down(lab: Lab, host: str) -> Path:
    """The host stops answering: its connection is gone and cannot be opened again (until
    its node file is put back at the returned path)."""
    uri = lab.queue.hosts.get(host).uri
    node = Path(uri.removeprefix("test://"))
    node.rename(node.with_suffix(".away"))
    lab.fleet.connections.forget(uri)
    return node


# --- syncs --------------------------------------------------------------------------------------


def test_a_sync_reads_each_host_as_its_node_file_describes_it(make_lab: Any) -> None:
    """After one sync the inventory holds exactly the node files: the host's CPUs and memory,
    each VM's UUID, state, vCPUs, memory and disk, each pool's volumes and sizes."""
    specs = (HostSpec(H1), HostSpec(H2, memory_mib=32768, cpus=4))
    lab: Lab = make_lab(*specs)
    with lab.keeper(thread=False):
        pass
    major, minor, release = (libvirt.getVersion() // 10**k % 1000 for k in (6, 3, 0))
    for index, spec in enumerate(specs, start=1):
        view = lab.inventory.host(spec.name)
        host = view.record
        assert host is not None
        assert (host.reachable, host.error, host.cpus, host.memory_kib) == (
            True,
            None,
            spec.cpus,
            spec.memory_mib * 1024,
        )
        assert host.libvirt_version == f"{major}.{minor}.{release}"
        assert host.hypervisor is not None and host.hypervisor.startswith("TEST ")
        assert host.confirmed_at == host.synced_at
        assert sorted((v.name, v.uuid, v.state, v.persistent) for v in view.vms) == sorted(
            (vm(spec.name, kind), vm_uuid(index, kind), STATES[runstate], True)
            for kind, runstate in KINDS.items()
        )
        for v in view.vms:
            assert (v.vcpus, v.memory_kib, v.max_memory_kib, v.snapshots) == (
                1,
                VM_MIB * 1024,
                VM_MIB * 1024,
                (),
            )
            assert v.disks == (Disk("vda", f"/{POOL}-{spec.name}/{v.name}.qcow2", "qcow2"),)
            assert v.last_state is None and v.confirmed_at == host.synced_at
        (pool,) = view.pools
        assert (pool.name, pool.uuid, pool.state, pool.persistent) == (
            POOL,
            pool_uuid(index),
            "running",
            True,
        )
        volumes = pool_volumes(spec.name)
        assert (pool.capacity, pool.allocation) == (100 * GIB, len(volumes) * GIB)
        assert [(v.name, v.path, v.capacity, v.allocation) for v in pool.volumes] == [
            (name, f"/{POOL}-{spec.name}/{name}", 10 * GIB, GIB) for name in sorted(volumes)
        ]


def test_a_change_that_sends_no_event_is_read_by_the_next_sync(lab: Lab) -> None:
    """The test driver sends no event for a snapshot (nor does QEMU for many changes): the
    periodic sync repairs the inventory within one interval; what did not change keeps its
    `since`."""
    name = vm(H1, "off")
    with lab.keeper(interval=0.2):
        before = {v.name: v for v in lab.inventory.vms(host=H1)}
        dom = lab.domain(H1, name)
        assert dom is not None
        dom.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>", 0)
        wait_until(
            lambda: lab.inventory.vms(host=H1, name=name)[0].snapshots == ("s1",),
            what="the snapshot in the inventory",
        )
        after = {v.name: v for v in lab.inventory.vms(host=H1)}
    assert after[name].since == before[name].since, "its state did not change"
    assert after[name].confirmed_at > before[name].confirmed_at


# --- events -------------------------------------------------------------------------------------


def test_changes_made_through_another_connection_arrive_as_events(lab: Lab) -> None:
    """`test:///default` is one host shared by every connection of this process: a VM
    defined, started, paused, destroyed and undefined, and a pool stopped and started, by
    another connection appear in the inventory at once, through libvirt's events alone (the
    keeper's next sync is a minute away)."""
    lab.queue.hosts.add("shared", "test:///default")
    outside = libvirt.open("test:///default")
    try:
        with lab.keeper(interval=60):

            def shows(state: str | None) -> bool:
                found = lab.inventory.vms(host="shared", name="outsider")
                return [v.state for v in found] == ([state] if state else [])

            dom = outside.defineXML(domain_xml("outsider"))
            wait_until(lambda: shows("shutoff"), what="the defined vm")
            dom.create()
            wait_until(lambda: shows("running"), what="the vm running")
            (running,) = lab.inventory.vms(host="shared", name="outsider")
            assert running.reason == "booted"
            dom.suspend()
            wait_until(lambda: shows("paused"), what="the vm paused")
            dom.destroy()
            wait_until(lambda: shows("shutoff"), what="the vm destroyed")
            assert lab.inventory.vms(host="shared", name="outsider")[0].reason == "destroyed"
            dom.undefine()
            wait_until(lambda: shows(None), what="the vm gone")

            pool = outside.storagePoolLookupByName("default-pool")
            pool.destroy()
            wait_until(
                lambda: [p.state for p in lab.inventory.pools(host="shared")] == ["inactive"],
                what="the pool stopped",
            )
            pool.create(0)
            wait_until(
                lambda: [p.state for p in lab.inventory.pools(host="shared")] == ["running"],
                what="the pool running",
            )
    finally:
        outside.close()


def test_events_keep_coming_after_a_connection_is_reopened(lab: Lab) -> None:
    """A dropped connection took its callbacks with it. When a worker re-opens it, the keeper
    syncs the host (a re-opened node file starts over from the file) and registers its
    callbacks on the new connection, so the next change arrives as an event again."""
    name = vm(H1, "off")
    with lab.keeper(interval=60):
        lab.domain(H1, name).create()  # type: ignore[union-attr]
        wait_until(lambda: _states(lab, host=H1)[name] == "running", what="the vm running")
        lab.fleet.connections.forget(lab.queue.hosts.get(H1).uri)
        conn = lab.conn(H1)  # re-opened as a worker would: the host as its file describes it
        wait_until(lambda: _states(lab, host=H1)[name] == "shutoff", what="the host re-read")
        conn.defineXML(domain_xml("after"))
        wait_until(lambda: "after" in _states(lab, host=H1), what="an event from the new one")


def test_a_dispatcher_keeps_the_inventory_and_reads_back_what_its_tasks_changed(
    lab: Lab,
) -> None:
    """A dispatcher with `inventory=True` syncs every host when it starts; after each task it
    re-reads the VM or pool the task names, so even a snapshot (no libvirt event) shows at
    once rather than at the next sync."""
    name = vm(H1, "running")
    with running_dispatcher(
        lab.queue, fleet=lab.fleet, inventory=True, inventory_interval=60, grace=1
    ):
        wait_until(lambda: len(lab.inventory.hosts()) == 2, what="the first sync")
        task = lab.submit("snapshot.create", {"vm": name, "name": "s1"})
        (done,) = lab.queue.wait(task.id, timeout=10)
        assert done.state is State.COMPLETE, done.error
        wait_until(
            lambda: lab.inventory.vms(name=name)[0].snapshots == ("s1",),
            2,
            "the snapshot in the inventory",
        )


# --- unreachable and stale ----------------------------------------------------------------------


def test_a_host_that_stops_answering_is_marked_unreachable_and_its_vms_unknown(
    lab: Lab, fast_retries: None
) -> None:
    """The VMs of a host that does not answer read "unknown since" the moment it stopped
    answering, keeping the state it last reported; the other host is unaffected; when it
    answers again, its VMs are known again."""
    with lab.keeper(thread=False) as keeper:
        known = _states(lab, host=H2)
        node = _take_down(lab, H2)
        keeper.sync()
        host = lab.inventory.host(H2).record
        assert host is not None and not host.reachable
        assert host.error is not None and "host 'h2'" in host.error
        for v in lab.inventory.vms(host=H2):
            assert (v.state, v.last_state, v.since) == ("unknown", known[v.name], host.since)
            assert v.reason is not None and v.reason.startswith("host unreachable: ")
        assert "unknown" not in _states(lab, host=H1).values()
        assert set(_states(lab, state="unknown")) == set(known)

        keeper.sync()
        again = lab.inventory.host(H2).record
        assert again is not None and again.since == host.since, "unreachable since the first"

        node.with_suffix(".away").rename(node)
        keeper.sync()
        back = lab.inventory.host(H2).record
        assert back is not None and back.reachable and back.since > host.since
        assert _states(lab, host=H2) == known


def test_an_inventory_nobody_keeps_reads_unknown(lab: Lab) -> None:
    """Once no dispatcher has confirmed a host for a few sync intervals, every VM on it reads
    unknown: a reader never takes an abandoned inventory for the truth."""
    with lab.keeper(interval=1.0, thread=False) as keeper:
        lab.clock.advance(keeper.valid_for + 1)
    vms = lab.inventory.vms()
    assert {v.state for v in vms} == {"unknown"}
    assert all(v.reason == "inventory not kept (is a dispatcher running?)" for v in vms)
    assert lab.inventory.rooms() == {}, "placement asks the hosts instead"


# --- across processes ---------------------------------------------------------------------------


@pytest.fixture
def daemon() -> Iterator[StorageDaemon]:
    """A private libvirtd; its test driver (`test+unix:///default?socket=…`) is one host
    shared by every process that connects."""
    started = start_storage_daemon()
    try:
        yield started
    finally:
        started.stop()
        shutil.rmtree(started.base, ignore_errors=True)


def _client(uri: str, code: str) -> None:
    """Run libvirt calls in another process (as `virsh` would), on connection `conn`."""
    script = f"import libvirt\nconn = libvirt.open({uri!r})\n{code}\nconn.close()\n"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)


def test_changes_made_by_another_process_appear_in_the_inventory(
    lab: Lab, daemon: StorageDaemon, fast_retries: None
) -> None:
    """Another process defines and starts a VM through the daemon, then removes it: the
    inventory follows through libvirt's events. When the daemon dies, the host is marked
    unreachable and its VMs unknown."""
    uri = f"test+unix:///default?socket={daemon.socket}"
    lab.queue.hosts.add("remote", uri)
    with lab.keeper(interval=60) as keeper:
        assert _states(lab, host="remote") == {"test": "running"}  # the driver's own
        xml = domain_xml("other")
        _client(uri, f"conn.defineXML({xml!r}).create()")
        wait_until(lambda: _states(lab, host="remote").get("other") == "running", what="the new vm")
        _client(uri, "d = conn.lookupByName('other'); d.destroy(); d.undefine()")
        wait_until(lambda: "other" not in _states(lab, host="remote"), what="the vm gone")

        daemon.stop()
        keeper.sync()
        host = lab.inventory.host("remote").record
        assert host is not None and not host.reachable
        assert _states(lab, host="remote") == {"test": "unknown"}
        assert "unknown" not in _states(lab, host=H1).values()


# --- placement ----------------------------------------------------------------------------------


def _asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hosts placement asks about their room, in order."""
    asked: list[str] = []
    real = Fleet._ask

    def ask(self: Fleet, host: Any, memory_kib: int) -> float | str:
        asked.append(host.name)
        return real(self, host, memory_kib)

    monkeypatch.setattr(Fleet, "_ask", ask)
    return asked


def _fill(lab: Lab, host: str, name: str = "big", memory_mib: int = 15_000) -> libvirt.virDomain:
    """Start a VM outside taskomatic that takes nearly all of a 16 GiB host's memory."""
    dom = lab.conn(host).defineXML(domain_xml(name, memory_mib=memory_mib))
    dom.create()
    return dom


def test_placement_picks_from_the_inventory_and_asks_only_that_host(
    make_lab: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a current inventory, placement ranks the hosts from it and confirms only its
    choice on the host: never the host in maintenance (though it has the most memory), never
    the host without the memory. Without an inventory it asks every active host."""
    lab: Lab = make_lab(HostSpec(H1), HostSpec(H2), HostSpec("h3", memory_mib=65536))
    lab.queue.hosts.set_state("h3", HostState.MAINTENANCE)
    _fill(lab, H2)
    asked = _asked(monkeypatch)
    with lab.fleet.placing():
        assert lab.fleet.place(4096 * 1024).name == H1
    assert asked == [H1, H2], "no inventory yet: every active host is asked"

    with lab.keeper(thread=False):
        rooms = lab.inventory.rooms()
    assert rooms[H2].unpromised_kib < 4096 * 1024 < rooms[H1].unpromised_kib
    asked.clear()
    with lab.fleet.placing():
        assert lab.fleet.place(4096 * 1024).name == H1
    assert asked == [H1]

    task = lab.submit("vm.define", {"name": "web", "memory_mib": 4096})
    lab.drain(inventory=True, inventory_interval=60)
    assert lab.queue.get(task.id).result["host"] == H1
    assert lab.where("web") == [H1]


def test_placement_confirms_on_the_host_when_the_inventory_is_behind(
    make_lab: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inventory says both hosts have room, but both were filled since: each is asked,
    each says no, and the task is refused with the hosts' own figures. Once one host has
    room again although the inventory says it is full, it is still found."""
    lab: Lab = make_lab(HostSpec(H1), HostSpec(H2))
    with lab.keeper(thread=False):
        pass
    _fill(lab, H1)
    big = _fill(lab, H2)
    asked = _asked(monkeypatch)
    with lab.fleet.placing(), pytest.raises(errors.NoHostAvailable) as refused:
        lab.fleet.place(4096 * 1024)
    assert "h1: 616 MiB free, 4096 needed; h2: 616 MiB free, 4096 needed" in str(refused.value)
    assert sorted(asked) == [H1, H2]

    with lab.keeper(thread=False):  # now the inventory says both are full
        pass
    big.destroy()
    with lab.fleet.placing():
        assert lab.fleet.place(4096 * 1024).name == H2


# --- drift --------------------------------------------------------------------------------------


def test_drift_lists_where_hosts_disagree_with_the_last_task(lab: Lab, fast_retries: None) -> None:
    """The last task of each VM against the inventory: a VM started by a task and destroyed
    outside, one destroyed by a task and undefined outside, one undefined by a task and
    defined again outside, one on a host that stopped answering. Before those changes,
    there is no drift."""
    started, stopped, removed, remote = (
        vm(H1, "off"),
        vm(H1, "running"),
        vm(H2, "off"),
        vm(H2, "paused"),
    )
    for action, name in (
        ("vm.start", started),
        ("vm.destroy", stopped),
        ("vm.undefine", removed),
        ("vm.start", remote),
    ):
        task = lab.run(action, {"name": name})
        assert task.state is State.COMPLETE, task.error
    with lab.keeper(thread=False) as keeper:
        assert drift(lab.inventory) == []
        lab.domain(H1, started).destroy()  # type: ignore[union-attr]
        lab.domain(H1, stopped).undefine()  # type: ignore[union-attr]
        lab.conn(H1).defineXML(domain_xml(removed))
        keeper.sync()
        _take_down(lab, H2)
        keeper.sync()
    found = {d.vm: d for d in drift(lab.inventory)}
    assert {name: d.kind for name, d in found.items()} == {
        started: "state",
        stopped: "missing",
        removed: "present",
        remote: "unknown",
    }
    assert found[started].expected == {"host": H1, "state": "running"}
    assert found[started].found == {"hosts": [H1], "state": "shutoff"}
    assert found[started].message.startswith(
        f"vm.start left vm {started!r} running; host 'h1' reports it shutoff (destroyed) since "
    )
    assert found[removed].expected == {"defined": False}
    assert found[remote].message.startswith(f"vm {remote!r} is unknown since ")


# --- clearing a host by destroying ------------------------------------------------------------


def _plan(lab: Lab, host: str, **options: Any) -> list[Any]:
    _group, tasks = clear_by_destroying(
        lab.queue, host, i_understand_this_destroys_data=True, **options
    )
    return tasks


def test_clearing_a_host_by_destroying_leaves_it_empty_and_reports_each_object(lab: Lab) -> None:
    """One group: maintenance, then per VM destroy -> undefine, per pool stop -> delete, and
    a check that the host is empty; each object's task reports its own result. The other
    host is untouched, and the inventory follows."""
    running = lab.domain(H1, vm(H1, "running"))
    assert running is not None
    running.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>", 0)
    untouched = lab.world()[H2]
    with lab.keeper(thread=False) as keeper:
        tasks = _plan(lab, H1)
        lab.drain()
        keeper.sync()
    done = [lab.queue.get(t.id) for t in tasks]
    assert all(t.state is State.COMPLETE for t in done), [t.error for t in done]
    names = sorted(vm(H1, kind) for kind in KINDS)
    assert [(t.action, t.params["name"]) for t in done] == [
        ("host.maintenance", H1),
        *((action, n) for n in names for action in ("vm.destroy", "vm.undefine")),
        ("pool.stop", POOL),
        ("pool.delete", POOL),
        ("host.verify_empty", H1),
    ]
    results = {(t.action, t.params["name"]): t.result for t in done}
    for n in names:
        assert results["vm.destroy", n]["state"] == "shutoff"
        assert results["vm.undefine", n] == {"vm": n, "host": H1, "undefined": True}
    assert results["pool.delete", POOL] == {"host": H1, "pool": POOL, "deleted": True}
    assert results["host.verify_empty", H1] == {"host": H1, "empty": True}
    assert lab.queue.group(done[0].group_id).state == "complete"  # type: ignore[arg-type]
    assert lab.world()[H1] == {"state": "maintenance", "vms": {}, "pools": {}}
    assert lab.world()[H2] == untouched
    assert lab.inventory.vms(host=H1) == [] and lab.inventory.pools(host=H1) == []


def test_a_vm_defined_after_the_clear_was_planned_fails_its_last_check(lab: Lab) -> None:
    """The group destroys what the inventory listed; a VM defined on the host in between is
    not destroyed (it was never asked for), and the final check fails naming it."""
    with lab.keeper(thread=False):
        tasks = _plan(lab, H1, delete_storage=True)
    lab.conn(H1).defineXML(domain_xml("late"))
    lab.drain()
    last = lab.queue.get(tasks[-1].id)
    assert (last.action, last.state) == ("host.verify_empty", State.FAILED)
    assert last.error is not None
    assert "host 'h1' still has vm(s) late, defined after the clear was planned" in str(
        last.error["message"]
    )
    assert lab.where("late") == [H1]
    assert {t.params.get("delete_storage") for t in tasks if t.action == "pool.delete"} == {True}


def test_a_clear_is_refused_without_confirmation_or_a_current_inventory(
    lab: Lab, fast_retries: None
) -> None:
    """Nothing is submitted without the explicit confirmation, for an unknown host, before
    the host's first sync, while it is unreachable, or once nobody keeps its inventory."""
    with pytest.raises(errors.ValidationError, match="i_understand_this_destroys_data=True"):
        clear_by_destroying(lab.queue, H1)
    with pytest.raises(errors.HostNotFound):
        _plan(lab, "nope")
    with pytest.raises(errors.InventoryNotCurrent, match="host 'h1' has no inventory yet"):
        _plan(lab, H1)
    with lab.keeper(interval=1.0, thread=False) as keeper:
        _take_down(lab, H2)
        keeper.sync()
    with pytest.raises(errors.InventoryNotCurrent, match="host 'h2' is unreachable since"):
        _plan(lab, H2)
    lab.clock.advance(keeper.valid_for + 1)
    with pytest.raises(errors.InventoryNotCurrent, match="no dispatcher keeps it now"):
        _plan(lab, H1)
    assert lab.queue.list().tasks == []


# --- clearing a host by migrating -------------------------------------------------------------


def test_clearing_a_host_by_migrating_moves_what_can_move_and_names_what_cannot(
    lab: Lab,
) -> None:
    """Maintenance, then the host's VMs listed as it runs and one move per VM added to the
    group, each to a host chosen when it runs: the stopped VM's definition moves to h2; the
    test driver cannot live-migrate, so each running or paused VM's move fails with
    libvirt's code (the others still move) and the group fails, the last check never
    running. A VM defined once maintenance began, while the host drains, is placed
    elsewhere; no inventory is needed to plan it."""
    group, tasks = clear_by_migrating(lab.queue, H1)
    assert [t.action for t in tasks] == ["host.maintenance", "host.evacuate", "host.verify_empty"]
    maintenance = next(t for t in tasks if t.action == "host.maintenance")
    newcomer = lab.submit(
        "vm.define", {"name": "newcomer", "memory_mib": 64}, after=[maintenance.id]
    )
    lab.drain()
    members = lab.queue.list(group=group.id, limit=100).tasks
    done = {(t.action, t.params["name"]): t for t in members}
    evacuate = done["host.evacuate", H1]
    assert evacuate.result == {"host": H1, "vms": sorted(vm(H1, k) for k in KINDS)}
    assert done["host.maintenance", H1].state is State.COMPLETE
    stopped = done["vm.migrate", vm(H1, "off")]
    assert stopped.state is State.COMPLETE
    assert (stopped.result["host"], stopped.result["from"]) == (H2, H1)  # type: ignore[index]
    for kind in ("running", "paused", "stubborn"):
        failed = done["vm.migrate", vm(H1, kind)]
        assert failed.state is State.FAILED and failed.attempt == 1
        assert failed.error is not None
        assert failed.error["libvirt_code"] == "VIR_ERR_ARGUMENT_UNSUPPORTED"
        assert lab.where(vm(H1, kind)) == [H1]  # still where it was, untouched
    assert done["host.verify_empty", H1].state is State.CANCELLED
    assert lab.queue.group(group.id).state == "failed"
    assert lab.where(vm(H1, "off")) == [H2]
    assert lab.queue.get(newcomer.id).result["host"] == H2  # type: ignore[index]
    assert lab.host_state(H1) is HostState.MAINTENANCE
