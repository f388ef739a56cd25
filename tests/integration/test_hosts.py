"""The hosts API (`queue.hosts`): register, list, maintenance and activation, removal — on both
backends, since these are rows in the same transactions as the queue."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from helpers import open_queue

from taskomatic import Queue, errors
from taskomatic.model import HostState

URI = "qemu+ssh://root@kvm1.example.com/system"


@pytest.fixture
def queue(db_url: str) -> Iterator[Queue]:
    """A queue on each backend: host rows live in the queue's transactions."""
    with open_queue(db_url) as q:
        yield q


@pytest.fixture
def sqlite_queue(sqlite_url: str) -> Iterator[Queue]:
    """For what is refused before any SQL runs, where the backend cannot matter."""
    with open_queue(sqlite_url) as q:
        yield q


def test_add_registers_an_active_host_and_the_same_add_again_returns_it(queue: Queue) -> None:
    """Registering is idempotent: the same name, URI and capacity give back the same host."""
    added = queue.hosts.add("kvm1", URI, capacity=20)
    assert (added.name, added.uri, added.state, added.capacity) == (
        "kvm1",
        URI,
        HostState.ACTIVE,
        20,
    )
    assert queue.hosts.add("kvm1", URI, capacity=20) == added
    assert queue.hosts.get("kvm1") == added
    assert queue.hosts.list() == [added]


@pytest.mark.parametrize(
    ("uri", "capacity"),
    [("qemu+ssh://root@kvm2.example.com/system", 20), (URI, 30), (URI, None)],
    ids=["other_uri", "other_capacity", "no_capacity"],
)
def test_adding_a_name_again_with_other_settings_is_a_conflict(
    queue: Queue, uri: str, capacity: int | None
) -> None:
    """A host is never silently redefined: a different URI or capacity must be removed first."""
    original = queue.hosts.add("kvm1", URI, capacity=20)
    with pytest.raises(errors.HostConflict, match="remove it first"):
        queue.hosts.add("kvm1", uri, capacity=capacity)
    assert queue.hosts.list() == [original]


def test_one_uri_is_one_host(queue: Queue) -> None:
    """Two names for one URI would place work on one machine as if it were two."""
    queue.hosts.add("kvm1", URI)
    with pytest.raises(errors.HostConflict, match="host 'kvm1' already has URI"):
        queue.hosts.add("kvm1-alias", URI)
    assert [h.name for h in queue.hosts.list()] == ["kvm1"]


def _blind_once(monkeypatch: pytest.MonkeyPatch, store: Any, method: str, empty: Any) -> None:
    """`store.method` finds nothing on its first call: what a racing add saw before the
    winner committed. Later calls (a retry) see the real rows."""
    real = getattr(store, method)
    calls: list[object] = []

    def blind(*args: Any) -> Any:
        calls.append(args)
        return empty if len(calls) == 1 else real(*args)

    monkeypatch.setattr(store, method, blind)


@pytest.mark.parametrize(
    ("name", "capacity", "conflict"),
    [
        ("kvm1", 20, None),
        ("kvm1", 30, "exists with URI .* remove it first"),
        ("kvm1-alias", 20, "host 'kvm1' already has URI"),
    ],
    ids=["same_host", "same_name_other_capacity", "same_uri_other_name"],
)
def test_an_add_that_lost_a_race_answers_as_if_it_came_second(
    queue: Queue,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    capacity: int,
    conflict: str | None,
) -> None:
    """Two adds at once: the loser's insert hits a unique key. It then answers as it would
    have after the winner — the same host back, or the conflict that explains it."""
    winner = queue.hosts.add("kvm1", URI, capacity=20)
    _blind_once(monkeypatch, queue.store, "hosts", [])
    _blind_once(monkeypatch, queue.store, "host_by_uri", None)
    if conflict is None:
        assert queue.hosts.add(name, URI, capacity=capacity) == winner
    else:
        with pytest.raises(errors.HostConflict, match=conflict):
            queue.hosts.add(name, URI, capacity=capacity)
    monkeypatch.undo()
    assert queue.hosts.list() == [winner]


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "kvm1.example.com",
        "http://kvm1.example.com/system",
        "qemu:/system",
        "test://node.xml",
    ],
    ids=["empty", "no_scheme", "not_libvirt", "no_slashes", "test_two_slashes"],
)
def test_a_uri_that_is_not_a_libvirt_uri_is_refused(sqlite_queue: Queue, uri: str) -> None:
    """A malformed URI fails at registration, naming the field, not later on every task."""
    with pytest.raises(errors.ValidationError) as refused:
        sqlite_queue.hosts.add("kvm1", uri)
    assert refused.value.field == "uri"
    assert sqlite_queue.hosts.list() == []


@pytest.mark.parametrize(
    ("name", "capacity", "field"),
    [
        ("", None, "name"),
        ("kvm 1", None, "name"),
        ("kvm1", -1, "capacity"),
        ("kvm1", True, "capacity"),
    ],
    ids=["empty_name", "space_in_name", "negative_capacity", "bool_capacity"],
)
def test_invalid_names_and_capacities_are_refused(
    sqlite_queue: Queue, name: str, capacity: Any, field: str
) -> None:
    """A name with spaces or a capacity that is not a count of VMs is refused, by field."""
    with pytest.raises(errors.ValidationError) as refused:
        sqlite_queue.hosts.add(name, URI, capacity=capacity)
    assert refused.value.field == field


def test_maintenance_and_activation_are_listed_by_state(queue: Queue) -> None:
    """A host goes into maintenance and back; `list(state)` shows each group by name."""
    for i in (3, 1, 2):
        queue.hosts.add(f"kvm{i}", f"qemu+ssh://root@kvm{i}.example.com/system")
    before = queue.hosts.get("kvm2")
    down = queue.hosts.set_state("kvm2", "maintenance")
    assert down.state is HostState.MAINTENANCE and down.changed_at >= before.changed_at
    assert queue.hosts.set_state("kvm2", HostState.MAINTENANCE) == down, "again: no change"
    assert [h.name for h in queue.hosts.list()] == ["kvm1", "kvm2", "kvm3"]
    assert [h.name for h in queue.hosts.list("maintenance")] == ["kvm2"]
    assert [h.name for h in queue.hosts.list(HostState.ACTIVE)] == ["kvm1", "kvm3"]

    assert queue.hosts.set_state("kvm2", "active").state is HostState.ACTIVE
    assert queue.hosts.list("maintenance") == []
    with pytest.raises(errors.ValidationError, match="states are: active, maintenance"):
        queue.hosts.set_state("kvm2", "retired")


def test_remove_forgets_a_host_and_its_uri(queue: Queue) -> None:
    """After removal the name is unknown and the URI may be registered again."""
    queue.hosts.add("kvm1", URI)
    queue.hosts.remove("kvm1")
    assert queue.hosts.list() == []
    assert queue.hosts.add("kvm1-new", URI).uri == URI


@pytest.mark.parametrize(
    "call",
    [
        lambda q: q.hosts.get("nope"),
        lambda q: q.hosts.set_state("nope", "maintenance"),
        lambda q: q.hosts.remove("nope"),
    ],
    ids=["get", "set_state", "remove"],
)
def test_an_unknown_host_is_reported_by_name(queue: Queue, call: Any) -> None:
    """Every call on a host that is not registered says which name, and where to look."""
    with pytest.raises(errors.HostNotFound, match="no host named 'nope'; `taskomatic hosts list`"):
        call(queue)
