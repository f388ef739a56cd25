"""Removing an external snapshot: merge each disk's overlay back, verify, delete it, drop metadata.

An external disk-only snapshot gave each of its disks a new overlay file on top of the image the
disk used before; the guest has been writing into the overlays since. Removing the snapshot
means committing each overlay into the image below it, so the disk's backing chain no longer
contains it, then deleting the overlay files and the snapshot's metadata. The group
(`flows/merge.py`) starts with `snapshot.plan_removal`, which reads the snapshot on the host and
adds per disk `disk.commit` → `snapshot.verify_chain` → `snapshot.delete_volume`, then one
`snapshot.drop_metadata` after all of them.

A running VM's disk is merged by a block commit, a host job the dispatcher's monitor polls:
an *active* commit when the overlay is the disk's top image (it becomes ready once the base
holds everything, and `poll` pivots the disk onto the base), a plain commit when a later
snapshot sits above it (QEMU drops the overlay from the chain when it ends). A stopped VM's
disk is merged offline with `qemu-img` on a local host. Every step is an "ensure": a disk
whose chain no longer holds the overlay is merged already, a commit job found on the disk is
adopted rather than started twice, a file already gone is deleted already.

Locks: the plan and the metadata step hold `vm:<vm>`; each disk's commit, check and deletion
hold `disk:<vm>:<target>`, so the commits of different disks run in parallel. While they run,
other tasks on the VM may be claimed. libvirt itself refuses to migrate a VM that has snapshot
metadata (kept until the last step) and to snapshot a disk in a block job; a VM stopped
mid-commit ends the job, which its `finish` reports as a failure saying the disk still uses
the overlay (removing the snapshot again then merges it offline).
"""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import libvirt

from taskomatic import defaults, errors
from taskomatic.actions.registry import Check, Context, Param, Registry
from taskomatic.actions.snapshot import HOST, SNAPSHOT, VM
from taskomatic.jobs import HostJob, JobHooks, JobStatus
from taskomatic.model import Host
from taskomatic.submission import Expansion, TaskSpec
from taskomatic.virt.connections import is_error
from taskomatic.virt.fleet import Found

BLOCK_COMMIT = "block-commit"
"""The kind of host job `disk.commit` hands back (what a task's timeline shows)."""

COMMIT_JOBS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active-commit",
}
JOB_NAMES = {
    **COMMIT_JOBS,
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP: "backup",
}

_NO_STORAGE = (
    libvirt.VIR_ERR_NO_SUPPORT,  # a driver without storage (e.g. the embedded QEMU driver)
    libvirt.VIR_ERR_NO_STORAGE_VOL,
    libvirt.VIR_ERR_NO_STORAGE_POOL,
)

PINNED = Param(str, help="the host the VM is on (the plan pins every step to it)")
DISK = Param(str, help="the disk's target, e.g. vda")
OVERLAY = Param(str, help="the overlay file the snapshot gave the disk")
BANDWIDTH = Param(int, default=None, help="limit the block commit to this many MiB/s")


def register(registry: Registry) -> None:
    """Add the snapshot-removal actions to `registry`."""
    attempts = defaults.HOST_ACTION_MAX_ATTEMPTS
    registry.action(
        "snapshot.plan_removal",
        params={
            "vm": VM,
            "snapshot": SNAPSHOT,
            "host": HOST,
            "bandwidth": BANDWIDTH,
        },
        locks=_vm_lock,
        max_attempts=attempts,  # it only reads: running it again is its own recovery
    )(plan_removal)
    registry.action(
        "disk.commit",
        params={"vm": VM, "host": PINNED, "disk": DISK, "overlay": OVERLAY, "bandwidth": BANDWIDTH},
        locks=_disk_lock,
        check=check_commit,
        max_attempts=attempts,
        job=JobHooks(poll=poll_commit, finish=finish_commit, abort=abort_commit),
    )(commit)
    registry.action(
        "snapshot.verify_chain",
        params={"vm": VM, "host": PINNED, "disk": DISK, "overlay": OVERLAY},
        locks=_disk_lock,
        check=check_verify,
        max_attempts=attempts,
    )(verify_chain)
    registry.action(
        "snapshot.delete_volume",
        params={"vm": VM, "host": PINNED, "disk": DISK, "path": Param(str, help="the file")},
        locks=_disk_lock,
        check=check_delete_volume,
        max_attempts=attempts,
    )(delete_volume)
    registry.action(
        "snapshot.drop_metadata",
        params={"vm": VM, "host": PINNED, "snapshot": SNAPSHOT},
        locks=_vm_lock,
        check=check_drop_metadata,
        max_attempts=attempts,
    )(drop_metadata)


