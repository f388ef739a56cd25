"""Storage actions: pools (define, build, start, stop, delete, refresh) and volumes (create,
delete) on one host.

Pools are per host, so every storage task names its host; they lock `pool:<host>/<name>`,
volumes included (a volume is never created in a pool being deleted). Each ensures an end
state, and its `check` reads that state on the host.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import libvirt

from taskomatic import defaults, errors
from taskomatic.actions.registry import Check, Context, Param, Registry
from taskomatic.model import Host
from taskomatic.virt.connections import is_error

HOST = Param(str, help="the host holding the pool")
POOL = Param(str, help="the storage pool name")
POOL_TYPES = ("dir", "logical")

POOL_STATES = {
    libvirt.VIR_STORAGE_POOL_INACTIVE: "inactive",
    libvirt.VIR_STORAGE_POOL_BUILDING: "building",
    libvirt.VIR_STORAGE_POOL_RUNNING: "running",
    libvirt.VIR_STORAGE_POOL_DEGRADED: "degraded",
    libvirt.VIR_STORAGE_POOL_INACCESSIBLE: "inaccessible",
}


def register(registry: Registry) -> None:
    """Add the storage actions to `registry`."""
    attempts = defaults.HOST_ACTION_MAX_ATTEMPTS
    pool = {"host": HOST, "name": POOL}
    registry.action(
        "pool.define",
        params={
            **pool,
            "type": Param(str, default="dir", help="dir or logical"),
            "path": Param(str, default=None, help="dir: the directory; logical: /dev/<vg>"),
            "devices": Param(list, default=[], help="logical: the physical volumes"),
            "source_name": Param(str, default=None, help="logical: the volume group name"),
            "xml": Param(str, default=None, help="full pool XML (instead of the fields above)"),
        },
        locks=_pool_locks,
        check=_check(lambda pool: pool is not None),
        max_attempts=attempts,
    )(define_pool)
    simple: Sequence[tuple[str, Callable[[Context], dict[str, Any]], Callable[[Any], bool]]] = (
        ("pool.build", build_pool, _built),
        ("pool.start", start_pool, lambda pool: pool is not None and pool.isActive()),
        ("pool.stop", stop_pool, lambda pool: pool is not None and not pool.isActive()),
        ("pool.refresh", refresh_pool, lambda pool: False),  # cheap and idempotent: run again
    )
    for name, fn, done in simple:
        registry.action(
            name, params=pool, locks=_pool_locks, check=_check(done), max_attempts=attempts
        )(fn)
    registry.action(
        "pool.delete",
        params={
            **pool,
            "delete_storage": Param(
                bool, default=False, help="also remove the directory / volume group and its data"
            ),
        },
        locks=_pool_locks,
        check=_check(lambda pool: pool is None),
        max_attempts=attempts,
    )(delete_pool)
    volume = {"host": HOST, "pool": POOL, "name": Param(str, help="the volume name")}
    registry.action(
        "volume.create",
        params={
            **volume,
            "capacity_mib": Param(int),
            "format": Param(str, default=None, help="qcow2, raw, … (default: the pool's)"),
            "allocation_mib": Param(int, default=0),
        },
        locks=_volume_locks,
        check=_check_volume(present=True),
        max_attempts=attempts,
        compensate=_delete_if_created,
    )(create_volume)
    registry.action(
        "volume.delete",
        params=volume,
        locks=_volume_locks,
        check=_check_volume(present=False),
        max_attempts=attempts,
    )(delete_volume)


def _pool_locks(params: Mapping[str, Any]) -> Iterable[str]:
    return [f"pool:{params['host']}/{params['name']}"]


def _volume_locks(params: Mapping[str, Any]) -> Iterable[str]:
    return [f"pool:{params['host']}/{params['pool']}"]


# --- reading ----------------------------------------------------------------------------------


def _lookup_pool(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool | None:
    try:
        return conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as exc:
        if is_error(exc, libvirt.VIR_ERR_NO_STORAGE_POOL):
            return None
        raise


def _lookup_volume(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if is_error(exc, libvirt.VIR_ERR_NO_STORAGE_VOL):
            return None
        raise


def _describe_pool(host: Host, pool: libvirt.virStoragePool) -> dict[str, Any]:
    st, capacity, allocation, available = pool.info()
    return {
        "host": host.name,
        "pool": pool.name(),
        "state": POOL_STATES.get(st, str(st)),
        "capacity": capacity,
        "allocation": allocation,
        "available": available,
    }


def _describe_volume(host: Host, pool: str, vol: libvirt.virStorageVol) -> dict[str, Any]:
    _kind, capacity, allocation = vol.info()
    return {
        "host": host.name,
        "pool": pool,
        "volume": vol.name(),
        "path": vol.path(),
        "capacity": capacity,
        "allocation": allocation,
    }


def _need_pool(conn: libvirt.virConnect, host: Host, name: str) -> libvirt.virStoragePool:
    pool = _lookup_pool(conn, name)
    if pool is None:
        raise errors.ActionFailed(
            f"no storage pool {name!r} on host {host.name!r}; define it first (pool.define)"
        )
    return pool


def _built(pool: libvirt.virStoragePool | None) -> bool:
    """A running pool is built. Whether a stopped one is cannot be told from here (its storage
    is on the host), so building again is harmless: NO_OVERWRITE never touches data."""
    return pool is not None and bool(pool.isActive())


def _check(done: Callable[[libvirt.virStoragePool | None], bool]) -> Any:
    def check(ctx: Context) -> Check:
        p = ctx.params
        host = ctx.hosts.host(p["host"])
        with ctx.hosts.call(host, f"looking up pool {p['name']!r}") as conn:
            pool = _lookup_pool(conn, p["name"])
            if done(pool):
                return Check.done(_describe_pool(host, pool) if pool else {"pool": p["name"]})
        return Check.not_started()

    return check


def _check_volume(present: bool) -> Any:
    def check(ctx: Context) -> Check:
        p = ctx.params
        host = ctx.hosts.host(p["host"])
        with ctx.hosts.call(host, f"looking up volume {p['name']!r}") as conn:
            vol = _lookup_volume(_need_pool(conn, host, p["pool"]), p["name"])
            if (vol is not None) == present:
                return Check.done(
                    _describe_volume(host, p["pool"], vol) if vol else {"volume": p["name"]}
                )
        return Check.not_started()

    return check


# --- pools ------------------------------------------------------------------------------------


def pool_xml(p: Mapping[str, Any]) -> str:
    """Pool XML from the task's fields (dir: a directory; logical: an LVM volume group)."""
    if p["type"] not in POOL_TYPES:
        raise errors.ActionFailed(
            f"pool type {p['type']!r} is not built in; give 'xml', or a type of: "
            + ", ".join(POOL_TYPES)
        )
    pool = ET.Element("pool", type=p["type"])
    ET.SubElement(pool, "name").text = p["name"]
    if p["type"] == "logical":
        source = ET.SubElement(pool, "source")
        for device in p["devices"]:
            ET.SubElement(source, "device", path=str(device))
        ET.SubElement(source, "name").text = p["source_name"] or p["name"]
        ET.SubElement(source, "format", type="lvm2")
    path = p["path"] or (
        f"/dev/{p['source_name'] or p['name']}" if p["type"] == "logical" else None
    )
    if not path:
        raise errors.ActionFailed("a dir pool needs a 'path'")
    ET.SubElement(ET.SubElement(pool, "target"), "path").text = path
    return ET.tostring(pool, encoding="unicode")


