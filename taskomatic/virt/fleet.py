"""What libvirt actions see of the fleet: the hosts in the database, their shared connections,
where a VM lives, and where new work goes (chosen when the task runs)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import libvirt

from taskomatic import errors
from taskomatic.hosts import Hosts
from taskomatic.inventory import Inventory, Room
from taskomatic.model import Host, HostState
from taskomatic.virt.connections import Connections, host_error, is_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Found:
    """A domain and the host it is defined on."""

    host: Host
    domain: libvirt.virDomain


class Fleet:
    """Hosts and connections for actions; shared by the worker threads of one dispatcher."""

    def __init__(
        self, hosts: Hosts, connections: Connections, inventory: Inventory | None = None
    ) -> None:
        self.hosts = hosts
        self.connections = connections
        self.inventory = inventory or Inventory(hosts.queue)
        self._placing = threading.Lock()

    def host(self, name: str) -> Host:
        """The host `name`; a permanent failure if it is not registered."""
        try:
            return self.hosts.get(name)
        except errors.HostNotFound as exc:
            raise errors.ActionFailed(exc.message) from None

    def connect(self, host: Host) -> libvirt.virConnect:
        """The shared connection to `host`; HostError (transient) if it cannot be reached."""
        return self.connections.get(host.uri, host.name)

    @contextmanager
    def call(self, host: Host, doing: str) -> Iterator[libvirt.virConnect]:
        """The connection to `host`; libvirt errors inside become HostErrors saying `doing`."""
        with self.connections.call(host.uri, host.name, doing) as conn:
            yield conn

    def find_vm(self, name: str, host: str | None = None) -> Found | None:
        """Where VM `name` is defined: on `host` if given, else searched on every host.

        None if it is nowhere. A VM defined on several hosts is an error a person must
        resolve; an unreachable host that might hold it is a transient error, since
        "not found" would then be a guess (see `find_copies`).
        """
        found = self.find_copies(name, host)
        if len(found) > 1:
            where = ", ".join(f.host.name for f in found)
            raise errors.ActionFailed(
                f"vm {name!r} is defined on several hosts ({where}); undefine the stale copies "
                "or pin the task to one host with its 'host' parameter"
            )
        return found[0] if found else None

    def find_copies(self, name: str, host: str | None = None) -> list[Found]:
        """Every host on which VM `name` is defined (normally one; two mid-migration).

        HostError (transient) if a host that might hold it cannot be asked and it was found
        nowhere else.
        """
        hosts = [self.host(host)] if host else self.hosts.list()
        found: list[Found] = []
        unreachable: list[errors.HostError] = []
        for h in hosts:
            try:
                conn = self.connect(h)
            except errors.HostError as exc:
                if host:
                    raise
                unreachable.append(exc)
                continue
            try:
                found.append(Found(h, conn.lookupByName(name)))
            except libvirt.libvirtError as exc:
                if not is_error(exc, libvirt.VIR_ERR_NO_DOMAIN):
                    raise host_error(exc, h.name, f"looking up vm {name!r}") from None
        if not found and unreachable:
            raise errors.HostError(
                f"vm {name!r} is on no reachable host, and {len(unreachable)} host(s) cannot be "
                f"asked: {unreachable[0].message}",
                host=unreachable[0].host,
                libvirt_code=unreachable[0].libvirt_code,
                transient=True,
            )
        return found

    def need_vm(self, name: str, host: str | None = None) -> Found:
        """Like `find_vm`, but a VM that exists nowhere fails the task."""
        found = self.find_vm(name, host)
        if found is None:
            where = f"on host {host!r}" if host else "on any host"
            raise errors.ActionFailed(f"no vm named {name!r} {where}; define it first (vm.define)")
        return found

    @contextmanager
    def placing(self) -> Iterator[None]:
        """Held while choosing a host and creating the VM there, so that two placements in
        this process never both count the same free slot (tasks that place also take the
        `placement` lock key, which orders them across dispatchers)."""
        with self._placing:
            yield

    def place(self, memory_kib: int, exclude: str | None = None) -> Host:
        """The active host with most room for a VM of `memory_kib`; NoHostAvailable if none.

        The inventory ranks the hosts and the host itself confirms before it is chosen: with
        a current inventory that is one question, to the chosen host. Hosts the inventory
        knows nothing current about are asked at once, and those it says are full are asked
        last, so a stale or empty inventory only costs questions, never a wrong choice. A host
        in maintenance, unreachable, at its capacity (VM count) or without the memory is never
        chosen. Call inside `placing()`.
        """
        reasons: dict[str, str] = {}
        candidates: list[tuple[float, bool, Host]] = []  # (score, confirmed by the host, host)
        doubtful: list[Host] = []  # the inventory says they cannot take it
        rooms = self._rooms()
        for h in self.hosts.list(HostState.ACTIVE):
            if h.name == exclude:
                continue
            room = rooms.get(h.name)
            if room is not None:
                fit = _fit(h, room.vms, room.unpromised_kib, memory_kib)
                if isinstance(fit, float):
                    candidates.append((fit, False, h))
                else:
                    doubtful.append(h)
                continue
            fit = self._ask(h, memory_kib)
            if isinstance(fit, float):
                candidates.append((fit, True, h))
            else:
                reasons[h.name] = fit
        chosen = self._first_confirmed(candidates, memory_kib, reasons)
        if chosen is None and doubtful:
            # Nothing the inventory liked fits: ask the hosts it said could not (it may lag).
            chosen = self._first_confirmed([(0.0, False, h) for h in doubtful], memory_kib, reasons)
        if chosen is not None:
            return chosen
        inactive = [h.name for h in self.hosts.list(HostState.MAINTENANCE)]
        listed = [reasons[n] for n in sorted(reasons)]
        if inactive:
            listed.append(f"in maintenance: {', '.join(inactive)}")
        raise errors.NoHostAvailable(
            "no active host can take the vm: " + ("; ".join(listed) or "no hosts registered")
        )

    def _first_confirmed(
        self,
        candidates: list[tuple[float, bool, Host]],
        memory_kib: int,
        reasons: dict[str, str],
    ) -> Host | None:
        """The best-scored candidate that its host confirms can take the VM (asking each
        not asked yet, best first); None, with each one's reason noted, if none can."""
        for score, confirmed, host in sorted(candidates, key=lambda c: -c[0]):
            fit = score if confirmed else self._ask(host, memory_kib)
            if isinstance(fit, float):
                return host
            reasons[host.name] = fit
        return None

    def _rooms(self) -> dict[str, Room]:
        """Room on each host as the inventory has it (none: placement asks every host)."""
        try:
            return self.inventory.rooms()
        except errors.TaskomaticError as exc:
            log.warning("placement without the inventory, which cannot be read: %s", exc)
            return {}

    def _ask(self, host: Host, memory_kib: int) -> float | str:
        """Whether `host` itself says it can take the VM: its score, or why not."""
        try:
            with self.call(host, "reading free resources") as conn:
                vms, free = _room(conn)
        except errors.HostError as exc:
            return f"{host.name}: unreachable ({exc.message})"
        return _fit(host, vms, free, memory_kib)


def _fit(host: Host, vms: int, free_kib: int, memory_kib: int) -> float | str:
    """The score of `host` for a new VM (more room, higher), or why it cannot take it."""
    if host.capacity is not None and vms >= host.capacity:
        return f"{host.name}: full ({vms} of {host.capacity} VMs)"
    if free_kib < memory_kib:
        return f"{host.name}: {free_kib // 1024} MiB free, {memory_kib // 1024} needed"
    room = (host.capacity - vms) / host.capacity if host.capacity else 1.0
    return float(room * free_kib)


def _room(conn: libvirt.virConnect) -> tuple[int, int]:
    """(VMs defined, KiB of memory not promised to running VMs) on a host.

    Memory counts what running VMs may use (their maximum), not what the host's free
    memory says at this instant, so placement never overcommits a host.
    """
    domains = conn.listAllDomains(0)
    promised = sum(d.maxMemory() for d in domains if d.isActive())
    total = conn.getInfo()[1] * 1024  # MiB -> KiB
    return len(domains), max(total - promised, 0)
