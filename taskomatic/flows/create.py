"""Creating a VM in three durable steps that undo themselves when a later one fails.

The group creates the VM's disk as a volume in a pool of the host, defines the VM on that
disk, and starts it. Each step is an ordinary task; when one fails, the steps already done
are undone in reverse order by compensation tasks (the VM destroyed, then undefined, then
its volume deleted) — but only what this group did: a volume or VM that existed before is
reported as kept and left alone.
"""

from __future__ import annotations

import uuid

from taskomatic import errors
from taskomatic.model import Group, Task
from taskomatic.queue import Queue
from taskomatic.submission import TaskSpec


def create_vm(
    queue: Queue,
    name: str,
    *,
    host: str,
    pool: str,
    disk_mib: int,
    memory_mib: int = 512,
    vcpus: int = 1,
    disk_format: str | None = "qcow2",
    network: str | None = None,
    created_by: str | None = None,
    group_id: uuid.UUID | None = None,
) -> tuple[Group, list[Task]]:
    """Submit the group creating VM `name` on `host` with a new `disk_mib` disk in `pool`
    (see the module). Raises HostNotFound for an unknown host; parameters are checked as
    the actions' are."""
    if disk_mib < 1:
        raise errors.ValidationError("disk_mib must be at least 1", field="disk_mib")
    queue.hosts.get(host)
    volume = f"{name}-disk0"
    specs = [
        TaskSpec(
            "volume.create",
            {
                "host": host,
                "pool": pool,
                "name": volume,
                "capacity_mib": disk_mib,
                "format": disk_format,
            },
            name="disk",
        ),
        TaskSpec(
            "vm.define",
            {
                "name": name,
                "host": host,
                "memory_mib": memory_mib,
                "vcpus": vcpus,
                "disks": [{"pool": pool, "volume": volume}],
                "network": network,
            },
            name="define",
            after=["disk"],
        ),
        TaskSpec("vm.start", {"name": name, "host": host}, name="start", after=["define"]),
    ]
    return queue.submit_group(
        specs, name=f"create vm {name} on {host}", group_id=group_id, created_by=created_by
    )
