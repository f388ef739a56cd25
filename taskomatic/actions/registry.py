"""Declaring actions: a name, its parameters, its default locks and its recovery hook."""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from taskomatic import defaults, errors
from taskomatic.jobs import JobHooks

if TYPE_CHECKING:
    from taskomatic.virt.fleet import Fleet

ENTRY_POINT_GROUP = "taskomatic.actions"
_REQUIRED: Any = object()
_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "an object",
}


@dataclass(frozen=True)
class Param:
    """One declared parameter of an action: its JSON type and, if optional, its default."""

    type: type
    default: Any = _REQUIRED
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.default is None  # an optional parameter may be given as null
        if isinstance(value, bool):
            return self.type is bool
        if self.type is float:
            return isinstance(value, int | float)
        return isinstance(value, self.type)


class Check:
    """What an action's `check` hook found on the host after its dispatcher died."""

    DONE = "done"
    NOT_STARTED = "not_started"
    IN_PROGRESS = "in_progress"
    DIVERGED = "diverged"

    def __init__(self, status: str, result: Any = None, message: str = "") -> None:
        self.status = status
        self.result = result
        self.message = message

    @classmethod
    def done(cls, result: Any = None) -> Check:
        return cls(cls.DONE, result=result)

    @classmethod
    def not_started(cls) -> Check:
        return cls(cls.NOT_STARTED)

    @classmethod
    def in_progress(cls) -> Check:
        return cls(cls.IN_PROGRESS)

    @classmethod
    def diverged(cls, message: str) -> Check:
        return cls(cls.DIVERGED, message=message)

    def __repr__(self) -> str:
        return f"Check({self.status!r}, result={self.result!r}, message={self.message!r})"


@dataclass(frozen=True)
class Context:
    """What an action sees while it runs: its task, its parameters, and a stop request."""

    task_id: uuid.UUID
    action: str
    params: Mapping[str, Any]
    attempt: int
    stop: threading.Event = field(default_factory=threading.Event)
    fleet: Fleet | None = None

    @property
    def stopping(self) -> bool:
        """True once the task timed out or the dispatcher is shutting down."""
        return self.stop.is_set()

    @property
    def hosts(self) -> Fleet:
        """The hosts and their connections, for actions that drive hypervisors."""
        if self.fleet is None:
            raise errors.ActionFailed(
                f"action {self.action!r} drives hosts, and this dispatcher has none configured"
            )
        return self.fleet


RunFn = Callable[[Context], Any]
CheckFn = Callable[[Context], Check]
LocksFn = Callable[[Mapping[str, Any]], Iterable[str]]
CompensateFn = Callable[[Mapping[str, Any], Any], "tuple[str, Mapping[str, Any]] | None"]
"""(params, result) of a completed run -> (action, params) of the task undoing it, or None
when there is nothing to undo (e.g. the VM was already defined before the command ran)."""


@dataclass(frozen=True)
class Action:
    """A registered action: what `run` needs, which locks it takes, how to `check` it."""

    name: str
    run: RunFn
    params: Mapping[str, Param]
    locks: LocksFn | None = None
    check: CheckFn | None = None
    help: str = ""
    max_attempts: int = defaults.MAX_ATTEMPTS  # unless the submitter says otherwise
    job: JobHooks | None = None  # set when `run` may hand back a HostJob
    compensate: CompensateFn | None = None  # how a failed group undoes this action's work

    def validate(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Params with defaults filled in; InvalidParams naming the first problem."""
        if params is not None and not isinstance(params, Mapping):
            raise errors.InvalidParams(
                f"params of action {self.name!r} must be an object, got {params!r}",
                field="params",
            )
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            declared = ", ".join(sorted(self.params)) or "none"
            raise errors.InvalidParams(
                f"action {self.name!r} has no parameter {unknown[0]!r} (declared: {declared})",
                field=f"params.{unknown[0]}",
            )
        out: dict[str, Any] = {}
        for name, param in self.params.items():
            if name not in params:
                if param.required:
                    raise errors.InvalidParams(
                        f"action {self.name!r} needs parameter {name!r}", field=f"params.{name}"
                    )
                out[name] = param.default
                continue
            value = params[name]
            if not param.accepts(value):
                raise errors.InvalidParams(
                    f"action {self.name!r}: parameter {name!r} must be "
                    f"{_TYPE_NAMES.get(param.type, param.type.__name__)}, got {value!r}",
                    field=f"params.{name}",
                )
            out[name] = value
        return out

    def lock_keys(self, params: Mapping[str, Any]) -> list[str]:
        """The resource keys this action locks by default for these params."""
        return list(self.locks(params)) if self.locks else []


class Registry:
    """Actions by name; the dispatcher runs them and the queue validates against them."""

    def __init__(self, builtins: bool = True) -> None:
        self._actions: dict[str, Action] = {}
        if builtins:
            from taskomatic.actions import builtin

            builtin.register(self)

    def action(
        self,
        name: str,
        *,
        params: Mapping[str, Param | type] | None = None,
        locks: LocksFn | None = None,
        check: CheckFn | None = None,
        max_attempts: int = defaults.MAX_ATTEMPTS,
        job: JobHooks | None = None,
        compensate: CompensateFn | None = None,
    ) -> Callable[[RunFn], RunFn]:
        """Decorator registering `fn(ctx)` as action `name`."""

        def decorate(fn: RunFn) -> RunFn:
            declared = {
                k: v if isinstance(v, Param) else Param(v) for k, v in (params or {}).items()
            }
            doc = (fn.__doc__ or "").strip().splitlines()
            self.add(
                Action(
                    name,
                    fn,
                    declared,
                    locks,
                    check,
                    doc[0] if doc else "",
                    max_attempts,
                    job,
                    compensate,
                )
            )
            return fn

        return decorate

    def add(self, action: Action) -> None:
        if action.name in self._actions and self._actions[action.name].run is not action.run:
            raise errors.TaskomaticError(f"action {action.name!r} is registered twice")
        self._actions[action.name] = action

    def get(self, name: str) -> Action:
        try:
            return self._actions[name]
        except KeyError:
            raise errors.UnknownAction(name, list(self._actions)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._actions

    def names(self) -> list[str]:
        return sorted(self._actions)

    def load_module(self, module: str) -> None:
        """Import an action module (whose decorators register into the default registry)."""
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise errors.ActionImportError(
                f"cannot import action module {module!r}: {type(exc).__name__}: {exc}"
            ) from exc

    def load_entry_points(self) -> None:
        """Import every module advertised in the `taskomatic.actions` entry-point group."""
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            self.load_module(ep.value)


registry = Registry()
"""The default registry; `taskomatic.action` registers here."""

action = registry.action
