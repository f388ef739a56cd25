"""Acceptance tests of the inventory's commands, as a user runs them: `vms`, `pools`,
`hosts show`, `drift` and `hosts clear`, with a `taskomatic dispatcher` keeping the inventory
of two hosts served by libvirt's test driver (docs/examples/fleet). SQLite only: the
inventory's SQL runs on both backends in tests/integration/test_inventory_store.py.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from acceptance.cli import Cli
from helpers import claim, complete, open_queue, wait_until

from taskomatic.inventory import Inventory

FLEET = Path(__file__).resolve().parents[2] / "docs" / "examples" / "fleet"
INTERVAL = 0.5
"""The dispatcher's inventory sync interval in these tests (seconds)."""

DISPATCH = ("dispatcher", "--workers", "4", "--poll", "0.2", "--grace", "1")
DISPATCH += ("--inventory-interval", str(INTERVAL))
CLEAR = ("hosts", "clear", "kvm1", "--destroy", "--i-understand-this-destroys-data")
FLEET_VMS = {("kvm1", "db1"), ("kvm1", "old-ci"), ("kvm1", "web1"), ("kvm2", "cache1")}


def _vms(url: str) -> set[tuple[str, str, str]]:
    """(host, name, state) of every VM in the inventory, read as the Python API reads it."""
    with open_queue(url) as queue:
        return {(v.host, v.name, v.state) for v in Inventory(queue).vms()}


def _rows(lines: list[str], width: int) -> list[list[str]]:
    """The first `width` columns of each row of a table (its header line skipped)."""
    return [line.split()[:width] for line in lines[1:]]


def test_the_inventory_commands_show_what_a_dispatcher_keeps(sqlite_cli: Cli) -> None:
    """Before any dispatcher ran there is no inventory, and nothing can be cleared; with one
    running, `vms`, `pools`, `hosts show` (tables and --json) show the fleet's node files,
    filtered by host and state, and there is no drift."""
    url = str(sqlite_cli.url)
    sqlite_cli.ok("hosts", "add", "kvm1", f"test://{FLEET}/kvm1.xml")
    sqlite_cli.ok("hosts", "add", "kvm2", f"test://{FLEET}/kvm2.xml")
    empty, unseen, early = sqlite_cli.run_all(["vms"], ["hosts", "show", "kvm1"], CLEAR)
    assert empty.lines == ["no vms"]
    assert unseen.lines[1] == "inventory:   none yet (a running dispatcher syncs every host)"
    early.error(4, "host 'kvm1' has no inventory yet")

    with sqlite_cli.background(*DISPATCH):
        wait_until(lambda: {(h, n) for h, n, _ in _vms(url)} == FLEET_VMS, 20, "the inventory")
        table, running, pools, kvm2_pools, shown, shown_json, drift = sqlite_cli.run_all(
            ["vms"],
            ["--json", "vms", "--host", "kvm1", "--state", "running"],
            ["pools"],
            ["--json", "pools", "--host", "kvm2"],
            ["hosts", "show", "kvm1"],
            ["--json", "hosts", "show", "kvm2"],
            ["drift"],
        )
    assert table.lines[0].split() == [
        *("HOST", "NAME", "STATE", "SINCE", "VCPUS", "MEMORY", "CONFIRMED"),
    ]
    assert _rows(table.lines, 3) == [
        ["kvm1", "db1", "running"],
        ["kvm1", "old-ci", "shutoff"],
        ["kvm1", "web1", "running"],
        ["kvm2", "cache1", "running"],
    ]
    assert [(v["name"], v["vcpus"], v["memory_kib"]) for v in running.json()] == [
        ("db1", 2, 2048 * 1024),
        ("web1", 2, 1024 * 1024),
    ]
    assert running.json()[0]["disks"] == [
        {
            "target": "vda",
            "source": "/var/lib/libvirt/images/db1.qcow2",
            "format": "qcow2",
            "backing": [],
        }
    ]
    assert _rows(pools.lines, 3) == [["kvm1", "images", "running"], ["kvm2", "images", "running"]]
    [images] = kvm2_pools.json()
    assert [v["name"] for v in images["volumes"]] == ["cache1.qcow2"]
    assert shown.lines[1].startswith("inventory:   reachable since ")
    assert "cpus:        16" in shown.lines
    assert "vms (3):" in shown.lines and "pools (1):" in shown.lines
    data = shown_json.json()
    assert (data["host"]["name"], data["inventory"]["status"]) == ("kvm2", "reachable")
    assert [v["name"] for v in data["vms"]] == ["cache1"]
    assert (drift.code, drift.lines) == (
        0,
        ["no drift: every VM is where and as its last task left it"],
    )


