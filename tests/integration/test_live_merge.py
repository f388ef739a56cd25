"""Removing an external snapshot on real QEMU: live block commits, the offline path, abort.

A VM with two qcow2 disks gets an external disk-only snapshot while stopped (libvirt creates
the overlays), data is written into the overlays with qemu-io, and then the snapshot is
removed — with the VM running (a block commit per disk, pivoted when ready) or stopped
(qemu-img). What the tests assert is read from libvirt and from the images themselves: each
disk's backing chain, the bytes in the base images, the overlay files, the snapshot metadata.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import libvirt
import pytest

from taskomatic import Dispatcher, Queue, State, Task
from taskomatic.actions import merge
from taskomatic.actions.registry import Check, Context, registry
from taskomatic.errors import ActionFailed, ValidationError
from taskomatic.failpoints import ENV
from taskomatic.flows.merge import remove_snapshot
from taskomatic.jobs import HostJob
from taskomatic.virt.connections import start_event_loop
from taskomatic.virt.fleet import Fleet

pytest.register_assert_rewrite("qemu", "twohosts")
pytest_plugins = ["qemu"]

from helpers import open_queue, wait_until  # noqa: E402
from procs import Proc, Processes  # noqa: E402
from qemu import (  # noqa: E402
    QEMU_HOST,
    QemuLab,
    backing_chain,
    domain_xml,
    holds_pattern,
    make_disk,
    write_pattern,
)
from twohosts import IMAGES, TwoHosts, start_two_hosts  # noqa: E402

MIB = 1024 * 1024
DISK_SIZE = "160M"


def define_two_disk_vm(lab: QemuLab, queue: Queue, name: str, tmp_path: Path) -> list[Path]:
    """Define VM `name` with disks vda and vdb (new qcow2 images): their paths."""
    disks = [make_disk(tmp_path / f"{name}-{t}.qcow2", DISK_SIZE) for t in ("vda", "vdb")]
    spec = {"name": name, "memory_mib": 64, "vcpus": 1, "disks": [{"path": str(d)} for d in disks]}
    lab.ok(queue, "vm.define", spec)
    return disks


def snapshot(lab: QemuLab, queue: Queue, vm: str, name: str) -> dict[str, Path]:
    """Take an external disk-only snapshot: each disk's new overlay file, by target."""
    result = lab.ok(queue, "snapshot.create", {"vm": vm, "name": name, "disk_only": True})
    assert result["disks"] == {"vda": "external", "vdb": "external"}
    return {t: top for t, top in sources(lab.conn.lookupByName(vm)).items()}


