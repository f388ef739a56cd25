"""Keeping the inventory current, in a dispatcher: libvirt events, and a full sync per host.

`InventoryKeeper` runs one thread beside the dispatch loop, on the dispatcher's own Fleet (the
same connections its workers use: a second `open()` of a test-driver node file would be
another host). On every host connection it registers domain and storage pool lifecycle
callbacks, again whenever the connection is re-opened. The callbacks only note what changed;
the thread re-reads those objects from the host and writes them in one transaction per host,
so an event's order or loss never leaves a wrong row, only a late one. Every
INVENTORY_SYNC_SECONDS it reads each host whole (`survey`), repairing whatever events missed
(a `virsh snapshot-create` has no event); a host that does not answer is marked unreachable,
its VMs then read "unknown".
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import libvirt

from taskomatic import defaults, errors
from taskomatic.inventory import Changes, Inventory, PoolRecord, VmRecord
from taskomatic.model import Host
from taskomatic.virt import survey
from taskomatic.virt.connections import alive, host_error
from taskomatic.virt.fleet import Fleet

log = logging.getLogger(__name__)


@dataclass
class _Watch:
    """The event callbacks registered on one host's current connection."""

    conn: libvirt.virConnect
    domain_ids: list[int] = field(default_factory=list)
    pool_ids: list[int] = field(default_factory=list)


@dataclass
class _Dirty:
    """What events said changed on a host since its last write: VM UUIDs or names, pools."""

    vms: set[str] = field(default_factory=set)
    pools: set[str] = field(default_factory=set)


