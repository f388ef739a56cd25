"""The inventory: what each host last reported about itself, its VMs and its storage.

A dispatcher keeps it (`taskomatic.virt.inventory`: libvirt events, and a full sync of every
host every few seconds); placement, the CLI and drift reports read it here. A reader is never
handed a stale answer silently: the VMs of a host that stopped answering read "unknown" since
then, and so do those of a host whose inventory no dispatcher has confirmed lately.

Rows are written only when what a host reports changes; a full sync that finds nothing new
only moves the host's `synced_at`, which confirms every row of that host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa

from taskomatic import errors
from taskomatic.actions.domains import ACTIVE, STATE_NAMES

if TYPE_CHECKING:
    from taskomatic.queue import Queue

T = TypeVar("T")

UNKNOWN = "unknown"
"""The state of a VM whose host cannot vouch for it now."""

VM_STATES = (*sorted(set(STATE_NAMES.values())), UNKNOWN)
"""Every state a VM can be listed in."""

ACTIVE_STATES = frozenset(STATE_NAMES[s] for s in ACTIVE)
"""States in which a VM holds its memory on its host."""


@dataclass(frozen=True)
class Disk:
    """A VM's disk: what it shows the guest, its image, and the images below that one."""

    target: str
    source: str | None
    format: str | None
    backing: tuple[str, ...] = ()  # the backing chain under `source`, nearest first

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Disk:
        return cls(data["target"], data["source"], data["format"], tuple(data["backing"]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "source": self.source,
            "format": self.format,
            "backing": list(self.backing),
        }


@dataclass(frozen=True)
class HostRecord:
    """A host as it last answered: reachable or not (since when), versions, CPUs, memory."""

    host: str
    reachable: bool
    since: datetime  # when `reachable` last changed
    error: str | None
    hostname: str | None
    libvirt_version: str | None
    hypervisor: str | None
    cpus: int | None
    memory_kib: int | None
    free_memory_kib: int | None
    confirmed_at: datetime | None  # its last answer
    synced_at: datetime | None  # its last full sync
    valid_until: datetime  # after this, no dispatcher is keeping its inventory

    @classmethod
    def from_row(cls, row: Any) -> HostRecord:
        m = row._mapping
        return cls(**{f: m[f] for f in cls.__dataclass_fields__})

    def vouches(self, now: datetime) -> bool:
        """Whether what this host reported can be taken as current."""
        return self.reachable and now <= self.valid_until

    def status(self, now: datetime) -> str:
        """'reachable', 'unreachable' or 'stale' (nobody is keeping the inventory)."""
        if now > self.valid_until:
            return "stale"
        return "reachable" if self.reachable else "unreachable"

    def to_dict(self, now: datetime) -> dict[str, Any]:
        values = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return {**_jsonable(values), "status": self.status(now)}


@dataclass(frozen=True)
class VmRecord:
    """A VM (libvirt domain) on a host, as that host last reported it.

    `state` is "unknown" when the host cannot vouch for it now; `last_state` then holds the
    state it last reported, and `since` when it stopped vouching.
    """

    host: str
    uuid: str
    name: str
    state: str
    reason: str | None
    since: datetime  # when this state was first seen
    persistent: bool
    vcpus: int | None
    memory_kib: int | None
    max_memory_kib: int | None
    disks: tuple[Disk, ...]
    snapshots: tuple[str, ...]
    confirmed_at: datetime
    last_state: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> VmRecord:
        m = row._mapping
        values = {f: m[f] for f in cls.__dataclass_fields__ if f != "last_state"}
        values["disks"] = tuple(Disk.from_dict(d) for d in m["disks"])
        values["snapshots"] = tuple(m["snapshots"])
        return cls(**values)

    def to_row(self) -> dict[str, Any]:
        values = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "last_state"}
        return {**values, "disks": [d.to_dict() for d in self.disks], "snapshots": self.snapshots}

    def observed(self) -> tuple[Any, ...]:
        """What the host reports (not when): a change here is a change worth writing."""
        skip = ("since", "confirmed_at", "last_state")
        return tuple(getattr(self, f) for f in self.__dataclass_fields__ if f not in skip)

    def to_dict(self) -> dict[str, Any]:
        values = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return {**_jsonable(values), "disks": [d.to_dict() for d in self.disks]}


@dataclass(frozen=True)
class VolumeRecord:
    """A storage volume in a pool."""

    host: str
    pool: str
    name: str
    path: str | None
    kind: str | None
    capacity: int | None  # bytes
    allocation: int | None  # bytes
    confirmed_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> VolumeRecord:
        m = row._mapping
        return cls(**{f: m[f] for f in cls.__dataclass_fields__})

    def to_row(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    def observed(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__ if f != "confirmed_at")

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self.to_row())