def sources(dom: libvirt.virDomain, flags: int = 0) -> dict[str, Path]:
    """Each disk's top image, by target, from the domain's XML."""
    out = {}
    for disk in domain_xml(dom, flags).findall("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        assert target is not None and source is not None
        out[str(target.get("dev"))] = Path(str(source.get("file")))
    return out


def live_chain(dom: libvirt.virDomain, target: str) -> list[str]:
    """The running domain's backing chain of one disk, top first, as libvirt shows it."""
    for disk in domain_xml(dom).findall("devices/disk"):
        found = disk.find("target")
        if found is not None and found.get("dev") == target:
            files, elem = [], disk
            while elem is not None and elem.find("source") is not None:
                files.append(str(elem.find("source").get("file")))  # type: ignore[union-attr]
                elem = elem.find("backingStore")
            return files
    raise AssertionError(f"no disk {target}")


def context(lab: QemuLab, queue: Queue, action: str, params: Mapping[str, Any]) -> Context:
    """What a dispatcher hands an action's hooks, for calling them one at a time."""
    return Context(
        uuid.uuid4(),
        action,
        registry.get(action).validate(params),
        1,
        fleet=Fleet(queue.hosts, lab.connections),
    )


def root_errors(tasks: list[Task]) -> list[tuple[str, Any]]:
    """The errors of a group's failed steps, without the dependents they cancelled: the
    message of a failed assertion on the group's state."""
    return [
        (t.action, t.error) for t in tasks if t.error and t.error["type"] != "PrerequisiteFailed"
    ]


def wait_for(queue: Queue, group: uuid.UUID, disk: str, seen: Callable[[Task], bool]) -> Task:
    """The group's commit of `disk` once `seen` holds for it (a minute at most)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for task in queue.list(group=group, action="disk.commit").tasks:
            if task.params["disk"] == disk and seen(task):
                return task
        time.sleep(0.05)
    raise AssertionError(f"the commit of {disk} never got there")


@contextlib.contextmanager
def running_dispatcher(lab: QemuLab, queue: Queue) -> Iterator[Dispatcher]:
    """A dispatcher working in the background on the lab's connections while the block runs."""
    dispatcher = Dispatcher(queue, fleet=Fleet(queue.hosts, lab.connections)).start()
    try:
        yield dispatcher
    finally:
        dispatcher.stop()


def test_a_block_commit_is_started_once_adopted_after_a_crash_and_aborted_without_pivot(
    qemu_lab: QemuLab, qemu_queue: Queue, tmp_path: Path
) -> None:
    lab, queue = qemu_lab, qemu_queue
    bases = define_two_disk_vm(lab, queue, "hooks", tmp_path)
    overlays = snapshot(lab, queue, "hooks", "s1")
    write_pattern(overlays["vda"], 0xAB, 0, 32 * MIB)
    lab.ok(queue, "vm.start", {"name": "hooks"})
    dom = lab.conn.lookupByName("hooks")
    params = {"vm": "hooks", "host": QEMU_HOST, "disk": "vda", "overlay": str(overlays["vda"])}
    ctx = context(lab, queue, "disk.commit", {**params, "bandwidth": 1})
    hooks = registry.get("disk.commit").job
    assert hooks is not None

    job = merge.commit(ctx)

    assert isinstance(job, HostJob)
    assert (job.host, job.kind, job.details["active"]) == (QEMU_HOST, "block-commit", True)
    info = dom.blockJobInfo("vda", 0)
    assert info["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT
    assert info["bandwidth"] == 1  # MiB/s, as asked
    status = hooks.poll(ctx, job)
    assert status.running and status.progress is not None
    assert status.progress["cur"] < status.progress["end"]  # 32 MiB at 1 MiB/s: far from ready

    # A dispatcher that died after starting the job finds it on the disk and follows it.
    assert merge.check_commit(ctx).status == Check.IN_PROGRESS
    again = merge.commit(ctx)
    assert again == job  # the same job, adopted: no second commit was started
    assert dom.blockJobInfo("vda", 0)["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT

    hooks.abort(ctx, job)

    assert dom.blockJobInfo("vda", 0) == {}
    assert not hooks.poll(ctx, job).running
    with pytest.raises(ActionFailed) as failed:
        hooks.finish(ctx, job)
    assert failed.value.message == (
        f"the block commit of disk 'vda' of vm 'hooks' was aborted; the disk still uses "
        f"{overlays['vda']}"
    )
    # The disk is on its overlay, chain intact, the data still in the overlay.
    assert live_chain(dom, "vda") == [str(overlays["vda"]), str(bases[0])]
    assert backing_chain(overlays["vda"]) == [str(overlays["vda"]), str(bases[0])]
    assert holds_pattern(overlays["vda"], 0xAB, 0, 32 * MIB, alone=True)
    assert merge.check_commit(ctx).status == Check.NOT_STARTED
    # An overlay the disk still uses is never deleted, whatever the task is told.
    where = {"vm": "hooks", "host": QEMU_HOST, "disk": "vda", "path": str(overlays["vda"])}
    deleting = context(lab, queue, "snapshot.delete_volume", where)
    with pytest.raises(ActionFailed) as refused:
        merge.delete_volume(deleting)
    assert refused.value.message == (
        f"disk 'vda' of vm 'hooks' still uses {overlays['vda']}; it is not deleted"
    )
    assert overlays["vda"].exists()


def test_removing_a_snapshot_of_a_running_vm_merges_both_disks_live(
    qemu_lab: QemuLab, qemu_queue: Queue, tmp_path: Path
) -> None:
    lab, queue = qemu_lab, qemu_queue
    bases = define_two_disk_vm(lab, queue, "web", tmp_path)
    write_pattern(bases[0], 0x11, 0, MIB)  # before the snapshot: stays where it is
    overlays = snapshot(lab, queue, "web", "before-upgrade")
    write_pattern(overlays["vda"], 0xAB, MIB, 4 * MIB)  # after it: in the overlays
    write_pattern(overlays["vdb"], 0xCD, 0, 4 * MIB)
    lab.ok(queue, "vm.start", {"name": "web"})
    dom = lab.conn.lookupByName("web")
    assert live_chain(dom, "vdb") == [str(overlays["vdb"]), str(bases[1])]

    group, _ = remove_snapshot(queue, "web", "before-upgrade")
    Dispatcher(queue, fleet=Fleet(queue.hosts, lab.connections)).run(until_empty=True)

    tasks = queue.list(group=group.id).tasks
    assert queue.group(group.id).state == "complete", root_errors(tasks)
    assert dom.isActive()  # the VM ran throughout
    for target, base in zip(("vda", "vdb"), bases, strict=True):
        assert live_chain(dom, target) == [str(base)]  # no backingStore: the overlay is gone
        assert backing_chain(base) == [str(base)]
        assert not overlays[target].exists()
    assert sources(dom, libvirt.VIR_DOMAIN_XML_INACTIVE) == {"vda": bases[0], "vdb": bases[1]}
    assert holds_pattern(bases[0], 0x11, 0, MIB, alone=True)
    assert holds_pattern(bases[0], 0xAB, MIB, 4 * MIB, alone=True)
    assert holds_pattern(bases[1], 0xCD, 0, 4 * MIB, alone=True)
    assert dom.listAllSnapshots(0) == []
    commits = [t for t in tasks if t.action == "disk.commit"]
    assert sorted(t.result["disk"] for t in commits) == ["vda", "vdb"]
    assert {t.result["merged"] for t in commits} == {"live"}


def test_a_throttled_commit_is_seen_waiting_while_it_moves_and_disks_merge_in_parallel(
    qemu_lab: QemuLab, qemu_queue: Queue, tmp_path: Path
) -> None:
    lab, queue = qemu_lab, qemu_queue
    bases = define_two_disk_vm(lab, queue, "slow", tmp_path)
    overlays = snapshot(lab, queue, "slow", "s")
    write_pattern(overlays["vda"], 0xA1, 0, 64 * MIB)  # at 16 MiB/s: about 4 s each
    write_pattern(overlays["vdb"], 0xB2, 0, 64 * MIB)
    lab.ok(queue, "vm.start", {"name": "slow"})
    dom = lab.conn.lookupByName("slow")

    group, _ = remove_snapshot(queue, "slow", "s", bandwidth=16)
    # Each sample: per disk, the task's state, the progress it records, and the host's job.
    samples: list[dict[str, tuple[State, Any, Any]]] = []
    with running_dispatcher(lab, queue):
        while queue.group(group.id).state == "running":
            commits = queue.list(group=group.id, action="disk.commit").tasks
            samples.append(
                {
                    t.params["disk"]: (
                        t.state,
                        (t.job or {}).get("progress"),
                        dom.blockJobInfo(t.params["disk"], 0),
                    )
                    for t in commits
                }
            )
            time.sleep(0.1)

    tasks = queue.list(group=group.id).tasks
    assert queue.group(group.id).state == "complete", root_errors(tasks)
    for target in ("vda", "vdb"):
        waiting = [s[target] for s in samples if target in s and s[target][0] == State.WAITING]
        assert len(waiting) >= 3, f"{target} was seen waiting {len(waiting)} time(s)"
        on_host = [job["cur"] for _, _, job in waiting if job]
        assert len(set(on_host)) >= 2, f"{target}: the commit never moved while waiting"
        assert all(job["bandwidth"] == 16 for _, _, job in waiting if job)  # MiB/s, as asked
        recorded = [p["cur"] for _, p, _ in waiting if p]
        assert recorded == sorted(recorded) and all(p <= 64 * MIB for p in recorded)
    both = [s for s in samples if all(s.get(t, (None,))[0] == State.WAITING for t in s)]
    assert any(len(s) == 2 for s in both), "the two disks' commits never waited at the same time"
    for target, base, pattern in (("vda", bases[0], 0xA1), ("vdb", bases[1], 0xB2)):
        assert live_chain(dom, target) == [str(base)]
        assert holds_pattern(base, pattern, 0, 64 * MIB, alone=True)
        assert not overlays[target].exists()
    assert dom.listAllSnapshots(0) == []


def test_cancelling_a_commit_aborts_it_on_the_host_and_leaves_the_disk_on_its_overlay(
    qemu_lab: QemuLab, qemu_queue: Queue, tmp_path: Path
) -> None:
    lab, queue = qemu_lab, qemu_queue
    bases = define_two_disk_vm(lab, queue, "stay", tmp_path)
    overlays = snapshot(lab, queue, "stay", "s")
    write_pattern(overlays["vda"], 0xEE, 0, 64 * MIB)  # at 1 MiB/s: a minute, unless aborted
    lab.ok(queue, "vm.start", {"name": "stay"})
    dom = lab.conn.lookupByName("stay")

    group, _ = remove_snapshot(queue, "stay", "s", bandwidth=1)
    with running_dispatcher(lab, queue):
        commit = wait_for(queue, group.id, "vda", lambda t: t.state == State.WAITING)
        info = dom.blockJobInfo("vda", 0)  # mid-commit on the host
        assert info["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT
        assert info["cur"] < info["end"]
        queue.cancel(commit.id, "the operator changed their mind")
        while queue.group(group.id).state == "running":
            time.sleep(0.1)

    commit = queue.get(commit.id)
    assert commit.state == State.CANCELLED
    messages = [e.message for e in queue.events(commit.id)]
    # The timeline says the abort was asked of the host, then what the host did.
    asked = next(i for i, m in enumerate(messages) if "abort" in m and "requested" in m)
    assert messages[-1].endswith(f"was aborted; the disk still uses {overlays['vda']}")
    assert asked < len(messages) - 1
    assert commit.error is not None and str(overlays["vda"]) in commit.error["message"]
    assert dom.blockJobInfo("vda", 0) == {}  # the job is gone from the host
    # vda: on its overlay, chain intact, the data still in the overlay file.
    assert live_chain(dom, "vda") == [str(overlays["vda"]), str(bases[0])]
    assert backing_chain(overlays["vda"]) == [str(overlays["vda"]), str(bases[0])]
    assert holds_pattern(overlays["vda"], 0xEE, 0, 64 * MIB, alone=True)
    # vdb's own steps went on; the metadata step waits on vda's, so it never ran.
    assert live_chain(dom, "vdb") == [str(bases[1])] and not overlays["vdb"].exists()
    assert [s.getName() for s in dom.listAllSnapshots(0)] == ["s"]
    ended = {(t.action, t.params.get("disk")): t.state for t in queue.list(group=group.id).tasks}
    assert ended == {
        ("snapshot.plan_removal", None): State.COMPLETE,
        ("disk.commit", "vda"): State.CANCELLED,
        ("snapshot.verify_chain", "vda"): State.CANCELLED,
        ("snapshot.delete_volume", "vda"): State.CANCELLED,
        ("disk.commit", "vdb"): State.COMPLETE,
        ("snapshot.verify_chain", "vdb"): State.COMPLETE,
        ("snapshot.delete_volume", "vdb"): State.COMPLETE,
        ("snapshot.drop_metadata", None): State.CANCELLED,
    }

    # Removing it again merges what is left: vdb is found merged, vda is committed now.
    again, _ = remove_snapshot(queue, "stay", "s")
    Dispatcher(queue, fleet=Fleet(queue.hosts, lab.connections)).run(until_empty=True)

    tasks = queue.list(group=again.id).tasks
    assert queue.group(again.id).state == "complete", root_errors(tasks)
    merged = {t.params["disk"]: t.result["merged"] for t in tasks if t.action == "disk.commit"}
    assert merged == {"vda": "live", "vdb": "already"}
    assert live_chain(dom, "vda") == [str(bases[0])] and not overlays["vda"].exists()
    assert holds_pattern(bases[0], 0xEE, 0, 64 * MIB, alone=True)
    assert dom.listAllSnapshots(0) == []


def test_removing_snapshots_of_a_stopped_vm_merges_them_offline_older_one_first(
    qemu_lab: QemuLab, qemu_queue: Queue, tmp_path: Path
) -> None:
    lab, queue = qemu_lab, qemu_queue
    bases = define_two_disk_vm(lab, queue, "cold", tmp_path)
    first = snapshot(lab, queue, "cold", "s1")
    write_pattern(first["vda"], 0x51, 0, 2 * MIB)
    write_pattern(first["vdb"], 0x52, 0, 2 * MIB)
    second = snapshot(lab, queue, "cold", "s2")
    write_pattern(second["vda"], 0x61, 2 * MIB, 2 * MIB)
    dom = lab.conn.lookupByName("cold")
    inactive = libvirt.VIR_DOMAIN_XML_INACTIVE

    # s1's overlays sit between the images and s2's: committed down, s2's rebased onto the base.
    older, _ = remove_snapshot(queue, "cold", "s1")
    Dispatcher(queue, fleet=Fleet(queue.hosts, lab.connections)).run(until_empty=True)

    tasks = queue.list(group=older.id).tasks
    assert queue.group(older.id).state == "complete", root_errors(tasks)
    assert not dom.isActive()
    for target, base in zip(("vda", "vdb"), bases, strict=True):
        assert backing_chain(second[target]) == [str(second[target]), str(base)]
        assert not first[target].exists()
    assert sources(dom, inactive) == second
    assert holds_pattern(bases[0], 0x51, 0, 2 * MIB, alone=True)
    assert holds_pattern(bases[1], 0x52, 0, 2 * MIB, alone=True)
    assert [s.getName() for s in dom.listAllSnapshots(0)] == ["s2"]

    # s2's overlays are the disks' tops: committed, and the domain points at the bases again.
    newer, _ = remove_snapshot(queue, "cold", "s2")
    Dispatcher(queue, fleet=Fleet(queue.hosts, lab.connections)).run(until_empty=True)

    tasks = queue.list(group=newer.id).tasks
    assert queue.group(newer.id).state == "complete", root_errors(tasks)
    assert {t.result["merged"] for t in tasks if t.action == "disk.commit"} == {"offline"}
    assert sources(dom, inactive) == {"vda": bases[0], "vdb": bases[1]}
    assert not second["vda"].exists() and not second["vdb"].exists()
    assert holds_pattern(bases[0], 0x61, 2 * MIB, 2 * MIB, alone=True)
    assert dom.listAllSnapshots(0) == []
    lab.ok(queue, "vm.start", {"name": "cold"})  # and QEMU runs on the merged images
    assert live_chain(dom, "vda") == [str(bases[0])] and live_chain(dom, "vdb") == [str(bases[1])]


def test_removing_an_older_snapshot_of_a_running_vm_commits_below_the_newer_one(
    qemu_lab: QemuLab, qemu_queue: Queue, tmp_path: Path
) -> None:
    lab, queue = qemu_lab, qemu_queue
    bases = define_two_disk_vm(lab, queue, "layers", tmp_path)
    first = snapshot(lab, queue, "layers", "s1")
    write_pattern(first["vda"], 0x71, 0, 8 * MIB)
    second = snapshot(lab, queue, "layers", "s2")
    lab.ok(queue, "vm.start", {"name": "layers"})
    dom = lab.conn.lookupByName("layers")

    group, _ = remove_snapshot(queue, "layers", "s1")
    Dispatcher(queue, fleet=Fleet(queue.hosts, lab.connections)).run(until_empty=True)

    tasks = queue.list(group=group.id).tasks
    assert queue.group(group.id).state == "complete", root_errors(tasks)
    for target, base in zip(("vda", "vdb"), bases, strict=True):
        assert live_chain(dom, target) == [str(second[target]), str(base)]  # s2's stays on top
        assert not first[target].exists()
    commits = [t for t in tasks if t.action == "disk.commit"]
    assert {t.job["details"]["active"] for t in commits if t.job} == {False}
    assert holds_pattern(bases[0], 0x71, 0, 8 * MIB, alone=True)
    assert [s.getName() for s in dom.listAllSnapshots(0)] == ["s2"]


def test_a_commit_outlives_its_dispatcher_and_the_next_one_follows_the_same_job(
    qemu_lab: QemuLab, qemu_queue: Queue, tmp_path: Path
) -> None:
    lab, queue = qemu_lab, qemu_queue
    bases = define_two_disk_vm(lab, queue, "handover", tmp_path)
    overlays = snapshot(lab, queue, "handover", "s")
    write_pattern(overlays["vda"], 0x3C, 0, 32 * MIB)  # at 8 MiB/s: about 4 s
    lab.ok(queue, "vm.start", {"name": "handover"})
    dom = lab.conn.lookupByName("handover")

    group, _ = remove_snapshot(queue, "handover", "s", bandwidth=8)
    with running_dispatcher(lab, queue):
        commit = wait_for(queue, group.id, "vda", lambda t: t.state == State.WAITING)
    # That dispatcher is gone (its leases expired as it stopped); the host job is not.
    assert queue.get(commit.id).state == State.WAITING
    assert dom.blockJobInfo("vda", 0)["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT

    Dispatcher(queue, fleet=Fleet(queue.hosts, lab.connections)).run(until_empty=True)

    tasks = queue.list(group=group.id).tasks
    assert queue.group(group.id).state == "complete", root_errors(tasks)
    commit = queue.get(commit.id)
    assert (commit.attempt, commit.result["merged"]) == (1, "live")
    messages = [e.message for e in queue.events(commit.id)]
    assert any(m.startswith("taken over from dispatcher") for m in messages), messages
    # Started once: one run left it waiting; the next dispatcher only polled and finished it.
    assert sum(m.startswith("waiting on a block-commit job") for m in messages) == 1, messages
    assert live_chain(dom, "vda") == [str(bases[0])]
    assert holds_pattern(bases[0], 0x3C, 0, 32 * MIB, alone=True)
    assert dom.listAllSnapshots(0) == [] and not overlays["vda"].exists()


def test_the_plan_refuses_an_internal_snapshot_and_finds_a_removed_one_done(
    qemu_lab: QemuLab, qemu_queue: Queue, tmp_path: Path
) -> None:
    lab, queue = qemu_lab, qemu_queue
    define_two_disk_vm(lab, queue, "plans", tmp_path)
    lab.ok(queue, "snapshot.create", {"vm": "plans", "name": "inside"})  # internal

    group, _ = remove_snapshot(queue, "plans", "inside")
    Dispatcher(queue, fleet=Fleet(queue.hosts, lab.connections)).run(until_empty=True)

    (plan,) = queue.list(group=group.id).tasks  # nothing was added
    assert plan.state == State.FAILED and plan.error is not None
    assert plan.error["message"] == (
        "snapshot 'inside' of vm 'plans' holds disk(s) vda, vdb inside the images or in a memory "
        "file; only external disk-only snapshots are merged (use snapshot.delete on the stopped "
        "VM for an internal one)"
    )
    assert [s.getName() for s in lab.conn.lookupByName("plans").listAllSnapshots(0)] == ["inside"]

    gone = lab.ok(queue, "snapshot.plan_removal", {"vm": "plans", "snapshot": "never-taken"})
    assert gone == {
        "vm": "plans",
        "host": QEMU_HOST,
        "snapshot": "never-taken",
        "disks": {},
        "removed": False,
    }


def test_remove_snapshot_is_idempotent_per_group_id_and_checks_its_bandwidth(
    qemu_queue: Queue,
) -> None:
    gid = uuid.uuid4()
    group, (plan,) = remove_snapshot(qemu_queue, "web", "s", bandwidth=10, group_id=gid)
    again, (same,) = remove_snapshot(qemu_queue, "web", "s", bandwidth=10, group_id=gid)

    assert (group.id, again.id, same.id) == (gid, gid, plan.id)
    assert group.name == "remove snapshot s of vm web"
    assert plan.action == "snapshot.plan_removal" and plan.locks == ("vm:web",)
    assert dict(plan.params) == {"vm": "web", "snapshot": "s", "host": None, "bandwidth": 10}
    assert qemu_queue.list(group=gid).tasks == [qemu_queue.get(plan.id)]
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValidationError) as refused:
            remove_snapshot(qemu_queue, "web", "s", bandwidth=bad)  # type: ignore[arg-type]
        assert refused.value.field == "bandwidth"


# --- kill -9 of a dispatcher process mid-removal ----------------------------------------------
# The VM runs under a private libvirtd (tests/twohosts.py, host a), which owns its QEMU process
# and its block jobs: a dispatcher process killed by SIGKILL leaves the commit running there,
# as on a real host, and the next dispatcher process must carry the removal to its end.


@pytest.fixture(scope="module")
def daemon_host() -> Iterator[TwoHosts]:
    """Private libvirtds (host a is used), started once for the kill tests of this module."""
    start_event_loop()
    hosts = start_two_hosts()
    try:
        yield hosts
    finally:
        hosts.stop()
        subprocess.run(["rm", "-rf", str(hosts.base)], check=False)


def dispatcher_process(where: Path, url: str, crash_at: str | None) -> Proc:
    """`taskomatic dispatcher` as a process, dying by SIGKILL at `crash_at` if given."""
    procs = Processes(where, {ENV: crash_at} if crash_at else {})
    return procs.start(
        "--database-url", url, "dispatcher", "--workers", "2", "--lease", "2",
        "--recovery", "0.5", "--poll", "0.5", "--no-inventory",
    )  # fmt: skip


@pytest.mark.parametrize("point", ["dispatcher:before-waiting", "waiting"])
def test_a_dispatcher_killed_mid_commit_is_followed_by_one_that_finishes_the_same_job(
    daemon_host: TwoHosts, sqlite_url: str, tmp_path: Path, point: str
) -> None:
    """Killed after starting the block commit but before recording the task waiting, or
    while it waits: the next dispatcher process follows the job the host still runs (a
    second commit is never started) and the removal completes."""
    lab, vm = daemon_host, "killed"
    lab.clean()
    lab.make_vm("a", vm, size_mib=64, start=False)
    dom = lab.conn("a").lookupByName(vm)
    dom.snapshotCreateXML(
        "<domainsnapshot><name>s</name></domainsnapshot>",
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC,
    )
    base, overlay = lab.disk_path(vm), f"{IMAGES}/{vm}.s"
    write_pattern(lab.a.images / f"{vm}.s", 0x4B, 0, 6 * MIB, alone=True)
    dom.create()
    with open_queue(sqlite_url) as queue:
        queue.hosts.add("a", lab.a.uri)
        group, _ = remove_snapshot(queue, vm, "s", bandwidth=1)  # about 6 s of commit
        first = dispatcher_process(tmp_path, sqlite_url, None if point == "waiting" else point)
        second = None
        try:
            commit = wait_for(queue, group.id, "vda", lambda t: t.state != State.NEW)
            if point == "waiting":
                wait_for(queue, group.id, "vda", lambda t: t.state == State.WAITING)
                first.kill()
            assert first.wait() == -9, first.describe()
            info = dom.blockJobInfo("vda", 0)  # the job outlived its dispatcher
            assert info["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT
            second = dispatcher_process(tmp_path, sqlite_url, None)
            wait_until(lambda: queue.group(group.id).state != "running", 60, "the removal")
        finally:
            first.kill()
            if second is not None:
                second.kill()
        tasks = queue.list(group=group.id).tasks
        assert queue.group(group.id).state == "complete", root_errors(tasks)
        commit = queue.get(commit.id)
        messages = [e.message for e in queue.events(commit.id)]
        assert any(m.startswith("taken over") for m in messages), messages
        assert sum(m.startswith("waiting on a block-commit job") for m in messages) == 1, messages
        assert (commit.attempt, commit.result["merged"]) == (1, "live")
        (deleted,) = [t for t in tasks if t.action == "snapshot.delete_volume"]
        assert (deleted.result["deleted"], deleted.result["how"]) == (True, "pool")
    assert live_chain(dom, "vda") == [base]
    assert not (lab.a.images / f"{vm}.s").exists() and overlay not in str(dom.XMLDesc(0))
    assert holds_pattern(lab.a.images / f"{vm}.qcow2", 0x4B, 0, 6 * MIB, alone=True)
    assert dom.listAllSnapshots(0) == []
    lab.clean()
