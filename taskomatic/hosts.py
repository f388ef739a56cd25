"""The hosts taskomatic drives: register, list, put into maintenance, activate, remove."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa

from taskomatic import errors
from taskomatic.model import Host, HostState

if TYPE_CHECKING:
    from taskomatic.queue import Queue

URI_SCHEMES = ("qemu", "test", "xen", "lxc", "ch", "bhyve", "vz", "esx", "openvz", "libxl")
"""libvirt driver names a host URI may start with (before an optional `+transport`)."""


class Hosts:
    """Host rows, over the same transactions as the queue (`queue.hosts`)."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue

    @property
    def queue(self) -> Queue:
        """The queue whose transactions these rows live in."""
        return self._queue

    def add(self, name: str, uri: str, *, capacity: int | None = None) -> Host:
        """Register a host (active); the same name, URI and capacity again returns it."""
        _check_name(name)
        _check_uri(uri)
        if capacity is not None and (
            not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0
        ):
            raise errors.ValidationError(
                f"capacity must be a whole number of VMs (0 or more), got {capacity!r}",
                field="capacity",
            )

        def insert(conn: sa.Connection, now: datetime) -> Host:
            store = self._queue.store
            existing = store.hosts(conn, [name])
            if existing:
                return _same_or_conflict(existing[0], uri, capacity)
            other = store.host_by_uri(conn, uri)
            if other is not None:
                raise errors.HostConflict(
                    f"host {other.name!r} already has URI {uri!r}; one URI is one host"
                )
            host = Host(name, uri, HostState.ACTIVE, capacity, now, now)
            store.insert_host(conn, host)
            return host

        try:
            return self._queue._write(insert, changed=lambda _: False)
        except sa.exc.IntegrityError:
            # A racing add took the name or the URI first: look again, now seeing the winner.
            return self._queue._write(insert, changed=lambda _: False)

    def get(self, name: str) -> Host:
        """The host `name`; HostNotFound if none."""
        return self._queue._read(lambda conn: self.get_in(conn, name))

    def get_in(self, conn: sa.Connection, name: str) -> Host:
        found = self._queue.store.hosts(conn, [name])
        if not found:
            raise errors.HostNotFound(name)
        return found[0]

    def list(self, state: HostState | str | None = None) -> list[Host]:
        """Every host by name, or those in `state`."""
        wanted = _host_state(state) if state is not None else None
        hosts = self._queue._read(lambda conn: self._queue.store.hosts(conn))
        return [h for h in hosts if wanted is None or h.state == wanted]

    def set_state(self, name: str, state: HostState | str) -> Host:
        """Put a host into maintenance (no new work is placed on it) or back to active."""
        wanted = _host_state(state)

        def update(conn: sa.Connection, now: datetime) -> Host:
            host = self.get_in(conn, name)
            if host.state != wanted:
                self._queue.store.update_host(conn, name, {"state": wanted, "changed_at": now})
            return self.get_in(conn, name)

        # Activating a host may make placement possible: wake dispatchers.
        return self._queue._write(update, changed=lambda _: wanted == HostState.ACTIVE)

    def remove(self, name: str) -> None:
        """Forget a host; what runs on it is untouched, tasks pinned to it will fail."""

        def delete(conn: sa.Connection, _now: datetime) -> None:
            if not self._queue.store.delete_host(conn, name):
                raise errors.HostNotFound(name)

        self._queue._write(delete, changed=lambda _: False)


def _same_or_conflict(host: Host, uri: str, capacity: int | None) -> Host:
    if (host.uri, host.capacity) != (uri, capacity):
        raise errors.HostConflict(
            f"host {host.name!r} exists with URI {host.uri!r} and capacity {host.capacity}; "
            "remove it first to change it"
        )
    return host


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or len(name) > 255 or any(c.isspace() for c in name):
        raise errors.ValidationError(
            f"a host name is 1 to 255 characters without spaces, got {name!r}", field="name"
        )


def _check_uri(uri: str) -> None:
    scheme = uri.split(":", 1)[0] if isinstance(uri, str) and ":" in uri else ""
    driver = scheme.split("+", 1)[0]
    if driver not in URI_SCHEMES or "//" not in uri:
        raise errors.ValidationError(
            f"{uri!r} is not a libvirt URI (e.g. qemu+tls://host/system, qemu+ssh://root@host/"
            "system, qemu:///system, test:///abs/path/node.xml)",
            field="uri",
        )
    if driver == "test" and uri.startswith("test://") and not uri.startswith("test:///"):
        raise errors.ValidationError(
            f"{uri!r}: a test-driver URI needs three slashes and an absolute path "
            "(test:///abs/path/node.xml, or test:///default)",
            field="uri",
        )


def _host_state(value: HostState | str) -> HostState:
    try:
        return HostState(value)
    except ValueError:
        raise errors.ValidationError(
            f"unknown host state {value!r}; states are: active, maintenance", field="state"
        ) from None
