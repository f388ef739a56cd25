"""Live migration of running VMs between two real libvirt hosts (tests/twohosts.py).

Each host is a private libvirtd in its own namespaces, with QEMU; the VMs boot no OS and
their disks are not shared, so every live migration copies the disk across the veth pair.
What is proved: a running VM moves through a real dispatcher and arrives running and
persistent, gone from its source with its definition; clearing a host moves every VM off it;
an aborted migration leaves the VM running where it was and fails its task saying so; a
dispatcher killed mid-migration is followed by one that finds out how the migration ended and
never starts a second one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from helpers import open_queue, running_dispatcher, wait_until
from procs import Processes
from twohosts import TwoHosts, start_two_hosts

from taskomatic import Dispatcher, Queue, State, Task, TaskSpec
from taskomatic.actions.vm import MIGRATION_NS
from taskomatic.flows.clear import clear_by_migrating
from taskomatic.inventory import Inventory
from taskomatic.model import HostState
from taskomatic.virt.connections import Connections, start_event_loop
from taskomatic.virt.fleet import Fleet

A, B = "twohost-a", "twohost-b"

SLOW_MIB = 4
"""MiB/s a migration that a test interrupts may use; it copies a disk of SLOW_DISK_MIB."""

SLOW_DISK_MIB = 24

WAIT_SECONDS = 90.0
"""Bound on a migration or a takeover finishing; a healthy one takes seconds."""


@pytest.fixture(scope="module")
def lab() -> Iterator[TwoHosts]:
    """Both hosts, started once for this module and stopped (by pid) after it."""
    start_event_loop()  # before any connection: keepalives need it
    hosts = start_two_hosts()
    try:
        yield hosts
    finally:
        hosts.stop()
        print(hosts.a.output()[-4000:], hosts.b.output()[-4000:], sep="\n")
        subprocess.run(["rm", "-rf", str(hosts.base)], check=False)


@pytest.fixture(scope="module")
def connections(lab: TwoHosts) -> Iterator[Connections]:
    """The dispatchers' connections in this process, shared by the tests of the module."""
    conns = Connections()
    try:
        yield conns
    finally:
        conns.close()


@contextlib.contextmanager
def _hosts_queue(lab: TwoHosts, url: str) -> Iterator[Queue]:
    """A queue on `url` with both hosts registered, which are empty before and after."""
    lab.clean()
    with open_queue(url) as q:
        q.hosts.add(A, lab.a.uri)
        q.hosts.add(B, lab.b.uri)
        try:
            yield q
        finally:
            lab.clean()


@pytest.fixture
def queue(lab: TwoHosts, sqlite_url: str) -> Iterator[Queue]:
    """A queue (SQLite) with both hosts registered; each test starts on two empty hosts."""
    with _hosts_queue(lab, sqlite_url) as q:
        yield q


@pytest.fixture
def pg_queue(lab: TwoHosts, pg_url: str) -> Iterator[Queue]:
    """The same on PostgreSQL."""
    with _hosts_queue(lab, pg_url) as q:
        yield q


def _names(lab: TwoHosts, host: str, flags: int = 0) -> set[str]:
    return {d.name() for d in lab.conn(host).listAllDomains(flags)}


def _dom(lab: TwoHosts, host: str, vm: str) -> libvirt.virDomain:
    return lab.conn(host).lookupByName(vm)


def _stamp_task(dom: libvirt.virDomain) -> str:
    """The task id in the migration stamp a domain carries."""
    text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, MIGRATION_NS, 0)
    return text.split('task="', 1)[1].split('"', 1)[0]


def _migrating(dom: libvirt.virDomain) -> bool:
    stats = dom.jobStats(0)
    return bool(
        stats.get("type") not in (None, libvirt.VIR_DOMAIN_JOB_NONE)
        and stats.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT
    )


