"""Built-in actions that are useful on their own: for demos, smoke tests and benchmarks."""

from __future__ import annotations

import time
from typing import Any

from taskomatic import errors
from taskomatic.actions.registry import Context, Param, Registry


def register(registry: Registry) -> None:
    """Add the built-in actions to `registry` (every registry has them)."""
    from taskomatic.actions import host, merge, snapshot, storage, vm

    for module in (vm, snapshot, merge, storage, host):
        module.register(registry)
    registry.action("noop")(noop)
    registry.action("sleep", params={"seconds": Param(float, default=1.0)})(sleep)
    registry.action("fail", params={"message": Param(str, default="failed on purpose")})(fail)


def noop(ctx: Context) -> None:
    """Do nothing; measures the queue itself."""


def sleep(ctx: Context) -> dict[str, Any]:
    """Sleep for a while, stopping early if asked (timeout, shutdown)."""
    started = time.monotonic()
    if ctx.stop.wait(ctx.params["seconds"]):
        raise errors.ActionFailed(f"stopped after {time.monotonic() - started:.3f}s")
    return {"slept": round(time.monotonic() - started, 3)}


def fail(ctx: Context) -> None:
    """Fail with the given message; for trying out retries and cancellation."""
    raise RuntimeError(ctx.params["message"])
