"""Drift: where what taskomatic's tasks last did to a VM and what its host reports disagree.

For each VM name, the last completed VM task (`vm.start`, `vm.migrate`, `vm.undefine`, …)
says where the VM should be and in what state; the inventory says where it is. A difference
the host confirmed after that task finished is drift: someone changed the VM outside
taskomatic (`virsh`), a guest powered itself off, a host lost it. A difference the inventory
has not confirmed since the task is not reported (the next sync settles it), and a VM whose
host cannot vouch for it now is reported as unknown, never as fine.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from taskomatic.inventory import UNKNOWN, HostRecord, Inventory, VmRecord
from taskomatic.model import Task

VM_ACTIONS = (
    "vm.define",
    "vm.start",
    "vm.shutdown",
    "vm.destroy",
    "vm.suspend",
    "vm.resume",
    "vm.undefine",
    "vm.migrate",
)
"""The actions whose result says where a VM is and in what state (or that it is gone)."""


@dataclass(frozen=True)
class Drift:
    """One VM on which the last task and the host disagree.

    `kind` is one of: `state` (another state than the task left), `host` (on another host),
    `missing` (the task left it defined; no host has it), `present` (the task undefined it;
    a host has it), `unknown` (its host cannot vouch for it now).
    """

    vm: str
    kind: str
    expected: Mapping[str, Any]  # {"host", "state"}, or {"defined": False}
    found: Mapping[str, Any]  # {"hosts": [...], "state": ...}
    task_id: uuid.UUID
    action: str
    finished_at: datetime
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "kind": self.kind,
            "expected": dict(self.expected),
            "found": dict(self.found),
            "task": str(self.task_id),
            "action": self.action,
            "finished_at": self.finished_at.isoformat(),
            "message": self.message,
        }


def drift(inventory: Inventory) -> list[Drift]:
    """Every VM on which the last completed VM task and the inventory disagree, by name."""
    queue = inventory.queue
    tasks = queue._read(lambda conn: queue.store.last_vm_tasks(conn, VM_ACTIONS))
    by_name: dict[str, list[VmRecord]] = {}
    for vm in inventory.vms():
        by_name.setdefault(vm.name, []).append(vm)
    hosts = {h.host: h for h in inventory.hosts()}
    now = queue.now()
    found = (_compare(t, by_name.get(str(t.params.get("name")), []), hosts, now) for t in tasks)
    return sorted((d for d in found if d is not None), key=lambda d: d.vm)


def _compare(
    task: Task, copies: list[VmRecord], records: Mapping[str, HostRecord], now: datetime
) -> Drift | None:
    """The drift of one VM from what `task` (its last) left, or None if there is none."""
    name = str(task.params.get("name"))
    result = task.result if isinstance(task.result, Mapping) else {}
    finished = task.finished_at
    assert finished is not None
    if any(c.state != UNKNOWN and c.confirmed_at < finished for c in copies):
        return None  # the inventory has not caught up with the task yet: its next sync will
    hosts = sorted(c.host for c in copies)
    states = {c.state for c in copies}
    found: dict[str, Any] = {"hosts": hosts, "state": ", ".join(sorted(states)) or None}

    def drifted(kind: str, expected: Mapping[str, Any], message: str) -> Drift:
        assert task.finished_at is not None
        return Drift(name, kind, expected, found, task.id, task.action, task.finished_at, message)

    if task.action == "vm.undefine":
        known = [c for c in copies if c.state != UNKNOWN]
        if not known:
            return None
        return drifted(
            "present",
            {"defined": False},
            f"{task.action} removed vm {name!r}, but host(s) {', '.join(hosts)} report it "
            f"({found['state']})",
        )
    expected = {"host": result.get("host"), "state": result.get("state")}
    mine = [c for c in copies if c.host == expected["host"]]
    if any(c.state == UNKNOWN for c in mine):
        since = max(c.since for c in mine).isoformat()
        return drifted(
            "unknown", expected, f"vm {name!r} is unknown since {since}: {mine[0].reason}"
        )
    if not copies:
        record = records.get(str(expected["host"]))
        if record is None or record.synced_at is None or record.synced_at < finished:
            return None
        if not record.vouches(now):
            return drifted(
                "unknown", expected, f"vm {name!r}: host {record.host!r} cannot vouch for it now"
            )
        return drifted(
            "missing",
            expected,
            f"{task.action} left vm {name!r} on host {expected['host']!r}; no host reports it",
        )
    if not mine or len(copies) > 1:
        return drifted(
            "host",
            expected,
            f"{task.action} left vm {name!r} on host {expected['host']!r}; it is on "
            f"{', '.join(hosts)}",
        )
    if expected["state"] is not None and mine[0].state != expected["state"]:
        return drifted(
            "state",
            expected,
            f"{task.action} left vm {name!r} {expected['state']}; host {mine[0].host!r} "
            f"reports it {mine[0].state} ({mine[0].reason or 'no reason given'}) since "
            f"{mine[0].since.isoformat()}",
        )
    return None
