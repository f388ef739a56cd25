"""The real-QEMU tier: VM, snapshot and storage tasks run by a dispatcher against real QEMU.

Each test submits tasks to a queue (SQLite) whose host `qemu` is libvirt's embedded QEMU
driver (tests/qemu.py), then reads what happened from libvirt and from the disk images, never
from taskomatic alone. The VMs boot no OS: they are real QEMU processes with tiny qcow2 disks.
Storage pools are on host `storage`, a private libvirtd, in real directories.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import libvirt
import pytest

from taskomatic import Queue, State

# tests/qemu.py holds the fixtures; loaded as a plugin, its asserts are rewritten only if
# registered before the import below.
pytest.register_assert_rewrite("qemu")
pytest_plugins = ["qemu"]

from qemu import (  # noqa: E402
    QEMU_HOST,
    STORAGE_HOST,
    QemuLab,
    StorageDaemon,
    domain_xml,
    image_info,
    make_disk,
)

QCOW2_MAGIC = b"QFI\xfb"


def vm_spec(name: str, disk: Path) -> dict[str, Any]:
    """vm.define parameters for a small VM: 64 MiB, one vCPU, one qcow2 disk."""
    return {"name": name, "memory_mib": 64, "vcpus": 1, "disks": [{"path": str(disk)}]}


def define(lab: QemuLab, queue: Queue, name: str, tmp_path: Path) -> tuple[libvirt.virDomain, Path]:
    """Define VM `name` with a new disk in `tmp_path`: the domain and the disk's path."""
    disk = make_disk(tmp_path / f"{name}.qcow2")
    lab.ok(queue, "vm.define", vm_spec(name, disk))
    return lab.conn.lookupByName(name), disk


def state(dom: libvirt.virDomain) -> tuple[int, int]:
    """(state, reason) as libvirt reports them now."""
    st, reason = dom.state()
    return int(st), int(reason)


def disk_source(dom: libvirt.virDomain) -> tuple[str | None, str | None]:
    """The live domain's first disk: (its file, the file of its backing image, if any)."""
    disk = domain_xml(dom).find("devices/disk")
    assert disk is not None
    source = disk.find("source")
    backing = disk.find("backingStore/source")
    return (
        source.get("file") if source is not None else None,
        backing.get("file") if backing is not None else None,
    )


def test_define_places_a_spec_on_the_qemu_host_with_the_guest_type_it_offers(
    qemu_lab: QemuLab, qemu_queue: Queue, tmp_path: Path
) -> None:
    disk = make_disk(tmp_path / "web.qcow2")

    result = qemu_lab.ok(qemu_queue, "vm.define", vm_spec("web", disk))

    assert result["host"] == QEMU_HOST  # placed: the task named no host
    assert (result["vm"], result["state"], result["defined"]) == ("web", "shutoff", True)
    dom = qemu_lab.conn.lookupByName("web")
    assert dom.UUIDString() == result["uuid"]
    assert not dom.isActive() and dom.isPersistent()
    xml = domain_xml(dom, libvirt.VIR_DOMAIN_XML_INACTIVE)
    # KVM where /dev/kvm is usable, else TCG: chosen from the host's capabilities.
    assert xml.get("type") == qemu_lab.domain_type
    memory = xml.find("memory")
    assert memory is not None and (memory.text, memory.get("unit")) == ("65536", "KiB")
    assert xml.findtext("vcpu") == "1"
    os_type = xml.find("os/type")
    assert os_type is not None and (os_type.text, os_type.get("arch")) == ("hvm", "x86_64")
    assert xml.find("features/acpi") is not None  # so a guest OS can honour vm.shutdown
    assert (xml.findtext("devices/emulator") or "").endswith("qemu-system-x86_64")
    disks = xml.findall("devices/disk")
    assert [d.get("device") for d in disks] == ["disk"]
    assert [d.get("file") for d in disks[0].iter("source")] == [str(disk)]
    assert [d.get("type") for d in disks[0].iter("driver")] == ["qcow2"]
    assert [(t.get("dev"), t.get("bus")) for t in disks[0].iter("target")] == [("vda", "virtio")]

    again = qemu_lab.ok(qemu_queue, "vm.define", vm_spec("web", disk))

    assert (again["defined"], again["uuid"]) == (False, result["uuid"])  # kept, not redefined


