"""VM actions: define, start, shutdown, destroy, suspend, resume, undefine, migrate.

Each ensures an end state: run twice, it ends in the same state without error. Its `check`
reads the domain on the host, so a task whose dispatcher died at any step is recovered by
asking the host what happened, then (if not done) running the action again. Drivers disagree
on error codes for "already in that state" (the test driver says 1, QEMU 55), so after an
error the state is read again instead of trusting the code.
"""

from __future__ import annotations

import logging
import posixpath
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import libvirt

from taskomatic import defaults, errors
from taskomatic.actions import domains
from taskomatic.actions.domains import ACTIVE, RUNNING, describe, state
from taskomatic.actions.registry import Check, Context, Param, Registry
from taskomatic.jobs import HostJob, JobHooks, JobStatus
from taskomatic.model import Host
from taskomatic.virt.connections import code_name, host_error, is_error
from taskomatic.virt.fleet import Fleet, Found

log = logging.getLogger(__name__)

MIGRATION_NS = "https://taskomatic.dev/xmlns/migration/1"
"""Namespace of the stamp a migration leaves in the domain's metadata: which task moved it
from which host, so a check after a crash tells "moved by me" from "never moved"."""

NAME = Param(str, help="the VM (domain) name")
HOST = Param(str, default=None, help="pin to this host (default: wherever the VM is defined)")

Reached = Callable[[int], bool]


def register(registry: Registry) -> None:
    """Add the VM actions to `registry`."""
    attempts = defaults.HOST_ACTION_MAX_ATTEMPTS
    vm = {"name": NAME, "host": HOST}
    registry.action(
        "vm.define",
        params={
            "name": NAME,
            "host": Param(str, default=None, help="define it here (default: placed when run)"),
            "xml": Param(str, default=None, help="full domain XML (instead of the spec below)"),
            "memory_mib": Param(int, default=512),
            "vcpus": Param(int, default=1),
            "disks": Param(list, default=[], help='[{"path": …} or {"pool": …, "volume": …}]'),
            "network": Param(str, default=None, help="a libvirt network for one virtio NIC"),
        },
        locks=_define_locks,
        check=check_define,
        max_attempts=attempts,
        compensate=_undefine_if_defined,
    )(define)
    for name, fn, reached, undo in (
        ("vm.start", start, _running, _destroy_if_started),
        ("vm.destroy", destroy, _stopped, None),
        ("vm.suspend", suspend, _paused, None),
        ("vm.resume", resume, _running, None),
    ):
        registry.action(
            name,
            params=vm,
            locks=_vm_locks,
            check=_check_state(reached),
            max_attempts=attempts,
            compensate=undo,
        )(fn)
    registry.action(
        "vm.shutdown",
        params={
            **vm,
            "timeout": Param(float, default=defaults.VM_SHUTDOWN_TIMEOUT_SECONDS),
            "force": Param(bool, default=False, help="destroy it if it is still up at timeout"),
        },
        locks=_vm_locks,
        check=_check_state(_stopped),
        max_attempts=attempts,
    )(shutdown)
    registry.action(
        "vm.undefine", params=vm, locks=_vm_locks, check=check_undefine, max_attempts=attempts
    )(undefine)
    registry.action(
        "vm.migrate",
        params={
            **vm,
            "to": Param(str, default=None, help="target host (default: placed when run)"),
            "live": Param(bool, default=True, help="live-migrate a running VM (peer-to-peer)"),
            "copy_storage": Param(bool, default=False, help="copy disks (no shared storage)"),
            "bandwidth_mib": Param(
                int, default=None, help="MiB/s a live migration may use (default: no limit)"
            ),
        },
        locks=_migrate_locks,
        check=check_migrate,
        max_attempts=attempts,
        job=JobHooks(poll_migration, finish_migration, abort_migration),
    )(migrate)


# --- locks and shared steps -----------------------------------------------------------------


