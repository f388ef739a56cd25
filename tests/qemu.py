"""Real QEMU for the tests: VMs run by QEMU, storage pools on real directories, no libvirt service.

VMs run under libvirt's embedded QEMU driver (`qemu:///embed?root=DIR`), inside the test process.
libvirt allows one embed root per process, and the first use of a fresh root probes QEMU's
capabilities (about 8 s with KVM, 4 s without), so a test session has exactly one root and one
`Connections`, shared by every test; `qemu_lab` is the only fixture that may open
`qemu:///embed`. (libvirt probes once more when the first VM start loads its file-storage
module, if that module's file is newer than the QEMU driver's: a first `vm.start` may take 5 s.)
A VM gets KVM when /dev/kvm opens read-write and answers as KVM, else TCG (domain type `qemu`);
either way it boots no guest OS, so it ignores ACPI shutdown requests. The QEMU processes are
not the test process's children: if it is killed before its teardown, they keep running.

libvirt's storage driver cannot be embedded, so storage pools live on a private libvirtd
(`storage_daemon`), run as an unprivileged user (nobody, when the tests run as root): session
mode keeps every file it writes under a temporary directory, so it never touches the machine's
libvirt configuration, and concurrent test sessions never meet.

Packages (bin/setup --test installs them): libvirt-daemon-driver-qemu, libvirt-daemon,
qemu-system-x86, qemu-utils; as root, the system account libvirt-qemu must exist.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
from helpers import open_queue

from taskomatic import Dispatcher, Queue, State, Task, TaskSpec
from taskomatic.virt.connections import Connections, start_event_loop
from taskomatic.virt.fleet import Fleet

QEMU_HOST = "qemu"
"""The name under which `qemu_queue` registers the embedded QEMU driver."""

STORAGE_HOST = "storage"
"""The name under which `storage_host` registers the private libvirtd holding storage pools."""

QEMU_CONF = 'stdio_handler = "file"\n'
"""The embed root's qemu.conf: QEMU's output goes to files (the default needs virtlogd)."""

QEMU_CONF_AS_ROOT = 'user = "root"\ngroup = "root"\n'
"""Added when the tests run as root: QEMU runs as root too (by default libvirt-qemu, which may
not open a root-only /dev/kvm; then every define re-probes QEMU, for about 40 s)."""

NOBODY = 65534
"""uid and gid of the unprivileged user running the storage daemon when the tests run as root."""

DAEMON_START_SECONDS = 15.0
"""How long the storage daemon gets to open its socket."""

UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
)


KVM_GET_API_VERSION = 0xAE00
"""The ioctl every KVM device answers with its API version (12 since Linux 2.6.22)."""


def kvm_usable() -> bool:
    """Whether this process may use KVM: /dev/kvm opens read-write and answers as KVM."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == 12
    except OSError:
        return False
    finally:
        os.close(fd)


def make_disk(path: Path, size: str = "16M") -> Path:
    """A new, empty qcow2 image at `path` (sparse: a few hundred KiB on disk)."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), size],
        check=True,
        capture_output=True,
    )
    return path


def image_info(path: Path) -> dict[str, Any]:
    """`qemu-img info` of an image, read even while a running QEMU holds it (force-share)."""
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def write_pattern(
    image: Path, pattern: int, offset: int, length: int, *, alone: bool = False
) -> None:
    """Write `length` bytes of `pattern` at `offset` into a qcow2 image no VM holds (qemu-io);
    with `alone`, without opening its backing image (whole clusters need no copy from it)."""
    subprocess.run(
        ["qemu-io", "-c", f"write -q -P {pattern:#x} {offset} {length}", _image_opts(image, alone)],
        check=True,
        capture_output=True,
    )


def _image_opts(image: Path, alone: bool) -> str:
    """A qcow2 image as qemu-io's json: filename, its backing image left out with `alone`."""
    opts: dict[str, Any] = {"driver": "qcow2", "file": {"driver": "file", "filename": str(image)}}
    if alone:
        opts["backing"] = None
    return f"json:{json.dumps(opts)}"