def _copied(lab: TwoHosts, vm: str) -> bool:
    """Whether the disk on host b holds exactly what the disk on host a holds."""
    done = subprocess.run(
        ["qemu-img", "compare", "-U", str(lab.image("a", vm)), str(lab.image("b", vm))],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode == 0


def _run(queue: Queue, connections: Connections, *specs: TaskSpec) -> list[Task]:
    _, tasks = queue.submit_group(specs)
    Dispatcher(queue, fleet=Fleet(queue.hosts, connections)).run(until_empty=True)
    return [queue.get(t.id) for t in tasks]


# --- one VM ---------------------------------------------------------------------------------


def test_a_running_vm_moves_live_with_its_disk_and_nothing_is_left_on_its_source(
    lab: TwoHosts, queue: Queue, connections: Connections
) -> None:
    """vm.migrate of a running VM without shared storage: it runs on b, persistently, its
    disk copied byte for byte; on a it is neither running nor defined; the result says so."""
    lab.make_vm("a", "web", size_mib=16, data_mib=8)
    before = _dom(lab, "a", "web").UUIDString()
    (task,) = _run(
        queue, connections, TaskSpec("vm.migrate", {"name": "web", "to": B, "copy_storage": True})
    )
    assert task.state is State.COMPLETE, task.error
    assert task.result is not None
    assert (task.result["host"], task.result["from"]) == (B, A)
    assert task.result["state"] == "running"
    moved = _dom(lab, "b", "web")
    assert moved.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert moved.isPersistent() and moved.UUIDString() == before
    assert _stamp_task(moved) == str(task.id)
    assert _names(lab, "a") == set()  # neither running nor defined
    assert _copied(lab, "web")


def test_a_running_vm_placed_when_the_task_runs_goes_to_the_other_host(
    lab: TwoHosts, queue: Queue, connections: Connections
) -> None:
    """Without `to`, the target is chosen when the task runs: the only other active host."""
    lab.make_vm("b", "db", size_mib=16, data_mib=1)
    (task,) = _run(queue, connections, TaskSpec("vm.migrate", {"name": "db", "copy_storage": True}))
    assert task.state is State.COMPLETE, task.error
    assert task.result is not None and (task.result["host"], task.result["from"]) == (A, B)
    assert _names(lab, "a", libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE) == {"db"}
    assert _names(lab, "b") == set()


def test_without_copy_storage_the_migration_fails_and_the_vm_keeps_running(
    lab: TwoHosts, queue: Queue, connections: Connections
) -> None:
    """Hosts without shared storage: a move that does not copy the disk is refused by libvirt
    (the target has no such file), the task fails with libvirt's reason, the VM stays put."""
    lab.make_vm("a", "nocopy", size_mib=16)
    (task,) = _run(queue, connections, TaskSpec("vm.migrate", {"name": "nocopy", "to": B}))
    assert task.state is State.FAILED
    assert task.error is not None and task.error["host"] == A
    assert "live-migrating vm 'nocopy' to host 'twohost-b'" in task.error["message"]
    assert _names(lab, "a", libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE) == {"nocopy"}
    assert _names(lab, "b") == set()


# --- clearing a host ------------------------------------------------------------------------


def test_clearing_a_host_by_migrating_moves_every_running_and_stopped_vm(
    lab: TwoHosts, queue: Queue, connections: Connections
) -> None:
    """Maintenance, the VMs listed as it runs, one live move per running VM (disk copied),
    the stopped VM's definition moved, and the final check finding host a empty: every VM
    is on b as it was."""
    for vm in ("one", "two"):
        lab.make_vm("a", vm, size_mib=16, data_mib=2)
    lab.make_vm("a", "idle", start=False)
    fleet = Fleet(queue.hosts, connections)
    with running_dispatcher(queue, fleet=fleet, inventory=True, poll=0.5):
        wait_until(
            lambda: Inventory(queue).host(A).record is not None, WAIT_SECONDS, "the inventory"
        )
        group, _ = clear_by_migrating(queue, A, copy_storage=True)
        _, members = queue.wait_group(group.id, timeout=WAIT_SECONDS)  # moves added as it ran
    ended = {(t.action, t.params["name"]): t for t in members}
    assert {name for action, name in ended if action == "vm.migrate"} == {"one", "two", "idle"}
    assert queue.group(group.id).state == "complete", {
        n: (t.state, t.error) for n, t in ended.items()
    }
    assert _names(lab, "a") == set()
    assert _names(lab, "b", libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE) == {"one", "two"}
    assert _names(lab, "b", libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE) == {"idle"}
    assert all(_dom(lab, "b", vm).isPersistent() for vm in ("one", "two", "idle"))
    assert queue.hosts.get(A).state is HostState.MAINTENANCE
    assert _copied(lab, "one") and _copied(lab, "two")


# --- aborting -------------------------------------------------------------------------------


def test_an_aborted_migration_leaves_the_vm_running_on_its_source_and_fails_the_task(
    lab: TwoHosts, queue: Queue, connections: Connections
) -> None:
    """`abortJob()` on the source while a slow migration copies the disk: the task fails at
    once (no retry) saying the migration was aborted and where the VM runs; it runs there
    still, the same QEMU process, and the target has neither a domain nor a disk left."""
    lab.make_vm("a", "slow", size_mib=SLOW_DISK_MIB, data_mib=8)
    source = _dom(lab, "a", "slow")
    domain_id = source.ID()
    (task,) = queue.submit_group(
        [
            TaskSpec(
                "vm.migrate",
                {"name": "slow", "to": B, "copy_storage": True, "bandwidth_mib": SLOW_MIB},
            )
        ]
    )[1]
    with running_dispatcher(queue, fleet=Fleet(queue.hosts, connections), poll=0.5):
        wait_until(lambda: _migrating(source), WAIT_SECONDS, "the migration to start")
        source.abortJob()
        wait_until(lambda: queue.get(task.id).state.terminal, WAIT_SECONDS, "the task to end")
    ended = queue.get(task.id)
    assert ended.state is State.FAILED and ended.attempt == 1
    assert ended.error is not None
    assert ended.error["type"] == "ActionFailed"
    assert ended.error["libvirt_code"] == "VIR_ERR_OPERATION_ABORTED"
    message = ended.error["message"]
    assert "was aborted" in message and "still runs on host 'twohost-a'" in message
    assert source.state()[0] == libvirt.VIR_DOMAIN_RUNNING and source.ID() == domain_id
    assert source.isPersistent()
    assert _names(lab, "b") == set()
    # libvirt created the disk's copy on b for the migration, and left it; the task removed it.
    assert not lab.image("b", "slow").exists()
    assert lab.image("a", "slow").exists()


def test_cancelling_a_waiting_migration_aborts_it_on_the_host_and_the_vm_stays(
    lab: TwoHosts, queue: Queue, connections: Connections
) -> None:
    """The task waits while host a's libvirtd migrates (its job's progress recorded); a
    cancel aborts the migration on the host, and the task ends cancelled once the job is
    gone, saying the VM still runs on a — which it does, the same QEMU process."""
    lab.make_vm("a", "cancelled", size_mib=SLOW_DISK_MIB, data_mib=8)
    source = _dom(lab, "a", "cancelled")
    domain_id = source.ID()
    # Slower than the other slow ones: the cancel must land while the disk is still copied.
    task = queue.submit(
        "vm.migrate", {"name": "cancelled", "to": B, "copy_storage": True, "bandwidth_mib": 1}
    )
    with running_dispatcher(queue, fleet=Fleet(queue.hosts, connections), poll=0.5):

        def progressing() -> bool:
            row = queue.get(task.id)
            return row.state is State.WAITING and bool((row.job or {}).get("progress"))

        wait_until(progressing, WAIT_SECONDS, "the task waiting with the job's progress")
        first = (queue.get(task.id).job or {})["progress"]["time_elapsed"]

        def moved_on() -> bool:
            return (queue.get(task.id).job or {})["progress"]["time_elapsed"] > first

        wait_until(moved_on, WAIT_SECONDS, "the recorded progress to follow the host's job")
        [asked] = queue.cancel(task.id, "not now")
        assert asked.state is State.WAITING
        [ended] = queue.wait(task.id, timeout=WAIT_SECONDS)
    assert ended.state is State.CANCELLED
    assert ended.error is not None and "not now" in ended.error["message"]
    assert "still runs on host 'twohost-a'" in ended.error["message"]
    messages = [e.message for e in queue.events(task.id)]
    assert "cancel: abort of the migration job requested on twohost-a" in messages
    assert source.state()[0] == libvirt.VIR_DOMAIN_RUNNING and source.ID() == domain_id
    assert _names(lab, "b") == set()
    assert not lab.image("b", "cancelled").exists()


# --- a dispatcher killed mid-migration --------------------------------------------------------


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Dispatcher processes of one test, killed at its end (their output then printed)."""
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        print(processes.kill_all())


def _dispatcher(procs: Processes, url: str) -> Any:
    return procs.start(
        "--database-url",
        url,
        "dispatcher",
        "--workers",
        "2",
        "--lease",
        "2",
        "--recovery",
        "0.5",
        "--poll",
        "0.5",
        "--no-inventory",
    )


def _killed_mid_migration(
    lab: TwoHosts, queue: Queue, procs: Processes, url: str, vm: str
) -> tuple[Task, libvirt.virDomain]:
    """Submit a slow migration of a running `vm` from a to b, start a dispatcher process,
    and kill -9 it once host a's libvirtd is migrating and b has the incoming domain; the
    task and the source domain."""
    lab.make_vm("a", vm, size_mib=SLOW_DISK_MIB, data_mib=8)
    source = _dom(lab, "a", vm)
    (task,) = queue.submit_group(
        [
            TaskSpec(
                "vm.migrate",
                {"name": vm, "to": B, "copy_storage": True, "bandwidth_mib": SLOW_MIB},
            )
        ]
    )[1]
    victim = _dispatcher(procs, url)
    wait_until(lambda: _migrating(source), WAIT_SECONDS, "the migration to start")
    wait_until(lambda: vm in _names(lab, "b"), WAIT_SECONDS, "the incoming domain on b")
    # A host job: the task waits on it, its worker free, its job recorded in the row.
    waiting = wait_until(lambda: queue.get(task.id).state is State.WAITING, WAIT_SECONDS, "waiting")
    assert waiting
    job = queue.get(task.id).job
    assert job is not None and (job["host"], job["kind"]) == (A, "migration")
    victim.kill()
    return task, source


def _taken_over(queue: Queue, task: Task) -> bool:
    return any(e.message.startswith("taken over") for e in queue.events(task.id))


def _qemu_pid(lab: TwoHosts, host: str, vm: str) -> int:
    return int((lab.hosts[host].base / "run" / "qemu" / f"{vm}.pid").read_text().strip())


def _held_until_taken_over(
    lab: TwoHosts, queue: Queue, procs: Processes, url: str, vm: str
) -> tuple[Task, libvirt.virDomain, int]:
    """kill -9 mid-migration, which goes on in host a's libvirtd but is held there (the
    target's QEMU stopped, so the copy stalls) until a new dispatcher has taken the task over
    and is awaiting it; then let go. The task, the source domain, the incoming domain's id."""
    task, source = _killed_mid_migration(lab, queue, procs, url, vm)
    incoming_id = _dom(lab, "b", vm).ID()  # paused on b until the migration ends
    target_qemu = _qemu_pid(lab, "b", vm)
    os.kill(target_qemu, signal.SIGSTOP)
    try:
        assert _migrating(source)
        _dispatcher(procs, url)
        wait_until(lambda: _taken_over(queue, task), WAIT_SECONDS, "the takeover")
        assert _migrating(source), "the migration ended while held"
        assert queue.get(task.id).state is State.WAITING  # watching it, not done, not failed
    finally:
        os.kill(target_qemu, signal.SIGCONT)
    return task, source, incoming_id


def test_killed_mid_migration_the_next_dispatcher_awaits_it_and_completes_the_task(
    lab: TwoHosts, queue: Queue, procs: Processes, sqlite_url: str
) -> None:
    """The migration a killed dispatcher left running completes while the next one awaits
    it: the task completes once the VM has arrived — the one incoming domain, never a second
    move."""
    task, _, incoming_id = _held_until_taken_over(lab, queue, procs, sqlite_url, "held")
    wait_until(lambda: queue.get(task.id).state.terminal, WAIT_SECONDS, "the task to end")
    ended = queue.get(task.id)
    assert ended.state is State.COMPLETE, ended.error
    assert ended.result is not None and (ended.result["host"], ended.result["from"]) == (B, A)
    moved = _dom(lab, "b", "held")
    assert moved.ID() == incoming_id and moved.isPersistent()
    assert moved.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert _stamp_task(moved) == str(task.id)
    assert _names(lab, "a") == set()


def test_killed_mid_migration_aborted_while_the_next_dispatcher_awaits_it_fails_the_task(
    lab: TwoHosts, queue: Queue, procs: Processes, sqlite_url: str
) -> None:
    """The migration a killed dispatcher left running is aborted on host a while the next
    dispatcher awaits it: the task fails saying it ended without moving the VM, which runs
    on a as before; nothing starts it again."""
    task, source, _ = _held_until_taken_over(lab, queue, procs, sqlite_url, "halted")
    domain_id = source.ID()
    source.abortJob()
    wait_until(lambda: queue.get(task.id).state.terminal, WAIT_SECONDS, "the task to end")
    ended = queue.get(task.id)
    assert ended.state is State.FAILED, ended.result
    assert ended.error is not None and ended.error["type"] == "ActionFailed"
    assert "ended without moving it" in ended.error["message"]
    assert source.state()[0] == libvirt.VIR_DOMAIN_RUNNING and source.ID() == domain_id
    assert not _migrating(source)
    assert _names(lab, "b") == set()


def test_killed_mid_migration_that_is_then_aborted_the_task_fails_and_the_vm_stays(
    lab: TwoHosts, queue: Queue, procs: Processes, sqlite_url: str
) -> None:
    """kill -9 while the migration runs (the task waiting on it), then an operator aborts
    it on host a: the next dispatcher takes the waiting task over, finds the job gone and
    the VM still running on a with this task's mark, fails the task saying the migration
    ended without moving it, and starts no second one."""
    task, source = _killed_mid_migration(lab, queue, procs, sqlite_url, "stays")
    domain_id = source.ID()
    source.abortJob()
    wait_until(lambda: not _migrating(source), WAIT_SECONDS, "the abort")
    _dispatcher(procs, sqlite_url)
    wait_until(lambda: queue.get(task.id).state.terminal, WAIT_SECONDS, "the task to end")
    ended = queue.get(task.id)
    assert ended.state is State.FAILED, ended.result
    assert ended.error is not None and ended.error["type"] == "ActionFailed"
    assert "ended without moving it" in ended.error["message"]
    assert _taken_over(queue, task)
    assert source.state()[0] == libvirt.VIR_DOMAIN_RUNNING and source.ID() == domain_id
    assert not _migrating(source)
    assert _names(lab, "b") == set()
    assert _stamp_task(source) == str(task.id)


def test_killed_mid_migration_that_then_completes_the_task_completes_without_moving_again(
    lab: TwoHosts, pg_queue: Queue, procs: Processes, pg_url: str
) -> None:
    """kill -9 while the migration runs, which then completes before any dispatcher is
    back: the next one's check finds the VM on b with this task's mark and completes the
    task; the VM stays on b (it is not moved back to a, the only other host). On
    PostgreSQL (the other dispatcher tests here use SQLite)."""
    task, _ = _killed_mid_migration(lab, pg_queue, procs, pg_url, "arrives")
    incoming_id = _dom(lab, "b", "arrives").ID()
    wait_until(lambda: not _names(lab, "a"), WAIT_SECONDS, "the migration to complete")
    _dispatcher(procs, pg_url)
    wait_until(lambda: pg_queue.get(task.id).state.terminal, WAIT_SECONDS, "the task to end")
    ended = pg_queue.get(task.id)
    assert ended.state is State.COMPLETE, ended.error
    assert ended.result is not None and (ended.result["host"], ended.result["from"]) == (B, A)
    moved = _dom(lab, "b", "arrives")
    assert moved.ID() == incoming_id and moved.isPersistent()
    assert _names(lab, "a") == set()
    assert uuid.UUID(_stamp_task(moved)) == task.id
    assert _taken_over(pg_queue, task)