def test_lifecycle_start_suspend_resume_shutdown_destroy_undefine(
    qemu_lab: QemuLab, qemu_queue: Queue, tmp_path: Path
) -> None:
    lab, queue = qemu_lab, qemu_queue
    dom, disk = define(lab, queue, "life", tmp_path)

    assert lab.ok(queue, "vm.start", {"name": "life"})["state"] == "running"
    assert state(dom)[0] == libvirt.VIR_DOMAIN_RUNNING
    pid = lab.qemu_pid("life")
    assert pid is not None, "no QEMU process runs the VM"

    again = lab.run_one(queue, "vm.start", {"name": "life"})  # already running: nothing to do
    assert (again.state, again.attempt, again.result["state"]) == (State.COMPLETE, 1, "running")
    assert lab.qemu_pid("life") == pid  # the same QEMU, not a restarted one

    assert lab.ok(queue, "vm.suspend", {"name": "life"})["state"] == "paused"
    assert state(dom)[0] == libvirt.VIR_DOMAIN_PAUSED
    assert lab.ok(queue, "vm.resume", {"name": "life"})["state"] == "running"
    assert state(dom)[0] == libvirt.VIR_DOMAIN_RUNNING

    # No guest OS answers the ACPI request: without force the task fails, the VM keeps running.
    refused = lab.run_one(queue, "vm.shutdown", {"name": "life", "timeout": 0.5})
    assert (refused.state, refused.attempt) == (State.FAILED, 1)
    assert refused.error is not None and refused.error["type"] == "ActionFailed"
    assert "did not power off within 0.5s" in refused.error["message"]
    assert state(dom)[0] == libvirt.VIR_DOMAIN_RUNNING and lab.qemu_pid("life") == pid

    forced = lab.ok(queue, "vm.shutdown", {"name": "life", "timeout": 0.5, "force": True})
    assert (forced["forced"], forced["state"]) == (True, "shutoff")
    assert state(dom) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)
    assert lab.qemu_pid("life") is None

    lab.ok(queue, "vm.start", {"name": "life"})
    assert lab.qemu_pid("life") not in (None, pid)
    assert lab.ok(queue, "vm.destroy", {"name": "life"})["state"] == "shutoff"
    assert state(dom) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)
    assert lab.qemu_pid("life") is None

    assert lab.ok(queue, "vm.undefine", {"name": "life"}) == {
        "vm": "life",
        "host": QEMU_HOST,
        "undefined": True,
    }
    with pytest.raises(libvirt.libvirtError) as gone:
        lab.conn.lookupByName("life")
    assert gone.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    assert disk.exists()  # undefine keeps the disk images


def test_disk_only_snapshot_of_a_running_vm_puts_an_overlay_over_its_disk(
    qemu_lab: QemuLab, qemu_queue: Queue, tmp_path: Path
) -> None:
    lab, queue = qemu_lab, qemu_queue
    dom, base = define(lab, queue, "snappy", tmp_path)
    lab.ok(queue, "vm.start", {"name": "snappy"})

    result = lab.ok(
        queue, "snapshot.create", {"vm": "snappy", "name": "before-upgrade", "disk_only": True}
    )

    assert result["snapshot"] == "before-upgrade"
    assert (result["state"], result["disks"]) == ("disk-snapshot", {"vda": "external"})
    assert state(dom)[0] == libvirt.VIR_DOMAIN_RUNNING  # the VM never stopped
    top, backing = disk_source(dom)
    assert top is not None and top != str(base)
    assert backing == str(base)  # the chain: overlay -> the original image
    overlay = Path(top)
    assert overlay.parent == tmp_path and overlay.read_bytes()[:4] == QCOW2_MAGIC
    info = image_info(overlay)
    assert (info["format"], info["backing-filename"]) == ("qcow2", str(base))
    assert [s.getName() for s in dom.listAllSnapshots(0)] == ["before-upgrade"]


