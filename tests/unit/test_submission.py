"""Validation before anything is written: specs, parameters, references and cycles."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from taskomatic import errors
from taskomatic.actions.registry import Action, Context, Param, Registry
from taskomatic.submission import Prepared, TaskSpec, new_task_id, parse_time, prepare


def _vm_locks(params: Mapping[str, Any]) -> list[str]:
    return [f"vm:{params['vm']}"]


@pytest.fixture
def registry() -> Registry:
    """The built-ins plus `guest.start`, which declares typed parameters and a default lock."""
    reg = Registry()

    @reg.action(
        "guest.start",
        params={"vm": str, "host": Param(str, default=None), "wait": Param(float, default=1.5)},
        locks=_vm_locks,
    )
    def start(ctx: Context) -> None:
        """Start a VM."""

    return reg


def _guest_start(registry: Registry) -> Action:
    return registry.get("guest.start")


# -- Action.validate ------------------------------------------------------------------------


def test_validate_fills_defaults(registry: Registry) -> None:
    """Optional parameters get their declared defaults; given ones are kept."""
    assert _guest_start(registry).validate({"vm": "a"}) == {"vm": "a", "host": None, "wait": 1.5}
    assert _guest_start(registry).validate({"vm": "a", "host": "h1", "wait": 3}) == {
        "vm": "a",
        "host": "h1",
        "wait": 3,
    }


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        (
            {"vm": "a", "hots": "h"},
            "params.hots",
            "has no parameter 'hots' (declared: host, vm, wait)",
        ),
        ({}, "params.vm", "needs parameter 'vm'"),
        (None, "params.vm", "needs parameter 'vm'"),
        ({"vm": 7}, "params.vm", "parameter 'vm' must be a string, got 7"),
        ({"vm": "a", "wait": "soon"}, "params.wait", "'wait' must be a number, got 'soon'"),
        ({"vm": "a", "wait": True}, "params.wait", "'wait' must be a number, got True"),
    ],
)
def test_validate_names_the_first_problem(
    registry: Registry, params: dict[str, Any] | None, field: str, message: str
) -> None:
    """Unknown, missing and mistyped parameters are InvalidParams naming the parameter."""
    with pytest.raises(errors.InvalidParams) as caught:
        _guest_start(registry).validate(params)
    assert message in caught.value.message
    assert "guest.start" in caught.value.message
    assert caught.value.field == field


def test_validate_accepts_ints_for_floats_but_not_bools_for_ints() -> None:
    """JSON numbers are numbers; true/false are not integers."""
    reg = Registry()
    reg.action("count", params={"n": int, "x": float})(lambda ctx: None)
    assert reg.get("count").validate({"n": 1, "x": 2}) == {"n": 1, "x": 2}
    with pytest.raises(errors.InvalidParams, match="must be an integer, got True"):
        reg.get("count").validate({"n": True, "x": 1.0})


def test_action_without_declared_params_rejects_any(registry: Registry) -> None:
    """`noop` takes nothing, and says so."""
    with pytest.raises(errors.InvalidParams, match=r"declared: none"):
        registry.get("noop").validate({"x": 1})


def test_unknown_action_lists_the_registered_ones(registry: Registry) -> None:
    """A typo in an action name shows what exists."""
    with pytest.raises(errors.UnknownAction) as caught:
        prepare([TaskSpec("guest.strat", {"vm": "a"})], registry)
    assert "unknown action 'guest.strat'" in caught.value.message
    assert "guest.start" in caught.value.message and "noop" in caught.value.message


# -- prepare: fields -------------------------------------------------------------------------


def test_prepare_resolves_names_and_merges_locks(registry: Registry) -> None:
    """`after` names resolve to ids; the action's default locks join the given ones, sorted."""
    a_id = uuid.uuid4()
    a, b = prepare(
        [
            TaskSpec("noop", id=str(a_id), name="first"),
            TaskSpec("guest.start", {"vm": "x"}, name="second", after=["first"], locks=["host:h"]),
        ],
        registry,
    )
    assert a.id == a_id
    assert b.after == (a_id,)
    assert b.locks == ("host:h", "vm:x")
    assert b.params == {"vm": "x", "host": None, "wait": 1.5}