def test_clearing_a_host_by_destroying_and_the_drift_a_restart_reveals(sqlite_cli: Cli) -> None:
    """`hosts clear --destroy` is refused without its confirmation; with it, one group empties
    kvm1 and `show` reports each object. The test driver forgets all that when its process
    restarts (it re-reads the node file), and `drift` says so; a task result that disagrees
    with kvm2 is drift too. Once no dispatcher keeps the inventory, VMs read unknown and a
    clear is refused."""
    url = str(sqlite_cli.url)
    sqlite_cli.ok("hosts", "add", "kvm1", f"test://{FLEET}/kvm1.xml")
    sqlite_cli.ok("hosts", "add", "kvm2", f"test://{FLEET}/kvm2.xml")
    with sqlite_cli.background(*DISPATCH):
        wait_until(lambda: len(_vms(url)) == 4, 20, "the inventory")
        how, unconfirmed, unknown_host, bad_state, no_host, no_pools = sqlite_cli.run_all(
            CLEAR[:3],
            CLEAR[:4],
            ["hosts", "clear", "nope", *CLEAR[3:]],
            ["vms", "--state", "asleep"],
            ["vms", "--host", "nope"],
            ["pools", "--host", "nope"],
        )
        how.error(2, "say how to clear host 'kvm1': --migrate (moves its VMs to other hosts)")
        unconfirmed.error(2, "add --i-understand-this-destroys-data")
        unknown_host.error(3, "no host named 'nope'")
        bad_state.error(2, "'asleep' is not one of")
        no_host.error(3, "no host named 'nope'")
        no_pools.error(3, "no host named 'nope'")

        cleared = sqlite_cli.json(*CLEAR, "--wait")
        assert cleared["group"]["state"] == "complete"
        assert [(t["action"], t["params"]["name"], t["state"]) for t in cleared["tasks"]] == [
            ("host.maintenance", "kvm1", "complete"),
            *(
                (action, vm, "complete")
                for vm in ("db1", "old-ci", "web1")
                for action in ("vm.destroy", "vm.undefine")
            ),
            ("pool.stop", "images", "complete"),
            ("pool.delete", "images", "complete"),
            ("host.verify_empty", "kvm1", "complete"),
        ]
        shown = sqlite_cli.ok("show", cleared["group"]["id"])
        assert shown.lines[0].endswith(
            "(clear host kvm1 by destroying 3 vm(s) and 1 pool(s)): complete"
        )
        assert sum('"undefined": true' in line for line in shown.lines) == 3
        wait_until(lambda: {h for h, _, _ in _vms(url)} == {"kvm2"}, 10, "kvm1 emptied")
        assert sqlite_cli.ok("pools", "--host", "kvm1").lines == ["no pools"]

    with open_queue(url) as queue:  # a task that says cache1 was left shut off
        owner = uuid.uuid4()
        queue.submit("vm.destroy", {"name": "cache1", "host": "kvm2"})
        (task,) = claim(queue, owner)
        complete(queue, owner, task, {"vm": "cache1", "host": "kvm2", "state": "shutoff"})
    with sqlite_cli.background(*DISPATCH):  # a new process: the test driver re-reads its files
        wait_until(lambda: len(_vms(url)) == 4, 20, "kvm1's vms back")
        drift, as_json = sqlite_cli.run_all(["drift"], ["--json", "drift"])
    assert drift.code == as_json.code == 1, f"{drift}\n{as_json}"
    found = as_json.json()
    assert {(d["vm"], d["kind"]) for d in found} == {
        ("cache1", "state"),
        ("db1", "present"),
        ("old-ci", "present"),
        ("web1", "present"),
    }
    assert any(
        line.startswith("cache1") and "left vm 'cache1' shutoff" in line for line in drift.lines
    )

    time.sleep(3 * INTERVAL + 0.5)  # no dispatcher now: the inventory runs out
    stale, refused = sqlite_cli.run_all(["--json", "vms", "--host", "kvm2"], CLEAR)
    [cache1] = stale.json()
    assert (cache1["state"], cache1["last_state"]) == ("unknown", "running")
    refused.error(4, "no dispatcher keeps it now")


def test_clearing_a_host_by_migrating_reports_each_vm(sqlite_cli: Cli) -> None:
    """`hosts clear kvm1 --migrate --wait`: the stopped VM moves to kvm2; the running ones
    cannot (the test driver has no live migration), so the command exits 1 and each failed
    move says why, in libvirt's words."""
    url = str(sqlite_cli.url)
    sqlite_cli.ok("hosts", "add", "kvm1", f"test://{FLEET}/kvm1.xml")
    sqlite_cli.ok("hosts", "add", "kvm2", f"test://{FLEET}/kvm2.xml")
    with sqlite_cli.background(*DISPATCH):
        wait_until(lambda: len(_vms(url)) == 4, 20, "the inventory")
        cleared = sqlite_cli.run("--json", "hosts", "clear", "kvm1", "--migrate", "--wait")
    assert cleared.code == 1, str(cleared)
    tasks = {(t["action"], t["params"]["name"]): t for t in cleared.json()["tasks"]}
    assert tasks["vm.migrate", "old-ci"]["result"]["host"] == "kvm2"
    for running in ("db1", "web1"):
        assert tasks["vm.migrate", running]["state"] == "failed"
        assert tasks["vm.migrate", running]["error"]["libvirt_code"] == (
            "VIR_ERR_ARGUMENT_UNSUPPORTED"
        )
    assert tasks["host.verify_empty", "kvm1"]["state"] == "cancelled"
    assert cleared.json()["group"]["name"] == "clear host kvm1 by migrating its vms"
    [evacuate] = [t for t in cleared.json()["tasks"] if t["action"] == "host.evacuate"]
    assert evacuate["result"]["vms"] == ["db1", "old-ci", "web1"]
