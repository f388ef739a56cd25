"""Where and when libvirt actions run: host selection at run time (maintenance, capacity,
memory), resource locks, unreachable hosts, and a VM's life across dispatcher restarts.

Against real libvirt (the test driver's node files, tests/virt.py), on SQLite.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import Gate, running_dispatcher, wait_until
from virt import POOL, HostSpec, Lab, vm

from taskomatic import Context, State, TaskSpec, defaults
from taskomatic.model import HostState

H1, H2 = "h1", "h2"


def _error(task: Any) -> dict[str, Any]:
    assert task.error is not None, f"task {task.id} ({task.state}) has no error"
    return dict(task.error)


# --- host selection -----------------------------------------------------------------------------


def test_an_unpinned_task_chooses_its_host_when_it_runs_never_one_in_maintenance(
    make_lab: Any,
) -> None:
    """The host is chosen when the task runs, not when it is submitted: a host put into
    maintenance in between is never chosen, while its own VMs can still be moved off it;
    once activated it takes work again."""
    lab: Lab = make_lab(HostSpec(H1), HostSpec(H2, memory_mib=32768))
    first = lab.run("vm.define", {"name": "v1"})
    assert first.result is not None and first.result["host"] == H2, "h2 has the most room"

    queued = lab.submit("vm.define", {"name": "v2"})
    lab.queue.hosts.set_state(H2, HostState.MAINTENANCE)
    lab.drain()
    placed = lab.queue.get(queued.id)
    assert placed.state is State.COMPLETE, placed.error
    assert lab.where("v2") == [H1]

    evacuated = lab.run("vm.migrate", {"name": vm(H2, "off")})
    assert evacuated.state is State.COMPLETE, evacuated.error
    assert lab.where(vm(H2, "off")) == [H1]
    stuck = lab.run("vm.migrate", {"name": "v2"}, max_attempts=1)
    assert _error(stuck)["type"] == "NoHostAvailable"
    assert "in maintenance: h2" in _error(stuck)["message"]
    assert lab.where("v2") == [H1]

    lab.queue.hosts.set_state(H2, HostState.ACTIVE)
    moved = lab.run("vm.migrate", {"name": "v2"})
    assert moved.state is State.COMPLETE, moved.error
    assert lab.where("v2") == [H2]


def test_placement_never_exceeds_a_hosts_capacity_even_for_defines_running_together(
    make_lab: Any,
) -> None:
    """Each host has room for one more VM; three defines run at once on four workers: one
    lands on each host, and the third fails saying both are full."""
    lab: Lab = make_lab(HostSpec(H1, capacity=5), HostSpec(H2, memory_mib=32768, capacity=5))
    tasks = lab.run_all(
        [TaskSpec("vm.define", {"name": f"v{i}"}, max_attempts=1) for i in range(3)]
    )

    placed = sorted(t.result["host"] for t in tasks if t.state is State.COMPLETE and t.result)
    assert placed == [H1, H2]
    (refused,) = [t for t in tasks if t.state is State.FAILED]
    assert _error(refused)["type"] == "NoHostAvailable"
    assert "h1: full (5 of 5 VMs)" in _error(refused)["message"]
    assert "h2: full (5 of 5 VMs)" in _error(refused)["message"]
    for host in (H1, H2):
        assert len(lab.conn(host).listAllDomains(0)) == 5


@pytest.mark.parametrize(
    ("memory_mib", "maintenance", "says"),
    [
        (512, [H1, H2], "no active host can take the vm: in maintenance: h1, h2"),
        (10**6, [H2], "h1: 15616 MiB free, 1000000 needed; in maintenance: h2"),
    ],
    ids=["all_in_maintenance", "too_big_for_the_active_host"],
)
def test_with_nowhere_to_place_a_vm_the_task_fails_saying_why(
    lab: Lab, memory_mib: int, maintenance: list[str], says: str
) -> None:
    """No active host with room: the task fails with NoHostAvailable, giving each reason."""
    for host in maintenance:
        lab.queue.hosts.set_state(host, HostState.MAINTENANCE)
    task = lab.run("vm.define", {"name": "v", "memory_mib": memory_mib}, max_attempts=1)
    assert task.state is State.FAILED
    assert _error(task)["type"] == "NoHostAvailable"
    assert says in _error(task)["message"]
    assert lab.where("v") == []


# --- locks --------------------------------------------------------------------------------------


def test_tasks_on_one_vm_run_one_at_a_time_while_other_vms_proceed(lab: Lab) -> None:
    """`vm:<name>`: a start waits for a slow forced shutdown of the same VM to finish, so they
    apply in submission order; a task on another VM runs meanwhile on a free worker."""
    name = vm(H1, "stubborn")
    shutdown, start, other = lab.run_all(
        [
            TaskSpec("vm.shutdown", {"name": name, "timeout": 0.5, "force": True}),
            TaskSpec("vm.start", {"name": name}),
            TaskSpec("vm.suspend", {"name": vm(H1, "running")}),
        ]
    )
    assert all(t.state is State.COMPLETE for t in (shutdown, start, other))
    assert shutdown.locks == start.locks == (f"vm:{name}",)
    assert shutdown.finished_at and start.started_at and other.finished_at
    assert start.started_at >= shutdown.finished_at
    assert other.finished_at < shutdown.finished_at
    assert lab.state(H1, name) == "running", "powered off, then on again"


def test_storage_tasks_wait_for_their_pools_lock_and_other_pools_do_not(lab: Lab) -> None:
    """`pool:<host>/<name>` is taken by pool and volume tasks alike: while it is held, a volume
    task in that pool waits (and `why` names the lock); the same pool name on another host is
    another lock, so its task runs."""
    key = f"pool:{H1}/{POOL}"
    assert lab.registry.get("pool.delete").lock_keys({"host": H1, "name": POOL}) == [key]
    gate = Gate()

    @lab.registry.action("hold", params={"key": str}, locks=lambda p: [p["key"]])
    def hold(ctx: Context) -> None:
        gate.wait()

    volume = {"pool": POOL, "name": "new.qcow2", "capacity_mib": 8}
    holder = lab.submit("hold", {"key": key})
    same = lab.submit("volume.create", {"host": H1, **volume})
    other = lab.submit("volume.create", {"host": H2, **volume})
    assert same.locks == (key,)
    try:
        with running_dispatcher(lab.queue, fleet=lab.fleet, workers=4, grace=1):
            assert gate.entered.wait(10), "the lock holder never ran"
            (ran,) = lab.queue.wait(other.id, timeout=10)
            assert ran.state is State.COMPLETE, ran.error
            assert lab.queue.get(same.id).state is State.NEW
            assert f"lock {key} is held by task {holder.id}" in lab.queue.why(same.id).summary
            assert "new.qcow2" not in lab.volumes(H1)
            gate.open()
            done = lab.queue.wait([holder.id, same.id], timeout=10)
    finally:
        gate.open()
    assert all(t.state is State.COMPLETE for t in done)
    assert "new.qcow2" in lab.volumes(H1)


# --- unreachable hosts --------------------------------------------------------------------------


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Task retries and connection attempts after short delays, so backoff fits in a test."""
    monkeypatch.setattr(defaults, "RETRY_BACKOFF_BASE_SECONDS", 0.05)
    monkeypatch.setattr(defaults, "HOST_RETRY_BASE_SECONDS", 0.01)


