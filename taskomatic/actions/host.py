"""Host actions: maintenance (no new work is placed on it) and activate (after checking that
it answers). Queued tasks choose their host when they run, so maintenance takes effect for
everything not yet running."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from taskomatic import defaults, errors
from taskomatic.actions.registry import Check, Context, Param, Registry
from taskomatic.model import HostState
from taskomatic.submission import Expansion, TaskSpec

NAME = Param(str, help="the host name")


def register(registry: Registry) -> None:
    """Add the host actions to `registry`."""
    for name, fn, wanted in (
        ("host.maintenance", maintenance, HostState.MAINTENANCE),
        ("host.activate", activate, HostState.ACTIVE),
    ):
        registry.action(
            name,
            params={"name": NAME},
            locks=_locks,
            check=_check(wanted),
            max_attempts=defaults.HOST_ACTION_MAX_ATTEMPTS,
        )(fn)
    registry.action(
        "host.evacuate",
        params={
            "name": NAME,
            "copy_storage": Param(bool, default=False, help="copy disks (no shared storage)"),
        },
        max_attempts=defaults.HOST_ACTION_MAX_ATTEMPTS,
    )(evacuate)
    registry.action(
        "host.verify_empty",
        params={"name": NAME, "pools": Param(bool, default=True, help="storage pools too")},
        locks=_locks,
        max_attempts=defaults.HOST_ACTION_MAX_ATTEMPTS,
    )(verify_empty)


def _locks(params: Mapping[str, Any]) -> Iterable[str]:
    return [f"host:{params['name']}"]


def _check(wanted: HostState) -> Any:
    def check(ctx: Context) -> Check:
        host = ctx.hosts.host(ctx.params["name"])
        return Check.done(host.to_dict()) if host.state == wanted else Check.not_started()

    return check


def maintenance(ctx: Context) -> dict[str, Any]:
    """Put a host into maintenance: nothing new is placed on it; what runs there stays."""
    ctx.hosts.host(ctx.params["name"])  # a clean failure for an unknown host
    return ctx.hosts.hosts.set_state(ctx.params["name"], HostState.MAINTENANCE).to_dict()


def activate(ctx: Context) -> dict[str, Any]:
    """Make a host active again, once it answers over libvirt."""
    host = ctx.hosts.host(ctx.params["name"])
    with ctx.hosts.call(host, "checking the host answers") as conn:
        conn.getInfo()
    return ctx.hosts.hosts.set_state(host.name, HostState.ACTIVE).to_dict()


def evacuate(ctx: Context) -> Expansion:
    """List the host's VMs now and add one `vm.migrate` per VM to the group (each chooses
    its target when it runs); what waits for this task waits for every move."""
    host = ctx.hosts.host(ctx.params["name"])
    with ctx.hosts.call(host, "listing the VMs to move off the host") as conn:
        vms = sorted(d.name() for d in conn.listAllDomains(0))
    moves = [
        TaskSpec(
            "vm.migrate",
            {"name": vm, "host": host.name, "copy_storage": ctx.params["copy_storage"]},
            name=f"move {vm}",
        )
        for vm in vms
    ]
    return Expansion(moves, result={"host": host.name, "vms": vms})


def verify_empty(ctx: Context) -> dict[str, Any]:
    """Fail unless the host has no VMs (and no storage pools): the last step of a clear."""
    host = ctx.hosts.host(ctx.params["name"])
    with ctx.hosts.call(host, "listing what is left on the host") as conn:
        vms = sorted(d.name() for d in conn.listAllDomains(0))
        pools = sorted(p.name() for p in conn.listAllStoragePools(0)) if ctx.params["pools"] else []
    if vms or pools:
        left = [f"vm(s) {', '.join(vms)}"] if vms else []
        left += [f"pool(s) {', '.join(pools)}"] if pools else []
        raise errors.ActionFailed(
            f"host {host.name!r} still has {' and '.join(left)}, defined after the clear was "
            "planned; clear it again"
        )
    return {"host": host.name, "empty": True}
