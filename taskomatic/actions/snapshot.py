"""Snapshot actions: create (internal, or external disk-only) and delete (of a stopped VM).

A snapshot is known by its name on the VM, so creating one that exists, or deleting one that
is gone, is done already; `check` asks the host whether the snapshot is there.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from typing import Any

import libvirt

from taskomatic import defaults, errors
from taskomatic.actions.domains import ACTIVE, STATE_NAMES, state
from taskomatic.actions.registry import Check, Context, Param, Registry
from taskomatic.virt.connections import is_error
from taskomatic.virt.fleet import Found

VM = Param(str, help="the VM (domain) name")
SNAPSHOT = Param(str, help="the snapshot name")
HOST = Param(str, default=None, help="pin to this host (default: wherever the VM is defined)")


def register(registry: Registry) -> None:
    """Add the snapshot actions to `registry`."""
    attempts = defaults.HOST_ACTION_MAX_ATTEMPTS
    registry.action(
        "snapshot.create",
        params={
            "vm": VM,
            "name": SNAPSHOT,
            "host": HOST,
            "disk_only": Param(
                bool, default=False, help="external disk-only: new overlay files, no memory"
            ),
            "description": Param(str, default=None),
        },
        locks=_locks,
        check=_check(present=True),
        max_attempts=attempts,
    )(create)
    registry.action(
        "snapshot.delete",
        params={"vm": VM, "name": SNAPSHOT, "host": HOST},
        locks=_locks,
        check=_check(present=False),
        max_attempts=attempts,
    )(delete)


def _locks(params: Mapping[str, Any]) -> Iterable[str]:
    return [f"vm:{params['vm']}"]


def _lookup(found: Found, name: str) -> libvirt.virDomainSnapshot | None:
    try:
        return found.domain.snapshotLookupByName(name, 0)
    except libvirt.libvirtError as exc:
        if is_error(exc, libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT):
            return None
        raise


def _describe(found: Found, snap: libvirt.virDomainSnapshot) -> dict[str, Any]:
    root = ET.fromstring(snap.getXMLDesc(0))
    disks = {
        d.get("name"): d.get("snapshot")
        for d in root.findall("disks/disk")
        if d.get("snapshot") not in (None, "no")
    }
    return {
        "vm": found.domain.name(),
        "host": found.host.name,
        "snapshot": snap.getName(),
        "state": root.findtext("state"),
        "disks": disks,
    }


def _check(present: bool) -> Any:
    def check(ctx: Context) -> Check:
        p = ctx.params
        found = ctx.hosts.need_vm(p["vm"], p["host"])
        with ctx.hosts.call(found.host, f"looking up snapshot {p['name']!r}"):
            snap = _lookup(found, p["name"])
        if (snap is not None) == present:
            return Check.done(_describe(found, snap) if snap else {"snapshot": p["name"]})
        return Check.not_started()

    return check


def create(ctx: Context) -> dict[str, Any]:
    """Snapshot a VM: internal (disks and, if running, memory), or external disk-only."""
    p = ctx.params
    found = ctx.hosts.need_vm(p["vm"], p["host"])
    doing = f"creating snapshot {p['name']!r} of vm {p['vm']!r}"
    with ctx.hosts.call(found.host, doing):
        snap = _lookup(found, p["name"])
        if snap is None:
            xml = ET.Element("domainsnapshot")
            ET.SubElement(xml, "name").text = p["name"]
            if p["description"]:
                ET.SubElement(xml, "description").text = p["description"]
            flags = 0
            if p["disk_only"]:
                flags = (
                    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                )
            snap = found.domain.snapshotCreateXML(ET.tostring(xml, encoding="unicode"), flags)
        return _describe(found, snap)


def delete(ctx: Context) -> dict[str, Any]:
    """Delete a snapshot of a stopped VM (a running VM's needs a live merge)."""
    p = ctx.params
    found = ctx.hosts.need_vm(p["vm"], p["host"])
    doing = f"deleting snapshot {p['name']!r} of vm {p['vm']!r}"
    with ctx.hosts.call(found.host, doing):
        snap = _lookup(found, p["name"])
        if snap is None:
            return {"vm": p["vm"], "host": found.host.name, "snapshot": p["name"], "deleted": False}
        st = state(found.domain)
        if st in ACTIVE:
            raise errors.ActionFailed(
                f"vm {p['vm']!r} on host {found.host.name!r} is {STATE_NAMES.get(st, st)}; "
                "stop it before deleting a snapshot"
            )
        snap.delete(0)
    return {"vm": p["vm"], "host": found.host.name, "snapshot": p["name"], "deleted": True}