def _vm_lock(params: Mapping[str, Any]) -> Iterable[str]:
    return [f"vm:{params['vm']}"]


def _disk_lock(params: Mapping[str, Any]) -> Iterable[str]:
    return [f"disk:{params['vm']}:{params['disk']}"]


def is_local(host: Host) -> bool:
    """Whether the host's libvirt runs on this machine (its URI names no remote machine), so
    its image files are files here."""
    return not urlsplit(host.uri).hostname


# --- reading a disk's chain -------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """A disk's images, top first, as far as they can be known, and how they were read."""

    files: tuple[str, ...]
    formats: tuple[str, ...]
    complete: bool  # False: a stopped VM on a remote host, whose chain below the top is unknown

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and os.path.normpath(path) in self.files

    def describe(self) -> str:
        return " → ".join(self.files) + ("" if self.complete else " → (not readable here)")


def _disk_element(dom: libvirt.virDomain, disk: str, flags: int = 0) -> ET.Element:
    root = ET.fromstring(dom.XMLDesc(flags))
    for elem in root.findall("devices/disk"):
        target = elem.find("target")
        if target is not None and target.get("dev") == disk:
            return elem
    raise errors.ActionFailed(f"vm {dom.name()!r} has no disk {disk!r}")


def _file(source: ET.Element | None) -> str | None:
    if source is None:
        return None
    path = source.get("file") or source.get("dev")
    return os.path.normpath(path) if path else None


def read_chain(found: Found, disk: str) -> Chain:
    """The disk's backing chain: from the live XML of a running VM, from the images themselves
    (qemu-img) for a stopped VM on a local host, else only its top image."""
    dom = found.domain
    if dom.isActive():
        files: list[str] = []
        formats: list[str] = []
        elem: ET.Element | None = _disk_element(dom, disk)
        while elem is not None:
            path = _file(elem.find("source"))
            if path is None:
                break
            files.append(path)
            kind = elem.find("format") if elem.tag == "backingStore" else elem.find("driver")
            formats.append((kind.get("type") if kind is not None else None) or "raw")
            elem = elem.find("backingStore")
        return Chain(tuple(files), tuple(formats), complete=True)
    config = _disk_element(dom, disk, libvirt.VIR_DOMAIN_XML_INACTIVE)
    top = _file(config.find("source"))
    if top is None:
        raise errors.ActionFailed(f"disk {disk!r} of vm {dom.name()!r} has no source file")
    if not is_local(found.host):
        driver = config.find("driver")
        fmt = (driver.get("type") if driver is not None else None) or "raw"
        return Chain((top,), (fmt,), complete=False)
    images = _qemu_img_json("info", "-U", "--backing-chain", "--output=json", top)
    return Chain(
        tuple(os.path.normpath(i["filename"]) for i in images),
        tuple(i.get("format", "raw") for i in images),
        complete=True,
    )


def _qemu_img_json(*args: str) -> Any:
    return json.loads(_qemu_img(*args))


def _qemu_img(*args: str) -> str:
    """Run qemu-img here; ActionFailed with its message if it is missing or fails."""
    try:
        done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise errors.ActionFailed(
            "qemu-img is not installed on this machine; install qemu-utils to merge snapshots "
            "of stopped VMs"
        ) from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise errors.ActionFailed(
            f"qemu-img {args[0]} failed: {message[-1] if message else f'exit {done.returncode}'}"
        )
    return done.stdout


# --- snapshot.plan_removal ----------------------------------------------------------------------


