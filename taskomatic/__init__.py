"""taskomatic — a single-queue relational task processor for virtualization work.

queue = taskomatic.Queue.open("sqlite:///tasks.db")
queue.init_db()
task = queue.submit("sleep", {"seconds": 1})
taskomatic.Dispatcher(queue).start()
queue.wait(task.id)
"""

from __future__ import annotations

from taskomatic.actions.registry import Check, Context, Param, Registry, action, registry
from taskomatic.dispatcher import Dispatcher
from taskomatic.errors import TaskomaticError
from taskomatic.model import Event, Group, State, Task
from taskomatic.queue import Queue
from taskomatic.submission import TaskSpec

__all__ = [
    "Check",
    "Context",
    "Dispatcher",
    "Event",
    "Group",
    "Param",
    "Queue",
    "Registry",
    "State",
    "Task",
    "TaskSpec",
    "TaskomaticError",
    "action",
    "registry",
]