def define_pool(ctx: Context) -> dict[str, Any]:
    """Define a storage pool (persistent, inactive); an existing pool of that name is kept."""
    p = ctx.params
    host = ctx.hosts.host(p["host"])
    with ctx.hosts.call(host, f"defining pool {p['name']!r}") as conn:
        pool = _lookup_pool(conn, p["name"])
        if pool is None:
            xml = p["xml"] or pool_xml(p)
            named = ET.fromstring(xml).findtext("name")
            if named != p["name"]:
                raise errors.ActionFailed(f"the pool XML names {named!r}, the task {p['name']!r}")
            pool = conn.storagePoolDefineXML(xml, 0)
        return _describe_pool(host, pool)


def build_pool(ctx: Context) -> dict[str, Any]:
    """Build a pool's storage (make the directory, create the volume group), never over data."""
    p = ctx.params
    host = ctx.hosts.host(p["host"])
    with ctx.hosts.call(host, f"building pool {p['name']!r}") as conn:
        pool = _need_pool(conn, host, p["name"])
        if not _built(pool):
            # A directory is simply made (or kept); anything else must not be formatted over.
            kind = ET.fromstring(pool.XMLDesc(0)).get("type")
            pool.build(0 if kind == "dir" else libvirt.VIR_STORAGE_POOL_BUILD_NO_OVERWRITE)
        return _describe_pool(host, pool)


