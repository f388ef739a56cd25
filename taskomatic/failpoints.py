"""Crash points: where tests of crash-only recovery kill a real process, exactly there.

`crash_point("name")` does nothing unless the environment variable TASKOMATIC_CRASH_AT
names that point; then the process SIGKILLs itself on the spot, as `kill -9` would — no
cleanup, no `finally`, nothing flushed. A dispatcher restarted without the variable then
shows what recovery makes of the state left behind.
"""

from __future__ import annotations

import os
import signal

ENV = "TASKOMATIC_CRASH_AT"


def crash_point(name: str) -> None:
    """Die here, by SIGKILL, if TASKOMATIC_CRASH_AT is `name` (see the module)."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