class InventoryKeeper:
    """Keeps the inventory of every registered host current (see the module's docstring)."""

    def __init__(
        self,
        inventory: Inventory,
        fleet: Fleet,
        interval: float = defaults.INVENTORY_SYNC_SECONDS,
    ) -> None:
        self.inventory = inventory
        self.fleet = fleet
        self.interval = interval
        self.valid_for = interval * defaults.INVENTORY_VALID_SYNCS
        self._watches: dict[str, _Watch] = {}  # by host name
        self._uris: dict[str, str] = {}  # host name by URI, as of the last round
        self._dirty: dict[str, _Dirty] = {}
        self._resync: set[str] = set()  # hosts whose connection was re-opened
        self._cond = threading.Condition()
        self._rounds_asked = 0
        self._rounds_done = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> InventoryKeeper:
        """Sync every host now, then keep them current from a thread of its own."""
        self.fleet.connections.add_listener(self._on_open)
        self._thread = threading.Thread(target=self._run, name="taskomatic-inventory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and remove every callback (the connections may outlive us)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.fleet.connections.remove_listener(self._on_open)
        self._apply_events()  # what the last tasks changed, noted just before the stop
        for name in list(self._watches):
            self._unwatch(name)

    def sync(self, timeout: float = 60.0) -> None:
        """Sync every host now and return when done (in this thread if none is running)."""
        if self._thread is None:
            self._round()
            self._apply_events()
            return
        with self._cond:
            self._rounds_asked += 1
            ticket = self._rounds_asked
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._rounds_done >= ticket, timeout):
                raise errors.TaskomaticError(f"the inventory sync did not finish in {timeout}s")

    def note(self, result: Any) -> None:
        """A task finished with `result`: re-read the VM or pool it names on its host(s).

        Covers what libvirt sends no event for (snapshots, volumes); cheap for the rest.
        """
        if not isinstance(result, Mapping) or not isinstance(result.get("host"), str):
            return
        hosts = [result["host"], *([result["from"]] if isinstance(result.get("from"), str) else [])]
        with self._cond:
            for host in hosts:
                dirty = self._dirty.setdefault(host, _Dirty())
                if isinstance(result.get("vm"), str):
                    dirty.vms.add(result["vm"])
                if isinstance(result.get("pool"), str):
                    dirty.pools.add(result["pool"])
            self._cond.notify_all()

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        next_round = time.monotonic()
        while not self._stop.is_set():
            try:
                next_round = self._step(next_round)
            except Exception:
                # The inventory must outlive any one bad read or write; the next round repairs.
                log.exception("inventory: unexpected error; carrying on")
                self._stop.wait(defaults.DB_RETRY_MAX_SECONDS)
                continue
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        self._stop.is_set()
                        or bool(self._dirty or self._resync)
                        or self._rounds_asked > self._rounds_done
                    ),
                    max(next_round - time.monotonic(), 0.0),
                )
            # Events come in bursts (a stop, then an undefine): take them together.
            self._stop.wait(defaults.INVENTORY_EVENT_BATCH_SECONDS)

    def _step(self, next_round: float) -> float:
        """Sync what is due, apply the events noted; returns when the next round is due."""
        with self._cond:
            asked = self._rounds_asked
            resync, self._resync = self._resync, set()
        if time.monotonic() >= next_round or asked > self._rounds_done:
            self._round()
            next_round = time.monotonic() + self.interval
            with self._cond:
                self._rounds_done = asked
                self._cond.notify_all()
        elif resync:
            self._round(only=resync)
        self._apply_events()
        return next_round

    def _round(self, only: set[str] | None = None) -> None:
        """Sync every registered host (or those in `only`); forget hosts no longer there."""
        try:
            hosts = self.fleet.hosts.list()
        except errors.TaskomaticError as exc:
            log.error("inventory: cannot read the hosts: %s", exc)
            return
        with self._cond:
            self._uris = {h.uri: h.name for h in hosts}
        for name in set(self._watches) - {h.name for h in hosts}:
            self._unwatch(name)
        for host in hosts:
            if self._stop.is_set():
                return
            if only is None or host.name in only:
                self._sync_host(host)

    def _sync_host(self, host: Host) -> None:
        started = time.perf_counter()
        try:
            conn = self.fleet.connect(host)
        except errors.HostError as exc:
            self._unreachable(host, exc.message)
            return
        self._watch(host, conn)
        try:
            found = survey.survey(conn, host.name, self.inventory.queue.now())
        except libvirt.libvirtError as exc:
            error = host_error(exc, host.name, "reading the inventory")
            if not alive(conn) or not error.permanent:
                self._unreachable(host, error.message)
            else:
                log.error("inventory: %s", error.message)
            return
        try:
            self.inventory.record_survey(found, self.valid_for)
        except errors.TaskomaticError as exc:
            log.error("inventory: cannot record the sync of host %s: %s", host.name, exc)
            return
        log.debug(
            "inventory: synced host %s (%d vms, %d pools) in %.1f ms",
            host.name,
            len(found.vms),
            len(found.pools),
            (time.perf_counter() - started) * 1000,
        )

    def _unreachable(self, host: Host, message: str) -> None:
        self._unwatch(host.name)  # its callbacks went with the connection
        try:
            self.inventory.record_unreachable(host.name, message, self.valid_for)
        except errors.TaskomaticError as exc:
            log.error("inventory: cannot record that host %s is unreachable: %s", host.name, exc)

    def _apply_events(self) -> None:
        """Re-read what events named, and write it: one transaction per host."""
        with self._cond:
            dirty, self._dirty = self._dirty, {}
        for host, what in dirty.items():
            watch = self._watches.get(host)
            if watch is None:
                continue  # not synced yet, or unreachable: its next sync reads everything
            try:
                changes = self._read_changes(watch.conn, host, what)
            except libvirt.libvirtError as exc:
                log.info(
                    "inventory: re-reading events on host %s failed (%s); syncing it", host, exc
                )
                with self._cond:
                    self._resync.add(host)
                continue
            try:
                self.inventory.record_changes(host, changes, self.valid_for)
            except errors.TaskomaticError as exc:
                log.error("inventory: cannot record changes on host %s: %s", host, exc)
                with self._cond:  # try again with the next batch
                    again = self._dirty.setdefault(host, _Dirty())
                    again.vms |= what.vms
                    again.pools |= what.pools

    def _read_changes(self, conn: libvirt.virConnect, host: str, what: _Dirty) -> Changes:
        now = self.inventory.queue.now()
        vms: list[VmRecord] = []
        gone_vms: list[str] = []
        gone_names: list[str] = []
        for key in sorted(what.vms):
            vm = survey.vm(conn, host, key, now)
            if vm is not None:
                vms.append(vm)
            elif survey.is_uuid(key):
                gone_vms.append(key)
            else:
                gone_names.append(key)
        pools: list[PoolRecord] = []
        gone_pools: list[str] = []
        for name in sorted(what.pools):
            pool = survey.pool(conn, host, name, now)
            if pool is None:
                gone_pools.append(name)
            else:
                pools.append(pool)
        # A VM noted by UUID (an event) and by name (a task) was read twice: keep one.
        unique = list({v.uuid: v for v in vms}.values())
        return Changes(unique, gone_vms, gone_names, pools, gone_pools)

    # -- callbacks -------------------------------------------------------------------------

    def _watch(self, host: Host, conn: libvirt.virConnect) -> None:
        """Register the callbacks on the host's connection, unless they are already there."""
        watch = self._watches.get(host.name)
        if watch is not None and watch.conn is conn:
            return
        self._unwatch(host.name)
        watch = self._watches[host.name] = _Watch(conn)
        try:
            watch.domain_ids.append(
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_domain, host.name
                )
            )
            for event, callback in (
                (libvirt.VIR_STORAGE_POOL_EVENT_ID_LIFECYCLE, self._on_pool),
                (libvirt.VIR_STORAGE_POOL_EVENT_ID_REFRESH, self._on_pool_refresh),
            ):
                watch.pool_ids.append(
                    conn.storagePoolEventRegisterAny(None, event, callback, host.name)
                )
        except libvirt.libvirtError as exc:
            # Without events the periodic sync still keeps the inventory, only later.
            log.warning(
                "inventory: no libvirt events from host %s (%s); relying on syncs every %gs",
                host.name,
                exc.get_error_message(),
                self.interval,
            )

    def _unwatch(self, name: str) -> None:
        watch = self._watches.pop(name, None)
        if watch is None:
            return
        # A closed connection took its callbacks with it; deregistering there fails harmlessly.
        for callback_id in watch.domain_ids:
            with contextlib.suppress(libvirt.libvirtError):
                watch.conn.domainEventDeregisterAny(callback_id)
        for callback_id in watch.pool_ids:
            with contextlib.suppress(libvirt.libvirtError):
                watch.conn.storagePoolEventDeregisterAny(callback_id)

    # These run on libvirt's event-loop thread: they only take notes.

    def _on_domain(
        self,
        _conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        _event: int,
        _detail: int,
        host: str,
    ) -> None:
        self._mark(host, vm=dom.UUIDString())

    def _on_pool(
        self,
        _conn: libvirt.virConnect,
        pool: libvirt.virStoragePool,
        _event: int,
        _detail: int,
        host: str,
    ) -> None:
        self._mark(host, pool=pool.name())

    def _on_pool_refresh(
        self, _conn: libvirt.virConnect, pool: libvirt.virStoragePool, host: str
    ) -> None:
        self._mark(host, pool=pool.name())

    def _on_open(self, uri: str, _conn: libvirt.virConnect) -> None:
        """A connection was (re-)opened by a worker: register callbacks on it, sync its host."""
        if threading.current_thread() is self._thread:
            return  # our own sync opened it, and registers them itself
        with self._cond:
            name = self._uris.get(uri)
            if name is not None:
                self._resync.add(name)
                self._cond.notify_all()

    def _mark(self, host: str, vm: str | None = None, pool: str | None = None) -> None:
        with self._cond:
            dirty = self._dirty.setdefault(host, _Dirty())
            if vm is not None:
                dirty.vms.add(vm)
            if pool is not None:
                dirty.pools.add(pool)
            self._cond.notify_all()