def start_pool(ctx: Context) -> dict[str, Any]:
    """Start (activate) a pool; a running pool is left running."""
    p = ctx.params
    host = ctx.hosts.host(p["host"])
    with ctx.hosts.call(host, f"starting pool {p['name']!r}") as conn:
        pool = _need_pool(conn, host, p["name"])
        if not pool.isActive():
            pool.create(0)
        return _describe_pool(host, pool)


def stop_pool(ctx: Context) -> dict[str, Any]:
    """Stop (deactivate) a pool; its definition and data stay."""
    p = ctx.params
    host = ctx.hosts.host(p["host"])
    with ctx.hosts.call(host, f"stopping pool {p['name']!r}") as conn:
        pool = _need_pool(conn, host, p["name"])
        if pool.isActive():
            pool.destroy()
        return _describe_pool(host, pool)


def refresh_pool(ctx: Context) -> dict[str, Any]:
    """Re-read a running pool's volumes and sizes from its storage."""
    p = ctx.params
    host = ctx.hosts.host(p["host"])
    with ctx.hosts.call(host, f"refreshing pool {p['name']!r}") as conn:
        pool = _need_pool(conn, host, p["name"])
        pool.refresh(0)
        return {**_describe_pool(host, pool), "volumes": sorted(pool.listVolumes())}


def delete_pool(ctx: Context) -> dict[str, Any]:
    """Remove a stopped pool's definition, and its storage if `delete_storage`."""
    p = ctx.params
    host = ctx.hosts.host(p["host"])
    with ctx.hosts.call(host, f"deleting pool {p['name']!r}") as conn:
        pool = _lookup_pool(conn, p["name"])
        if pool is None:
            return {"host": host.name, "pool": p["name"], "deleted": False}
        if pool.isActive():
            raise errors.ActionFailed(
                f"pool {p['name']!r} on host {host.name!r} is running; stop it first (pool.stop)"
            )
        if p["delete_storage"]:
            pool.delete(libvirt.VIR_STORAGE_POOL_DELETE_NORMAL)
        pool.undefine()
    return {"host": host.name, "pool": p["name"], "deleted": True}


# --- volumes ----------------------------------------------------------------------------------


def create_volume(ctx: Context) -> dict[str, Any]:
    """Create a volume in a running pool; an existing volume of that name is kept."""
    p = ctx.params
    host = ctx.hosts.host(p["host"])
    with ctx.hosts.call(host, f"creating volume {p['name']!r} in pool {p['pool']!r}") as conn:
        pool = _need_pool(conn, host, p["pool"])
        vol = _lookup_volume(pool, p["name"])
        created = vol is None
        if vol is None:
            xml = ET.Element("volume")
            ET.SubElement(xml, "name").text = p["name"]
            ET.SubElement(xml, "capacity", unit="MiB").text = str(p["capacity_mib"])
            ET.SubElement(xml, "allocation", unit="MiB").text = str(p["allocation_mib"])
            if p["format"]:
                ET.SubElement(ET.SubElement(xml, "target"), "format", type=p["format"])
            vol = pool.createXML(ET.tostring(xml, encoding="unicode"), 0)
        return {**_describe_volume(host, p["pool"], vol), "created": created}


def _delete_if_created(params: Mapping[str, Any], result: Any) -> tuple[str, dict[str, Any]] | None:
    """A volume this task created is deleted; one that was there before is kept."""
    if not isinstance(result, Mapping) or result.get("created") is not True:
        return None
    return "volume.delete", {k: params[k] for k in ("host", "pool", "name")}


def delete_volume(ctx: Context) -> dict[str, Any]:
    """Delete a volume and its data; a missing volume is already deleted."""
    p = ctx.params
    host = ctx.hosts.host(p["host"])
    with ctx.hosts.call(host, f"deleting volume {p['name']!r} from pool {p['pool']!r}") as conn:
        vol = _lookup_volume(_need_pool(conn, host, p["pool"]), p["name"])
        if vol is None:
            return {"host": host.name, "pool": p["pool"], "volume": p["name"], "deleted": False}
        vol.delete(0)
    return {"host": host.name, "pool": p["pool"], "volume": p["name"], "deleted": True}
