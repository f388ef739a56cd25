"""Reading domains: state names, the result every VM action returns, domain XML from a spec."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

import libvirt

from taskomatic import errors
from taskomatic.model import Host

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}

ACTIVE = frozenset(
    {
        libvirt.VIR_DOMAIN_RUNNING,
        libvirt.VIR_DOMAIN_BLOCKED,
        libvirt.VIR_DOMAIN_PAUSED,
        libvirt.VIR_DOMAIN_SHUTDOWN,
        libvirt.VIR_DOMAIN_PMSUSPENDED,
    }
)
"""States in which a domain has a running process (it must be stopped before some changes)."""

RUNNING = frozenset({libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED})


def state(dom: libvirt.virDomain) -> int:
    """The domain's current state (a VIR_DOMAIN_* constant)."""
    return int(dom.state()[0])


def describe(host: Host, dom: libvirt.virDomain) -> dict[str, Any]:
    """What a VM action returns: where the VM is and what state it is in now."""
    return {
        "vm": dom.name(),
        "host": host.name,
        "uuid": dom.UUIDString(),
        "state": STATE_NAMES.get(state(dom), str(state(dom))),
    }


_KIB_PER_UNIT = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "kb": 1000 / 1024}
_KIB_PER_UNIT |= {"m": 1024, "mib": 1024, "mb": 1000**2 / 1024, "g": 1024**2, "gib": 1024**2}
_KIB_PER_UNIT |= {"gb": 1000**3 / 1024, "t": 1024**3, "tib": 1024**3, "tb": 1000**4 / 1024}


def memory_kib(elem: ET.Element | None) -> int | None:
    """KiB in a domain XML's <memory> or <currentMemory> (any of libvirt's units); None if
    the element is missing or holds no number."""
    if elem is None or not (elem.text or "").strip().isdigit():
        return None
    return int(
        int((elem.text or "").strip()) * _KIB_PER_UNIT.get(elem.get("unit", "KiB").lower(), 1)
    )


def xml_name(xml: str) -> str:
    """The <name> of a domain XML document; ActionFailed if it has none or is not XML."""
    try:
        name = ET.fromstring(xml).findtext("name")
    except ET.ParseError as exc:
        raise errors.ActionFailed(f"the domain XML is not well-formed: {exc}") from None
    if not name:
        raise errors.ActionFailed("the domain XML has no <name>")
    return name.strip()


def guest_type(conn: libvirt.virConnect) -> tuple[str, str]:
    """(domain type, arch) to define a plain hvm guest on this host: kvm where the host
    offers it, else qemu (TCG), else whatever the driver has (the test driver's `test`)."""
    caps = ET.fromstring(conn.getCapabilities())
    choices: list[tuple[int, str, str]] = []
    preference = {"kvm": 0, "qemu": 1}
    for guest in caps.findall("guest"):
        if guest.findtext("os_type") != "hvm":
            continue
        for arch in guest.findall("arch"):
            arch_name = arch.get("name", "")
            for domain in arch.findall("domain"):
                kind = domain.get("type", "")
                rank = preference.get(kind, 2) * 2 + (arch_name != "x86_64")
                choices.append((rank, kind, arch_name))
    if not choices:
        raise errors.ActionFailed("the host offers no hvm guests; give the VM as domain XML")
    _, kind, arch_name = min(choices)
    return kind, arch_name


def spec_xml(
    conn: libvirt.virConnect,
    name: str,
    memory_mib: int,
    vcpus: int,
    disks: Sequence[Mapping[str, Any]],
    network: str | None,
) -> str:
    """Domain XML for a small spec: memory, vCPUs, disks (file paths or pool volumes), one
    NIC on a libvirt network. Values are escaped by ElementTree, never pasted into text."""
    kind, arch = guest_type(conn)
    dom = ET.Element("domain", type=kind)
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = str(vcpus)
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch=arch).text = "hvm"
    if arch in ("x86_64", "i686"):
        # Without it QEMU runs with -no-acpi: no guest could honour vm.shutdown's power button.
        ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    devices = ET.SubElement(dom, "devices")
    for index, disk in enumerate(disks):
        devices.append(_disk(disk, index))
    if network:
        nic = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(nic, "source", network=network)
        ET.SubElement(nic, "model", type="virtio")
    return ET.tostring(dom, encoding="unicode")


def _disk(disk: Mapping[str, Any], index: int) -> ET.Element:
    target = disk.get("target") or f"vd{chr(ord('a') + index)}"
    fmt = disk.get("format", "qcow2")
    if "path" in disk:
        elem = ET.Element("disk", type="file", device="disk")
        source: dict[str, str] = {"file": str(disk["path"])}
    elif "pool" in disk and "volume" in disk:
        elem = ET.Element("disk", type="volume", device="disk")
        source = {"pool": str(disk["pool"]), "volume": str(disk["volume"])}
    else:
        raise errors.ActionFailed(
            f"disk {index}: give either 'path' or both 'pool' and 'volume', got {dict(disk)!r}"
        )
    ET.SubElement(elem, "driver", name="qemu", type=str(fmt))
    ET.SubElement(elem, "source", source)
    ET.SubElement(elem, "target", dev=str(target), bus="virtio")
    return elem
