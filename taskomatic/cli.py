"""The `taskomatic` command: a few lines per verb over Queue; one clear line on error."""

from __future__ import annotations

import contextlib
import functools
import getpass
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import sqlalchemy as sa

from taskomatic import defaults, errors, logs
from taskomatic.actions.registry import registry
from taskomatic.model import TERMINAL, Group, HostState, State, Task
from taskomatic.queue import Queue
from taskomatic.submission import TaskSpec, parse_time
from taskomatic.tree import group_tree

F = TypeVar("F", bound=Callable[..., Any])

EXIT_TASK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_DATABASE = 5
EXIT_TIMEOUT = 6
EXIT_INTERNAL = 70

EXIT_CODES = f"""
Exit codes: 0 ok; {EXIT_TASK_FAILED} a waited-for task failed or was cancelled;
{EXIT_BAD_INPUT} bad input; {EXIT_NOT_FOUND} no such task or host;
{EXIT_CONFLICT} conflict or wrong state; {EXIT_DATABASE} database unavailable or not initialised;
{EXIT_TIMEOUT} wait timed out.
"""


def default_database_url() -> str:
    """An SQLite file in the user's data directory: the zero-setup embedded default."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"sqlite:///{Path(base) / 'taskomatic' / 'taskomatic.db'}"


class App:
    """What every command shares: the database URL, the output mode, the opened queue."""

    def __init__(self, database_url: str, as_json: bool, actions: Sequence[str]) -> None:
        self.database_url = database_url
        self.json = as_json
        self.actions = actions
        self._queue: Queue | None = None
        self._actions_loaded = False

    def load_actions(self) -> None:
        """Register the actions of installed plugins and of `--actions` modules (once)."""
        if not self._actions_loaded:
            registry.load_entry_points()
            for module in self.actions:
                registry.load_module(module)
            self._actions_loaded = True

    def queue(self, init: bool = False) -> Queue:
        """The queue, opened on first use; creates the schema if `init` or on SQLite."""
        if self._queue is None:
            self.load_actions()
            queue = self._open()
            version = self._schema_version(queue)
            if init or version is None:
                if not init and not self.database_url.startswith("sqlite"):
                    raise errors.SchemaError(
                        f"no taskomatic schema in {_safe_url(self.database_url)}; "
                        "run `taskomatic db init` first"
                    )
                queue.init_db()  # the embedded default needs no set-up step
            self._queue = queue
        return self._queue

    def _open(self) -> Queue:
        # Someone at a prompt wants to hear soon that the database went away mid-command.
        return Queue.open(
            self.database_url, actor=f"cli:{_user()}", give_up=defaults.CLI_DB_GIVE_UP_SECONDS
        )

    def _schema_version(self, queue: Queue) -> int | None:
        """The first contact with the database, deliberately not retried.

        Queue retries a lost connection for minutes, which suits a dispatcher; someone at a
        prompt (or a script) wants to learn at once that the database cannot be reached.
        """
        try:
            return queue.store.schema_version()
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            hint = (
                "check that it is a file this user can write"
                if self.database_url.startswith("sqlite")
                else "check that the server runs and the URL is right"
            )
            raise errors.DatabaseUnavailable(
                f"cannot reach the database at {_safe_url(self.database_url)}: "
                f"{_first_line(exc.orig or exc)}; {hint}"
            ) from None

    def out(self, data: Any, human: Callable[[], None]) -> None:
        if self.json:
            click.echo(json.dumps(data, indent=2, default=str))
        else:
            human()


def command(group: click.Group, name: str | None = None, **kw: Any) -> Callable[[F], F]:
    """Register a command whose TaskomaticErrors become one line and an exit code."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except errors.TaskomaticError as exc:
                fail(exc.message, _exit_code(exc))

        return group.command(name, **kw)(click.pass_obj(wrapper))  # type: ignore[return-value]

    return decorate


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"taskomatic: error: {message}", err=True)
    sys.exit(code)


def _exit_code(exc: errors.TaskomaticError) -> int:
    for kind, code in (
        (errors.ValidationError, EXIT_BAD_INPUT),
        (errors.ActionImportError, EXIT_BAD_INPUT),
        (errors.TaskNotFound, EXIT_NOT_FOUND),
        (errors.GroupNotFound, EXIT_NOT_FOUND),
        (errors.HostNotFound, EXIT_NOT_FOUND),
        (errors.TokenNotFound, EXIT_NOT_FOUND),
        (errors.TokenConflict, EXIT_CONFLICT),
        (errors.Conflict, EXIT_CONFLICT),
        (errors.HostConflict, EXIT_CONFLICT),
        (errors.InvalidTransition, EXIT_CONFLICT),
        (errors.DatabaseUnavailable, EXIT_DATABASE),
        (errors.SchemaError, EXIT_DATABASE),
        (errors.InventoryNotCurrent, EXIT_CONFLICT),
        (errors.WaitTimeout, EXIT_TIMEOUT),
    ):
        if isinstance(exc, kind):
            return code
    return EXIT_INTERNAL


# click >= 8.2 shows the help of a bare `taskomatic` (or `taskomatic db`) by raising this.
_SHOWS_HELP: tuple[type[click.ClickException], ...] = (
    (click.exceptions.NoArgsIsHelpError,) if hasattr(click.exceptions, "NoArgsIsHelpError") else ()
)


@contextlib.contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    """Turn click's usage errors (four lines, with the usage) into one line, exit code 2."""
    try:
        yield
    except click.ClickException as exc:
        if isinstance(exc, _SHOWS_HELP):
            raise
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
        fail(" ".join(exc.format_message().split()) + hint, EXIT_BAD_INPUT)


class _Main(click.Group):
    """The top-level group: reports bad usage of any command in one line."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_usage_errors():  # parsing of subcommands happens in here
            return super().invoke(ctx)


@click.group(
    cls=_Main,
    epilog=EXIT_CODES,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--database-url",
    envvar="TASKOMATIC_DATABASE_URL",
    default=default_database_url,
    show_default="an SQLite file in ~/.local/share/taskomatic",
    help="postgresql://user@host/db or sqlite:///path (env TASKOMATIC_DATABASE_URL).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--actions",
    "actions",
    multiple=True,
    metavar="MODULE",
    help="Import a module that registers actions (repeatable).",
)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.version_option(package_name="taskomatic")
@click.pass_context
def main(
    ctx: click.Context, database_url: str, as_json: bool, actions: tuple[str, ...], verbose: int
) -> None:
    """taskomatic — run virtualization work in order, in parallel where safe, never twice."""
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = App(database_url, as_json, actions)


@main.group()
def db() -> None:
    """Manage the database schema."""


@command(db, "init")
def db_init(app: App) -> None:
    """Create the tables if missing (safe to repeat) and record the schema version."""
    version = app.queue(init=True).store.schema_version()
    app.out(
        {"schema_version": version},
        lambda: click.echo(f"schema version {version} ready at {_safe_url(app.database_url)}"),
    )


@command(db, "schema")
def db_schema(app: App) -> None:
    """Print the PostgreSQL DDL of the schema (what `schema.sql` holds)."""
    from taskomatic.schema import postgresql_ddl

    click.echo(postgresql_ddl(), nl=False)


@command(db, "check")
def db_check(app: App) -> None:
    """Verify the queue's invariants (prerequisite counts, held locks); exit 1 if broken."""
    queue = app.queue()
    with queue.store.read() as conn:
        problems = queue.store.audit(conn)
    app.out(
        {"problems": problems},
        lambda: click.echo("\n".join(problems) if problems else "ok: no problems found"),
    )
    if problems:
        sys.exit(EXIT_TASK_FAILED)


def _task_options(fn: F) -> F:
    for option in reversed(
        [
            click.option(
                "--param",
                "-p",
                "param",
                multiple=True,
                metavar="KEY=VALUE",
                help="A parameter; VALUE is read as JSON if it parses, else as a string.",
            ),
            click.option("--params", "params_json", metavar="JSON", help="All parameters as JSON."),
            click.option("--after", multiple=True, metavar="ID", help="A prerequisite task id."),
            click.option("--id", "task_id", metavar="UUID", help="Choose the id (idempotent)."),
            click.option("--lock", multiple=True, metavar="KEY", help="An extra lock key."),
            click.option(
                "--priority", type=int, default=0, show_default=True, help="Higher runs first."
            ),
            click.option(
                "--not-before", metavar="TIME", help="ISO 8601 time, or a delay like 30s, 5m, 2h."
            ),
            click.option("--timeout", type=float, metavar="SECONDS", help="Fail after this long."),
            click.option(
                "--max-attempts",
                type=int,
                show_default="the action's own, usually 1",
                help="Attempts before the task fails.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


@command(main, "submit", epilog=EXIT_CODES)
@click.argument("action")
@_task_options
@click.option("--wait", "wait_", is_flag=True, help="Wait for the task to finish.")
def submit(
    app: App,
    action: str,
    param: tuple[str, ...],
    params_json: str | None,
    after: tuple[str, ...],
    task_id: str | None,
    lock: tuple[str, ...],
    priority: int,
    not_before: str | None,
    timeout: float | None,
    max_attempts: int | None,
    wait_: bool,
) -> None:
    """Submit one task running ACTION."""
    # Left out unless given, so that the action's own default applies.
    attempts: dict[str, Any] = {} if max_attempts is None else {"max_attempts": max_attempts}
    spec = TaskSpec(
        action,
        _params(param, params_json),
        id=task_id,
        after=after,
        locks=lock,
        priority=priority,
        not_before=_when(not_before),
        timeout=timeout,
        **attempts,
    )
    queue = app.queue()
    task = queue.submit_many([spec], created_by=f"cli:{_user()}")[0]
    if wait_:
        task = _wait(app, [task.id], None)[0]
    app.out(task.to_dict(), lambda: click.echo(task.id if not wait_ else _line(task)))
    _exit_for(task)


@command(main, "submit-group", epilog=EXIT_CODES)
@click.argument("file", type=click.File())
@click.option("--name", help="A name for the group (default: from the file).")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the group, showing progress.")
def submit_group(app: App, file: Any, name: str | None, wait_: bool) -> None:
    """Submit a DAG of tasks from FILE (JSON; - for stdin) as one group.

    The file holds {"name": ..., "tasks": [{"name": "a", "action": "noop"},
    {"action": "sleep", "params": {"seconds": 1}, "after": ["a"]}]}; `after` names tasks
    of the file by `name`, or existing tasks by id.
    """
    try:
        doc = json.load(file)
    except json.JSONDecodeError as exc:
        raise errors.ValidationError(f"{file.name}: not valid JSON: {exc}") from None
    if isinstance(doc, list):
        doc = {"tasks": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list):
        raise errors.ValidationError(f"{file.name}: expected an object with a 'tasks' list")
    specs = [TaskSpec.from_dict(t) if isinstance(t, dict) else _not_a_task(t) for t in doc["tasks"]]
    group_id = _group_id(doc.get("id"), file.name)
    name = name or doc.get("name")
    if name is not None and not isinstance(name, str):
        raise errors.ValidationError(f"{file.name}: 'name' must be a string, got {name!r}")
    queue = app.queue()
    group, tasks = queue.submit_group(
        specs, name=name, group_id=group_id, created_by=f"cli:{_user()}"
    )
    if wait_:
        tasks = _wait(app, [t.id for t in tasks], None, label=group.name or str(group.id))
    data = {"group": queue.group(group.id).to_dict(), "tasks": [t.to_dict() for t in tasks]}
    app.out(data, lambda: click.echo(group.id if not wait_ else "\n".join(_line(t) for t in tasks)))
    for task in tasks:
        _exit_for(task)


@command(main, "show")
@click.argument("task_id")
def show(app: App, task_id: str) -> None:
    """Show a task (or a group) with its event timeline."""
    queue = app.queue()
    try:
        task = queue.get(task_id)
    except errors.TaskNotFound:
        group = _group(queue, task_id)
        tasks = queue.list(group=group.id, limit=defaults.MAX_LIST_LIMIT).tasks
        app.out(
            {"group": group.to_dict(), "tasks": [t.to_dict() for t in tasks]},
            lambda: click.echo("\n".join(group_tree(group, tasks))),
        )
        return
    events = queue.events(task.id)
    app.out(
        {**task.to_dict(), "events": [e.to_dict() for e in events]},
        lambda: _print_task(task, events),
    )


@command(main, "list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in State]),
    help="Only tasks in this state (repeatable).",
)
@click.option("--action", help="Only tasks of this action.")
@click.option("--group", help="Only tasks of this group.")
@click.option("--limit", type=int, default=defaults.LIST_LIMIT, show_default=True)
@click.option("--cursor", type=int, help="Continue after a previous page.")
def list_(
    app: App,
    states: tuple[str, ...],
    action: str | None,
    group: str | None,
    limit: int,
    cursor: int | None,
) -> None:
    """List tasks, newest first."""
    page = app.queue().list(
        state=list(states), action=action, group=group, limit=limit, cursor=cursor
    )

    def human() -> None:
        click.echo(f"{'ID':36}  {'STATE':9}  {'ACTION':20}  {'TRY':>5}  CREATED")
        for t in page.tasks:
            click.echo(
                f"{t.id}  {t.state.value:9}  {t.action[:20]:20}  "
                f"{t.attempt:>2}/{t.max_attempts:<2}  {t.created_at:%Y-%m-%d %H:%M:%S}"
            )
        if page.next_cursor is not None:
            click.echo(f"(more: --cursor {page.next_cursor})", err=True)

    app.out({"tasks": [t.to_dict() for t in page.tasks], "next_cursor": page.next_cursor}, human)


@command(main, "wait", epilog=EXIT_CODES)
@click.argument("ids", nargs=-1, required=True)
@click.option("--timeout", type=float, metavar="SECONDS", help="Give up after this long.")
def wait(app: App, ids: tuple[str, ...], timeout: float | None) -> None:
    """Wait until the tasks (or every task of a group) finish; exit 1 if any did not complete."""
    queue = app.queue()
    task_ids: list[uuid.UUID] = []
    groups: list[Group] = []
    for ref in ids:
        try:
            task_ids.append(queue.get(ref).id)
        except errors.TaskNotFound:
            groups.append(_group(queue, ref))
    tasks = _wait(app, task_ids, timeout) if task_ids else []
    for group in groups:  # a group may grow as it runs: wait for the group, not its tasks
        tasks += wait_group(app, group, timeout)
    app.out([t.to_dict() for t in tasks], lambda: click.echo("\n".join(_line(t) for t in tasks)))
    for task in tasks:
        _exit_for(task)


@command(main, "cancel")
@click.argument("task_id")
@click.option("--reason", default="cancelled by operator", show_default=True)
def cancel(app: App, task_id: str, reason: str) -> None:
    """Cancel a task: a new one at once, with the tasks that depend on it; a running or
    waiting one is asked to stop (its host job aborted) and ends once it has."""
    tasks = app.queue().cancel(task_id, reason)
    app.out([t.to_dict() for t in tasks], lambda: click.echo("\n".join(_line(t) for t in tasks)))


@command(main, "retry")
@click.argument("task_id")
def retry(app: App, task_id: str) -> None:
    """Send a failed or cancelled task back to new (with the dependents it cancelled)."""
    tasks = app.queue().retry(task_id)
    app.out([t.to_dict() for t in tasks], lambda: click.echo("\n".join(_line(t) for t in tasks)))


@command(main, "collect")
@click.argument("task_id")
def collect(app: App, task_id: str) -> None:
    """Print a finished task's result and mark it collected."""
    task = app.queue().collect(task_id)
    app.out(
        task.to_dict(),
        lambda: click.echo(json.dumps(task.result if task.state == State.COMPLETE else task.error)),
    )
    _exit_for(task)


@command(main, "prune")
@click.option(
    "--older-than",
    required=True,
    metavar="AGE",
    help="Only tasks finished longer ago than this: 30d, 12h, 90m, 3600s.",
)
@click.option("--force", is_flag=True, help="Also tasks whose results were never collected.")
def prune(app: App, older_than: str, force: bool) -> None:
    """Remove finished tasks (and their events) whose results were collected."""
    removed = app.queue().prune(_age(older_than), force=force)
    app.out({"removed": removed}, lambda: click.echo(f"removed {removed} finished task(s)"))


@command(main, "why")
@click.argument("task_id")
def why(app: App, task_id: str) -> None:
    """Explain why a task is not running (prerequisites, locks, not_before, workers), or
    where a group is: what sank it, what its live tasks wait for."""
    queue = app.queue()
    try:
        answer = queue.why(task_id)
    except errors.TaskNotFound:
        group = queue.why_group(_group(queue, task_id).id)
        lines = [group.summary] + [
            f"- {w.task.action} {w.task.id}: {w.summary}" for w in group.tasks
        ]
        app.out(group.to_dict(), lambda: click.echo("\n".join(lines)))
        return
    app.out(
        answer.to_dict(),
        lambda: click.echo("\n".join(f"- {b.message}" for b in answer.blockers) or answer.summary),
    )


@command(main, "status")
def status(app: App) -> None:
    """Tasks by state and the dispatchers alive."""
    queue = app.queue()
    counts, alive, uncollected = queue.counts(), queue.dispatchers(), queue.uncollected()
    data = {
        "counts": {s.value: counts.get(s, 0) for s in State},
        "uncollected": uncollected,
        "dispatchers": [
            {"id": str(d.id), "host": d.hostname, "pid": d.pid, "workers": d.workers} for d in alive
        ],
    }

    def human() -> None:
        click.echo("  ".join(f"{s.value}={counts.get(s, 0)}" for s in State))
        click.echo(f"{uncollected} finished task(s) with results not yet collected")
        click.echo(
            f"{len(alive)} dispatcher(s) alive"
            + "".join(f"\n  {d.id} on {d.hostname} pid {d.pid}, {d.workers} workers" for d in alive)
        )

    app.out(data, human)


@main.group()
def hosts() -> None:
    """Manage the hypervisors libvirt actions run on (see docs/hosts.md)."""


@command(hosts, "add")
@click.argument("name")
@click.argument("uri")
@click.option("--capacity", type=int, help="Most VMs to place on it (default: no limit).")
def hosts_add(app: App, name: str, uri: str, capacity: int | None) -> None:
    """Register host NAME at libvirt URI (qemu+tls://h/system, qemu+ssh://…, test:///…)."""
    host = app.queue().hosts.add(name, uri, capacity=capacity)
    app.out(host.to_dict(), lambda: click.echo(f"{host.name}  {host.state}  {host.uri}"))


@command(hosts, "list")
@click.option("--state", type=click.Choice([s.value for s in HostState]), help="Only these.")
def hosts_list(app: App, state: str | None) -> None:
    """The hosts, by name."""
    found = app.queue().hosts.list(state)

    def human() -> None:
        if not found:
            click.echo("no hosts; add one with `taskomatic hosts add NAME URI`")
            return
        click.echo(f"{'NAME':<16} {'STATE':<12} {'CAPACITY':>8}  URI")
        for h in found:
            capacity = "-" if h.capacity is None else str(h.capacity)
            click.echo(f"{h.name:<16} {h.state:<12} {capacity:>8}  {h.uri}")

    app.out([h.to_dict() for h in found], human)


def _host_state_command(name: str, state: HostState, doc: str) -> None:
    """`hosts maintenance` and `hosts activate`: one command each, the same code."""

    @command(hosts, name, help=doc)
    @click.argument("host")
    def set_state(app: App, host: str) -> None:
        changed = app.queue().hosts.set_state(host, state)
        app.out(changed.to_dict(), lambda: click.echo(f"{changed.name}  {changed.state}"))


_host_state_command(
    "maintenance",
    HostState.MAINTENANCE,
    "Put HOST into maintenance: nothing new is placed on it; what runs there stays.",
)
_host_state_command("activate", HostState.ACTIVE, "Make HOST active again: new work may go there.")


@command(hosts, "remove")
@click.argument("host")
def hosts_remove(app: App, host: str) -> None:
    """Forget HOST (the hypervisor is untouched; tasks pinned to it will fail)."""
    app.queue().hosts.remove(host)
    app.out({"removed": host}, lambda: click.echo(f"removed {host}"))


@command(main, "actions")
def actions(app: App) -> None:
    """List the registered actions and their parameters."""
    app.load_actions()
    listing: dict[str, dict[str, Any]] = {}
    for name in registry.names():
        action = registry.get(name)
        listing[name] = {
            "help": action.help,
            "params": {
                p: {
                    "type": spec.type.__name__,
                    "required": spec.required,
                    **({} if spec.required else {"default": spec.default}),
                }
                for p, spec in action.params.items()
            },
        }

    def human() -> None:
        for name, info in listing.items():
            params = ", ".join(
                f"{p}: {v['type']}" + ("" if v["required"] else f" = {v['default']!r}")
                for p, v in info["params"].items()
            )
            click.echo(f"{name}({params})  {info['help']}")

    app.out(listing, human)


grace_option = click.option(
    "--grace",
    type=float,
    default=defaults.SHUTDOWN_GRACE_SECONDS,
    show_default=True,
    help="Seconds running actions get to finish on SIGTERM/SIGINT.",
)
"""`--grace`, shared by the long-running commands (dispatcher, serve)."""

log_format_option = click.option(
    "--log-format",
    type=click.Choice(logs.FORMATS),
    default="text",
    show_default=True,
    help="json: one object per line, with the task id as a field.",
)
"""`--log-format`, shared by the long-running commands (dispatcher, serve)."""


@command(main, "dispatcher")
@click.option(
    "--workers",
    type=int,
    default=defaults.WORKERS,
    show_default=True,
    help="Worker threads (tasks run at once).",
)
@click.option(
    "--lease",
    type=float,
    default=defaults.LEASE_SECONDS,
    show_default=True,
    help="Seconds a claimed task stays ours without renewal.",
)
@click.option(
    "--poll",
    type=float,
    default=defaults.SAFETY_POLL_SECONDS,
    show_default=True,
    help="Seconds between safety polls.",
)
@click.option(
    "--recovery",
    type=float,
    default=defaults.RECOVERY_SECONDS,
    show_default=True,
    help="Seconds between sweeps taking over tasks whose lease expired.",
)
@click.option("--until-empty", is_flag=True, help="Exit once no task is new, running or waiting.")
@grace_option
@click.option(
    "--inventory/--no-inventory",
    default=True,
    show_default=True,
    help="Keep the inventory of hosts, VMs and pools current (libvirt events, syncs).",
)
@click.option(
    "--inventory-interval",
    type=click.FloatRange(min=0.1),
    default=defaults.INVENTORY_SYNC_SECONDS,
    show_default=True,
    help="Seconds between full inventory syncs of every host.",
)
@log_format_option
def dispatcher(
    app: App,
    workers: int,
    lease: float,
    poll: float,
    recovery: float,
    until_empty: bool,
    grace: float,
    inventory: bool,
    inventory_interval: float,
    log_format: str,
) -> None:
    """Run tasks until stopped (SIGTERM/SIGINT: finish running work, then exit 0)."""
    from taskomatic.dispatcher import Dispatcher

    logs.configure(log_format)
    queue = service_queue(app)
    disp = Dispatcher(
        queue,
        workers=workers,
        lease=lease,
        poll=poll,
        recovery=recovery,
        inventory=inventory,
        inventory_interval=inventory_interval,
    )
    on_stop_signals(queue, lambda: disp.stop(grace=grace, wait=False))
    disp.run(until_empty=until_empty)


# -- helpers -----------------------------------------------------------------------------


def service_queue(app: App) -> Queue:
    """The queue of a long-running command (`dispatcher`, `serve`): INFO logs, and database
    outages ridden out for minutes rather than the seconds a person at a prompt waits."""
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    queue = app.queue()
    queue.give_up = defaults.DB_RETRY_GIVE_UP_SECONDS
    return queue


def on_stop_signals(queue: Queue, stop: Callable[[], None]) -> None:
    """On the first SIGTERM/SIGINT call `stop` and quit riding out a database outage (which
    must not hold the exit for minutes); on a second, exit at once (leases recover the rest)."""
    stops = 0

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stops
        stops += 1
        if stops > 1:
            os._exit(1)
        logging.getLogger(__name__).info("%s: stopping", signal.Signals(signum).name)
        stop()
        queue.abandon_retries()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _wait(
    app: App, ids: list[uuid.UUID], timeout: float | None, label: str | None = None
) -> list[Task]:
    progress = _progress(app, label) if label else None
    return app.queue().wait(ids, timeout=timeout, on_change=progress)


def _progress(app: App, label: str) -> Callable[[list[Task]], None] | None:
    """A progress line on stderr for waits (one line, redrawn on a terminal)."""
    if app.json:
        return None
    tty = sys.stderr.isatty()

    def progress(tasks: list[Task]) -> None:
        counts: dict[str, int] = {}
        for t in tasks:
            counts[t.state.value] = counts.get(t.state.value, 0) + 1
        done = sum(t.state in TERMINAL for t in tasks)
        text = (
            f"{label}: {done}/{len(tasks)} finished ("
            + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            + ")"
        )
        end = "" if tty and done < len(tasks) else "\n"
        click.echo(("\r\x1b[K" if tty else "") + text + end, err=True, nl=False)

    return progress


def wait_group(app: App, group: Group, timeout: float | None) -> list[Task]:
    """Wait for a group to end, showing its progress on stderr (unless --json)."""
    _, tasks = app.queue().wait_group(
        group.id, timeout, on_change=_progress(app, group.name or str(group.id))
    )
    return tasks


def _exit_for(task: Task) -> None:
    if task.state in (State.FAILED, State.CANCELLED):
        sys.exit(EXIT_TASK_FAILED)


def _line(task: Task) -> str:
    detail = ""
    if task.error:
        detail = f"  {task.error.get('message', '')}"
    elif task.result is not None:
        detail = f"  {json.dumps(task.result)}"
    return f"{task.id}  {task.state.value:9}  {task.action}{detail}"


def _print_task(task: Task, events: Sequence[Any]) -> None:
    d = task.to_dict()
    for key in (
        "id",
        "action",
        "state",
        "params",
        "priority",
        "attempt",
        "max_attempts",
        "locks",
        "after",
        "group",
        "not_before",
        "timeout",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
        "owner",
        "result",
        "error",
    ):
        value = d[key]
        if value in (None, [], {}) and key not in ("state", "params"):
            continue
        if key == "error" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != "traceback"}
        click.echo(
            f"{key + ':':13} {json.dumps(value) if isinstance(value, dict | list) else value}"
        )
    click.echo("events:")
    for e in events:
        src = e.from_state.value if e.from_state else "-"
        click.echo(
            f"  {e.at:%Y-%m-%d %H:%M:%S.%f}"[:-3] + f"  {src:>9} -> {e.to_state.value:9}"
            f"  {e.actor}  {e.message}"
        )


def _params(pairs: Sequence[str], params_json: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if params_json:
        try:
            params = json.loads(params_json)
        except json.JSONDecodeError as exc:
            raise errors.InvalidParams(f"--params is not valid JSON: {exc}") from None
        if not isinstance(params, dict):
            raise errors.InvalidParams("--params must be a JSON object")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise errors.InvalidParams(f"--param {pair!r} is not KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> timedelta | None:
    """A span like 30s, 5m, 2h, 7d; None if `text` is not one."""
    if text[-1:] in _UNITS and text[:-1].replace(".", "", 1).isdigit():
        return timedelta(seconds=float(text[:-1]) * _UNITS[text[-1]])
    return None


def _age(text: str) -> timedelta:
    span = _duration(text)
    if span is None:
        raise errors.ValidationError(
            f"--older-than: {text!r} is not an age; give a number and a unit: 30d, 12h, 90m, 60s",
            field="older_than",
        )
    return span


def _when(text: str | None) -> datetime | None:
    if not text:
        return None
    span = _duration(text)
    if span is not None:
        return datetime.now(UTC) + span
    try:
        return parse_time(text)
    except errors.ValidationError as exc:
        raise errors.ValidationError(
            f"--not-before: {exc.message}; give an ISO 8601 time with a timezone "
            "(2030-01-01T12:00:00Z) or a delay like 30s, 5m, 2h",
            field="not_before",
        ) from None


def _group(queue: Queue, ref: str) -> Group:
    """The group `ref` names, once it is known not to be a task."""
    try:
        return queue.group(ref)
    except errors.GroupNotFound:
        raise errors.TaskNotFound(f"{ref} (nor a group with that id)") from None


def _group_id(value: Any, source: str) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise errors.ValidationError(f"{source}: group 'id' {value!r} is not a UUID") from None


def _not_a_task(value: Any) -> NoReturn:
    raise errors.ValidationError(f"each task must be an object, got {value!r}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _safe_url(url: str) -> str:
    return sa.engine.make_url(url).render_as_string(hide_password=True)


# The inventory's commands (`vms`, `pools`, `drift`, `hosts show`, `hosts clear`) and `serve`
# and `tokens` live in their own modules, which register them on the groups above.
from taskomatic import cli_flows, cli_inventory, cli_serve  # noqa: E402, F401
