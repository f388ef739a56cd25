"""Creating a VM (volume → define → start) on the test driver, and undoing it on failure."""

from __future__ import annotations

from virt import NETWORK, POOL, Lab, vm

from taskomatic import State
from taskomatic.flows.create import create_vm

H1, H2 = "h1", "h2"


def _group_tasks(lab: Lab, group_id: object) -> list:  # type: ignore[type-arg]
    return lab.queue.list(group=str(group_id), limit=50).tasks


def test_a_vm_is_created_on_a_new_disk_and_runs(lab: Lab) -> None:
    group, tasks = create_vm(
        lab.queue, "web", host=H1, pool=POOL, disk_mib=64, memory_mib=128, network=NETWORK
    )
    lab.drain()
    assert lab.queue.group(group.id).state == "complete"
    assert lab.state(H1, "web") == "running"
    assert "web-disk0" in lab.volumes(H1)
    disk, define, start = (lab.queue.get(t.id) for t in tasks)
    assert disk.result["created"] is True  # type: ignore[index]
    assert define.result["defined"] is True  # type: ignore[index]
    assert start.result["started"] is True  # type: ignore[index]


def test_a_failed_step_removes_what_the_earlier_steps_created(lab: Lab) -> None:
    """The name is taken on another host: the definition fails, and the volume created for
    it is deleted by a compensation task; the other host's VM is untouched."""
    taken = vm(H2, "running")
    before = lab.volumes(H1)
    group, [disk, define, start] = create_vm(
        lab.queue, taken, host=H1, pool=POOL, disk_mib=64, memory_mib=128
    )
    lab.drain()
    assert lab.queue.get(define.id).state is State.FAILED
    assert "already defined on host 'h2'" in lab.queue.get(define.id).error["message"]  # type: ignore[index]
    assert lab.queue.get(start.id).state is State.CANCELLED
    [undo] = [t for t in _group_tasks(lab, group.id) if t.compensates]
    assert (undo.action, undo.compensates, undo.state) == ("volume.delete", disk.id, State.COMPLETE)
    assert lab.volumes(H1) == before
    assert lab.state(H2, taken) == "running"
    assert lab.queue.group(group.id).state == "compensated"


def test_what_existed_before_is_not_undone(lab: Lab) -> None:
    """The disk volume already existed: the group reports it kept, and a later failure does
    not delete it (only what the group itself created is undone)."""
    taken = vm(H2, "off")
    lab.run(
        "volume.create", {"host": H1, "pool": POOL, "name": f"{taken}-disk0", "capacity_mib": 8}
    )
    group, [disk, *_] = create_vm(lab.queue, taken, host=H1, pool=POOL, disk_mib=8)
    lab.drain()
    assert lab.queue.get(disk.id).result["created"] is False  # type: ignore[index]
    assert lab.queue.group(group.id).state == "failed"
    assert not [t for t in _group_tasks(lab, group.id) if t.compensates]
    assert f"{taken}-disk0" in lab.volumes(H1)
