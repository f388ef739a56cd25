"""The built-in multi-step commands: `snapshot remove` and `vm create`.

Each submits one durable group (taskomatic.flows) and prints its id, or with `--wait`
follows it to its end — including the tasks it adds as it runs and any compensation —
and shows it as a tree, exiting 1 when it did not complete.
"""

from __future__ import annotations

import sys

import click

from taskomatic.cli import EXIT_CODES, EXIT_TASK_FAILED, App, _user, command, main, wait_group
from taskomatic.flows.create import create_vm
from taskomatic.flows.merge import remove_snapshot
from taskomatic.model import Group, Task
from taskomatic.tree import group_tree


@main.group()
def snapshot() -> None:
    """Snapshots of VMs."""


@main.group()
def vm() -> None:
    """VMs, in several steps that undo themselves on failure."""


@command(snapshot, "remove", epilog=EXIT_CODES)
@click.argument("vm_name", metavar="VM")
@click.argument("name")
@click.option("--host", help="The VM's host (default: wherever it is defined).")
@click.option("--bandwidth", type=int, metavar="MIB_S", help="Limit each block commit.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the removal, showing progress.")
def snapshot_remove(
    app: App, vm_name: str, name: str, host: str | None, bandwidth: int | None, wait_: bool
) -> None:
    """Remove external snapshot NAME of VM: merge each disk's overlay into its backing
    image (live block commits while the VM runs), check the chains, delete the overlays,
    drop the snapshot's metadata."""
    group, tasks = remove_snapshot(
        app.queue(), vm_name, name, host=host, bandwidth=bandwidth, created_by=f"cli:{_user()}"
    )
    _report(app, group, tasks, wait_)


@command(vm, "create", epilog=EXIT_CODES)
@click.argument("name")
@click.option("--host", required=True, help="The host to create it on.")
@click.option("--pool", required=True, help="The storage pool of its disk on that host.")
@click.option("--disk-mib", type=int, required=True, help="Size of its new disk (MiB).")
@click.option("--memory-mib", type=int, default=512, show_default=True)
@click.option("--vcpus", type=int, default=1, show_default=True)
@click.option("--network", help="A libvirt network for one virtio NIC.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for it to run, showing progress.")
def vm_create(
    app: App,
    name: str,
    host: str,
    pool: str,
    disk_mib: int,
    memory_mib: int,
    vcpus: int,
    network: str | None,
    wait_: bool,
) -> None:
    """Create VM NAME on a new disk and start it; if a step fails, what the earlier steps
    created is removed again (in reverse order)."""
    group, tasks = create_vm(
        app.queue(),
        name,
        host=host,
        pool=pool,
        disk_mib=disk_mib,
        memory_mib=memory_mib,
        vcpus=vcpus,
        network=network,
        created_by=f"cli:{_user()}",
    )
    _report(app, group, tasks, wait_)


def _report(app: App, group: Group, tasks: list[Task], wait_: bool) -> None:
    if wait_:
        tasks = wait_group(app, group, None)
    group = app.queue().group(group.id)
    data = {"group": group.to_dict(), "tasks": [t.to_dict() for t in tasks]}
    app.out(data, lambda: click.echo("\n".join(group_tree(group, tasks)) if wait_ else group.id))
    if wait_ and group.state != "complete":
        sys.exit(EXIT_TASK_FAILED)