def plan_removal(ctx: Context) -> Expansion | dict[str, Any]:
    """Read the snapshot on the host and add the group's steps: per disk commit, verify and
    delete its overlay, then drop the snapshot's metadata."""
    p = ctx.params
    if p["bandwidth"] is not None and p["bandwidth"] <= 0:
        raise errors.ActionFailed(f"bandwidth must be a positive MiB/s, got {p['bandwidth']}")
    found = ctx.hosts.need_vm(p["vm"], p["host"])
    host = found.host.name
    summary = {"vm": p["vm"], "host": host, "snapshot": p["snapshot"]}
    with ctx.hosts.call(found.host, f"reading snapshot {p['snapshot']!r} of vm {p['vm']!r}"):
        snap = _lookup_snapshot(found, p["snapshot"])
        if snap is None:
            return {**summary, "disks": {}, "removed": False}  # gone already: nothing to do
        root = ET.fromstring(snap.getXMLDesc(0))
    memory = root.find("memory")
    disks = root.findall("disks/disk")
    internal = [d.get("name") for d in disks if d.get("snapshot") == "internal"]
    if internal or (memory is not None and memory.get("snapshot") == "external"):
        what = f"disk(s) {', '.join(map(str, internal))}" if internal else "the memory"
        raise errors.ActionFailed(
            f"snapshot {p['snapshot']!r} of vm {p['vm']!r} holds {what} inside the images or in "
            "a memory file; only external disk-only snapshots are merged (use snapshot.delete "
            "on the stopped VM for an internal one)"
        )
    overlays: dict[str, str] = {}
    for disk in disks:
        if disk.get("snapshot") != "external":
            continue
        path = _file(disk.find("source"))
        if path is None:
            raise errors.ActionFailed(
                f"snapshot {p['snapshot']!r} names no overlay file for disk {disk.get('name')!r}"
            )
        overlays[str(disk.get("name"))] = path
    specs: list[TaskSpec] = []
    deleted: list[str] = []
    for target, overlay in sorted(overlays.items()):
        where = {"vm": p["vm"], "host": host, "disk": target}
        specs += [
            TaskSpec(
                "disk.commit",
                {**where, "overlay": overlay, "bandwidth": p["bandwidth"]},
                name=f"commit {target}",
            ),
            TaskSpec(
                "snapshot.verify_chain",
                {**where, "overlay": overlay},
                name=f"verify {target}",
                after=[f"commit {target}"],
            ),
            TaskSpec(
                "snapshot.delete_volume",
                {**where, "path": overlay},
                name=f"delete {target}",
                after=[f"verify {target}"],
            ),
        ]
        deleted.append(f"delete {target}")
    specs.append(
        TaskSpec(
            "snapshot.drop_metadata",
            {"vm": p["vm"], "host": host, "snapshot": p["snapshot"]},
            name="drop metadata",
            after=deleted,
        )
    )
    return Expansion(tasks=specs, result={**summary, "disks": overlays})


def _lookup_snapshot(found: Found, name: str) -> libvirt.virDomainSnapshot | None:
    try:
        return found.domain.snapshotLookupByName(name, 0)
    except libvirt.libvirtError as exc:
        if is_error(exc, libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT):
            return None
        raise


# --- disk.commit --------------------------------------------------------------------------------


def _merged(p: Mapping[str, Any], host: str, chain: Chain, how: str) -> dict[str, Any]:
    return {
        "vm": p["vm"],
        "host": host,
        "disk": p["disk"],
        "overlay": p["overlay"],
        "merged": how,
        "chain": list(chain.files),
    }


def commit(ctx: Context) -> HostJob | dict[str, Any]:
    """Merge the overlay of one disk into the image below it: a block commit (a host job) if
    the VM runs, qemu-img if it is stopped."""
    p = ctx.params
    found = ctx.hosts.need_vm(p["vm"], p["host"])
    doing = f"committing {p['overlay']} of disk {p['disk']!r} of vm {p['vm']!r}"
    with ctx.hosts.call(found.host, doing):
        chain = read_chain(found, p["disk"])
        if p["overlay"] not in chain:
            return _merged(p, found.host.name, chain, "already")
        if not found.domain.isActive():
            return _commit_offline(found, p, chain)
        return _start_block_commit(found, p, chain)


def _job(found: Found, p: Mapping[str, Any], active: bool) -> HostJob:
    details = {"vm": p["vm"], "disk": p["disk"], "overlay": p["overlay"], "active": active}
    return HostJob(found.host.name, BLOCK_COMMIT, details)


