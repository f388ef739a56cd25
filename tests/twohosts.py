"""Two real libvirt hosts on one machine: private libvirtds, each in its own namespaces.

Each host is a system-mode `libvirtd` (QEMU runs as root, under KVM when /dev/kvm answers, else
TCG) started by `unshare --mount --uts --net`, so it has:

* its own hostname (UTS namespace) and `host_uuid` (its libvirtd.conf): libvirt refuses to
  migrate a VM to a host with the same name or UUID as the source;
* its own network: a veth pair joins the two namespaces (10.231.7.1 and 10.231.7.2 on a /30),
  and each namespace's /etc/hosts names both hosts. The QEMU processes a daemon starts live in
  its namespace, so a live migration's memory stream and disk copy (NBD) cross the veth pair to
  the target's hostname, as between two machines;
* its own /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt:
  directories under one temporary base, bind-mounted over those paths inside its mount
  namespace only. A VM's disk lives at the same path on both hosts (/var/lib/libvirt/images/…)
  but in two different files, as without shared storage; a `dir` pool `images` over that
  directory on each host lets libvirt create the target's copy of a disk when it migrates.

Clients (tests, dispatchers, virsh) reach each daemon on its unix socket,
`qemu+unix:///system?socket=BASE/NAME/run/libvirt-sock`, which is a file on the machine's own
filesystem; the source daemon reaches the target the same way for a peer-to-peer migration.
Nothing listens on the machine's network. `TwoHosts.stop()` ends both daemons by pid (and so
the QEMU processes in their namespaces, which it destroys first), also after a failed start.

Needs root, util-linux's unshare and nsenter, iproute2's ip, libvirt-daemon,
libvirt-daemon-driver-qemu (and -storage-… as shipped in libvirt-daemon), qemu-system-x86 and
qemu-utils. The empty mount points /etc/libvirt, /var/lib/libvirt, /var/cache/libvirt and
/var/log/libvirt are created on the machine if missing (nothing is ever written into them).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

NETWORK = "10.231.7"
"""The /30 the veth pair is on: host a is .1, host b is .2 (only inside their namespaces)."""

MOUNTS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}
"""Private directory (under a host's base) → the path it replaces inside that host."""

IMAGES = "/var/lib/libvirt/images"
"""Where VM disks live on a host (inside its namespace), in the storage pool `images`."""

IMAGES_POOL = "images"

START_SECONDS = 30.0
"""How long a daemon gets to open its socket."""

STOP_SECONDS = 15.0
"""How long a daemon gets to exit after SIGTERM before it is killed."""

LIBVIRTD_CONF = """\
host_uuid = "{uuid}"
auth_unix_ro = "none"
auth_unix_rw = "none"
unix_sock_rw_perms = "0700"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
log_filters = "4:util.netdev 4:util.cgroup 4:util.gdbus 2:qemu.qemu_migration"
"""

QEMU_CONF = """\
user = "root"
group = "root"
stdio_handler = "file"
security_driver = "none"
cgroup_controllers = []
namespaces = []
"""
"""QEMU as root (a root-only /dev/kvm), its output in files (no virtlogd), no cgroups (no
systemd here) and no per-VM mount namespace (the daemon's own one suffices)."""

POOL_XML = f"""\
<pool type='dir'><name>{IMAGES_POOL}</name><target><path>{IMAGES}</path></target></pool>
"""

HOST_SCRIPT = """\
set -e
hostname {hostname}
{mounts}
mount --bind {hosts} /etc/hosts
exec libvirtd --config /etc/libvirt/libvirtd.conf --pid-file /run/libvirt/libvirtd.pid
"""
"""What runs inside a host's new namespaces: its name, its directories, then the daemon."""


@dataclass
class Host:
    """One private libvirtd in its own namespaces."""

    name: str  # also its hostname
    address: str
    base: Path
    host_uuid: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.base / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """How a client on this machine (or the other host's daemon) reaches it."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def images(self) -> Path:
        """Its images directory, as this machine sees it (IMAGES inside the host)."""
        return self.base / "lib" / "images"

    @property
    def log(self) -> Path:
        return self.base / "log" / "libvirtd.log"

    def qemu_pids(self) -> list[int]:
        """The QEMU processes this host's daemon started that are still alive."""
        pids = []
        for pidfile in (self.base / "run" / "qemu").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
        return pids

    def qemu_log(self, vm: str) -> Path:
        return self.base / "log" / "qemu" / f"{vm}.log"

    def output(self) -> str:
        """What the daemon printed, and its log file."""
        parts = []
        for path in (self.base / "libvirtd.out", self.log):
            if path.exists():
                parts.append(f"--- {path}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)


@dataclass
class TwoHosts:
    """Hosts `a` and `b`, and the connections the fixture itself holds to them."""

    base: Path
    hosts: dict[str, Host]
    domain_type: str  # 'kvm' or 'qemu' (TCG), what a VM defined here must say
    veth: tuple[str, str] = ("", "")
    _conns: dict[str, libvirt.virConnect] = field(default_factory=dict)

    @property
    def a(self) -> Host:
        return self.hosts["a"]

    @property
    def b(self) -> Host:
        return self.hosts["b"]

    def conn(self, name: str) -> libvirt.virConnect:
        """The fixture's own connection to host `name` (not the dispatcher's)."""
        conn = self._conns.get(name)
        if conn is None or not _alive(conn):
            conn = self._conns[name] = libvirt.open(self.hosts[name].uri)
        return conn

    def image(self, host: str, vm: str) -> Path:
        """The file of VM `vm`'s disk on host `host`, as this machine sees it."""
        return self.hosts[host].images / f"{vm}.qcow2"

    def disk_path(self, vm: str) -> str:
        """The path of VM `vm`'s disk inside either host."""
        return f"{IMAGES}/{vm}.qcow2"

    def vm_xml(self, vm: str, memory_mib: int = 64) -> str:
        """A small VM booting no OS, with one qcow2 disk in the images pool."""
        return (
            f"<domain type='{self.domain_type}'><name>{vm}</name>"
            f"<memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64'>hvm</type></os><features><acpi/></features>"
            "<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{self.disk_path(vm)}'/><target dev='vda' bus='virtio'/></disk>"
            "<graphics type='vnc' port='-1' listen='127.0.0.1'/></devices></domain>"
        )

    def make_vm(
        self, host: str, vm: str, *, size_mib: int = 64, data_mib: int = 0, start: bool = True
    ) -> None:
        """Define VM `vm` on `host` with a fresh qcow2 disk of `size_mib` (its first
        `data_mib` MiB written with a pattern), refresh the pool, and start it. A live
        migration copies the disk's whole size, data or not."""
        path = self.image(host, vm)
        _run("qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M")
        if data_mib:
            _run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {data_mib}M", str(path))
        conn = self.conn(host)
        conn.storagePoolLookupByName(IMAGES_POOL).refresh(0)
        dom = conn.defineXML(self.vm_xml(vm))
        if start:
            dom.create()

    def clean(self) -> None:
        """Destroy and undefine every VM on both hosts and delete every image: each test
        starts on two empty hosts."""
        for name, host in self.hosts.items():
            conn = self.conn(name)
            for dom in conn.listAllDomains(0):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.abortJob()
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
            for image in host.images.glob("*"):
                image.unlink()
            with contextlib.suppress(libvirt.libvirtError):
                conn.storagePoolLookupByName(IMAGES_POOL).refresh(0)

    def stop(self) -> None:
        """Stop everything that was started, by pid: VMs (destroyed through their daemon,
        and any QEMU still alive afterwards killed), connections, daemons, the veth pair."""
        for name, host in self.hosts.items():
            if host.process is None or host.process.poll() is not None:
                continue
            with contextlib.suppress(libvirt.libvirtError):
                for dom in self.conn(name).listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.destroy()
        for conn in self._conns.values():
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        self._conns.clear()
        for host in self.hosts.values():
            if host.process is not None and host.process.poll() is None:
                host.process.send_signal(signal.SIGTERM)
        for host in self.hosts.values():
            if host.process is None:
                continue
            try:
                host.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                host.process.kill()
                host.process.wait()
        # libvirtd leaves running QEMU processes behind when it exits (by design).
        for host in self.hosts.values():
            for pid in host.qemu_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # A veth pair dies with its namespaces; this only matters if they never got it.
        for veth in self.veth:
            if veth:
                subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"$ {shlex.join(cmd)}\nexit status {done.returncode}\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def _alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def kvm_usable() -> bool:
    """Whether /dev/kvm opens read-write (the daemons run QEMU as root, as this process)."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def start_two_hosts(base: Path | None = None) -> TwoHosts:
    """Start hosts `a` and `b` under `base` (a new temporary directory by default); on any
    failure everything started so far is stopped and the error says what failed."""
    if os.geteuid() != 0:
        raise RuntimeError("two private system-mode libvirtds need root (namespaces, mounts)")
    # Unix socket paths have 108 bytes at most: keep the base short.
    base = base or Path(tempfile.mkdtemp(prefix="tk2h-"))
    (base / "hosts").write_text(
        f"127.0.0.1 localhost\n{NETWORK}.1 twohost-a\n{NETWORK}.2 twohost-b\n"
    )
    for point in MOUNTS.values():
        os.makedirs(point, exist_ok=True)
    tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:3]}"
    lab = TwoHosts(
        base=base,
        hosts={
            n: Host(f"twohost-{n}", f"{NETWORK}.{i}", base / n, str(uuid.uuid4()))
            for i, n in ((1, "a"), (2, "b"))
        },
        domain_type="kvm" if kvm_usable() else "qemu",
        veth=(f"tk{tag}a", f"tk{tag}b"),
    )
    try:
        for host in lab.hosts.values():
            _start(host, base / "hosts")
        for host in lab.hosts.values():
            _wait_for_socket(host)
        _link(lab)
        _prepare(lab)
        return lab
    except BaseException:
        lab.stop()
        raise


def _start(host: Host, hosts_file: Path) -> None:
    for sub in MOUNTS:
        (host.base / sub).mkdir(parents=True, exist_ok=True)
    (host.base / "lib" / "images").mkdir(exist_ok=True)
    (host.base / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(uuid=host.host_uuid))
    (host.base / "etc" / "qemu.conf").write_text(QEMU_CONF)
    mounts = "\n".join(
        f"mount --bind {shlex.quote(str(host.base / sub))} {path}" for sub, path in MOUNTS.items()
    )
    script = HOST_SCRIPT.format(
        hostname=host.name, mounts=mounts, hosts=shlex.quote(str(hosts_file))
    )
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": str(host.base)}
    with (host.base / "libvirtd.out").open("wb") as out:
        host.process = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--uts",
                "--net",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a ^C at the terminal is for the test runner
        )


def _wait_for_socket(host: Host) -> None:
    assert host.process is not None
    deadline = time.monotonic() + START_SECONDS
    while not host.socket.exists():
        if host.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"libvirtd of host {host.name} did not open {host.socket}:\n{host.output()}"
            )
        time.sleep(0.02)


def _link(lab: TwoHosts) -> None:
    """The veth pair: created here, one end moved into each host's network namespace."""
    one, two = lab.veth
    _run("ip", "link", "add", one, "type", "veth", "peer", "name", two)
    for veth, host in ((one, lab.a), (two, lab.b)):
        _run("ip", "link", "set", veth, "netns", str(host.pid))
        inside = ["nsenter", "--target", str(host.pid), "--net", "ip"]
        _run(*inside, "link", "set", "lo", "up")
        _run(*inside, "addr", "add", f"{host.address}/30", "dev", veth)
        _run(*inside, "link", "set", veth, "up")
    lab.veth = ("", "")  # they belong to the namespaces now and go with them


def _prepare(lab: TwoHosts) -> None:
    """Each host gets its images pool and answers its slow first question once, here rather
    than in a test: the first getVersion builds the host's capabilities, probing each QEMU
    binary (x86_64 and i386, about 4 s in all). Host a probes; host b then finds a's results
    in its own cache (they describe the same binaries on the same machine) and only checks
    that they are current."""
    probed = lab.a.base / "cache" / "qemu" / "capabilities"
    for host in lab.hosts.values():
        conn = libvirt.open(host.uri)
        try:
            if host is lab.b and probed.is_dir():
                shutil.copytree(probed, host.base / "cache" / "qemu" / "capabilities")
            conn.getVersion()
            pool = conn.storagePoolDefineXML(POOL_XML, 0)
            pool.setAutostart(True)
            pool.create(0)
        except libvirt.libvirtError as exc:
            raise RuntimeError(
                f"preparing host {host.name} failed: {exc}\n{host.output()}"
            ) from None
        finally:
            conn.close()


@contextlib.contextmanager
def two_hosts() -> Iterator[TwoHosts]:
    """Both hosts, running for the `with` block, then stopped and their files removed."""
    lab = start_two_hosts()
    try:
        yield lab
    finally:
        lab.stop()
        shutil.rmtree(lab.base, ignore_errors=True)
