"""The inventory's SQL: host, VM, pool and volume rows, and the task history drift reads.

Mixed into `Store`; the statements are the same on both backends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from taskomatic import schema as s
from taskomatic.inventory import HostRecord, PoolRecord, VmRecord, VolumeRecord
from taskomatic.model import State, Task

t = s.tasks


class InventoryStatements:
    """Every statement on the inventory tables, each a named method."""

    def inventory_hosts(
        self, conn: sa.Connection, names: Sequence[str] | None = None
    ) -> list[HostRecord]:
        """The inventory row of every host (or those named) that has one, by name."""
        h = s.host_inventory
        query = sa.select(h).order_by(h.c.host)
        if names is not None:
            query = query.where(h.c.host.in_(list(names)))
        return [HostRecord.from_row(r) for r in conn.execute(query)]

    def lock_inventory_host(self, conn: sa.Connection, host: str) -> HostRecord | None:
        """A host's inventory row, locked until commit (writers of one host take turns)."""
        h = s.host_inventory
        row = conn.execute(sa.select(h).where(h.c.host == host).with_for_update()).first()
        return HostRecord.from_row(row) if row else None

    def put_inventory_host(self, conn: sa.Connection, record: HostRecord, exists: bool) -> None:
        """Write a host's whole inventory row (insert it unless it `exists`)."""
        h = s.host_inventory
        values = dataclasses.asdict(record)
        if exists:
            conn.execute(h.update().where(h.c.host == record.host).values(values))
        else:
            conn.execute(h.insert().values(values))

    def update_inventory_host(
        self, conn: sa.Connection, host: str, values: Mapping[str, Any]
    ) -> None:
        h = s.host_inventory
        conn.execute(h.update().where(h.c.host == host).values(dict(values)))

    def inventory_vms(
        self, conn: sa.Connection, host: str | None = None, name: str | None = None
    ) -> list[VmRecord]:
        """VM rows as stored, by host and name."""
        v = s.vm_inventory
        query = sa.select(v).order_by(v.c.host, v.c.name, v.c.uuid)
        if host is not None:
            query = query.where(v.c.host == host)
        if name is not None:
            query = query.where(v.c.name == name)
        return [VmRecord.from_row(r) for r in conn.execute(query)]

    def insert_inventory_vms(self, conn: sa.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            conn.execute(s.vm_inventory.insert(), list(rows))

    def delete_inventory_vms(self, conn: sa.Connection, host: str, uuids: Sequence[str]) -> None:
        v = s.vm_inventory
        if uuids:
            conn.execute(v.delete().where(v.c.host == host, v.c.uuid.in_(list(uuids))))

    def inventory_usage(
        self, conn: sa.Connection, active_states: Sequence[str]
    ) -> dict[str, tuple[int, int]]:
        """Per host: (VMs defined, KiB of maximum memory of the VMs in `active_states`)."""
        v = s.vm_inventory
        promised = sa.func.coalesce(
            sa.func.sum(sa.case((v.c.state.in_(list(active_states)), v.c.max_memory_kib), else_=0)),
            0,
        )
        rows = conn.execute(sa.select(v.c.host, sa.func.count(), promised).group_by(v.c.host))
        return {host: (int(count), int(kib)) for host, count, kib in rows}

    def inventory_pools(self, conn: sa.Connection, host: str | None = None) -> list[PoolRecord]:
        """Pool rows as stored (without volumes), by host and name."""
        p = s.pool_inventory
        query = sa.select(p).order_by(p.c.host, p.c.name)
        if host is not None:
            query = query.where(p.c.host == host)
        return [PoolRecord.from_row(r) for r in conn.execute(query)]

    def insert_inventory_pools(
        self, conn: sa.Connection, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        if rows:
            conn.execute(s.pool_inventory.insert(), list(rows))

    def update_inventory_pool(
        self, conn: sa.Connection, host: str, name: str, values: Mapping[str, Any]
    ) -> None:
        p = s.pool_inventory
        conn.execute(p.update().where(p.c.host == host, p.c.name == name).values(dict(values)))

    def delete_inventory_pools(self, conn: sa.Connection, host: str, names: Sequence[str]) -> None:
        """Delete pool rows (their volumes must be deleted first)."""
        p = s.pool_inventory
        if names:
            conn.execute(p.delete().where(p.c.host == host, p.c.name.in_(list(names))))

    def inventory_volumes(self, conn: sa.Connection, host: str | None = None) -> list[VolumeRecord]:
        """Volume rows, by host, pool and name."""
        v = s.volume_inventory
        query = sa.select(v).order_by(v.c.host, v.c.pool, v.c.name)
        if host is not None:
            query = query.where(v.c.host == host)
        return [VolumeRecord.from_row(r) for r in conn.execute(query)]

    def insert_inventory_volumes(
        self, conn: sa.Connection, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        if rows:
            conn.execute(s.volume_inventory.insert(), list(rows))

    def delete_inventory_volumes(
        self, conn: sa.Connection, host: str, pool: str, names: Sequence[str]
    ) -> None:
        v = s.volume_inventory
        if names:
            conn.execute(
                v.delete().where(v.c.host == host, v.c.pool == pool, v.c.name.in_(list(names)))
            )

    def last_vm_tasks(self, conn: sa.Connection, actions: Sequence[str]) -> list[Task]:
        """The last completed task of `actions` for each VM name (its `name` parameter).

        Reads the history of those actions: meant for reports, not for a hot path.
        """
        name = t.c.params["name"].as_string()
        last = (
            sa.select(sa.func.max(t.c.seq))
            .where(t.c.state == State.COMPLETE, t.c.action.in_(list(actions)))
            .group_by(name)
        )
        rows = conn.execute(sa.select(t).where(t.c.seq.in_(last)).order_by(t.c.seq))
        return [Task.from_row(r) for r in rows]