def _vm_locks(params: Mapping[str, Any]) -> Iterable[str]:
    return [f"vm:{params['name']}"]


def _define_locks(params: Mapping[str, Any]) -> Iterable[str]:
    return _placing(params, params["host"])


def _migrate_locks(params: Mapping[str, Any]) -> Iterable[str]:
    return _placing(params, params["to"])


def _placing(params: Mapping[str, Any], pinned: str | None) -> list[str]:
    """A task that chooses its host when it runs also takes `placement`, so two placements
    never both count the same free slot, even in different dispatchers."""
    return [f"vm:{params['name']}", *([] if pinned else ["placement"])]


def _running(st: int) -> bool:
    return st in RUNNING


def _stopped(st: int) -> bool:
    return st not in ACTIVE


def _paused(st: int) -> bool:
    return st == libvirt.VIR_DOMAIN_PAUSED


def _vm(ctx: Context) -> Found:
    return ctx.hosts.need_vm(ctx.params["name"], ctx.params["host"])


def _change(found: Found, doing: str, op: Callable[[], object], reached: Reached) -> None:
    """Run a libvirt operation; an error is forgiven if the domain ended as wanted anyway
    (a racing change, or the driver's way of saying "already")."""
    try:
        op()
    except libvirt.libvirtError as exc:
        try:
            if reached(state(found.domain)):
                return
        except libvirt.libvirtError:
            pass
        raise host_error(exc, found.host.name, doing) from None


def _check_state(reached: Reached) -> Callable[[Context], Check]:
    def check(ctx: Context) -> Check:
        found = ctx.hosts.find_vm(ctx.params["name"], ctx.params["host"])
        if found is not None and reached(state(found.domain)):
            return Check.done(describe(found.host, found.domain))
        return Check.not_started()

    return check


# --- compensation: undo only what this task did, as its result says ---------------------------


def _undefine_if_defined(
    params: Mapping[str, Any], result: Any
) -> tuple[str, dict[str, Any]] | None:
    """A VM this task defined is undefined; one that was there before is left alone."""
    if not isinstance(result, Mapping) or result.get("defined") is not True:
        return None
    return "vm.undefine", {"name": params["name"], "host": result.get("host")}


def _destroy_if_started(
    params: Mapping[str, Any], result: Any
) -> tuple[str, dict[str, Any]] | None:
    """A VM this task started is powered off; one that already ran is left running."""
    if not isinstance(result, Mapping) or result.get("started") is not True:
        return None
    return "vm.destroy", {"name": params["name"], "host": result.get("host")}


# --- define -----------------------------------------------------------------------------------


def define(ctx: Context) -> dict[str, Any]:
    """Define a VM from domain XML or a small spec; an existing VM of that name is kept."""
    p, fleet = ctx.params, ctx.hosts
    name = p["name"]
    if p["xml"] is not None and domains.xml_name(p["xml"]) != name:
        raise errors.ActionFailed(
            f"the domain XML names vm {domains.xml_name(p['xml'])!r}, the task {name!r}"
        )
    found = fleet.find_vm(name)
    if found is not None:
        if p["host"] and found.host.name != p["host"]:
            raise errors.ActionFailed(
                f"vm {name!r} is already defined on host {found.host.name!r}, not {p['host']!r}; "
                "move it with vm.migrate"
            )
        return {**describe(found.host, found.domain), "defined": False}
    with fleet.placing():
        host = fleet.host(p["host"]) if p["host"] else fleet.place(_memory_kib(p))
        with fleet.call(host, f"defining vm {name!r}") as conn:
            xml = p["xml"] or domains.spec_xml(
                conn, name, p["memory_mib"], p["vcpus"], p["disks"], p["network"]
            )
            dom = conn.defineXML(xml)
    return {**describe(host, dom), "defined": True}


def check_define(ctx: Context) -> Check:
    found = ctx.hosts.find_vm(ctx.params["name"])
    if found is None or (ctx.params["host"] and found.host.name != ctx.params["host"]):
        return Check.not_started()  # on another host than pinned: the run fails, saying so
    return Check.done(describe(found.host, found.domain))