def _add_down_host(lab: Lab, name: str = "h3") -> None:
    """Register a host whose node file does not exist (yet): it cannot be reached."""
    lab.queue.hosts.add(name, f"test://{lab.node_dir / f'{name}.xml'}")


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"name": "h3-off", "host": "h3"}, "on host 'h3' failed: XML error"),
        ({"name": "h3-off"}, "vm 'h3-off' is on no reachable host, and 1 host(s) cannot be asked"),
    ],
    ids=["pinned", "searched"],
)
def test_an_unreachable_host_is_retried_with_backoff_until_attempts_run_out(
    lab: Lab, fast_retries: None, params: dict[str, Any], says: str
) -> None:
    """A host that cannot be reached is a transient fault: every attempt is used, after a
    backoff each, and the task fails with a HostError naming the host. A VM that may be on
    that host is not reported missing (which would be a permanent failure)."""
    _add_down_host(lab)
    task = lab.run("vm.start", params, max_attempts=3)
    assert (task.state, task.attempt) == (State.FAILED, 3)
    error = _error(task)
    assert (error["type"], error["host"], error["libvirt_code"]) == (
        "HostError",
        "h3",
        "VIR_ERR_XML_ERROR",
    )
    assert says in error["message"]
    retries = [e for e in lab.queue.events(task.id) if e.to_state is State.NEW and e.from_state]
    assert len(retries) == 2
    assert all("; retry at " in e.message for e in retries)


