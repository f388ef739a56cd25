"""Log output of the long-running commands: text for people, or one JSON object per line for
log collectors, carrying the task (and dispatcher) a line is about as fields of their own.

A line is about a task when the code passes `extra={"task": id}` or when its message names
one the way taskomatic's messages do: "task <uuid>" or a path "/tasks/<uuid>".
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
"""The values of `--log-format`."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""The text lines' layout (what `taskomatic` has always printed)."""

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_TASK = re.compile(rf"(?:\btask |/tasks/)({_UUID})")
_DISPATCHER = re.compile(rf"\bdispatcher:? ?({_UUID})")
_GROUP = re.compile(rf"(?:\bgroup |/groups/)({_UUID})")

# Attributes every LogRecord has; anything else came through `extra=` and is kept as a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, ids, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        for field, pattern in (("task", _TASK), ("dispatcher", _DISPATCHER), ("group", _GROUP)):
            found = pattern.search(message)
            if found:
                line[field] = found.group(1)
        for key, value in vars(record).items():
            if key not in _STANDARD:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(fmt: str) -> None:
    """Format every handler of the root logger as `fmt` ("text" or "json")."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; formats: {', '.join(FORMATS)}")
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(formatter)
