"""Reading a host's inventory from libvirt: the host, its VMs, its pools and volumes.

A full survey costs one `getAllDomainStats` for every domain's state, one listing of transient
domains, then per domain its XML (vCPUs, memory, disks and their backing chains) and snapshot
names; per pool its figures and, when it runs, its volumes. Everything is read, nothing is
changed. Errors are libvirt's own (`libvirt.libvirtError`); the caller decides what they mean.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import ParamSpec, TypeVar

import libvirt

from taskomatic.actions.domains import STATE_NAMES, memory_kib
from taskomatic.actions.storage import POOL_STATES
from taskomatic.inventory import Disk, HostRecord, PoolRecord, Survey, VmRecord, VolumeRecord
from taskomatic.virt.connections import is_error

_STATE_PREFIXES = {
    libvirt.VIR_DOMAIN_NOSTATE: "VIR_DOMAIN_NOSTATE_",
    libvirt.VIR_DOMAIN_RUNNING: "VIR_DOMAIN_RUNNING_",
    libvirt.VIR_DOMAIN_BLOCKED: "VIR_DOMAIN_BLOCKED_",
    libvirt.VIR_DOMAIN_PAUSED: "VIR_DOMAIN_PAUSED_",
    libvirt.VIR_DOMAIN_SHUTDOWN: "VIR_DOMAIN_SHUTDOWN_",
    libvirt.VIR_DOMAIN_SHUTOFF: "VIR_DOMAIN_SHUTOFF_",
    libvirt.VIR_DOMAIN_CRASHED: "VIR_DOMAIN_CRASHED_",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "VIR_DOMAIN_PMSUSPENDED_",
}
_NOT_REASONS = {
    # Shutdown *flags* share the prefix of the SHUTDOWN state's reasons.
    *(f"VIR_DOMAIN_SHUTDOWN_{f}" for f in ("DEFAULT", "ACPI_POWER_BTN", "GUEST_AGENT")),
    *(f"VIR_DOMAIN_SHUTDOWN_{f}" for f in ("INITCTL", "SIGNAL", "PARAVIRT")),
}
REASONS = {
    (state, value): name.removeprefix(prefix).lower().replace("_", "-")
    for state, prefix in _STATE_PREFIXES.items()
    for name, value in vars(libvirt).items()
    if name.startswith(prefix)
    and isinstance(value, int)
    and name not in _NOT_REASONS
    # LAST counts the reasons; UNKNOWN says there is none (and must not read as a state).
    and not name.endswith(("_LAST", "_UNKNOWN"))
    # PMSUSPENDED_DISK_* reasons belong to another state than PMSUSPENDED_*.
    and not (prefix == "VIR_DOMAIN_PMSUSPENDED_" and name.startswith(prefix + "DISK_"))
}
"""libvirt's reason for a domain's state, by (state, reason code): e.g. (5, 2) 'destroyed'."""

VOLUME_KINDS = {
    libvirt.VIR_STORAGE_VOL_FILE: "file",
    libvirt.VIR_STORAGE_VOL_BLOCK: "block",
    libvirt.VIR_STORAGE_VOL_DIR: "dir",
    libvirt.VIR_STORAGE_VOL_NETWORK: "network",
    libvirt.VIR_STORAGE_VOL_NETDIR: "netdir",
    libvirt.VIR_STORAGE_VOL_PLOOP: "ploop",
}

T = TypeVar("T")
P = ParamSpec("P")


def survey(conn: libvirt.virConnect, host: str, now: datetime) -> Survey:
    """Everything the inventory holds about `host`, read through its connection."""
    return Survey(host_facts(conn, host, now), vms(conn, host, now), pools(conn, host, now))


def host_facts(conn: libvirt.virConnect, host: str, now: datetime) -> HostRecord:
    """The host itself: versions, CPUs, memory (the caller sets the timestamps it keeps)."""
    _model, memory_mib, cpus, *_ = conn.getInfo()
    return HostRecord(
        host=host,
        reachable=True,
        since=now,
        error=None,
        hostname=conn.getHostname(),
        libvirt_version=_version(conn.getLibVersion()),
        hypervisor=f"{conn.getType()} {_version(conn.getVersion())}",
        cpus=int(cpus),
        memory_kib=int(memory_mib) * 1024,
        free_memory_kib=int(conn.getFreeMemory()) // 1024,
        confirmed_at=now,
        synced_at=now,
        valid_until=now,
    )


def vms(conn: libvirt.virConnect, host: str, now: datetime) -> list[VmRecord]:
    """Every domain on the host; one that vanishes while being read is left out."""
    transient = {
        d.UUIDString() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT)
    }
    found = []
    for dom, stats in conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0):
        state = (int(stats["state.state"]), int(stats["state.reason"]))
        record = _unless_gone(_vm, dom, host, state, now, transient)
        if record is not None:
            found.append(record)
    return found


def vm(conn: libvirt.virConnect, host: str, key: str, now: datetime) -> VmRecord | None:
    """One domain, by UUID or name; None if the host has no such domain."""
    try:
        dom = conn.lookupByUUIDString(key) if is_uuid(key) else conn.lookupByName(key)
    except libvirt.libvirtError as exc:
        if is_error(exc, libvirt.VIR_ERR_NO_DOMAIN):
            return None
        raise
    return _unless_gone(_vm, dom, host, None, now, None)


def pools(conn: libvirt.virConnect, host: str, now: datetime) -> list[PoolRecord]:
    """Every storage pool on the host, with the volumes of those that run."""
    found = []
    for p in conn.listAllStoragePools(0):
        record = _unless_gone(_pool, p, host, now)
        if record is not None:
            found.append(record)
    return found


def pool(conn: libvirt.virConnect, host: str, name: str, now: datetime) -> PoolRecord | None:
    """One storage pool by name; None if the host has no such pool."""
    try:
        found = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as exc:
        if is_error(exc, libvirt.VIR_ERR_NO_STORAGE_POOL):
            return None
        raise
    return _unless_gone(_pool, found, host, now)


# -- the pieces ----------------------------------------------------------------------------------


def _vm(
    dom: libvirt.virDomain,
    host: str,
    state: tuple[int, int] | None,
    now: datetime,
    transient: set[str] | None,
) -> VmRecord:
    """One domain; `state` and the transient UUIDs are read here unless a listing gave them."""
    if state is None:
        st, reason = dom.state()
        state = (int(st), int(reason))
    root = ET.fromstring(dom.XMLDesc(0))
    uuid = dom.UUIDString()
    persistent = uuid not in transient if transient is not None else bool(dom.isPersistent())
    vcpu = root.find("vcpu")
    return VmRecord(
        host=host,
        uuid=uuid,
        name=dom.name(),
        state=STATE_NAMES.get(state[0], str(state[0])),
        reason=REASONS.get((state[0], state[1])),
        since=now,
        persistent=persistent,
        vcpus=int(vcpu.get("current") or vcpu.text or 0) if vcpu is not None else None,
        memory_kib=memory_kib(root.find("currentMemory")),
        max_memory_kib=memory_kib(root.find("memory")),
        disks=tuple(_disks(root.findall("devices/disk"))),
        snapshots=tuple(sorted(dom.snapshotListNames(0))),
        confirmed_at=now,
    )


def _disks(elements: Iterable[ET.Element]) -> Iterable[Disk]:
    for disk in elements:
        target = disk.find("target")
        chain = []
        below = disk.find("backingStore")
        while below is not None and below.find("source") is not None:
            chain.append(_source(below) or "")
            below = below.find("backingStore")
        driver = disk.find("driver")
        yield Disk(
            target=target.get("dev", "") if target is not None else "",
            source=_source(disk),
            format=driver.get("type") if driver is not None else None,
            backing=tuple(chain),
        )


def _source(elem: ET.Element) -> str | None:
    """Where a disk's (or a backing image's) data is: a file, a device, a pool volume…"""
    source = elem.find("source")
    if source is None:
        return None
    for attr in ("file", "dev", "dir", "name"):
        if source.get(attr):
            return source.get(attr)
    if source.get("pool") and source.get("volume"):
        return f"{source.get('pool')}/{source.get('volume')}"
    return None


def _pool(p: libvirt.virStoragePool, host: str, now: datetime) -> PoolRecord:
    state, capacity, allocation, available = p.info()
    name = p.name()
    volumes: tuple[VolumeRecord, ...] = ()
    if state == libvirt.VIR_STORAGE_POOL_RUNNING:
        volumes = tuple(
            v for v in (_unless_gone(_volume, v, host, name, now) for v in p.listAllVolumes(0)) if v
        )
    return PoolRecord(
        host=host,
        name=name,
        uuid=p.UUIDString(),
        state=POOL_STATES.get(state, str(state)),
        persistent=bool(p.isPersistent()),
        autostart=bool(p.autostart()),
        capacity=capacity,
        allocation=allocation,
        available=available,
        confirmed_at=now,
        volumes=tuple(sorted(volumes, key=lambda v: v.name)),
    )


def _volume(v: libvirt.virStorageVol, host: str, pool: str, now: datetime) -> VolumeRecord:
    kind, capacity, allocation = v.info()
    return VolumeRecord(
        host=host,
        pool=pool,
        name=v.name(),
        path=v.path(),
        kind=VOLUME_KINDS.get(kind, str(kind)),
        capacity=capacity,
        allocation=allocation,
        confirmed_at=now,
    )


_GONE = (
    libvirt.VIR_ERR_NO_DOMAIN,
    libvirt.VIR_ERR_NO_STORAGE_POOL,
    libvirt.VIR_ERR_NO_STORAGE_VOL,
    # A pool stopped between listing and reading its volumes.
    libvirt.VIR_ERR_OPERATION_INVALID,
)


def _unless_gone(read: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
    """`read(...)`, or None if the object vanished meanwhile (another client removed it)."""
    try:
        return read(*args, **kwargs)
    except libvirt.libvirtError as exc:
        if is_error(exc, *_GONE):
            return None
        raise


def _version(number: int) -> str:
    """libvirt's version numbers: major * 1,000,000 + minor * 1,000 + release."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def is_uuid(key: str) -> bool:
    """Whether `key` looks like a UUID (else it is a name)."""
    return len(key) == 36 and key.count("-") == 4