@dataclass(frozen=True)
class PoolRecord:
    """A storage pool on a host (with its volumes when it runs: a stopped pool lists none)."""

    host: str
    name: str
    uuid: str
    state: str
    persistent: bool
    autostart: bool
    capacity: int | None  # bytes
    allocation: int | None
    available: int | None
    confirmed_at: datetime
    volumes: tuple[VolumeRecord, ...] = ()

    @classmethod
    def from_row(cls, row: Any, volumes: Iterable[VolumeRecord] = ()) -> PoolRecord:
        m = row._mapping
        values = {f: m[f] for f in cls.__dataclass_fields__ if f != "volumes"}
        return cls(**values, volumes=tuple(volumes))

    def to_row(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "volumes"}

    def observed(self) -> tuple[Any, ...]:
        skip = ("confirmed_at", "volumes")
        return tuple(getattr(self, f) for f in self.__dataclass_fields__ if f not in skip)

    def to_dict(self) -> dict[str, Any]:
        return {**_jsonable(self.to_row()), "volumes": [v.to_dict() for v in self.volumes]}


@dataclass(frozen=True)
class Survey:
    """Everything one full sync read from a host."""

    host: HostRecord
    vms: Sequence[VmRecord]
    pools: Sequence[PoolRecord]  # each with its volumes


@dataclass(frozen=True)
class Changes:
    """What libvirt events (or finished tasks) say changed on one host, re-read from it."""

    vms: Sequence[VmRecord] = ()
    gone_vms: Sequence[str] = ()  # UUIDs of VMs no longer defined
    gone_vm_names: Sequence[str] = ()
    pools: Sequence[PoolRecord] = ()  # each with its volumes
    gone_pools: Sequence[str] = ()

    def __bool__(self) -> bool:
        return any((self.vms, self.gone_vms, self.gone_vm_names, self.pools, self.gone_pools))


@dataclass(frozen=True)
class Room:
    """What placement needs of a host, as its inventory has it."""

    host: str
    vms: int  # defined
    unpromised_kib: int  # memory not promised to running VMs


@dataclass(frozen=True)
class HostView:
    """Everything the inventory holds about one host (`taskomatic hosts show`)."""

    record: HostRecord | None  # None: never synced
    vms: list[VmRecord] = field(default_factory=list)
    pools: list[PoolRecord] = field(default_factory=list)

    def to_dict(self, now: datetime) -> dict[str, Any]:
        """The view as JSON (the CLI's `--json hosts show`, the HTTP API), `now` dating it."""
        return {
            "inventory": self.record.to_dict(now) if self.record else None,
            "vms": [vm.to_dict() for vm in self.vms],
            "pools": [pool.to_dict() for pool in self.pools],
        }


