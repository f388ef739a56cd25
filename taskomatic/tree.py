"""A group drawn as a tree for a terminal: each task under the tasks it waits for.

A task with several prerequisites in the group is drawn under the first of them and named
("see above") under the others, so the drawing stays a tree while showing every edge.
Compensation tasks follow, in the order they run, each naming the task it undoes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

from taskomatic.model import Group, Task


def group_tree(group: Group, tasks: Sequence[Task]) -> list[str]:
    """The lines showing `group` and its tasks (see the module)."""
    title = f"group {group.id}" + (f" ({group.name})" if group.name else "") + f": {group.state}"
    work = [t for t in tasks if t.compensates is None]
    undo = [t for t in tasks if t.compensates is not None]
    ids = {t.id for t in work}
    order = sorted(work, key=lambda t: (t.created_at, str(t.id)))
    children: dict[uuid.UUID | None, list[Task]] = {}
    for t in order:
        parents: list[uuid.UUID | None] = [p for p in t.prerequisites if p in ids] or [None]
        for p in parents:
            children.setdefault(p, []).append(t)
    lines = [title]
    drawn: set[uuid.UUID] = set()

    def draw(node: uuid.UUID | None, indent: str) -> None:
        kids = children.get(node, [])
        for i, t in enumerate(kids):
            last = i == len(kids) - 1
            branch, below = ("└─ ", "   ") if last else ("├─ ", "│  ")
            if t.id in drawn:
                lines.append(f"{indent}{branch}{_short(t.id)} {t.action} (see above)")
                continue
            drawn.add(t.id)
            lines.append(f"{indent}{branch}{_label(t)}")
            draw(t.id, indent + below)

    draw(None, "")
    if undo:
        lines.append("compensation (runs in this order):")
        by_id = {t.id: t for t in tasks}
        for t in _chain(undo):
            original = by_id.get(t.compensates) if t.compensates else None
            what = f"{original.action} {_short(original.id)}" if original else str(t.compensates)
            lines.append(f"   {_label(t)}  undoes {what}")
    return lines


def _chain(undo: Sequence[Task]) -> list[Task]:
    """Compensation tasks in the order they run (each waits for the one before)."""
    ids = {t.id for t in undo}
    first = [t for t in undo if not any(p in ids for p in t.prerequisites)]
    after = {p: t for t in undo for p in t.prerequisites if p in ids}
    out = list(first)
    while out and out[-1].id in after:
        out.append(after[out[-1].id])
    return out + [t for t in undo if t not in out]


def _label(t: Task) -> str:
    detail = ""
    if t.error:
        detail = f"  {t.error.get('message', '')}"
    elif t.job and t.state.value == "waiting":
        detail = f"  {t.job.get('kind')} job on {t.job.get('host')}"
    elif t.result is not None:
        text = json.dumps(t.result)
        detail = f"  {text if len(text) <= 60 else text[:57] + '...'}"
    return f"{t.state.value:9} {t.action} {_short(t.id)}{detail}"


def _short(task_id: uuid.UUID) -> str:
    return str(task_id)[:8]