def test_a_task_on_a_host_that_comes_back_succeeds_on_a_later_attempt(
    lab: Lab, fast_retries: None
) -> None:
    """Once the host answers again, the next attempt re-opens the connection and does the work."""
    _add_down_host(lab)
    task = lab.submit("vm.start", {"name": "h3-off", "host": "h3"})
    with running_dispatcher(lab.queue, fleet=lab.fleet, grace=1):
        wait_until(
            lambda: any("retry at" in e.message for e in lab.queue.events(task.id)),
            what="a failed first attempt",
        )
        lab.write_node(HostSpec("h3"), 3)
        (done,) = lab.queue.wait(task.id, timeout=10)
    assert done.state is State.COMPLETE, done.error
    assert done.attempt >= 2
    assert lab.state("h3", "h3-off") == "running"


# --- a VM's life, across dispatcher restarts ------------------------------------------------------


def test_a_vm_lifecycle_across_dispatcher_restarts(lab: Lab) -> None:
    """Chains of tasks run by three dispatchers in turn, on the same hosts: each sees what the
    previous one did. The VM is placed, started, snapshotted, paused, resumed, shut down, moved,
    started there, destroyed and undefined."""
    steps: list[list[tuple[str, dict[str, Any]]]] = [
        [
            ("vm.define", {"memory_mib": 128}),
            ("vm.start", {}),
            ("snapshot.create", {"name": "s1"}),
            ("vm.suspend", {}),
        ],
        [
            ("vm.resume", {}),
            ("vm.shutdown", {}),
            ("snapshot.delete", {"name": "s1"}),
            ("vm.migrate", {}),
        ],
        [("vm.start", {}), ("vm.destroy", {}), ("vm.undefine", {})],
    ]
    states: list[tuple[str, str | None, str | None]] = []
    for phase in steps:
        specs = [
            TaskSpec(
                action,
                {("vm" if action.startswith("snapshot") else "name"): "web", **extra},
                name=f"step{i}",
                after=[f"step{i - 1}"] if i else [],
            )
            for i, (action, extra) in enumerate(phase)
        ]
        for task in lab.run_all(specs):
            assert task.state is State.COMPLETE, (task.action, task.error)
            result = task.result or {}
            states.append((task.action, result.get("host"), result.get("state")))
    assert states == [
        ("vm.define", H1, "shutoff"),
        ("vm.start", H1, "running"),
        ("snapshot.create", H1, "running"),
        ("vm.suspend", H1, "paused"),
        ("vm.resume", H1, "running"),
        ("vm.shutdown", H1, "shutoff"),
        ("snapshot.delete", H1, None),
        ("vm.migrate", H2, "shutoff"),
        ("vm.start", H2, "running"),
        ("vm.destroy", H2, "shutoff"),
        ("vm.undefine", H2, None),
    ]
    assert lab.where("web") == []