class Inventory:
    """Reads and writes the inventory over the queue's transactions (`Inventory(queue)`)."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    # -- reads ---------------------------------------------------------------------------

    def host(self, name: str) -> HostView:
        """The inventory of host `name`; HostNotFound if it is not registered."""

        def read(conn: sa.Connection) -> HostView:
            self.queue.hosts.get_in(conn, name)
            return HostView(
                next(iter(self.queue.store.inventory_hosts(conn, [name])), None),
                self._vms_in(conn, host=name),
                self._pools_in(conn, host=name),
            )

        return self._read(read)

    def hosts(self) -> list[HostRecord]:
        """Every host that has been synced at least once, by name."""
        return self._read(lambda conn: self.queue.store.inventory_hosts(conn))

    def vms(
        self, *, host: str | None = None, state: str | None = None, name: str | None = None
    ) -> list[VmRecord]:
        """VMs by host and name, optionally only those on `host`, named `name`, in `state`."""
        if state is not None and state not in VM_STATES:
            raise errors.ValidationError(
                f"unknown vm state {state!r}; states are: {', '.join(VM_STATES)}", field="state"
            )
        found = self._read(lambda conn: self._vms_in(conn, host=host, name=name))
        return [vm for vm in found if state is None or vm.state == state]

    def pools(self, *, host: str | None = None) -> list[PoolRecord]:
        """Storage pools (with their volumes) by host and name."""
        return self._read(lambda conn: self._pools_in(conn, host=host))

    def rooms(self) -> dict[str, Room]:
        """Room for new VMs on each host whose inventory is current (others: ask the host)."""

        def read(conn: sa.Connection) -> dict[str, Room]:
            now = self.queue.now()
            vouching = {
                h.host: h
                for h in self.queue.store.inventory_hosts(conn)
                if h.vouches(now) and h.memory_kib is not None
            }
            usage = self.queue.store.inventory_usage(conn, sorted(ACTIVE_STATES))
            return {
                name: Room(
                    name,
                    usage.get(name, (0, 0))[0],
                    max((h.memory_kib or 0) - usage.get(name, (0, 0))[1], 0),
                )
                for name, h in vouching.items()
            }

        return self._read(read)

    def _vms_in(
        self, conn: sa.Connection, host: str | None = None, name: str | None = None
    ) -> list[VmRecord]:
        hosts = {h.host: h for h in self.queue.store.inventory_hosts(conn)}
        now = self.queue.now()
        return [
            _as_seen(vm, hosts[vm.host], now)
            for vm in self.queue.store.inventory_vms(conn, host, name)
        ]

    def _pools_in(self, conn: sa.Connection, host: str | None = None) -> list[PoolRecord]:
        hosts = {h.host: h for h in self.queue.store.inventory_hosts(conn)}
        volumes: dict[tuple[str, str], list[VolumeRecord]] = {}
        for vol in self.queue.store.inventory_volumes(conn, host):
            volumes.setdefault((vol.host, vol.pool), []).append(_confirmed(vol, hosts[vol.host]))
        return [
            dataclasses.replace(
                _confirmed(pool, hosts[pool.host]),
                volumes=tuple(volumes.get((pool.host, pool.name), ())),
            )
            for pool in self.queue.store.inventory_pools(conn, host)
        ]

    def _read(self, fn: Callable[[sa.Connection], T]) -> T:
        return self.queue._read(fn)

    # -- writes (by the dispatcher keeping the inventory) ----------------------------------

    def record_survey(self, survey: Survey, valid_for: float) -> bool:
        """Store a full sync of one host: what changed, what vanished, the host's facts.

        `valid_for` is how long (seconds) this dispatcher vouches for it without another sync.
        False if the host is no longer registered (nothing is written).
        """
        name = survey.host.host

        def write(conn: sa.Connection, now: datetime) -> bool:
            if not self._registered(conn, name):
                return False
            old = self.queue.store.lock_inventory_host(conn, name)
            host = dataclasses.replace(
                survey.host,
                since=old.since if old and old.reachable else now,
                error=None,
                confirmed_at=now,
                synced_at=now,
                valid_until=now + timedelta(seconds=valid_for),
            )
            self.queue.store.put_inventory_host(conn, host, exists=old is not None)
            self._write_vms(conn, name, survey.vms, None, now)
            self._write_pools(conn, name, survey.pools, None, now)
            return True

        return self._write(write)

    def record_changes(self, host: str, changes: Changes, valid_for: float) -> bool:
        """Store what events said changed on `host` (re-read from it); False if unregistered.

        Before the host's first full sync there is nothing to amend: that sync reads it all.
        """

        def write(conn: sa.Connection, now: datetime) -> bool:
            if not self._registered(conn, host):
                return False
            old = self.queue.store.lock_inventory_host(conn, host)
            if old is None:
                return True
            until = now + timedelta(seconds=valid_for)  # events come from a live connection
            self.queue.store.update_inventory_host(
                conn, host, {"confirmed_at": now, "valid_until": until}
            )
            names = {vm.name for vm in changes.vms} | set(changes.gone_vm_names)
            uuids = {vm.uuid for vm in changes.vms} | set(changes.gone_vms)
            self._write_vms(conn, host, changes.vms, (names, uuids), now)
            pools = {p.name for p in changes.pools} | set(changes.gone_pools)
            self._write_pools(conn, host, changes.pools, pools, now)
            return True

        return self._write(write)

    def record_unreachable(self, host: str, error: str, valid_for: float) -> bool:
        """Mark `host` unreachable (since now, unless it already was); its VMs read unknown."""

        def write(conn: sa.Connection, now: datetime) -> bool:
            if not self._registered(conn, host):
                return False
            old = self.queue.store.lock_inventory_host(conn, host)
            until = now + timedelta(seconds=valid_for)
            if old is None:
                self.queue.store.put_inventory_host(
                    conn, _unreached(host, now, error, until), exists=False
                )
                return True
            values: dict[str, Any] = {"reachable": False, "error": error, "valid_until": until}
            if old.reachable:
                values["since"] = now
            self.queue.store.update_inventory_host(conn, host, values)
            return True

        return self._write(write)

    def _registered(self, conn: sa.Connection, host: str) -> bool:
        """Whether `host` is still registered (a removed host's rows went with it)."""
        return bool(self.queue.store.hosts(conn, [host]))

    def _write_vms(
        self,
        conn: sa.Connection,
        host: str,
        seen: Sequence[VmRecord],
        scope: tuple[set[str], set[str]] | None,
        now: datetime,
    ) -> None:
        """Make the host's VM rows equal `seen`: all of them (a full sync, `scope` None), or
        those whose (names, UUIDs) are in `scope`. Unchanged rows are left alone."""
        store = self.queue.store
        old = {v.uuid: v for v in store.inventory_vms(conn, host)}
        seen = list({vm.uuid: vm for vm in seen}.values())  # one row per VM
        fresh = []
        for vm in seen:
            before = old.get(vm.uuid)
            if before is not None and before.observed() == vm.observed():
                continue
            since = before.since if before is not None and before.state == vm.state else now
            fresh.append(dataclasses.replace(vm, since=since, confirmed_at=now))
        in_scope = [
            u for u, v in old.items() if scope is None or v.name in scope[0] or u in scope[1]
        ]
        seen_ids = {vm.uuid for vm in seen}
        gone = [u for u in in_scope if u not in seen_ids]
        store.delete_inventory_vms(conn, host, gone + [v.uuid for v in fresh])
        store.insert_inventory_vms(conn, [v.to_row() for v in fresh])

    def _write_pools(
        self,
        conn: sa.Connection,
        host: str,
        seen: Sequence[PoolRecord],
        scope: set[str] | None,
        now: datetime,
    ) -> None:
        """Make the host's pools and their volumes equal `seen`: all of them (`scope` None),
        or those named in `scope`. Unchanged rows are left alone."""
        store = self.queue.store
        old = {p.name: p for p in store.inventory_pools(conn, host)}
        volumes: dict[str, dict[str, VolumeRecord]] = {}
        for vol in store.inventory_volumes(conn, host):
            volumes.setdefault(vol.pool, {})[vol.name] = vol
        seen_names = {p.name for p in seen}
        gone = [n for n in old if (scope is None or n in scope) and n not in seen_names]
        for name in gone:
            store.delete_inventory_volumes(conn, host, name, list(volumes.get(name, {})))
        store.delete_inventory_pools(conn, host, gone)
        for pool in seen:
            row = dataclasses.replace(pool, confirmed_at=now).to_row()
            if pool.name not in old:
                store.insert_inventory_pools(conn, [row])
            elif old[pool.name].observed() != pool.observed():
                store.update_inventory_pool(conn, host, pool.name, row)
            kept = volumes.get(pool.name, {})
            mine = {v.name: v for v in pool.volumes}
            stale = [
                n for n, v in kept.items() if n not in mine or v.observed() != mine[n].observed()
            ]
            new = [v for n, v in mine.items() if n not in kept or n in stale]
            store.delete_inventory_volumes(conn, host, pool.name, stale)
            store.insert_inventory_volumes(
                conn, [dataclasses.replace(v, confirmed_at=now).to_row() for v in new]
            )

    def _write(self, fn: Callable[[sa.Connection, datetime], T]) -> T:
        # Nothing a dispatcher waits for changes: no wake-up.
        return self.queue._write(fn, changed=lambda _: False)


def _as_seen(vm: VmRecord, host: HostRecord, now: datetime) -> VmRecord:
    """A VM row as a reader must see it (see VmRecord)."""
    if not host.vouches(now):
        since = host.since if not host.reachable else host.valid_until
        reason = (
            f"host unreachable: {host.error}"
            if not host.reachable
            else "inventory not kept (is a dispatcher running?)"
        )
        return dataclasses.replace(
            vm, state=UNKNOWN, reason=reason, since=max(since, vm.since), last_state=vm.state
        )
    return _confirmed(vm, host)


R = TypeVar("R", VmRecord, PoolRecord, VolumeRecord)


def _confirmed(row: R, host: HostRecord) -> R:
    """A full sync of its host confirms every row it did not need to rewrite."""
    if host.synced_at is not None and host.synced_at > row.confirmed_at:
        return dataclasses.replace(row, confirmed_at=host.synced_at)
    return row


def _unreached(name: str, now: datetime, error: str, valid_until: datetime) -> HostRecord:
    """The row of a host never reached: nothing known but that it does not answer."""
    return HostRecord(
        name, False, now, error, None, None, None, None, None, None, None, None, valid_until
    )


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v.isoformat() if isinstance(v, datetime) else list(v) if isinstance(v, tuple) else v
        for k, v in values.items()
    }