def test_internal_snapshot_of_a_stopped_vm_is_written_into_its_qcow2(
    qemu_lab: QemuLab, qemu_queue: Queue, tmp_path: Path
) -> None:
    lab, queue = qemu_lab, qemu_queue
    dom, disk = define(lab, queue, "frozen", tmp_path)

    result = lab.ok(queue, "snapshot.create", {"vm": "frozen", "name": "clean"})

    assert (result["state"], result["disks"]) == ("shutoff", {"vda": "internal"})
    assert not dom.isActive()
    assert [s["name"] for s in image_info(disk).get("snapshots", [])] == ["clean"]
    assert disk_source(dom) == (str(disk), None)  # no overlay: the snapshot is inside the image

    deleted = lab.ok(queue, "snapshot.delete", {"vm": "frozen", "name": "clean"})

    assert deleted["deleted"] is True
    assert image_info(disk).get("snapshots", []) == []
    assert dom.listAllSnapshots(0) == []


def test_qemu_rejecting_the_domain_xml_fails_the_task_for_good(
    qemu_lab: QemuLab, qemu_queue: Queue
) -> None:
    xml = (
        f"<domain type='{qemu_lab.domain_type}'><name>bad</name><memory>lots</memory>"
        "<os><type>hvm</type></os></domain>"
    )

    task = qemu_lab.run_one(qemu_queue, "vm.define", {"name": "bad", "xml": xml})

    assert task.state == State.FAILED
    assert task.attempt == 1 and task.max_attempts > 1  # permanent: not retried
    assert task.error is not None
    assert task.error["type"] == "HostError"
    assert task.error["host"] == QEMU_HOST
    assert str(task.error["libvirt_code"]).startswith("VIR_ERR_XML_")
    assert "'lots'" in task.error["message"] and "defining vm 'bad'" in task.error["message"]
    with pytest.raises(libvirt.libvirtError):
        qemu_lab.conn.lookupByName("bad")


def test_storage_pool_and_volume_on_a_real_directory(
    qemu_lab: QemuLab, qemu_queue: Queue, storage_host: StorageDaemon
) -> None:
    lab, queue = qemu_lab, qemu_queue
    name = f"pool-{uuid.uuid4().hex[:8]}"
    directory = storage_host.pools / name
    pool = {"host": STORAGE_HOST, "name": name}
    volume = {"host": STORAGE_HOST, "pool": name, "name": "data.qcow2"}

    defined = lab.ok(queue, "pool.define", {**pool, "type": "dir", "path": str(directory)})
    assert defined["state"] == "inactive" and not directory.exists()

    lab.ok(queue, "pool.build", pool)
    assert directory.is_dir()
    assert lab.ok(queue, "pool.start", pool)["state"] == "running"
    assert lab.storage_conn().storagePoolLookupByName(name).isActive()

    created = lab.ok(queue, "volume.create", {**volume, "capacity_mib": 16, "format": "qcow2"})
    path = directory / "data.qcow2"
    assert created["path"] == str(path)
    assert created["capacity"] == 16 * 1024 * 1024
    assert path.read_bytes()[:4] == QCOW2_MAGIC
    assert image_info(path)["virtual-size"] == 16 * 1024 * 1024

    assert lab.ok(queue, "volume.delete", volume)["deleted"] is True
    assert not path.exists()

    assert lab.ok(queue, "pool.stop", pool)["state"] == "inactive"
    assert directory.is_dir()  # stopping keeps the storage
    assert lab.ok(queue, "pool.delete", {**pool, "delete_storage": True})["deleted"] is True
    assert not directory.exists()
    with pytest.raises(libvirt.libvirtError) as gone:
        lab.storage_conn().storagePoolLookupByName(name)
    assert gone.value.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL
