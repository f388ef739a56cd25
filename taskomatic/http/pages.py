"""The dashboard's HTML, rendered on the server: every value passes through `escape`.

The live parts of a page (counts, lists, a group's states, a task's timeline) are filled by
static/dashboard.js from the page's event stream (`data-live`); the rest is plain HTML.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from taskomatic.explain import Why
from taskomatic.http.sessions import Session
from taskomatic.metrics import host_of
from taskomatic.model import Event, Group, Host, State, Task


def layout(title: str, body: str, session: Session | None, *, live: str | None = None) -> str:
    """A whole page: head, navigation (with sign-out when signed in), body."""
    nav = ""
    if session is not None:
        nav = (
            '<nav><a href="/ui/">Overview</a> <a href="/ui/tasks">Tasks</a> '
            '<a href="/ui/hosts">Hosts</a>'
            f'<span class="who">{escape(session.token.name)} ({session.token.role.value})</span>'
            f'<form method="post" action="/ui/logout" class="inline">{csrf_field(session)}'
            '<button type="submit" id="sign-out">Sign out</button></form></nav>'
        )
    live_attr = f' data-live="{escape(live)}"' if live else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · taskomatic</title>"
        '<link rel="stylesheet" href="/ui/static/dashboard.css">'
        '<script src="/ui/static/dashboard.js" defer></script></head>'
        f"<body{live_attr}><header><h1>taskomatic</h1>{nav}</header>"
        f"<main>{body}</main></body></html>"
    )


def csrf_field(session: Session) -> str:
    return f'<input type="hidden" name="csrf" value="{escape(session.csrf)}">'


def login(message: str | None = None) -> str:
    """The sign-in form: the token goes in the body of a POST, never in a URL."""
    note = f'<p class="error" id="login-error">{escape(message)}</p>' if message else ""
    return layout(
        "Sign in",
        "<h2>Sign in</h2>"
        f"{note}"
        '<form method="post" action="/ui/login" id="login">'
        '<label>API token <input type="password" name="token" id="token" '
        'autocomplete="off" required></label> '
        '<button type="submit">Sign in</button></form>'
        "<p>Create a token with <code>taskomatic tokens create --role viewer --name …</code>.</p>",
        None,
    )


def error(status: int, message: str, session: Session | None) -> str:
    return layout(
        f"Error {status}", f'<h2>Error {status}</h2><p class="error">{escape(message)}</p>', session
    )


def overview(session: Session) -> str:
    """Counts and the live lists, all filled from the overview stream."""
    counts = "".join(
        f'<a class="count state-{st.value}" href="/ui/tasks?state={st.value}">'
        f'<span class="n" id="count-{st.value}">…</span> {st.value}</a>'
        for st in State
    )
    sections = "".join(
        f'<section><h2>{escape(title)}</h2><table id="{key}"><tbody></tbody></table></section>'
        for key, title in (
            ("groups", "Recent groups"),
            ("running", "Running, and where"),
            ("waiting", "Waiting on a host job"),
            ("blocked", "New: what each waits for"),
            ("failures", "Recent failures"),
        )
    )
    body = (
        f'<div class="counts">{counts}</div>'
        '<p class="status"><span id="dispatchers">…</span> dispatcher(s) alive · '
        '<span id="updated">connecting…</span></p>'
        f"{sections}"
    )
    return layout("Overview", body, session, live="/ui/live")


def tasks(
    session: Session,
    found: Sequence[Task],
    next_cursor: int | None,
    state: str | None,
    action: str | None,
) -> str:
    """A page of tasks, newest first, with a link to the next page."""
    options = "".join(
        f'<option value="{st.value}"{" selected" if st.value == state else ""}>{st.value}</option>'
        for st in State
    )
    form = (
        '<form method="get" action="/ui/tasks" class="filters">'
        f'<select name="state"><option value="">any state</option>{options}</select> '
        f'<input name="action" placeholder="action" value="{escape(action or "")}"> '
        "<button>Filter</button></form>"
    )
    rows = "".join(_task_row(t) for t in found)
    more = ""
    if next_cursor is not None:
        query = {k: v for k, v in (("state", state), ("action", action)) if v}
        query["cursor"] = str(next_cursor)
        more = f'<p><a id="next-page" href="/ui/tasks?{escape(urlencode(query))}">Older →</a></p>'
    body = (
        f"<h2>Tasks</h2>{form}<table id=tasks><thead><tr><th>task</th><th>action</th>"
        "<th>state</th><th>host</th><th>created</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>{more}"
    )
    return layout("Tasks", body, session)


def task(session: Session, task: Task, events: Sequence[Event], why: Why) -> str:
    """One task: its fields, why it is where it is, its error, its timeline (kept live)."""
    actions = ""
    if session.token.role.value in ("operator", "admin"):
        for verb, states in (("cancel", (State.NEW,)), ("retry", (State.FAILED, State.CANCELLED))):
            if task.state in states:
                actions += (
                    f'<form method="post" action="/ui/tasks/{task.id}/{verb}" class="inline">'
                    f'{csrf_field(session)}<button id="{verb}">{verb.title()}</button></form>'
                )
    state = task.state.value
    fields = _dl(
        (
            ("id", escape(str(task.id))),
            ("action", escape(task.action)),
            ("state", f'<span id="state" class="state state-{state}">{state}</span>'),
            ("host", escape(host_of(task.job, task.params, task.result) or "—")),
            ("group", _group_link(task)),
            ("attempt", f"{task.attempt} of {task.max_attempts}"),
            ("created", escape(f"{_t(task.created_at)} by {task.created_by or '?'}")),
            ("why", f'<span id="why">{escape(why.summary)}</span>'),
        )
    )
    error_text = _json(task.error) if task.error else ""
    prereqs = "".join(f"<li>{_task_link(p)}</li>" for p in task.prerequisites)
    body = (
        f"<h2>Task {escape(task.action)}</h2>{actions}{fields}"
        f'<section><h3>Error</h3><pre id="error">{escape(error_text) or "none"}</pre></section>'
        f"<section><h3>Params</h3><pre>{escape(_json(task.params))}</pre></section>"
        + (f"<section><h3>After</h3><ul>{prereqs}</ul></section>" if prereqs else "")
        + "<section><h3>Timeline</h3><ol id=timeline>"
        + "".join(_event(e) for e in events)
        + "</ol></section>"
    )
    return layout(f"Task {task.id}", body, session, live=f"/ui/live?task={task.id}")


def group(session: Session, group: Group, members: Sequence[Task], more: bool) -> str:
    """A group: its DAG drawn with each task's state (kept live), and its tasks."""
    note = f"<p>Showing the first {len(members)} tasks.</p>" if more else ""
    rows = "".join(_task_row(t) for t in members)
    body = (
        f"<h2>Group {escape(group.name or str(group.id))}</h2>"
        f'<p>state <span id="group-state" class="state state-{escape(group.state)}">'
        f"{escape(group.state)}</span></p>{note}"
        f'<div class="dag">{dag_svg(members)}</div>'
        f"<table id=tasks><thead><tr><th>task</th><th>action</th><th>state</th><th>host</th>"
        f"<th>created</th></tr></thead><tbody>{rows}</tbody></table>"
    )
    return layout(f"Group {group.id}", body, session, live=f"/ui/live?group={group.id}")


def hosts(
    session: Session,
    found: Sequence[Host],
    reachable: dict[str, Any],
    waiting: dict[str, int],
) -> str:
    """The hosts: state, capacity, whether the inventory reaches them, jobs waiting on each;
    for admins, a button taking each into maintenance or back."""
    admin = session.token.role.value == "admin"

    def switch(h: Host) -> str:
        if not admin:
            return ""
        verb = "activate" if h.state.value == "maintenance" else "maintenance"
        return (
            f'<td><form method="post" action="/ui/hosts/{quote(h.name)}/{verb}" class="inline">'
            f"{csrf_field(session)}<button>{verb.title()}</button></form></td>"
        )

    rows = "".join(
        f'<tr id="host-{escape(h.name)}"><td>{escape(h.name)}</td><td>{escape(h.uri)}</td>'
        f'<td class="state-{h.state.value}">{h.state.value}</td>'
        f"<td>{'—' if h.capacity is None else h.capacity}</td>"
        f"<td>{escape(_reach(reachable.get(h.name)))}</td><td>{waiting.get(h.name, 0)}</td>"
        f"{switch(h)}</tr>"
        for h in found
    )
    body = (
        "<h2>Hosts</h2><table id=hosts><thead><tr><th>name</th><th>uri</th><th>state</th>"
        "<th>capacity</th><th>inventory</th><th>waiting jobs</th>"
        f"{'<th></th>' if admin else ''}</tr></thead>"
        f"<tbody>{rows or '<tr><td colspan=6>no hosts: taskomatic hosts add</td></tr>'}"
        "</tbody></table>"
    )
    return layout("Hosts", body, session)


