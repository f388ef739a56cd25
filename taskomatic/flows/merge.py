"""Removing a snapshot of a VM, running or stopped: one durable group (see actions/merge.py).

The group starts as one task, `snapshot.plan_removal`, which reads the snapshot on the host
when it runs and adds the rest: per disk a commit (live block commits run in parallel), a
check of the disk's backing chain and the deletion of its overlay file, then the snapshot's
metadata is dropped. `taskomatic show GROUP` lists each step with its result or error.
"""

from __future__ import annotations

import uuid

from taskomatic import errors
from taskomatic.model import Group, Task
from taskomatic.queue import Queue
from taskomatic.submission import TaskSpec


def remove_snapshot(
    queue: Queue,
    vm: str,
    snapshot: str,
    *,
    host: str | None = None,
    bandwidth: int | None = None,
    created_by: str | None = None,
    group_id: uuid.UUID | None = None,
) -> tuple[Group, list[Task]]:
    """Submit the group that removes external snapshot `snapshot` of VM `vm`.

    `host` pins the work to one host (default: wherever the VM is defined when the plan
    runs); `bandwidth` limits each live block commit to that many MiB/s. Submitting again
    with the same `group_id` returns the same group.
    """
    if bandwidth is not None and (
        not isinstance(bandwidth, int) or isinstance(bandwidth, bool) or bandwidth <= 0
    ):
        raise errors.ValidationError(
            f"bandwidth must be a positive whole number of MiB/s, got {bandwidth!r}",
            field="bandwidth",
        )
    gid = group_id or uuid.uuid4()
    params = {"vm": vm, "snapshot": snapshot, "host": host, "bandwidth": bandwidth}
    # The plan's id comes from the group's, so resubmitting the same group is idempotent.
    plan = TaskSpec("snapshot.plan_removal", params, id=uuid.uuid5(gid, "plan"), name="plan")
    name = f"remove snapshot {snapshot} of vm {vm}"
    return queue.submit_group([plan], name=name, group_id=gid, created_by=created_by)
