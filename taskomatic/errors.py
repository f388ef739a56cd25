"""One exception base; each error says what went wrong and what to do about it."""

from __future__ import annotations

import uuid
from collections.abc import Sequence


class TaskomaticError(Exception):
    """Something went wrong in taskomatic."""

    code = "error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ValidationError(TaskomaticError):
    """The submitted tasks are not valid; nothing was written."""

    code = "invalid"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownAction(ValidationError):
    """No action is registered under this name."""

    code = "unknown_action"

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(
            f"unknown action {name!r}; registered actions: {', '.join(sorted(known)) or 'none'}",
            field="action",
        )
        self.action = name


class InvalidParams(ValidationError):
    """The parameters do not match what the action declares."""

    code = "invalid_params"


class UnknownPrerequisite(ValidationError):
    """A prerequisite names a task that does not exist."""

    code = "unknown_prerequisite"

    def __init__(self, task_id: uuid.UUID, prerequisite: uuid.UUID) -> None:
        super().__init__(
            f"task {task_id} names prerequisite {prerequisite}, which is neither an existing "
            "task nor part of this submission",
            field="after",
        )
        self.task_id = task_id
        self.prerequisite = prerequisite


class CycleError(ValidationError):
    """The prerequisites form a cycle, so none of these tasks could ever run."""

    code = "cycle"

    def __init__(self, cycle: Sequence[uuid.UUID]) -> None:
        path = " -> ".join(str(t) for t in cycle)
        super().__init__(f"prerequisites form a cycle: {path}", field="after")
        self.cycle = list(cycle)


class Conflict(TaskomaticError):
    """A task with this id exists with different content."""

    code = "conflict"

    def __init__(self, task_id: uuid.UUID, fields: Sequence[str]) -> None:
        super().__init__(
            f"task {task_id} already exists with a different {', '.join(fields)}; "
            "choose a new id or resubmit the same content"
        )
        self.task_id = task_id
        self.fields = list(fields)


class TaskNotFound(TaskomaticError):
    """No task has this id."""

    code = "not_found"

    def __init__(self, task_id: uuid.UUID | str) -> None:
        super().__init__(f"no task with id {task_id}")
        self.task_id = task_id


class GroupNotFound(TaskomaticError):
    """No group has this id."""

    code = "not_found"

    def __init__(self, group_id: uuid.UUID | str) -> None:
        super().__init__(f"no group with id {group_id}")
        self.group_id = group_id


class InvalidTransition(TaskomaticError):
    """The task is not in a state that allows this change."""

    code = "invalid_state"

    def __init__(self, task_id: uuid.UUID, state: str, wanted: str, hint: str = "") -> None:
        message = f"task {task_id} is {state}; it cannot move to {wanted}"
        super().__init__(f"{message}; {hint}" if hint else message)
        self.task_id = task_id
        self.state = state
        self.wanted = wanted


class LostOwnership(TaskomaticError):
    """A guarded update found the task no longer in the expected state or owner."""

    code = "lost_ownership"

    def __init__(self, task_ids: Sequence[uuid.UUID], expected: str) -> None:
        ids = ", ".join(str(t) for t in task_ids)
        super().__init__(f"tasks no longer {expected} for this dispatcher: {ids}")
        self.task_ids = list(task_ids)


class WaitTimeout(TaskomaticError):
    """The task did not finish within the time given."""

    code = "timeout"


class DatabaseUnavailable(TaskomaticError):
    """The database could not be reached; check that it runs and the URL is right."""

    code = "database_unavailable"


class SchemaError(TaskomaticError):
    """The database schema is missing or from another version; run `taskomatic db init`."""

    code = "schema"


class ActionImportError(TaskomaticError):
    """An action module could not be imported."""

    code = "action_import"


class ActionError(TaskomaticError):
    """An action's run went wrong; `permanent` says whether another attempt could succeed.

    `details` are recorded in the task's `error` beside the type and message.
    """

    code = "action_error"
    permanent = False

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.details = details


class ActionFailed(ActionError):
    """Raised by an action to fail its task at once, without further attempts."""

    code = "action_failed"
    permanent = True


class HostError(ActionError):
    """libvirt refused or failed an operation on a host.

    Carries libvirt's error code name (e.g. VIR_ERR_NO_DOMAIN), its error domain and message,
    the host and the action; `permanent` is False for faults another attempt may not meet
    (a lost connection, a timeout), which are retried with backoff.
    """

    code = "host_error"

    def __init__(
        self,
        message: str,
        *,
        host: str,
        libvirt_code: str | None = None,
        libvirt_domain: str | None = None,
        transient: bool = False,
        action: str | None = None,
    ) -> None:
        super().__init__(
            message,
            host=host,
            libvirt_code=libvirt_code,
            libvirt_domain=libvirt_domain,
            action=action,
        )
        self.host = host
        self.libvirt_code = libvirt_code
        self.permanent = not transient


class HostNotFound(TaskomaticError):
    """No host is registered under this name; `taskomatic hosts list` shows them."""

    code = "host_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"no host named {name!r}; `taskomatic hosts list` shows the hosts")
        self.name = name


class HostConflict(TaskomaticError):
    """A host with this name or URI exists with a different definition."""

    code = "conflict"


class NoHostAvailable(ActionError):
    """No active host can take the work; hosts in maintenance or full are never chosen."""

    code = "no_host"


class InventoryNotCurrent(TaskomaticError):
    """The inventory of a host is not current enough to act on; a dispatcher keeps it."""

    code = "inventory_not_current"


class Unauthorized(TaskomaticError):
    """No valid token was given; send `Authorization: Bearer <token>` from `tokens create`."""

    code = "unauthorized"


class Forbidden(TaskomaticError):
    """The token's role does not allow this; a person with an admin token can issue another."""

    code = "forbidden"


class TokenNotFound(TaskomaticError):
    """No live token has this name; `taskomatic tokens list` shows them."""

    code = "not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"no live token named {name!r}; `taskomatic tokens list` shows them")
        self.name = name


class TokenConflict(TaskomaticError):
    """A live token already has this name; revoke it first or choose another name."""

    code = "conflict"