def _memory_kib(p: Mapping[str, Any]) -> int:
    if p["xml"] is None:
        return int(p["memory_mib"]) * 1024
    return domains.memory_kib(ET.fromstring(p["xml"]).find("memory")) or 0


# --- lifecycle --------------------------------------------------------------------------------


def start(ctx: Context) -> dict[str, Any]:
    """Start a VM (resume it if paused); a running VM is left running."""
    found = _vm(ctx)
    st = state(found.domain)
    if st == libvirt.VIR_DOMAIN_PAUSED:
        _change(found, f"resuming vm {ctx.params['name']!r}", found.domain.resume, _running)
    elif not _running(st):
        _change(found, f"starting vm {ctx.params['name']!r}", found.domain.create, _running)
    return {**describe(found.host, found.domain), "started": not _running(st)}


def destroy(ctx: Context) -> dict[str, Any]:
    """Power a VM off at once (no guest shutdown); a stopped VM is left stopped."""
    found = _vm(ctx)
    if not _stopped(state(found.domain)):
        _change(found, f"destroying vm {ctx.params['name']!r}", found.domain.destroy, _stopped)
    return describe(found.host, found.domain)


def suspend(ctx: Context) -> dict[str, Any]:
    """Pause a running VM's CPUs; a paused VM is left paused."""
    found = _vm(ctx)
    st = state(found.domain)
    if st != libvirt.VIR_DOMAIN_PAUSED:
        if not _running(st):
            raise errors.ActionFailed(
                f"vm {ctx.params['name']!r} on host {found.host.name!r} is "
                f"{domains.STATE_NAMES.get(st, st)}; only a running VM can be suspended"
            )
        _change(found, f"suspending vm {ctx.params['name']!r}", found.domain.suspend, _paused)
    return describe(found.host, found.domain)


def resume(ctx: Context) -> dict[str, Any]:
    """Resume a paused VM; a running VM is left running."""
    found = _vm(ctx)
    st = state(found.domain)
    if not _running(st):
        if st != libvirt.VIR_DOMAIN_PAUSED:
            raise errors.ActionFailed(
                f"vm {ctx.params['name']!r} on host {found.host.name!r} is "
                f"{domains.STATE_NAMES.get(st, st)}, not paused; start it with vm.start"
            )
        _change(found, f"resuming vm {ctx.params['name']!r}", found.domain.resume, _running)
    return describe(found.host, found.domain)


def shutdown(ctx: Context) -> dict[str, Any]:
    """Ask the guest to power off; after `timeout` fail, or destroy it if `force`."""
    p = ctx.params
    found = _vm(ctx)
    forced = False
    if not _stopped(state(found.domain)):
        _change(found, f"shutting down vm {p['name']!r}", found.domain.shutdown, _stopped)
        deadline = time.monotonic() + p["timeout"]
        while not _stopped(state(found.domain)):
            if time.monotonic() >= deadline:
                if not p["force"]:
                    raise errors.ActionFailed(
                        f"vm {p['name']!r} on host {found.host.name!r} did not power off within "
                        f"{p['timeout']:g}s; retry with force=true, or run vm.destroy"
                    )
                _change(found, f"destroying vm {p['name']!r}", found.domain.destroy, _stopped)
                forced = True
                break
            if ctx.stop.wait(defaults.HOST_STATE_POLL_SECONDS):
                raise errors.ActionError(
                    f"stopped while vm {p['name']!r} was shutting down; its state is re-read "
                    "on the next attempt"
                )
    return {**describe(found.host, found.domain), "forced": forced}


# --- undefine ---------------------------------------------------------------------------------