def holds_pattern(image: Path, pattern: int, offset: int, length: int, *, alone: bool) -> bool:
    """Whether the image reads `pattern` over that range, read-only even while a VM holds it;
    with `alone`, from this image's own clusters (its backing image ignored)."""
    command = f"read -P {pattern:#x} {offset} {length}"
    done = subprocess.run(
        ["qemu-io", "-r", "-U", "-c", command, _image_opts(image, alone)],
        capture_output=True,
        text=True,
    )
    return done.returncode == 0 and "verification failed" not in done.stdout


def backing_chain(image: Path) -> list[str]:
    """The files of an image's backing chain, itself first (`qemu-img info --backing-chain`)."""
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [str(i["filename"]) for i in json.loads(out)]


def domain_xml(dom: libvirt.virDomain, flags: int = 0) -> ET.Element:
    """A domain's XML, parsed."""
    return ET.fromstring(dom.XMLDesc(flags))


@dataclass
class StorageDaemon:
    """A private libvirtd serving real storage pools over a unix socket."""

    process: subprocess.Popen[bytes]
    base: Path  # everything it writes, and the pools' directories, are under here
    uri: str
    log: Path

    @property
    def pools(self) -> Path:
        """A directory the daemon's user may create pool directories in."""
        return self.base / "pools"

    @property
    def socket(self) -> Path:
        """Its unix socket: `test+unix:///default?socket=…` reaches its test driver."""
        return self.base / "run" / "libvirt" / "libvirt-sock"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_storage_daemon() -> StorageDaemon:
    """Start libvirtd in session mode under a new temporary directory, as nobody if root."""
    base = Path(tempfile.mkdtemp(prefix="taskomatic-libvirtd-"))
    as_root = os.geteuid() == 0
    base.chmod(0o755)  # the daemon's user must reach its directories
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    for sub, var in (
        ("home", "HOME"),
        ("config", "XDG_CONFIG_HOME"),
        ("cache", "XDG_CACHE_HOME"),
        ("run", "XDG_RUNTIME_DIR"),
        ("pools", None),
    ):
        path = base / sub
        path.mkdir(mode=0o700)
        if as_root:
            os.chown(path, NOBODY, NOBODY)
        if var:
            env[var] = str(path)
    conf = base / "libvirtd.conf"
    conf.write_text("")  # defaults: session mode, a unix socket under XDG_RUNTIME_DIR
    log = base / "libvirtd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["libvirtd", "--config", str(conf)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a ^C at the terminal is for pytest, not for the daemon
            user=NOBODY if as_root else None,
            group=NOBODY if as_root else None,
            extra_groups=[] if as_root else None,
        )
    socket = base / "run" / "libvirt" / "libvirt-sock"
    daemon = StorageDaemon(process, base, f"qemu+unix:///session?socket={socket}", log)
    deadline = time.monotonic() + DAEMON_START_SECONDS
    while not daemon.socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            daemon.stop()
            output = daemon.output()
            shutil.rmtree(base, ignore_errors=True)
            raise RuntimeError(f"libvirtd did not open {socket}; it printed:\n{output}")
        time.sleep(0.01)
    return daemon