def test_prepare_drops_repeated_prerequisites(registry: Registry) -> None:
    """Naming the same prerequisite twice is one edge, not a duplicate-row error later."""
    pre = uuid.uuid4()
    (p,) = prepare([TaskSpec("noop", after=[pre, str(pre)])], registry)
    assert p.after == (pre,)


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (TaskSpec("noop", priority="high"), "priority", "priority must be an integer"),  # type: ignore[arg-type]
        (TaskSpec("noop", priority=True), "priority", "priority must be an integer"),
        (TaskSpec("noop", priority=2**31), "priority", "priority must be"),
        (TaskSpec("noop", max_attempts=0), "max_attempts", "at least 1"),
        (TaskSpec("noop", max_attempts=2**31), "max_attempts", "max_attempts must be"),
        (TaskSpec("noop", max_attempts=True), "max_attempts", "max_attempts must be"),
        (TaskSpec("noop", timeout=0), "timeout", "timeout must be a positive number"),
        (TaskSpec("noop", timeout=-1), "timeout", "timeout must be a positive number"),
        (TaskSpec("noop", timeout="5"), "timeout", "timeout must be a positive number"),  # type: ignore[arg-type]
        (TaskSpec("noop", timeout=float("inf")), "timeout", "timeout must be"),
        (TaskSpec("noop", timeout=float("nan")), "timeout", "timeout must be"),
        (TaskSpec("noop", timeout=1e300), "timeout", "timeout must be"),
        (TaskSpec("noop", not_before=datetime(2030, 1, 1)), "not_before", "needs a timezone"),
        (TaskSpec("noop", locks=[""]), "locks", "non-empty strings"),
        (TaskSpec("noop", id="not-a-uuid"), "id", "is not a UUID"),
        (TaskSpec("noop", after=["nobody"]), "after", "neither a task id nor the name"),
    ],
)
def test_prepare_rejects_bad_fields(
    registry: Registry, spec: TaskSpec, field: str, message: str
) -> None:
    """Each bad field is a ValidationError naming the field, with a fix in the message."""
    with pytest.raises(errors.ValidationError) as caught:
        prepare([spec], registry)
    assert caught.value.field == field
    assert message in caught.value.message


def test_prepare_accepts_aware_not_before_and_whole_number_timeout(registry: Registry) -> None:
    """A timezone-aware time and an integer timeout are fine (stored as float seconds)."""
    when = datetime(2030, 1, 1, tzinfo=UTC)
    (p,) = prepare([TaskSpec("noop", not_before=when, timeout=5, priority=-3)], registry)
    assert (p.not_before, p.timeout, p.priority) == (when, 5.0, -3)


def test_prepare_rejects_empty_duplicate_ids_and_names(registry: Registry) -> None:
    """Nothing to submit, an id twice, or a name twice are each clear errors."""
    with pytest.raises(errors.ValidationError, match="nothing to submit"):
        prepare([], registry)
    tid = uuid.uuid4()
    with pytest.raises(errors.ValidationError, match=f"task id {tid} appears twice"):
        prepare([TaskSpec("noop", id=tid), TaskSpec("noop", id=str(tid))], registry)
    with pytest.raises(errors.ValidationError, match="task name 'x' appears twice"):
        prepare([TaskSpec("noop", name="x"), TaskSpec("noop", name="x")], registry)


# -- prepare: cycles -------------------------------------------------------------------------


def _assert_is_cycle(
    cycle: list[uuid.UUID], prepared_edges: dict[uuid.UUID, set[uuid.UUID]]
) -> None:
    """A reported cycle starts and ends on the same task and follows real edges."""
    assert cycle[0] == cycle[-1]
    for task, prerequisite in itertools.pairwise(cycle):
        assert prerequisite in prepared_edges[task], f"{task} does not wait for {prerequisite}"


def _specs_with_edges(edges: dict[str, list[str]]) -> tuple[list[TaskSpec], dict[str, uuid.UUID]]:
    """Specs named after the keys of `edges`, each with a fixed id, waiting for the values."""
    ids = {n: uuid.uuid4() for n in edges}
    return [TaskSpec("noop", id=ids[n], name=n, after=after) for n, after in edges.items()], ids


def test_self_edge_is_a_cycle_of_one(registry: Registry) -> None:
    """A task waiting for itself could never run."""
    tid = uuid.uuid4()
    with pytest.raises(errors.CycleError) as caught:
        prepare([TaskSpec("noop", id=tid, after=[tid])], registry)
    assert caught.value.cycle == [tid, tid]
    assert f"{tid} -> {tid}" in caught.value.message


