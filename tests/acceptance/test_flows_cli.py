"""The multi-step commands as a user runs them: `vm create` (and its undoing on failure),
`show` and `why` of a group, with a `taskomatic dispatcher` driving two hosts served by
libvirt's test driver (docs/examples/fleet). The live snapshot removal runs on real QEMU
in tests/integration/test_live_merge.py."""

from __future__ import annotations

from pathlib import Path

from acceptance.cli import Cli

FLEET = Path(__file__).resolve().parents[2] / "docs" / "examples" / "fleet"
DISPATCH = ("dispatcher", "--workers", "4", "--poll", "0.2", "--grace", "1")


def _hosts(cli: Cli) -> None:
    cli.ok("hosts", "add", "kvm1", f"test://{FLEET}/kvm1.xml")
    cli.ok("hosts", "add", "kvm2", f"test://{FLEET}/kvm2.xml")


def test_vm_create_runs_its_steps_and_shows_them_as_a_tree(sqlite_cli: Cli) -> None:
    _hosts(sqlite_cli)
    create = ("vm", "create", "web2", "--host", "kvm1", "--pool", "images", "--disk-mib", "8")
    with sqlite_cli.background(*DISPATCH):
        done = sqlite_cli.ok(*create, "--wait")
        group = sqlite_cli.json("--json", "list", "--action", "vm.start")["tasks"][0]["group"]
        shown = sqlite_cli.json("--json", "show", group)
    title, disk, define, start = done.lines[:4]
    assert title.startswith("group ") and title.endswith("(create vm web2 on kvm1): complete")
    assert disk.startswith("└─ complete  volume.create")
    assert define.strip().startswith("└─ complete  vm.define")
    assert start.strip().startswith("└─ complete  vm.start")
    assert {
        t["action"]: t["result"]["started"]
        for t in shown["tasks"]
        if "started" in (t["result"] or {})
    } == {"vm.start": True}


def test_a_failed_vm_create_undoes_its_disk_and_says_why(sqlite_cli: Cli) -> None:
    """cache1 exists on kvm2: defining it on kvm1 fails, the new disk is deleted again, the
    command exits 1; `show` draws the undo, `why` names the failure and the compensation."""
    _hosts(sqlite_cli)
    create = ("vm", "create", "cache1", "--host", "kvm1", "--pool", "images", "--disk-mib", "8")
    with sqlite_cli.background(*DISPATCH):
        failed = sqlite_cli.run(*create, "--wait")
        group = sqlite_cli.json("--json", "list", "--action", "vm.define")["tasks"][0]["group"]
    assert failed.code == 1, str(failed)
    assert failed.lines[0].endswith("(create vm cache1 on kvm1): compensated")
    assert any("failed    vm.define" in line and "already defined on host 'kvm2'" in line
               for line in failed.lines)  # fmt: skip
    assert "compensation (runs in this order):" in failed.lines
    [undo] = [line for line in failed.lines if "volume.delete" in line]
    assert undo.strip().startswith("complete  volume.delete") and "undoes volume.create" in undo
    why = sqlite_cli.ok("why", group).lines[0]
    assert why.startswith("compensated; task ") and "(vm.define) failed: vm 'cache1'" in why
    assert why.endswith("1 of 1 compensation task(s) done")
    shown = sqlite_cli.json("--json", "show", group)
    assert shown["group"]["state"] == "compensated"
    assert shown["group"]["compensation"] == {"complete": 1}