def _commit_job(found: Found, disk: str) -> dict[str, Any] | None:
    """The block job on the disk if it is a commit; ActionFailed if it is another kind."""
    info = found.domain.blockJobInfo(disk, 0)
    if not info:
        return None
    if info["type"] not in COMMIT_JOBS:
        kind = JOB_NAMES.get(info["type"], str(info["type"]))
        raise errors.ActionFailed(
            f"disk {disk!r} of vm {found.domain.name()!r} is busy with a block {kind} job; wait "
            "for it to end (or abort it), then remove the snapshot again"
        )
    return dict(info)


def _start_block_commit(found: Found, p: Mapping[str, Any], chain: Chain) -> HostJob:
    dom, disk = found.domain, p["disk"]
    running = _commit_job(found, disk)
    if running is not None:  # ours, started before a crash: follow it, never start a second
        return _job(found, p, running["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT)
    overlay = os.path.normpath(p["overlay"])
    if chain.files.index(overlay) == len(chain.files) - 1:
        raise errors.ActionFailed(
            f"{overlay} is the bottom image of disk {disk!r} of vm {p['vm']!r}: there is no "
            "image below it to merge it into"
        )
    active = chain.files[0] == overlay
    flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW  # into the image right below it
    if active:
        flags |= libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
    try:
        dom.blockCommit(disk, None, None if active else overlay, p["bandwidth"] or 0, flags)
    except libvirt.libvirtError:
        # Someone may have started one between our look and our start: adopt it, if so.
        running = _commit_job(found, disk)
        if running is None:
            raise
        active = running["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT
    return _job(found, p, active)


def _commit_offline(found: Found, p: Mapping[str, Any], chain: Chain) -> dict[str, Any]:
    """qemu-img commit of the overlay into its backing image, then the image above it (or the
    domain's disk, when the overlay was on top) is pointed at that backing image."""
    disk, vm = p["disk"], p["vm"]
    if not is_local(found.host):
        raise errors.ActionFailed(
            f"vm {vm!r} is stopped and host {found.host.name!r} is remote: its images cannot be "
            "merged from here; start the VM and remove the snapshot again (a live merge)"
        )
    overlay = os.path.normpath(p["overlay"])
    at = chain.files.index(overlay)
    if at == len(chain.files) - 1:
        raise errors.ActionFailed(
            f"{overlay} is the bottom image of disk {disk!r} of vm {vm!r}: there is no image "
            "below it to merge it into"
        )
    base, base_format = chain.files[at + 1], chain.formats[at + 1]
    # qemu-img takes the images' locks: a VM started meanwhile fails to open them.
    _qemu_img("commit", "-q", "-f", chain.formats[at], overlay)
    if at == 0:
        _point_disk_at(found, disk, base, base_format)
    else:
        above = chain.files[at - 1]
        _qemu_img("rebase", "-u", "-f", chain.formats[at - 1], "-b", base, "-F", base_format, above)
    return _merged(p, found.host.name, read_chain(found, disk), "offline")


def _point_disk_at(found: Found, disk: str, path: str, fmt: str) -> None:
    """Point the stopped domain's disk at `path` (in format `fmt`) in its persistent definition.

    Only that disk device is replaced, inside libvirt: commits of the VM's other disks run in
    parallel, and rewriting the whole domain would undo a neighbour's change made meanwhile.
    """
    dom = found.domain
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    elem = _disk_element(dom, disk, flags)
    if elem.get("type") != "file":
        raise errors.ActionFailed(
            f"disk {disk!r} of vm {dom.name()!r} is a {elem.get('type')} disk; only file "
            "disks are merged offline (start the VM to merge it live)"
        )
    source = elem.find("source")
    if source is None:
        source = ET.SubElement(elem, "source")
    source.set("file", path)
    driver = elem.find("driver")
    if driver is not None:
        driver.set("type", fmt)
    backing = elem.find("backingStore")
    if backing is not None:
        elem.remove(backing)
    xml = ET.tostring(elem, encoding="unicode")
    dom.updateDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG)


def poll_commit(ctx: Context, job: HostJob) -> JobStatus:
    """Look at the disk's block job; pivot an active commit that is ready (its base holds
    everything), which ends the job."""
    d = job.details
    found = ctx.hosts.need_vm(d["vm"], job.host)
    with ctx.hosts.call(found.host, f"polling the block commit of disk {d['disk']!r}"):
        if not found.domain.isActive():
            return JobStatus.gone()  # QEMU stopped: no job can be left
        info = found.domain.blockJobInfo(d["disk"], 0)
        if not info:
            return JobStatus.gone()
        progress = {"cur": info["cur"], "end": info["end"], "bandwidth": info["bandwidth"]}
        # libvirt reports cur == end only once the job is ready (before that, end - 1).
        ready = info["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT and (
            info["end"] > 0 and info["cur"] == info["end"]
        )
        if ready and not ctx.stopping:
            try:
                found.domain.blockJobAbort(d["disk"], libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            except libvirt.libvirtError as exc:
                if not is_error(exc, libvirt.VIR_ERR_BLOCK_COPY_ACTIVE):
                    raise
                # not ready after all: look again at the next poll
            return JobStatus(bool(found.domain.blockJobInfo(d["disk"], 0)), progress)
        return JobStatus(True, progress)


def finish_commit(ctx: Context, job: HostJob) -> dict[str, Any]:
    """The job is gone: the disk's chain must no longer hold the overlay, or the task fails."""
    d = job.details
    found = ctx.hosts.need_vm(d["vm"], job.host)
    with ctx.hosts.call(found.host, f"reading the chain of disk {d['disk']!r}"):
        chain = read_chain(found, d["disk"])
        running = found.domain.isActive()
    if d["overlay"] not in chain:
        return _merged(d, found.host.name, chain, "live")
    if running:
        raise errors.ActionFailed(
            f"the block commit of disk {d['disk']!r} of vm {d['vm']!r} was aborted; the disk "
            f"still uses {d['overlay']}"
        )
    raise errors.ActionFailed(
        f"vm {d['vm']!r} stopped during the block commit of disk {d['disk']!r}; the disk still "
        f"uses {d['overlay']} (remove the snapshot again to merge it offline)"
    )


def abort_commit(ctx: Context, job: HostJob) -> None:
    """Stop the block commit without pivoting: the disk stays on its overlay, chain intact."""
    d = job.details
    found = ctx.hosts.need_vm(d["vm"], job.host)
    with ctx.hosts.call(found.host, f"aborting the block commit of disk {d['disk']!r}"):
        if not found.domain.isActive() or not found.domain.blockJobInfo(d["disk"], 0):
            return  # nothing left to abort
        try:
            found.domain.blockJobAbort(d["disk"], 0)
        except libvirt.libvirtError:
            if found.domain.isActive() and found.domain.blockJobInfo(d["disk"], 0):
                raise
            # else the job ended on its own meanwhile: nothing to abort


def check_commit(ctx: Context) -> Check:
    """After a crash: merged already, a commit still running (run again adopts it), or not."""
    p = ctx.params
    found = ctx.hosts.need_vm(p["vm"], p["host"])
    with ctx.hosts.call(found.host, f"checking disk {p['disk']!r} of vm {p['vm']!r}"):
        chain = read_chain(found, p["disk"])
        if p["overlay"] not in chain:
            return Check.done(_merged(p, found.host.name, chain, "already"))
        if found.domain.isActive() and _commit_job(found, p["disk"]) is not None:
            return Check.in_progress()
    return Check.not_started()


# --- snapshot.verify_chain ------------------------------------------------------------------------


def verify_chain(ctx: Context) -> dict[str, Any]:
    """Confirm on the host that the disk's backing chain no longer holds the overlay."""
    p = ctx.params
    found = ctx.hosts.need_vm(p["vm"], p["host"])
    with ctx.hosts.call(found.host, f"reading the chain of disk {p['disk']!r}"):
        chain = read_chain(found, p["disk"])
    if p["overlay"] in chain:
        raise errors.ActionFailed(
            f"disk {p['disk']!r} of vm {p['vm']!r} still uses {p['overlay']}: {chain.describe()}"
        )
    if not chain.complete:
        raise errors.ActionFailed(
            f"the chain of disk {p['disk']!r} of stopped vm {p['vm']!r} on remote host "
            f"{found.host.name!r} cannot be read from here; start the VM and retry this task"
        )
    return {"vm": p["vm"], "host": found.host.name, "disk": p["disk"], "chain": list(chain.files)}


def check_verify(ctx: Context) -> Check:
    """Verifying only reads: run it again."""
    return Check.not_started()


# --- snapshot.delete_volume -----------------------------------------------------------------------


def delete_volume(ctx: Context) -> dict[str, Any]:
    """Delete the overlay file: through the storage pool holding it, else (on a local host) as
    a file; never while any disk of the VM still uses it."""
    p = ctx.params
    path = os.path.normpath(p["path"])
    found = ctx.hosts.need_vm(p["vm"], p["host"])
    result = {"vm": p["vm"], "host": found.host.name, "disk": p["disk"], "path": path}
    with ctx.hosts.call(found.host, f"deleting {path}"):
        for disk in _disks(found.domain):
            chain = read_chain(found, disk)
            if path in chain:
                raise errors.ActionFailed(
                    f"disk {disk!r} of vm {p['vm']!r} still uses {path}; it is not deleted"
                )
            if not chain.complete:
                raise errors.ActionFailed(
                    f"vm {p['vm']!r} is stopped on remote host {found.host.name!r}, so the "
                    f"chain of its disk {disk!r} cannot be read to confirm nothing uses {path}; "
                    "start the VM and retry this task"
                )
        volume, pooled = _pool_volume(found, path)
        if volume is not None:
            volume.delete(0)
            return {**result, "deleted": True, "how": "pool"}
    if pooled:
        return {**result, "deleted": False, "how": "pool"}  # its pool no longer lists it
    if not is_local(found.host):
        raise errors.ActionFailed(
            f"no storage pool on host {found.host.name!r} holds {path}, and the host is remote; "
            f"define and start a dir pool for {os.path.dirname(path)} there, then retry this task"
        )
    try:
        os.unlink(path)
    except FileNotFoundError:
        return {**result, "deleted": False, "how": "file"}
    return {**result, "deleted": True, "how": "file"}


def _disks(dom: libvirt.virDomain) -> list[str]:
    """The targets of the domain's disks (vda, vdb, …)."""
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    targets = (d.find("target") for d in root.findall("devices/disk"))
    return [str(t.get("dev")) for t in targets if t is not None and t.get("dev")]


def _pool_volume(found: Found, path: str) -> tuple[libvirt.virStorageVol | None, bool]:
    """(the volume at `path`, whether an active pool covers its directory). A pool that
    covers it is refreshed first: the overlay was created by QEMU, not through the pool."""
    conn = found.domain.connect()
    directory = os.path.dirname(path)
    pooled = False
    try:
        pools = conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
    except libvirt.libvirtError as exc:
        if not is_error(exc, *_NO_STORAGE):
            raise
        pools = []
    for pool in pools:
        target = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
        if target and os.path.normpath(target) == directory:
            pool.refresh(0)
            pooled = True
    try:
        return conn.storageVolLookupByPath(path), pooled
    except libvirt.libvirtError as exc:
        if is_error(exc, *_NO_STORAGE):
            return None, pooled
        raise


def check_delete_volume(ctx: Context) -> Check:
    """A file no longer here was deleted; otherwise run again (it deletes at most once)."""
    p = ctx.params
    found = ctx.hosts.need_vm(p["vm"], p["host"])
    path = os.path.normpath(p["path"])
    if is_local(found.host) and not os.path.lexists(path):
        return Check.done({"vm": p["vm"], "host": found.host.name, "path": path, "deleted": True})
    return Check.not_started()


# --- snapshot.drop_metadata -----------------------------------------------------------------------


def drop_metadata(ctx: Context) -> dict[str, Any]:
    """Forget the snapshot on the host (its data was merged and its files deleted)."""
    p = ctx.params
    found = ctx.hosts.need_vm(p["vm"], p["host"])
    result = {"vm": p["vm"], "host": found.host.name, "snapshot": p["snapshot"]}
    with ctx.hosts.call(found.host, f"dropping snapshot {p['snapshot']!r} of vm {p['vm']!r}"):
        snap = _lookup_snapshot(found, p["snapshot"])
        if snap is None:
            return {**result, "dropped": False}
        snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    return {**result, "dropped": True}


def check_drop_metadata(ctx: Context) -> Check:
    """Dropped already when the host no longer knows the snapshot."""
    p = ctx.params
    found = ctx.hosts.need_vm(p["vm"], p["host"])
    with ctx.hosts.call(found.host, f"looking up snapshot {p['snapshot']!r}"):
        if _lookup_snapshot(found, p["snapshot"]) is None:
            return Check.done({"vm": p["vm"], "host": found.host.name, "snapshot": p["snapshot"]})
    return Check.not_started()