@pytest.mark.parametrize(
    "edges",
    [
        {"a": ["b"], "b": ["a"]},
        {"a": ["b"], "b": ["c"], "c": ["a"]},
        # The cycle does not include the first task, and is reached through a diamond.
        {"root": [], "x": ["root"], "y": ["x", "w"], "z": ["y"], "w": ["z"]},
        {"a": [], "b": ["a"], "c": ["b", "e"], "d": ["c"], "e": ["d"]},
    ],
)
def test_cycles_are_reported_as_a_path(registry: Registry, edges: dict[str, list[str]]) -> None:
    """The error shows one actual cycle, as a path a person can follow and break."""
    specs, ids = _specs_with_edges(edges)
    with pytest.raises(errors.CycleError) as caught:
        prepare(specs, registry)
    by_id = {ids[n]: {ids[a] for a in after} for n, after in edges.items()}
    _assert_is_cycle(caught.value.cycle, by_id)
    assert len(caught.value.cycle) >= 3
    assert " -> ".join(str(t) for t in caught.value.cycle) in caught.value.message


@pytest.mark.parametrize(
    "edges",
    [
        {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]},
        {"a": [], "b": ["a"], "c": ["a", "b"], "d": ["a", "b", "c"]},
        {"a": [], "b": [], "c": []},
    ],
)
def test_dags_pass(registry: Registry, edges: dict[str, list[str]]) -> None:
    """Diamonds and shared prerequisites are not cycles."""
    prepared = prepare(_specs_with_edges(edges)[0], registry)
    assert len(prepared) == len(edges)
    assert all(isinstance(p, Prepared) for p in prepared)


# -- from JSON ------------------------------------------------------------------------------


def test_spec_from_dict_parses_and_rejects() -> None:
    """Group files: unknown fields and a missing action are named; times are parsed."""
    spec = TaskSpec.from_dict({"action": "noop", "not_before": "2030-01-01T00:00:00Z"})
    assert spec.not_before == datetime(2030, 1, 1, tzinfo=UTC)
    with pytest.raises(errors.ValidationError, match="unknown task field 'aftr'") as caught:
        TaskSpec.from_dict({"action": "noop", "aftr": []})
    assert caught.value.field == "aftr"
    with pytest.raises(errors.ValidationError, match="needs an 'action'"):
        TaskSpec.from_dict({"params": {}})


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("locks", "vm:web1", "must be a list of lock keys"),
        ("after", "abc", "must be a list of task ids or names"),
        ("params", [1], "must be an object"),
        ("action", 7, "must be a string"),
    ],
)
def test_spec_from_dict_checks_json_types(field: str, value: Any, says: str) -> None:
    """A string where a list belongs is refused, never read letter by letter as seven
    one-character lock keys or prerequisites."""
    data = {"action": "noop", field: value}
    with pytest.raises(errors.ValidationError, match=f"task field '{field}' {says}") as caught:
        TaskSpec.from_dict(data)
    assert caught.value.field == field


def test_params_that_are_not_an_object_are_invalid(registry: Registry) -> None:
    """Params given as a list (from JSON, say) are a clear InvalidParams, not a crash."""
    with pytest.raises(errors.InvalidParams, match="must be an object, got \\[1\\]"):
        prepare([TaskSpec("noop", [1])], registry)  # type: ignore[arg-type]


def test_parse_time_requires_a_timezone() -> None:
    """A local time without a zone is ambiguous, so it is refused with an example fix."""
    assert parse_time("2030-01-01T10:00+02:00") == datetime(2030, 1, 1, 8, tzinfo=UTC)
    with pytest.raises(errors.ValidationError, match=r"needs a timezone, e\.g\. 2030-01-01T10:00Z"):
        parse_time("2030-01-01T10:00")
    with pytest.raises(errors.ValidationError, match="not an ISO 8601 time"):
        parse_time("tomorrow")


def test_ids_taskomatic_chooses_are_unique_uuid7_in_the_order_of_their_creation(
    registry: Registry,
) -> None:
    """Ids of tasks submitted without one are RFC 9562 version 7 UUIDs: unique, and those
    made a millisecond or more apart sort in the order they were made (new tasks' keys go
    to the end of the indexes, next to each other)."""
    before = time.time_ns() // 1_000_000
    ids = [new_task_id() for _ in range(20_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert all(before <= i.int >> 80 <= after for i in ids)
    time.sleep(0.002)
    later = new_task_id()
    assert later > max(ids)
    time.sleep(0.002)
    (submitted,) = prepare([TaskSpec("noop", {})], registry)
    assert submitted.id.version == 7 and submitted.id > later
