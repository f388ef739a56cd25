"""The action the latency workloads submit: the time at its first line, as its result.

A peer's submit→start ends at its job function's first line, after its claim committed;
taskomatic's `started_at` is the claiming transaction's start, before its commit. This
action gives taskomatic's figure at the same point as the peers'. Loaded into the
dispatcher with `--actions bench.stamp`, and by the harness when imported.
"""

from __future__ import annotations

import time

from taskomatic import Context
from taskomatic.actions.registry import registry

ACTION = "bench.stamp"


@registry.action(ACTION)
def stamp(ctx: Context) -> float:
    """Return the wall-clock time (seconds) at which the action began."""
    return time.time()