def undefine(ctx: Context) -> dict[str, Any]:
    """Remove a stopped VM's definition (and its snapshot metadata; disk images stay)."""
    p, fleet = ctx.params, ctx.hosts
    found = fleet.find_vm(p["name"], p["host"])
    if found is None:
        return {"vm": p["name"], "undefined": False}
    st = state(found.domain)
    if not _stopped(st):
        raise errors.ActionFailed(
            f"vm {p['name']!r} on host {found.host.name!r} is {domains.STATE_NAMES.get(st, st)}; "
            "stop it first (vm.shutdown or vm.destroy)"
        )
    flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    )
    try:
        found.domain.undefineFlags(flags)
    except libvirt.libvirtError as exc:
        if fleet.find_vm(p["name"], found.host.name) is not None:
            raise host_error(exc, found.host.name, f"undefining vm {p['name']!r}") from None
    return {"vm": p["name"], "host": found.host.name, "undefined": True}


def check_undefine(ctx: Context) -> Check:
    found = ctx.hosts.find_vm(ctx.params["name"], ctx.params["host"])
    return Check.not_started() if found else Check.done({"vm": ctx.params["name"]})


# --- migrate ----------------------------------------------------------------------------------


def migrate(ctx: Context) -> dict[str, Any] | HostJob:
    """Move a VM to another host: live (peer-to-peer) if it runs, else its definition.

    A live migration is a host job: it is started and handed back, and the task waits
    while the source host's libvirtd carries it out (`poll_migration`). If one this task
    started is still running (its dispatcher died), that one is followed, never a second.
    """
    p, fleet = ctx.params, ctx.hosts
    name = p["name"]
    copies = fleet.find_copies(name, None)
    left = _left_by(ctx, copies)
    if left is not None and _stamp_of(left)[2] and _migrating(left):
        return _migration_job(ctx, left, target=None, created=[])
    moved = _moved_by(ctx, copies)
    if moved is not None:
        return _finish_move(fleet, name, moved, copies)
    sources = [c for c in copies if not p["host"] or c.host.name == p["host"]]
    if len(sources) != 1:
        where = ", ".join(c.host.name for c in copies) or "no host"
        raise errors.ActionFailed(
            f"vm {name!r} must be defined on exactly one host to migrate (found on: {where})"
        )
    source = sources[0]
    with fleet.placing():
        if p["to"]:
            target = fleet.host(p["to"])
        else:
            target = fleet.place(int(source.domain.info()[1]), exclude=source.host.name)
        if target.name == source.host.name:
            return {**describe(source.host, source.domain), "from": source.host.name}
        running = not _stopped(state(source.domain))
        if running and not p["live"]:
            raise errors.ActionFailed(f"vm {name!r} is running; live=false moves only a stopped VM")
        _stamp(ctx, source, running)
        if running:
            created = _disks_to_create(fleet, source, target) if p["copy_storage"] else []
            _start_live_migration(ctx, source, target, created)
            return _migration_job(ctx, source, target.name, created)
        _offline_migrate(fleet, source, target)
    # Looked up afresh: an offline move has not undefined the source yet.
    return _finish_move(fleet, name, fleet.need_vm(name, target.name), fleet.find_copies(name))


def check_migrate(ctx: Context) -> Check:
    """After a takeover: done if this task's move finished (awaiting one still running),
    diverged if a live migration it started ended without moving the VM (aborted or failed;
    starting another is the operator's call), else not started."""
    name = ctx.params["name"]
    copies = ctx.hosts.find_copies(name, None)
    left = _left_by(ctx, copies)
    if left is not None and _stamp_of(left)[2] and _migrating(left):
        return Check.in_progress()  # the run follows it as its host job
    moved = _moved_by(ctx, copies)
    if moved is not None and len(copies) == 1:
        return Check.done({**describe(moved.host, moved.domain), "from": _stamp_of(moved)[1]})
    left = _left_by(ctx, copies)
    if moved is None and left is not None and _stamp_of(left)[2] and _running(state(left.domain)):
        return Check.diverged(_not_moved(name, left, "started before its dispatcher stopped"))
    return Check.not_started()  # not moved, or both copies left: run finishes the move


