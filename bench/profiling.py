"""Where a dispatcher's time goes: SQL statement counts inside it, and py-spy stack summaries.

`python -m bench.profiling ARGS…` is `taskomatic ARGS…` with SQLAlchemy listeners that count
every statement the process sends (by normalized text: executions, rows, seconds) and every
commit; on exit it writes them as JSON to $BENCH_STATEMENTS_OUT. Nothing else changes.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

# --- counting statements inside the dispatcher process ---------------------------------------

_lock = threading.Lock()
_statements: dict[str, list[float]] = {}  # signature -> [executions, rows, seconds]
_commits = [0, 0.0]  # count, seconds

_PLACEHOLDER = r"(?:%\([^)]*\)s|\?|\$\d+|%s)(?:::[A-Z][A-Z ]*[A-Z])?"
_PLACEHOLDER_LIST = re.compile(rf"\(\s*{_PLACEHOLDER}(?:\s*,\s*{_PLACEHOLDER})*\s*\)")
_MANY_ROWS = re.compile(r"(\(…\))(?:\s*,\s*\(…\))+")
_COLUMNS = re.compile(r"^SELECT (.*?) FROM ", re.S)


def signature(statement: str) -> str:
    """A statement's shape: whitespace collapsed, placeholder lists and row lists folded."""
    text = " ".join(statement.split())
    text = _PLACEHOLDER_LIST.sub("(…)", text)
    text = _MANY_ROWS.sub(r"\1…", text)
    text = re.sub(_PLACEHOLDER, "?", text)
    columns = _COLUMNS.match(text)
    if columns and columns.group(1).count(",") >= 4:
        n = columns.group(1).count(",") + 1
        text = f"SELECT <{n} columns> FROM " + text[columns.end() :]
    return text[:220]


def _install() -> None:
    import sqlalchemy as sa
    from sqlalchemy.engine.default import DefaultDialect

    @sa.event.listens_for(sa.engine.Engine, "before_cursor_execute")
    def _before(conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool) -> None:
        conn.info.setdefault("bench_started", []).append(time.perf_counter())

    @sa.event.listens_for(sa.engine.Engine, "after_cursor_execute")
    def _after(conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool) -> None:
        took = time.perf_counter() - conn.info["bench_started"].pop()
        rows = len(params) if many and isinstance(params, list | tuple) else 1
        with _lock:
            entry = _statements.setdefault(signature(statement), [0, 0, 0.0])
            entry[0] += 1
            entry[1] += rows
            entry[2] += took

    do_commit = DefaultDialect.do_commit

    def timed_commit(self: DefaultDialect, dbapi_connection: Any) -> None:
        started = time.perf_counter()
        do_commit(self, dbapi_connection)
        with _lock:
            _commits[0] += 1
            _commits[1] += time.perf_counter() - started

    DefaultDialect.do_commit = timed_commit  # type: ignore[method-assign]


def _dump(path: str) -> None:
    with _lock:
        data = {
            "commits": _commits[0],
            "commit_seconds": _commits[1],
            "statements": {
                sig: {"executions": int(n), "rows": int(rows), "seconds": secs}
                for sig, (n, rows, secs) in sorted(_statements.items(), key=lambda kv: -kv[1][0])
            },
        }
    Path(path).write_text(json.dumps(data, indent=1))


def summarize_statements(data: dict[str, Any], tasks: int) -> dict[str, Any]:
    """Per-task figures from a statements file: statements, rows, commits, DB time."""
    statements = data.get("statements", {})
    executions = sum(s["executions"] for s in statements.values())
    seconds = sum(s["seconds"] for s in statements.values())
    per_kind = [
        {
            "statement": sig,
            "per_task": s["executions"] / tasks,
            "rows_per_execution": s["rows"] / max(s["executions"], 1),
            "mean_ms": s["seconds"] * 1000 / max(s["executions"], 1),
            "ms_per_task": s["seconds"] * 1000 / tasks,
        }
        for sig, s in statements.items()
    ]
    per_kind.sort(key=lambda k: -k["ms_per_task"])
    return {
        "statements_per_task": executions / tasks,
        "commits_per_task": data.get("commits", 0) / tasks,
        "statement_ms_per_task": seconds * 1000 / tasks,
        "commit_ms_per_task": data.get("commit_seconds", 0.0) * 1000 / tasks,
        "by_statement": per_kind,
    }


# --- py-spy stacks ------------------------------------------------------------------------------

_ROLES = (
    ("dispatcher loop", "(taskomatic/dispatcher.py"),
    ("worker", "_work (taskomatic/workers.py"),
    ("watcher", "(taskomatic/wakeup.py"),
)

# What the dispatcher loop is doing in a sample, first match wins (frames anywhere in the stack).
_BUCKETS = (
    ("waiting for a wake-up", ("wait (taskomatic/wakeup.py",)),
    ("commit", ("do_commit (", "_commit_impl (")),
    ("begin / pool checkout", ("_on_begin (", "do_begin (", "_checkout (", "begin (sqlalchemy")),
    (
        "executing SQL (driver + round trip)",
        ("do_execute (", "do_executemany (", "_exec_insertmany"),
    ),
    ("compiling SQL", ("_compile_w_cache (", "compile (sqlalchemy")),
    ("fetching / building rows", ("fetchall (", "_allrows (", "from_row (", "__iter__ (sqlalch")),
)


def _frame_key(frame: str) -> str:
    """'claim (taskomatic/store/base.py:215)' -> 'claim (taskomatic/store/base.py)'."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0].rstrip(")")
    for marker in ("site-packages/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def summarize_stacks(path: Path, top: int = 20) -> dict[str, Any]:
    """Samples per thread role, the dispatcher loop's time by activity, and its hottest frames."""
    by_thread: dict[str, list[tuple[list[str], int]]] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        by_thread.setdefault(frames[0], []).append((frames[1:], int(count)))
    roles: Counter[str] = Counter()
    loop: list[tuple[list[str], int]] = []
    for stacks in by_thread.values():
        text = ";".join(";".join(f) for f, _ in stacks)
        role = next((r for r, marker in _ROLES if marker in text), "other")
        roles[role] += sum(n for _, n in stacks)
        if role == "dispatcher loop":
            loop += stacks
    total = sum(n for _, n in loop) or 1
    buckets: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in loop:
        joined = ";".join(frames)
        bucket = next(
            (b for b, needles in _BUCKETS if any(x in joined for x in needles)), "other Python"
        )
        buckets[bucket] += n
        for key in {_frame_key(f) for f in frames}:
            inclusive[key] += n
    interesting = [
        (k, n)
        for k, n in inclusive.most_common()
        if "taskomatic/" in k or "do_commit" in k or "do_execute" in k
    ]
    return {
        "samples_by_thread_role": dict(roles),
        "loop_samples": total,
        "loop_share_by_activity": {b: n / total for b, n in buckets.most_common()},
        "loop_hottest_frames": [
            {"frame": k, "inclusive_share": n / total} for k, n in interesting[:top]
        ],
    }


def main() -> None:
    """`taskomatic` with statement counting (see the module docstring)."""
    out = os.environ.get("BENCH_STATEMENTS_OUT")
    if out:
        _install()
        atexit.register(_dump, out)
    from taskomatic.cli import main as cli

    cli(prog_name="taskomatic")


if __name__ == "__main__":
    main()