# -- the DAG ------------------------------------------------------------------------------

_W, _H, _GAP_X, _GAP_Y = 150, 36, 40, 14


def dag_svg(members: Sequence[Task]) -> str:
    """The group's tasks in layers (a task one right of its last prerequisite), as SVG."""
    inside = {t.id: t for t in members}
    before = {t.id: [p for p in t.prerequisites if p in inside] for t in members}
    layer: dict[Any, int] = {}
    remaining = set(inside)
    while remaining:  # layer by layer, so a long chain needs no deep recursion
        ready = [tid for tid in remaining if all(p in layer for p in before[tid])]
        for tid in ready or remaining:  # (a cycle cannot be submitted; draw it anyway)
            layer[tid] = 1 + max((layer.get(p, -1) for p in before[tid]), default=-1)
        remaining -= set(ready or remaining)
    columns: dict[int, list[Task]] = {}
    for t in sorted(members, key=lambda t: t.created_at):
        columns.setdefault(layer[t.id], []).append(t)
    where = {}
    for x, col in columns.items():
        for y, t in enumerate(col):
            where[t.id] = (x * (_W + _GAP_X) + 10, y * (_H + _GAP_Y) + 10)
    width = (max(columns, default=0) + 1) * (_W + _GAP_X) + 20
    height = max((len(c) for c in columns.values()), default=1) * (_H + _GAP_Y) + 20
    edges = "".join(
        f'<line x1="{where[p][0] + _W}" y1="{where[p][1] + _H // 2}" '
        f'x2="{where[t.id][0]}" y2="{where[t.id][1] + _H // 2}" marker-end="url(#arrow)"/>'
        for t in members
        for p in t.prerequisites
        if p in where
    )
    nodes = "".join(
        f'<a href="/ui/tasks/{t.id}"><g class="node state-{t.state.value}" data-task="{t.id}">'
        f'<rect x="{x}" y="{y}" width="{_W}" height="{_H}" rx="6"/>'
        f'<text x="{x + 8}" y="{y + 15}">{escape(t.action[:20])}</text>'
        f'<text x="{x + 8}" y="{y + 29}" class="sub">{str(t.id)[:8]} · '
        f'<tspan class="st">{t.state.value}</tspan></text></g></a>'
        for t in members
        for x, y in [where[t.id]]
    )
    return (
        f'<svg id="dag" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>'
        f'<g class="edges">{edges}</g>{nodes}</svg>'
    )


# -- small parts --------------------------------------------------------------------------


def _task_row(t: Task) -> str:
    return (
        f'<tr data-task="{t.id}"><td>{_task_link(t.id)}</td><td>{escape(t.action)}</td>'
        f'<td class="state state-{t.state.value}">{t.state.value}</td>'
        f"<td>{escape(host_of(t.job, t.params, t.result) or '')}</td>"
        f"<td>{_t(t.created_at)}</td></tr>"
    )


def _task_link(tid: Any) -> str:
    return f'<a href="/ui/tasks/{tid}">{str(tid)[:8]}</a>'


def _group_link(t: Task) -> str:
    if t.group_id is None:
        return "—"
    return f'<a href="/ui/groups/{t.group_id}">{str(t.group_id)[:8]}</a>'


def _event(e: Event) -> str:
    source = e.from_state.value if e.from_state else "·"
    return (
        f'<li class="state-{e.to_state.value}"><time>{_t(e.at)}</time> '
        f"{source} → <b>{e.to_state.value}</b> {escape(e.message)} "
        f'<span class="actor">{escape(e.actor)}</span></li>'
    )


def _dl(items: Iterable[tuple[str, str]]) -> str:
    """A definition list of (name, HTML already escaped by the caller)."""
    return "<dl>" + "".join(f"<dt>{key}</dt><dd>{value}</dd>" for key, value in items) + "</dl>"


def _reach(record: Any) -> str:
    if record is None:
        return "not yet synced"
    return "reachable" if record.reachable else f"unreachable: {record.error or '?'}"


def _t(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "—"


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, sort_keys=True)
