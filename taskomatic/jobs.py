"""Host jobs: long work a hypervisor does on its own (a block commit, a migration).

An action that starts one returns a `HostJob` instead of a result. The task then goes to
`waiting`: its worker thread is free, its locks stay held, and the dispatcher's monitor
polls the job through the action's `JobHooks` until the host no longer has it. Then
`finish` looks at what the host really did and the task completes or fails. The job's
description lives in the task row, so a dispatcher that takes the task over carries on
polling it and never starts it again.

Actions that start host jobs must be ensure-style: `run` first looks for a job of its kind
already on the object (one it started before a crash) and returns that one instead of
starting a second.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskomatic.actions.registry import Context


@dataclass(frozen=True)
class HostJob:
    """A job running on `host`, as an action describes it: enough to find it again."""

    host: str
    kind: str  # e.g. "block-commit", "migration": what the task's timeline shows
    details: Mapping[str, Any] = field(default_factory=dict)  # what the hooks need (vm, disk…)

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "kind": self.kind, "details": dict(self.details)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HostJob:
        return cls(data["host"], data["kind"], dict(data.get("details") or {}))


@dataclass(frozen=True)
class JobStatus:
    """What one poll found: the job still running (with its progress), or gone."""

    running: bool
    progress: Mapping[str, Any] | None = None  # e.g. {"cur": …, "end": …}

    @classmethod
    def gone(cls) -> JobStatus:
        return cls(False)


PollFn = Callable[["Context", HostJob], JobStatus]
FinishFn = Callable[["Context", HostJob], Any]
AbortFn = Callable[["Context", HostJob], None]


@dataclass(frozen=True)
class JobHooks:
    """How the monitor drives an action's host job.

    `poll` looks at the object on the host (and may move the job on, e.g. pivot a commit
    that is ready); `finish` runs once the job is gone and returns the task's result after
    verifying the outcome on the host — raising `ActionFailed` when the job vanished
    without it, never succeeding silently; `abort` asks the host to stop the job (cancel,
    timeout), after which polling goes on until the job is really gone.
    """

    poll: PollFn
    finish: FinishFn
    abort: AbortFn
