"""Simulated libvirt hosts for the test-driver tier: node files, registered hosts, one Fleet.

Each simulated host is a node file for libvirt's test driver (`test:///abs/path/hN.xml`) with
VMs in known states, a `dir` pool with volumes, a network, and real memory and CPU figures, so
placement has numbers to work with. The driver runs inside this process and needs no daemon.

Two facts of the driver shape everything here:

* every `libvirt.open()` of a node file builds a fresh copy of the host, so the only true view
  of a simulated host is the one connection its Fleet holds. `Lab.conn()` hands out exactly
  that connection, and tests assert on it with plain libvirt calls;
* the Fleet (with its connections, the "hypervisors") lives as long as the test, while
  dispatchers come and go: each `Lab.drain()` builds a new Dispatcher on the same Fleet, as a
  restarted dispatcher process would find the same hosts.

tests/integration/conftest.py offers the fixtures `make_lab` and `lab` to integration tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
from helpers import OffsetClock, claim, open_queue

from taskomatic import Check, Context, Dispatcher, Queue, Registry, Task, TaskSpec
from taskomatic.actions.domains import STATE_NAMES
from taskomatic.inventory import Inventory
from taskomatic.model import HostState
from taskomatic.virt.connections import Connections, is_error
from taskomatic.virt.fleet import Fleet
from taskomatic.virt.inventory import InventoryKeeper

VM_MIB = 256
"""Memory of every VM in the node files (MiB)."""

KINDS = {"running": 1, "paused": 3, "off": 5, "stubborn": 1}
"""The VMs on every simulated host, `<host>-<kind>`, and their `<test:runstate>`. The stubborn
one runs and restarts when its guest powers off (`on_poweroff=restart`): a guest that ignores
a shutdown request, which the test driver otherwise carries out at once."""

POOL = "images"
"""The running `dir` pool of every host; it holds `<vm>.qcow2` for each VM and `spare.qcow2`."""

NETWORK = "default"
"""The network of every host."""

_TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"


@dataclass(frozen=True)
class HostSpec:
    """One simulated host: its name, memory and CPUs, and the capacity it is registered with."""

    name: str
    memory_mib: int = 16384
    cpus: int = 8
    capacity: int | None = None


def vm(host: str, kind: str) -> str:
    """The name of a VM the node file of `host` defines, e.g. vm("h1", "off") == "h1-off"."""
    assert kind in KINDS, kind
    return f"{host}-{kind}"


def vm_uuid(index: int, kind: str) -> str:
    """The UUID of VM `<host>-<kind>` in the node file of the `index`th host (from 1)."""
    return f"{index:08x}-0000-0000-0000-{list(KINDS).index(kind) + 1:012x}"


def pool_uuid(index: int) -> str:
    """The UUID of the pool POOL in the node file of the `index`th host (from 1)."""
    return f"{index:08x}-1111-0000-0000-000000000000"


def domain_xml(name: str, memory_mib: int = VM_MIB, uuid_: str | None = None) -> str:
    """Minimal domain XML of a VM for the test driver (a `test` guest, i686 hvm)."""
    return (
        f"<domain type='test'><name>{name}</name>"
        + (f"<uuid>{uuid_}</uuid>" if uuid_ else "")
        + f"<memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>"
        "<os><type arch='i686'>hvm</type></os></domain>"
    )


def node_xml(spec: HostSpec, index: int) -> str:
    """The node file of a simulated host (UUIDs are unique per host, so a migrated VM keeps
    its own and never clashes with one already on the target)."""
    domains = []
    for kind, runstate in KINDS.items():
        name = vm(spec.name, kind)
        poweroff = "<on_poweroff>restart</on_poweroff>" if kind == "stubborn" else ""
        domains.append(
            f"<domain type='test' xmlns:test='{_TEST_NS}'>"
            f"<name>{name}</name><uuid>{vm_uuid(index, kind)}</uuid>"
            f"<memory unit='MiB'>{VM_MIB}</memory><currentMemory unit='MiB'>{VM_MIB}"
            "</currentMemory><vcpu>1</vcpu><os><type arch='i686'>hvm</type></os>"
            f"{poweroff}<devices><disk type='file' device='disk'>"
            f"<driver name='qemu' type='qcow2'/><source file='/{POOL}-{spec.name}/{name}.qcow2'/>"
            "<target dev='vda' bus='virtio'/></disk></devices>"
            f"<test:runstate>{runstate}</test:runstate></domain>"
        )
    volumes = pool_volumes(spec.name)
    pool = (
        f"<pool type='dir'><name>{POOL}</name><uuid>{pool_uuid(index)}</uuid>"
        f"<target><path>/{POOL}-{spec.name}</path></target>"
        + "".join(
            f"<volume><name>{v}</name><capacity unit='GiB'>10</capacity>"
            "<allocation unit='GiB'>1</allocation><target><format type='qcow2'/></target></volume>"
            for v in volumes
        )
        + "</pool>"
    )
    return (
        "<node><cpu><mhz>2000</mhz><model>x86_64</model>"
        f"<active>{spec.cpus}</active><nodes>1</nodes><sockets>1</sockets>"
        f"<cores>{spec.cpus}</cores><threads>1</threads></cpu>"
        f"<memory>{spec.memory_mib * 1024}</memory>"
        + "".join(domains)
        + pool
        + f"<network><name>{NETWORK}</name><bridge name='virbr{index}'/><forward/>"
        f"<ip address='192.168.{100 + index}.1' netmask='255.255.255.0'/></network></node>"
    )


def pool_volumes(host: str) -> list[str]:
    """The volumes of POOL in the node file of `host`: one per VM, and a spare."""
    return [f"{vm(host, kind)}.qcow2" for kind in KINDS] + ["spare.qcow2"]


class CountingRegistry(Registry):
    """Every built-in action, counting how often each action's `run` and `check` were called,
    so a test can tell "the check found it done" from "it ran again"."""

    def __init__(self) -> None:
        super().__init__(builtins=False)
        self.runs: Counter[str] = Counter()
        self.checks: Counter[str] = Counter()
        self._guard = threading.Lock()
        for name in (real := Registry()).names():
            action = real.get(name)
            check = action.check
            self.add(
                dataclasses.replace(
                    action,
                    run=self._counted(self.runs, name, action.run),
                    check=self._counted(self.checks, name, check) if check else None,
                )
            )

    def _counted(self, counter: Counter[str], name: str, fn: Callable[[Context], Any]) -> Any:
        def counted(ctx: Context) -> Any:
            with self._guard:
                counter[name] += 1
            return fn(ctx)

        return counted


class Lab:
    """Simulated hosts registered in a queue, and the one Fleet all dispatchers of a test use."""

    def __init__(self, queue: Queue, fleet: Fleet, clock: OffsetClock, node_dir: Path) -> None:
        self.queue = queue
        self.fleet = fleet
        self.clock = clock
        self.node_dir = node_dir
        assert isinstance(queue.registry, CountingRegistry)
        self.registry: CountingRegistry = queue.registry

    # -- the hosts as libvirt sees them --------------------------------------------------

    def conn(self, host: str) -> libvirt.virConnect:
        """The hypervisor itself: the connection the fleet uses (a new open would be a copy)."""
        h = self.queue.hosts.get(host)
        return self.fleet.connections.get(h.uri, h.name)

    def domain(self, host: str, name: str) -> libvirt.virDomain | None:
        """VM `name` on `host`, or None if it is not defined there."""
        try:
            return self.conn(host).lookupByName(name)
        except libvirt.libvirtError as exc:
            if is_error(exc, libvirt.VIR_ERR_NO_DOMAIN):
                return None
            raise

    def state(self, host: str, name: str) -> str | None:
        """'running', 'paused', 'shutoff', … of VM `name` on `host`; None if not defined."""
        dom = self.domain(host, name)
        return None if dom is None else STATE_NAMES[dom.state()[0]]

    def where(self, name: str) -> list[str]:
        """The hosts on which VM `name` is defined."""
        return [h.name for h in self.queue.hosts.list() if self.domain(h.name, name) is not None]

    def pool(self, host: str, name: str = POOL) -> libvirt.virStoragePool | None:
        """Storage pool `name` on `host`, or None."""
        try:
            return self.conn(host).storagePoolLookupByName(name)
        except libvirt.libvirtError as exc:
            if is_error(exc, libvirt.VIR_ERR_NO_STORAGE_POOL):
                return None
            raise

    def volumes(self, host: str, pool: str = POOL) -> set[str]:
        """The volume names in a pool."""
        found = self.pool(host, pool)
        assert found is not None, f"no pool {pool} on {host}"
        return set(found.listVolumes())

    def snapshots(self, host: str, name: str) -> set[str]:
        """The snapshot names of VM `name` on `host`."""
        dom = self.domain(host, name)
        assert dom is not None, f"no vm {name} on {host}"
        return set(dom.snapshotListNames(0))

    def host_state(self, host: str) -> HostState:
        return self.queue.hosts.get(host).state

    def world(self) -> dict[str, Any]:
        """Everything a test may change, read from libvirt and the hosts table: per host its
        state, each VM's (state, UUID, snapshots) and each pool's (active, volumes)."""
        out: dict[str, Any] = {}
        for h in self.queue.hosts.list():
            conn = self.conn(h.name)
            out[h.name] = {
                "state": h.state.value,
                "vms": {
                    d.name(): (
                        STATE_NAMES[d.state()[0]],
                        d.UUIDString(),
                        sorted(d.snapshotListNames(0)),
                    )
                    for d in conn.listAllDomains(0)
                },
                "pools": {
                    p.name(): (bool(p.isActive()), sorted(p.listVolumes()) if p.isActive() else [])
                    for p in conn.listAllStoragePools(0)
                },
            }
        return out

    # -- the inventory -------------------------------------------------------------------

    @property
    def inventory(self) -> Inventory:
        """What the inventory holds (the fleet's, as placement reads it)."""
        return self.fleet.inventory

    @contextlib.contextmanager
    def keeper(self, interval: float = 60.0, thread: bool = True) -> Iterator[InventoryKeeper]:
        """An InventoryKeeper on this lab's fleet, every host synced once on entry; then as a
        dispatcher runs it (its own thread, syncing every `interval` s, events as they come),
        or with `thread=False` only when the test calls `sync()` (events applied then too)."""
        keeper = InventoryKeeper(self.inventory, self.fleet, interval)
        if thread:
            keeper.start()
        try:
            keeper.sync()
            yield keeper
        finally:
            keeper.stop()

    # -- running actions -----------------------------------------------------------------

    def context(
        self, action: str, params: Mapping[str, Any], task_id: uuid.UUID | None = None
    ) -> Context:
        """What a dispatcher would hand the action: validated params and the shared fleet."""
        checked = self.registry.get(action).validate(params)
        return Context(task_id or uuid.uuid4(), action, checked, 1, fleet=self.fleet)

    def call(self, ctx: Context) -> Any:
        """Run an action in this thread, as a worker would (no queue involved)."""
        return self.registry.get(ctx.action).run(ctx)

    def check(self, ctx: Context) -> Check:
        """Ask an action's `check` hook what the host says about this task."""
        check = self.registry.get(ctx.action).check
        assert check is not None, f"{ctx.action} has no check hook"
        return check(ctx)

    def submit(self, action: str, params: Mapping[str, Any], **spec: Any) -> Task:
        return self.queue.submit(action, dict(params), **spec)

    def drain(self, timeout: float = 20.0, **dispatcher: Any) -> None:
        """Run every queued task to the end with a NEW dispatcher on this lab's fleet (a
        restarted dispatcher finds the same hosts); fails the test after `timeout` s."""
        options: dict[str, Any] = {"workers": 4, "poll": 1.0, "recovery": 0.1} | dispatcher
        d = Dispatcher(self.queue, fleet=self.fleet, **options)
        thread = threading.Thread(target=d.run, kwargs={"until_empty": True}, daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            d.stop(grace=1.0, wait=False)
            thread.join(5)
            live = self.queue.list(state=["new", "running", "waiting"]).tasks
            raise AssertionError(f"tasks not finished after {timeout}s: {live}")

    def run(self, action: str, params: Mapping[str, Any], **spec: Any) -> Task:
        """Submit one task, run the queue dry, return the finished task."""
        task = self.submit(action, params, **spec)
        self.drain()
        return self.queue.get(task.id)

    def run_all(self, specs: Sequence[TaskSpec]) -> list[Task]:
        """Submit tasks together (one transaction), run the queue dry, return them finished."""
        tasks = self.queue.submit_many(specs)
        self.drain()
        return [self.queue.get(t.id) for t in tasks]

    def orphan(self, action: str, params: Mapping[str, Any]) -> Task:
        """A task claimed by a dispatcher that then died: it never reports and its lease is
        expired (the clock moves past it), so the next dispatcher takes it over."""
        task = self.submit(action, params)
        (claimed,) = claim(self.queue, uuid.uuid4(), 1, lease=5.0)
        assert claimed.id == task.id
        self.clock.advance(10)
        return claimed

    def write_node(self, spec: HostSpec, index: int) -> str:
        """Write (or rewrite) a host's node file; returns its test-driver URI."""
        path = self.node_dir / f"{spec.name}.xml"
        partial = path.with_suffix(".partial")
        partial.write_text(node_xml(spec, index))
        partial.replace(path)  # atomic: libvirt never reads half a file
        return f"test://{path}"


@pytest.fixture
def make_lab(sqlite_url: str, tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    """Builds a Lab over SQLite with the given simulated hosts (registered active)."""
    with contextlib.ExitStack() as stack:

        def make(*specs: HostSpec) -> Lab:
            clock = OffsetClock()
            queue = stack.enter_context(
                open_queue(sqlite_url, registry=CountingRegistry(), clock=clock)
            )
            connections = Connections()
            stack.callback(connections.close)  # closing discards the simulated hosts' state
            node_dir = tmp_path / "hosts"
            node_dir.mkdir(exist_ok=True)
            lab = Lab(queue, Fleet(queue.hosts, connections), clock, node_dir)
            for index, spec in enumerate(specs, start=1):
                queue.hosts.add(spec.name, lab.write_node(spec, index), capacity=spec.capacity)
            return lab

        yield make


@pytest.fixture
def lab(make_lab: Callable[..., Lab]) -> Lab:
    """Two simulated hosts, h1 and h2, with 16 GiB and 8 CPUs each and no VM limit."""
    return make_lab(HostSpec("h1"), HostSpec("h2"))


def xml_of(dom: libvirt.virDomain) -> ET.Element:
    """A domain's persistent definition, parsed."""
    return ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
