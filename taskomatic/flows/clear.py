"""Clearing a host by destroying what is on it: one durable group, one task per object.

The group puts the host into maintenance (nothing new is placed there), then for every VM the
inventory lists on it destroys and undefines it, then stops and deletes every storage pool
(their data stays unless `delete_storage`), and finally checks on the host that nothing is
left. Each object has its own tasks, so `taskomatic show GROUP` reports each one's result.
What to destroy is read from the inventory, which must be current: a dispatcher keeps it.

Clearing by migrating (`clear_by_migrating`) needs no inventory: maintenance, then
`host.evacuate` lists the host's VMs at that moment and adds one `vm.migrate` per VM to the
group (dynamic expansion), each choosing its target when it runs (live for a running VM, its
definition for a stopped one); the final check (of VMs only: pools stay) waits for every move.
A VM that cannot move fails its own task with the reason; the others still move.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from taskomatic import errors
from taskomatic.inventory import HostRecord, Inventory
from taskomatic.model import Group, Task
from taskomatic.queue import Queue
from taskomatic.submission import TaskSpec


def clear_by_destroying(
    queue: Queue,
    host: str,
    *,
    i_understand_this_destroys_data: bool = False,
    delete_storage: bool = False,
    created_by: str | None = None,
    group_id: uuid.UUID | None = None,
) -> tuple[Group, list[Task]]:
    """Submit the group that destroys every VM and storage pool on `host` (see the module).

    `i_understand_this_destroys_data` must be True: this powers VMs off without asking their
    guests and removes their definitions. With `delete_storage`, pools' directories or volume
    groups (and every volume in them) are deleted too. Raises HostNotFound, or
    InventoryNotCurrent when the host's inventory cannot say what is on it now.
    """
    if i_understand_this_destroys_data is not True:
        raise errors.ValidationError(
            f"clearing host {host!r} by destroying powers off and undefines every VM on it and "
            "deletes its storage pools; confirm with i_understand_this_destroys_data=True",
            field="i_understand_this_destroys_data",
        )
    view = Inventory(queue).host(host)
    _check_current(host, view.record, queue.now())
    specs = [TaskSpec("host.maintenance", {"name": host}, name="maintenance")]
    undefined = []
    for vm in sorted({v.name for v in view.vms}):
        target = {"name": vm, "host": host}
        specs.append(TaskSpec("vm.destroy", target, name=f"destroy {vm}", after=["maintenance"]))
        specs.append(
            TaskSpec("vm.undefine", target, name=f"undefine {vm}", after=[f"destroy {vm}"])
        )
        undefined.append(f"undefine {vm}")
    # Pools go once no VM is left to use them; a VM that could not be removed keeps them.
    deleted = []
    for pool in view.pools:
        target = {"host": host, "name": pool.name}
        specs.append(
            TaskSpec(
                "pool.stop", target, name=f"stop {pool.name}", after=undefined or ["maintenance"]
            )
        )
        specs.append(
            TaskSpec(
                "pool.delete",
                {**target, "delete_storage": delete_storage},
                name=f"delete {pool.name}",
                after=[f"stop {pool.name}"],
            )
        )
        deleted.append(f"delete {pool.name}")
    specs.append(
        TaskSpec("host.verify_empty", {"name": host}, after=deleted or undefined or ["maintenance"])
    )
    name = f"clear host {host} by destroying {len(undefined)} vm(s) and {len(deleted)} pool(s)"
    return queue.submit_group(
        specs, name=name, group_id=group_id, created_by=created_by, on_failure="continue"
    )


def clear_by_migrating(
    queue: Queue,
    host: str,
    *,
    copy_storage: bool = False,
    created_by: str | None = None,
    group_id: uuid.UUID | None = None,
) -> tuple[Group, list[Task]]:
    """Submit the group that moves every VM off `host` (see the module).

    Each move is its own task, so a VM that cannot move fails with its own reason (and the
    group with it) while the others still move. `copy_storage` copies disks during live
    migrations (hosts without shared storage). Raises HostNotFound.
    """
    queue.hosts.get(host)
    specs = [
        TaskSpec("host.maintenance", {"name": host}, name="maintenance"),
        TaskSpec(
            "host.evacuate",
            {"name": host, "copy_storage": copy_storage},
            name="evacuate",
            after=["maintenance"],
        ),
        TaskSpec("host.verify_empty", {"name": host, "pools": False}, after=["evacuate"]),
    ]
    name = f"clear host {host} by migrating its vms"
    return queue.submit_group(
        specs, name=name, group_id=group_id, created_by=created_by, on_failure="continue"
    )


def _check_current(host: str, record: HostRecord | None, now: datetime) -> None:
    """Refuse to plan from an inventory that cannot say what is on the host now."""
    if record is None:
        raise errors.InventoryNotCurrent(
            f"host {host!r} has no inventory yet; a running dispatcher syncs every host at "
            "start and then every few seconds: start one, then try again"
        )
    status = record.status(now)
    if status == "unreachable":
        raise errors.InventoryNotCurrent(
            f"host {host!r} is unreachable since {record.since.isoformat()} ({record.error}); "
            "what is on it cannot be cleared until it answers"
        )
    if status == "stale":
        confirmed = record.confirmed_at.isoformat() if record.confirmed_at else "never"
        raise errors.InventoryNotCurrent(
            f"the inventory of host {host!r} was last confirmed at {confirmed}, and no "
            "dispatcher keeps it now; start one, then try again"
        )