def _not_moved(name: str, left: Found, when: str) -> str:
    return (
        f"vm {name!r} still runs on host {left.host.name!r}: the live migration this task "
        f"{when} ended without moving it (aborted or failed); submit vm.migrate again to "
        "move it"
    )


# --- a live migration as a host job ----------------------------------------------------------

_calls: dict[str, threading.Thread] = {}
_errors: dict[str, libvirt.libvirtError] = {}
_calls_lock = threading.Lock()
"""The migrateToURI3 calls this process has under way, and how the ended ones failed, by
task id: libvirt's own error is the best account of a failed migration. After a restart
neither is known, and the hosts alone say what happened."""


def _migration_job(ctx: Context, source: Found, target: str | None, created: list[Any]) -> HostJob:
    return HostJob(
        source.host.name,
        "migration",
        {"vm": source.domain.name(), "target": target, "created": [list(c) for c in created]},
    )


def _start_live_migration(
    ctx: Context, source: Found, target: Host, created: list[tuple[str, str]]
) -> None:
    """Start the peer-to-peer live migration in a thread of its own: the call returns only
    when the migration ends, and the task waits meanwhile without holding a worker."""
    key = str(ctx.task_id)
    p = ctx.params

    def call() -> None:
        try:
            _live_migrate(source, target, p["copy_storage"], p["bandwidth_mib"])
        except libvirt.libvirtError as exc:
            with _calls_lock:
                _errors[key] = exc
        finally:
            with _calls_lock:
                _calls.pop(key, None)

    thread = threading.Thread(target=call, name=f"migrate-{source.domain.name()}", daemon=True)
    with _calls_lock:
        _calls[key] = thread
        _errors.pop(key, None)
    thread.start()


def poll_migration(ctx: Context, job: HostJob) -> JobStatus:
    """Running while our call runs or the source domain has an outgoing migration job;
    progress from the job's statistics."""
    with _calls_lock:
        calling = str(ctx.task_id) in _calls
    source = ctx.hosts.find_vm(job.details["vm"], job.host)
    stats = _job_stats(source) if source is not None else {}
    if calling or stats:
        keys = (
            "time_elapsed",
            "data_total",
            "data_processed",
            "data_remaining",
            "disk_total",
            "disk_processed",
            "disk_remaining",
        )
        progress = {k: stats[k] for k in keys if k in stats}
        return JobStatus(True, progress or None)
    return JobStatus.gone()


def finish_migration(ctx: Context, job: HostJob) -> dict[str, Any]:
    """The migration is over: done if the VM arrived (the source copy gone), else a failure
    saying why — libvirt's error when this process made the call, the hosts' word after a
    restart — with the disk copies it created on the target removed."""
    name = job.details["vm"]
    with _calls_lock:
        failure = _errors.pop(str(ctx.task_id), None)
    copies = ctx.hosts.find_copies(name, None)
    moved = _moved_by(ctx, copies)
    if moved is not None:
        return _finish_move(ctx.hosts, name, moved, copies)
    source = ctx.hosts.host(job.host)
    target = job.details.get("target")
    if target:
        created = [(pool, vol) for pool, vol in job.details.get("created") or []]
        _remove_copies(ctx.hosts, ctx.hosts.host(target), name, created)
    if failure is not None:
        if is_error(failure, libvirt.VIR_ERR_OPERATION_ABORTED):
            raise errors.ActionFailed(
                f"the live migration of vm {name!r} from host {source.name!r} to host "
                f"{target!r} was aborted ({_message(failure)}); the vm still runs on host "
                f"{source.name!r}",
                host=source.name,
                libvirt_code=code_name(failure),
            )
        raise host_error(failure, source.name, f"live-migrating vm {name!r} to host {target!r}")
    left = _left_by(ctx, copies)
    raise errors.ActionFailed(
        _not_moved(name, left, "started")
        if left is not None
        else f"vm {name!r} is on none of the hosts after its live migration from {source.name!r}"
    )