@dataclass
class QemuLab:
    """The session's embedded QEMU driver, its connections, and how to run tasks against it."""

    root: Path
    uri: str
    connections: Connections
    domain_type: str  # what a VM defined from a spec must get: 'kvm' or 'qemu' (TCG)
    storage: StorageDaemon | None = None

    @property
    def conn(self) -> libvirt.virConnect:
        """The shared connection to the embedded driver."""
        return self.connections.get(self.uri, QEMU_HOST)

    def storage_conn(self) -> libvirt.virConnect:
        """The shared connection to the storage daemon."""
        assert self.storage is not None, "request the storage_daemon fixture"
        return self.connections.get(self.storage.uri, STORAGE_HOST)

    def qemu_pid(self, name: str) -> int | None:
        """The pid of the QEMU process running VM `name`, if that process is alive."""
        pidfile = self.root / "run" / "qemu" / f"{name}.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return None
        return pid if b"qemu-system" in cmdline else None

    def run(self, queue: Queue, *specs: TaskSpec) -> list[Task]:
        """Submit `specs` (as a group, so `after` may name earlier ones), run a dispatcher
        until no task is left, and return the tasks as they ended."""
        _, tasks = queue.submit_group(specs)
        Dispatcher(queue, fleet=Fleet(queue.hosts, self.connections)).run(until_empty=True)
        return [queue.get(t.id) for t in tasks]

    def run_one(self, queue: Queue, action: str, params: Mapping[str, Any]) -> Task:
        """Run one task to its end and return it."""
        return self.run(queue, TaskSpec(action, dict(params)))[0]

    def ok(self, queue: Queue, action: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Run one task that must complete, and return its result."""
        task = self.run_one(queue, action, params)
        assert task.state == State.COMPLETE, f"{action} {params} ended {task.state}: {task.error}"
        result: dict[str, Any] = task.result
        return result

    def clean(self) -> None:
        """Power off and undefine every domain, stop and undefine every storage pool (their
        files stay, in directories the tests delete)."""
        for dom in self.conn.listAllDomains(0):
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefineFlags(UNDEFINE_FLAGS)
        if self.storage is not None:
            for pool in self.storage_conn().listAllStoragePools(0):
                with contextlib.suppress(libvirt.libvirtError):
                    if pool.isActive():
                        pool.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    pool.undefine()


@pytest.fixture(scope="session")
def qemu_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QemuLab]:
    """The session's embed root (one per process), opened once and probed once; at the end,
    every domain left on it is destroyed and undefined. The root stays with pytest's other
    temporary directories: QEMU's log of each VM is in log/qemu/NAME.log under it."""
    start_event_loop()  # the embedded driver refuses to open without an event loop
    # QEMU's monitor sockets live under the root; unix socket paths have 108 bytes at most.
    root = tmp_path_factory.mktemp("embed")
    (root / "etc").mkdir()
    conf = QEMU_CONF + (QEMU_CONF_AS_ROOT if os.geteuid() == 0 else "")
    (root / "etc" / "qemu.conf").write_text(conf)
    connections = Connections()
    lab = QemuLab(
        root=root,
        uri=f"qemu:///embed?root={root}",
        connections=connections,
        domain_type="kvm" if kvm_usable() else "qemu",
    )
    try:
        lab.conn.getCapabilities()  # the one slow probe, here rather than in the first test
        yield lab
    finally:
        try:
            lab.clean()
        finally:
            connections.close()


@pytest.fixture(scope="session")
def storage_daemon(qemu_lab: QemuLab) -> Iterator[StorageDaemon]:
    """The private libvirtd holding real storage pools, started on first use in a session."""
    daemon = start_storage_daemon()
    qemu_lab.storage = daemon
    try:
        yield daemon
    finally:
        try:
            qemu_lab.clean()
        finally:
            qemu_lab.storage = None
            qemu_lab.connections.forget(daemon.uri)
            daemon.stop()
            shutil.rmtree(daemon.base, ignore_errors=True)


@pytest.fixture
def qemu_queue(qemu_lab: QemuLab, sqlite_url: str) -> Iterator[Queue]:
    """A queue (SQLite) with the embedded QEMU driver registered as host `qemu`; after the
    test, every domain (and storage pool) left is removed, so each test starts on empty hosts."""
    with open_queue(sqlite_url) as queue:
        queue.hosts.add(QEMU_HOST, qemu_lab.uri)
        try:
            yield queue
        finally:
            qemu_lab.clean()


@pytest.fixture
def storage_host(qemu_queue: Queue, storage_daemon: StorageDaemon) -> StorageDaemon:
    """The storage daemon, registered in `qemu_queue` as host `storage`."""
    qemu_queue.hosts.add(STORAGE_HOST, storage_daemon.uri)
    return storage_daemon
