"""The inventory's commands: `vms`, `pools`, `drift`, `hosts show`, `hosts clear`.

A few lines each over `taskomatic.inventory`, `taskomatic.drift` and `taskomatic.flows.clear`;
registered on the groups of `taskomatic.cli`, which imports this module.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime

import click

from taskomatic.cli import (
    EXIT_BAD_INPUT,
    EXIT_CODES,
    EXIT_TASK_FAILED,
    App,
    _exit_for,
    _line,
    _user,
    command,
    fail,
    hosts,
    main,
    wait_group,
)
from taskomatic.drift import drift as find_drift
from taskomatic.flows.clear import clear_by_destroying, clear_by_migrating
from taskomatic.inventory import VM_STATES, HostRecord, Inventory, PoolRecord, VmRecord


@command(hosts, "show")
@click.argument("host")
def hosts_show(app: App, host: str) -> None:
    """What the inventory knows of HOST: versions, CPUs, memory, its VMs and pools."""
    queue = app.queue()
    row = queue.hosts.get(host)
    view = Inventory(queue).host(host)
    now = queue.now()
    data = {"host": row.to_dict(), **view.to_dict(now)}

    def human() -> None:
        click.echo(f"host:        {row.name}  {row.state}  {row.uri}")
        record = view.record
        if record is None:
            click.echo("inventory:   none yet (a running dispatcher syncs every host)")
            return
        click.echo(f"inventory:   {_status(record, now)}")
        click.echo(
            f"hypervisor:  {record.hypervisor or '-'}, libvirt {record.libvirt_version or '-'}, "
            f"hostname {record.hostname or '-'}"
        )
        click.echo(f"cpus:        {record.cpus if record.cpus is not None else '-'}")
        click.echo(
            f"memory:      {_kib(record.memory_kib)} total, {_kib(record.free_memory_kib)} free"
        )
        click.echo(
            f"confirmed:   {_time(record.confirmed_at)} (full sync {_time(record.synced_at)})"
        )
        click.echo(f"vms ({len(view.vms)}):")
        _print_vms(view.vms, indent="  ", with_host=False)
        click.echo(f"pools ({len(view.pools)}):")
        _print_pools(view.pools, indent="  ", with_host=False)

    app.out(data, human)


@command(hosts, "clear", epilog=EXIT_CODES)
@click.argument("host")
@click.option("--migrate", is_flag=True, help="Clear by moving every VM to other hosts.")
@click.option("--destroy", is_flag=True, help="Clear by destroying every VM and pool on it.")
@click.option(
    "--i-understand-this-destroys-data",
    "confirmed",
    is_flag=True,
    help="Required with --destroy: VMs are powered off and undefined, pools deleted.",
)
@click.option(
    "--delete-storage",
    is_flag=True,
    help="With --destroy: also delete the pools' storage (directories, volume groups).",
)
@click.option(
    "--copy-storage", is_flag=True, help="With --migrate: copy disks (no shared storage)."
)
@click.option("--wait", "wait_", is_flag=True, help="Wait for the group, showing progress.")
def hosts_clear(
    app: App,
    host: str,
    migrate: bool,
    destroy: bool,
    confirmed: bool,
    delete_storage: bool,
    copy_storage: bool,
    wait_: bool,
) -> None:
    """Put HOST into maintenance, then move every VM away (--migrate) or destroy every VM
    and storage pool on it (--destroy): one group, a task per object (`taskomatic show`)."""
    if migrate == destroy:
        fail(
            f"say how to clear host {host!r}: --migrate (moves its VMs to other hosts) or "
            "--destroy (destroys what is on it)",
            EXIT_BAD_INPUT,
        )
    if destroy and not confirmed:
        fail(
            f"clearing host {host!r} with --destroy powers off and undefines every VM on it and "
            "deletes its storage pools; add --i-understand-this-destroys-data",
            EXIT_BAD_INPUT,
        )
    queue = app.queue()
    if migrate:
        group, tasks = clear_by_migrating(
            queue, host, copy_storage=copy_storage, created_by=f"cli:{_user()}"
        )
    else:
        group, tasks = clear_by_destroying(
            queue,
            host,
            i_understand_this_destroys_data=True,
            delete_storage=delete_storage,
            created_by=f"cli:{_user()}",
        )
    if wait_:  # the whole group: a clear by migrating adds its moves as it runs
        tasks = wait_group(app, group, None)
    data = {"group": queue.group(group.id).to_dict(), "tasks": [t.to_dict() for t in tasks]}
    app.out(data, lambda: click.echo(group.id if not wait_ else "\n".join(_line(t) for t in tasks)))
    for task in tasks:
        _exit_for(task)


@command(main, "vms")
@click.option("--host", help="Only the VMs on this host.")
@click.option("--state", type=click.Choice(VM_STATES), help="Only VMs in this state.")
def vms(app: App, host: str | None, state: str | None) -> None:
    """The VMs on every host, as the hosts last reported them (the inventory)."""
    queue = app.queue()
    if host is not None:
        queue.hosts.get(host)  # an unknown host is an error, not an empty list
    found = Inventory(queue).vms(host=host, state=state)
    app.out([vm.to_dict() for vm in found], lambda: _print_vms(found))


@command(main, "pools")
@click.option("--host", help="Only the pools on this host.")
def pools(app: App, host: str | None) -> None:
    """The storage pools on every host, with their volumes (the inventory)."""
    queue = app.queue()
    if host is not None:
        queue.hosts.get(host)
    found = Inventory(queue).pools(host=host)
    app.out([pool.to_dict() for pool in found], lambda: _print_pools(found))


@command(main, "drift")
def drift(app: App) -> None:
    """VMs whose host reports otherwise than their last task left them; exit 1 if any."""
    found = find_drift(Inventory(app.queue()))

    def human() -> None:
        if not found:
            click.echo("no drift: every VM is where and as its last task left it")
        for d in found:
            click.echo(f"{d.vm:<20} {d.kind:<8} {d.message}")

    app.out([d.to_dict() for d in found], human)
    if found:
        sys.exit(EXIT_TASK_FAILED)


# -- printing ------------------------------------------------------------------------------------


def _print_vms(found: Sequence[VmRecord], indent: str = "", with_host: bool = True) -> None:
    if not found:
        click.echo(f"{indent}no vms")
        return
    head = f"{'HOST':<14} " if with_host else ""
    click.echo(
        f"{indent}{head}{'NAME':<20} {'STATE':<14} {'SINCE':<19}  VCPUS  {'MEMORY':>10}  CONFIRMED"
    )
    for vm in found:
        state = vm.state if vm.last_state is None else f"{vm.state} (was {vm.last_state})"
        host = f"{vm.host:<14} " if with_host else ""
        vcpus = vm.vcpus if vm.vcpus is not None else "-"
        click.echo(
            f"{indent}{host}{vm.name:<20} {state:<14} {_time(vm.since):<19}  {vcpus:>5}  "
            f"{_kib(vm.memory_kib):>10}  {_time(vm.confirmed_at)}"
        )


def _print_pools(found: Sequence[PoolRecord], indent: str = "", with_host: bool = True) -> None:
    if not found:
        click.echo(f"{indent}no pools")
        return
    head = f"{'HOST':<14} " if with_host else ""
    click.echo(
        f"{indent}{head}{'NAME':<16} {'STATE':<10} {'CAPACITY':>10} {'USED':>10} "
        f"{'FREE':>10}  VOLUMES  CONFIRMED"
    )
    for pool in found:
        host = f"{pool.host:<14} " if with_host else ""
        click.echo(
            f"{indent}{host}{pool.name:<16} {pool.state:<10} {_bytes(pool.capacity):>10} "
            f"{_bytes(pool.allocation):>10} {_bytes(pool.available):>10}  "
            f"{len(pool.volumes):>7}  {_time(pool.confirmed_at)}"
        )


def _status(record: HostRecord, now: datetime) -> str:
    status = record.status(now)
    if status == "reachable":
        return f"reachable since {_time(record.since)}"
    if status == "unreachable":
        return f"unreachable since {_time(record.since)}: {record.error}"
    return f"stale: no dispatcher has confirmed it since {_time(record.confirmed_at)}"


def _time(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value else "-"


def _kib(value: int | None) -> str:
    return "-" if value is None else _bytes(value * 1024)


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    if value < 1024:
        return f"{value} B"
    size, unit = value / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"