def abort_migration(ctx: Context, job: HostJob) -> None:
    """Ask the source host to abort the migration; the VM then stays there, running."""
    source = ctx.hosts.find_vm(job.details["vm"], job.host)
    if source is None:
        return
    try:
        source.domain.abortJob()
    except libvirt.libvirtError as exc:
        if not is_error(exc, libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
            raise host_error(exc, job.host, "aborting the migration") from None


def _job_stats(found: Found) -> dict[str, Any]:
    """The statistics of an outgoing migration job running on this copy, or {}."""
    stats: dict[str, Any] = {}
    return stats if _migrating(found, stats) else {}


def _migrating(found: Found, into: dict[str, Any] | None = None) -> bool:
    """Whether an outgoing migration job runs on this copy now (none on a domain that is
    gone or stopped, as the source is once a migration completed); its statistics go
    `into` a given dict."""
    try:
        stats = found.domain.jobStats(0)
    except libvirt.libvirtError as exc:
        # NO_SUPPORT: a driver that reports no jobs (the test driver) migrates nothing live.
        if is_error(
            exc,
            libvirt.VIR_ERR_NO_DOMAIN,
            libvirt.VIR_ERR_OPERATION_INVALID,
            libvirt.VIR_ERR_NO_SUPPORT,
        ):
            return False
        raise host_error(exc, found.host.name, "reading the migration job") from None
    running = bool(
        stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE
        and stats.get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT
    )
    if running and into is not None:
        into.update(stats)
    return running


def _live_migrate(
    source: Found, target: Host, copy_storage: bool, bandwidth_mib: int | None
) -> None:
    """Peer-to-peer live migration, to its end: the source host's libvirtd opens
    `target.uri` itself, so that URI must reach the target from the source host too. With
    `copy_storage`, every disk is copied while the VM runs; libvirt creates a disk missing
    on the target only in a storage pool there whose directory holds that path, and leaves
    it there if the migration fails (`finish_migration` deletes it then)."""
    flags = (
        libvirt.VIR_MIGRATE_LIVE
        | libvirt.VIR_MIGRATE_PEER2PEER
        | libvirt.VIR_MIGRATE_PERSIST_DEST
        | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    )
    if copy_storage:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
    params: dict[str, Any] = {}
    if bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(bandwidth_mib)
    # The whole migration runs on the source host's libvirtd, inside this call.
    source.domain.migrateToURI3(target.uri, params, flags)


def _disks_to_create(fleet: Fleet, source: Found, target: Host) -> list[tuple[str, str]]:
    """(pool, volume) of each of the VM's file disks that libvirt will create on the target
    to copy it into: those in an active storage pool's directory there with no such file."""
    name = source.domain.name()
    with fleet.call(source.host, f"reading vm {name!r}"):
        root = ET.fromstring(source.domain.XMLDesc(0))
    paths = [
        str(src.get("file"))
        for disk in root.iterfind("devices/disk[@device='disk']")
        if (src := disk.find("source")) is not None and src.get("file")
    ]
    found: list[tuple[str, str]] = []
    if not paths:
        return found
    try:
        with fleet.call(target, "reading the storage pools the migrated disks go to") as conn:
            pools = {}
            for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
                directory = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
                if directory:
                    pools[directory.rstrip("/")] = pool
            for path in paths:
                pool = pools.get(posixpath.dirname(path))
                if pool is None:
                    continue
                pool.refresh(0)  # a file made outside libvirt must not count as missing
                try:
                    pool.storageVolLookupByName(posixpath.basename(path))
                except libvirt.libvirtError as exc:
                    if not is_error(exc, libvirt.VIR_ERR_NO_STORAGE_VOL):
                        raise
                    found.append((pool.name(), posixpath.basename(path)))
    except errors.HostError as exc:
        # Only the clean-up after a failure depends on it: the migration itself goes ahead.
        log.warning("cannot tell which disks vm %s's migration creates: %s", name, exc)
        return []
    return found


def _remove_copies(fleet: Fleet, target: Host, name: str, created: list[tuple[str, str]]) -> None:
    """After a failed live migration, delete the disk copies it created on the target (a
    VM that arrived there after all keeps them); what cannot be deleted is only logged."""
    if not created:
        return
    try:
        if fleet.find_copies(name, target.name):
            return
    except errors.HostError as exc:
        log.warning("the failed migration of vm %s may have left disk copies: %s", name, exc)
        return
    for pool_name, volume in created:
        try:
            with fleet.call(target, f"deleting the copy of {volume!r}") as conn:
                pool = conn.storagePoolLookupByName(pool_name)
                pool.refresh(0)
                pool.storageVolLookupByName(volume).delete(0)
        except errors.HostError as exc:
            if exc.libvirt_code != "VIR_ERR_NO_STORAGE_VOL":
                log.warning("the failed migration of vm %s left a disk copy: %s", name, exc)


def _message(exc: libvirt.libvirtError) -> str:
    return (exc.get_error_message() or str(exc)).strip()


def _offline_migrate(fleet: Fleet, source: Found, target: Any) -> None:
    name = source.domain.name()
    count = source.domain.snapshotNum(0)
    if count:
        raise errors.ActionFailed(
            f"vm {name!r} has {count} snapshot(s), whose metadata would not move; "
            "delete them first (snapshot.delete)"
        )
    flags = libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_INACTIVE
    with fleet.call(source.host, f"reading vm {name!r}"):
        xml = source.domain.XMLDesc(flags)
    with fleet.call(target, f"defining vm {name!r} (moved from {source.host.name!r})") as conn:
        conn.defineXML(xml)


def _finish_move(fleet: Fleet, name: str, moved: Found, copies: list[Found]) -> dict[str, Any]:
    """The VM is on its target; undefine the stopped copy an offline move left behind."""
    for stale in copies:
        if stale.host.name == moved.host.name:
            continue
        if not _stopped(state(stale.domain)):
            raise errors.ActionFailed(
                f"vm {name!r} runs on host {stale.host.name!r} although it was moved to "
                f"{moved.host.name!r}; decide which copy to keep"
            )
        with fleet.call(stale.host, f"undefining the moved vm {name!r}"):
            stale.domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    return {**describe(moved.host, moved.domain), "from": _stamp_of(moved)[1]}


def _stamp(ctx: Context, source: Found, running: bool) -> None:
    """Record in the domain which task moves it from where; the copy on the target carries
    it, which is how `check` recognises its own finished move."""
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if running else 0)
    stamp = ET.Element("migration", task=str(ctx.task_id), source=source.host.name)
    if running:
        stamp.set("live", "yes")
    with ctx.hosts.call(source.host, f"marking vm {source.domain.name()!r} for migration"):
        source.domain.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            ET.tostring(stamp, encoding="unicode"),
            "taskomatic",
            MIGRATION_NS,
            flags,
        )


def _stamp_of(found: Found) -> tuple[str | None, str | None, bool]:
    """(task id, source host, whether live) of the migration stamp on a domain, or
    (None, None, False)."""
    try:
        text = found.domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, MIGRATION_NS, 0)
    except libvirt.libvirtError:
        return None, None, False
    elem = ET.fromstring(text)
    return elem.get("task"), elem.get("source"), elem.get("live") == "yes"


def _moved_by(ctx: Context, copies: list[Found]) -> Found | None:
    """The copy this task already moved to another host, if any."""
    for found in copies:
        task, source, _ = _stamp_of(found)
        if task == str(ctx.task_id) and source != found.host.name:
            return found
    return None


def _left_by(ctx: Context, copies: list[Found]) -> Found | None:
    """The copy this task marked for migration and that is still on its source host."""
    for found in copies:
        task, source, _ = _stamp_of(found)
        if task == str(ctx.task_id) and source == found.host.name:
            return found
    return None
