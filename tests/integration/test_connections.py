"""libvirt connections: one per host URI shared by every thread, re-opened when lost, an
unreachable host tried at most once per backoff interval, and libvirt silent on stderr.

On a node-file URI every `libvirt.open()` is a fresh copy of the host, so "one connection per
URI" is what makes a simulated host (and, in production, a dispatcher's view of a host) one
host. Openings are counted with an opener wrapper around the real `libvirt.open`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import libvirt
import pytest
from virt import HostSpec, Lab, node_xml, vm

from taskomatic import State, TaskSpec, defaults, errors
from taskomatic.virt.connections import Connections


class CountingOpener:
    """Opens with the real `libvirt.open`, slowly (so racing threads overlap), and counts."""

    def __init__(self) -> None:
        self.opened: list[str] = []

    def __call__(self, uri: str) -> libvirt.virConnect:
        self.opened.append(uri)
        time.sleep(0.02)
        return libvirt.open(uri)


def _node(tmp_path: Path, name: str, index: int) -> str:
    path = tmp_path / f"{name}.xml"
    path.write_text(node_xml(HostSpec(name), index))
    return f"test://{path}"


@pytest.fixture
def opener() -> CountingOpener:
    return CountingOpener()


@pytest.fixture
def connections(opener: CountingOpener) -> Connections:
    return Connections(opener=opener)


def test_one_connection_per_uri_even_when_eight_threads_ask_at_once(
    tmp_path: Path, opener: CountingOpener, connections: Connections
) -> None:
    """Eight workers asking for a host at the same moment share one connection, so they all
    act on the same host (a second open of a node file would be a different, fresh host)."""
    h1, h2 = _node(tmp_path, "h1", 1), _node(tmp_path, "h2", 2)
    barrier = threading.Barrier(8)
    got: dict[str, set[int]] = {h1: set(), h2: set()}
    guard = threading.Lock()

    def worker(uri: str) -> None:
        barrier.wait()
        conn = connections.get(uri, "h")
        with guard:
            got[uri].add(id(conn))

    threads = [threading.Thread(target=worker, args=(h1 if i % 2 else h2,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    try:
        assert sorted(opener.opened) == [h1, h2]
        assert [len(ids) for ids in got.values()] == [1, 1]
        assert got[h1] != got[h2]
    finally:
        connections.close()


def test_a_lost_connection_is_reopened_on_next_use(
    tmp_path: Path,
    opener: CountingOpener,
    connections: Connections,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A connection found dead is dropped, logged and replaced by a working one."""
    uri = _node(tmp_path, "h1", 1)
    first = connections.get(uri, "h1")
    first.close()  # the link to the host went away
    second = connections.get(uri, "h1")
    try:
        assert second is not first and second.isAlive()
        assert second.lookupByName(vm("h1", "running")).isActive()
        assert opener.opened == [uri, uri]
        assert connections.get(uri, "h1") is second, "a live connection is kept"
        assert f"connection to host h1 ({uri}) was lost; re-opening" in caplog.text
    finally:
        connections.close()


def test_an_unreachable_host_is_tried_again_only_after_its_backoff(
    tmp_path: Path,
    opener: CountingOpener,
    connections: Connections,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host that cannot be reached costs one connection attempt per backoff interval (which
    doubles), not one per task; its errors are transient HostErrors naming it. Once it
    answers, the connection is made and kept."""
    monkeypatch.setattr(defaults, "HOST_RETRY_BASE_SECONDS", 0.2)
    path = tmp_path / "h9.xml"
    uri = f"test://{path}"

    with pytest.raises(errors.HostError) as failed:
        connections.get(uri, "h9")
    assert (failed.value.host, failed.value.libvirt_code) == ("h9", "VIR_ERR_XML_ERROR")
    assert not failed.value.permanent
    with pytest.raises(errors.HostError, match=r"host 'h9' is unreachable \(next attempt in"):
        connections.get(uri, "h9")
    assert opener.opened == [uri], "tried again inside the backoff"

    time.sleep(0.25)
    with pytest.raises(errors.HostError):
        connections.get(uri, "h9")
    assert opener.opened == [uri, uri]
    with pytest.raises(errors.HostError, match="unreachable"):
        connections.get(uri, "h9")  # the interval doubled to 0.4 s
    assert len(opener.opened) == 2

    path.write_text(node_xml(HostSpec("h9"), 9))  # the host is back
    time.sleep(0.45)
    try:
        conn = connections.get(uri, "h9")
        assert connections.get(uri, "h9") is conn
        assert opener.opened == [uri, uri, uri]
    finally:
        connections.close()


def test_libvirt_errors_never_reach_stderr(lab: Lab, capfd: pytest.CaptureFixture[str]) -> None:
    """libvirt prints every error to stderr by default; taskomatic turns them into task errors
    and keeps a dispatcher's stderr clean (lookups of missing VMs, unsupported operations,
    invalid XML)."""
    capfd.readouterr()
    tasks = lab.run_all(
        [
            TaskSpec("vm.start", {"name": "ghost"}),
            TaskSpec("vm.migrate", {"name": vm("h1", "running"), "to": "h2"}),
            TaskSpec(
                "snapshot.create", {"vm": vm("h1", "running"), "name": "d", "disk_only": True}
            ),
            TaskSpec(
                "vm.define",
                {"name": "bad", "host": "h1", "xml": "<domain><name>bad</name></domain>"},
            ),
        ]
    )
    assert [t.state for t in tasks] == [State.FAILED] * 4
    assert capfd.readouterr().err == ""
