"""Acceptance tests: the `taskomatic` command run as a subprocess, exactly as a user runs it.

Every run is a fresh process of the venv's console script, configured the way a user
configures it: `TASKOMATIC_DATABASE_URL`, `--database-url`, or neither (then the default
database under `$HOME`, which points at a temporary directory). Tests whose outcome depends on
the backend take `cli` and run on SQLite and PostgreSQL; the rest run on SQLite only, and the
tests that need a PostgreSQL server say `postgresql` in their id, so `-k "not postgresql"`
runs without one. Each run costs about half a second of CPU (mostly imports), so commands
that do not depend on each other start together (`run_all`).
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from acceptance.cli import (
    ACTIONS_MODULE,
    RUN_TIMEOUT_SECONDS,
    TASKOMATIC,
    Cli,
    Result,
    run_concurrently,
)
from helpers import TABLES, open_queue, run_to_completion, wait_until
from pgcluster import ExternalPostgres, PostgresCluster

from taskomatic import State, TaskSpec
from taskomatic.schema import SCHEMA_VERSION
from taskomatic.store import connect

CLOSED_PORT_URL = "postgresql+psycopg://x@127.0.0.1:1/x"
"""A PostgreSQL server that is not there: nothing listens on port 1."""

UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"
"""A task id that no task has."""

DONE_ID = "00000000-0000-4000-8000-00000000000d"
"""The completed task in the queue the FAILURES run on."""

QUEUED_ID = "00000000-0000-4000-8000-00000000000a"
"""The new task (with a dependent) in the queue the FAILURES run on."""

DEMO_GROUP = Path(__file__).resolve().parents[2] / "docs" / "examples" / "demo-group.json"

README_COMMANDS = (
    *("db", "submit", "submit-group", "show", "list", "wait", "cancel", "retry", "collect"),
    *("why", "status", "actions", "dispatcher", "prune", "hosts"),
)
"""The commands the README promises."""

README_DB_COMMANDS = ("init", "check", "schema")
"""The `db` subcommands the README promises."""

Snapshot = dict[str, list[tuple[str, ...]]]


def snapshot(url: str) -> Snapshot:
    """Every row of every task table: equal snapshots mean nothing was written."""
    store = connect(url)
    try:
        with store.read() as conn:
            return {
                table.name: sorted(tuple(map(str, row)) for row in conn.execute(sa.select(table)))
                for table in TABLES
            }
    finally:
        store.close()


def states(result: Result) -> dict[str, str]:
    """Task id to state, from the lines `wait`, `cancel` and `retry` print."""
    assert result.lines, str(result)
    return {line.split()[0]: line.split()[1] for line in result.lines}


def ids(result: Result) -> list[str]:
    """The task ids of a `--json list`, in the order listed."""
    assert result.code == 0, str(result)
    return [t["id"] for t in result.json()["tasks"]]


# -- what users rely on ---------------------------------------------------------------------


def test_help_works_for_every_command(home_cli: Cli) -> None:
    """`-h` and `--help` describe every command and subcommand, a bare `taskomatic` shows
    the help too, and none of them touches a database."""
    top, bare = home_cli.run_all(["--help"], [])
    commands = _listed_commands(top.stdout)
    assert set(README_COMMANDS) <= set(commands)
    assert "Exit codes: 0 ok;" in top.stdout
    assert (bare.stdout + bare.stderr).startswith("Usage: taskomatic [OPTIONS] COMMAND")
    helps = home_cli.run_all(
        *([c, "--help"] for c in commands), *(["db", c, "-h"] for c in README_DB_COMMANDS)
    )
    [db] = [result for result in helps if result.args == ("db", "--help")]
    assert _listed_commands(db.stdout) == sorted(README_DB_COMMANDS)
    for result in helps:
        command = " ".join(a for a in result.args if not a.startswith("-"))
        assert result.code == 0, str(result)
        assert result.stdout.startswith(f"Usage: taskomatic {command} "), str(result)
        assert result.stderr == ""
    assert list(home_cli.home.iterdir()) == []  # no database was created


def _listed_commands(help_text: str) -> list[str]:
    """The command names in the `Commands:` section of a help text."""
    section = help_text.split("Commands:\n", 1)[1].split("\n\n", 1)[0]
    return [line.split()[0] for line in section.splitlines() if line.startswith("  ")]


def test_default_database_is_an_sqlite_file_in_the_users_data_directory(
    home_cli: Cli, tmp_path: Path, actions_path: Path
) -> None:
    """With no URL the queue lives in ~/.local/share/taskomatic, or under $XDG_DATA_HOME;
    it needs no `db init`, and `db init` on it is harmless: it keeps what is queued."""
    queued = home_cli.submit("noop")
    default = home_cli.home / ".local" / "share" / "taskomatic" / "taskomatic.db"
    assert (
        home_cli.ok("db", "init").stdout
        == f"schema version {SCHEMA_VERSION} ready at sqlite:///{default}\n"
    )

    xdg_cli = Cli(home_cli.home, None, actions_path)
    xdg_cli.env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    listed, xdg_listed = run_concurrently([(home_cli, ("--json", "list")), (xdg_cli, ("status",))])
    assert ids(listed) == [queued]
    assert xdg_listed.lines[0].startswith("new=0  running=0")
    assert (tmp_path / "xdg" / "taskomatic" / "taskomatic.db").is_file()


def test_submit_records_every_option_and_resubmission_is_idempotent(cli: Cli) -> None:
    """Each `submit` option lands on the task; the same --id with the same content returns
    the task (exit 0), with other content is a conflict (exit 4) that changes nothing."""
    task_id = str(uuid.uuid4())
    submit = ("--actions", ACTIONS_MODULE, "submit", "demo.provision", "--id", task_id)
    options = (
        *("--params", '{"vm": "web1"}', "--lock", "host:h1", "--priority", "7"),
        *("--not-before", "1h", "--timeout", "90", "--max-attempts", "3"),
    )
    submitted = datetime.now(UTC)
    assert cli.ok(*submit, "-p", "memory_mb=2048", *options).stdout == f"{task_id}\n"
    before = snapshot(str(cli.url))
    again, conflict, show = cli.run_all(
        [*submit, "-p", "memory_mb=2048", *options],
        [*submit, "-p", "memory_mb=4096", *options],
        ["--json", "show", task_id],
    )
    assert (again.code, again.stdout) == (0, f"{task_id}\n")
    conflict.error(4, f"task {task_id} already exists with a different params;")
    assert snapshot(str(cli.url)) == before

    shown = show.json()
    assert (shown["action"], shown["state"]) == ("demo.provision", "new")
    assert shown["params"] == {"vm": "web1", "host": "any", "memory_mb": 2048}
    assert shown["locks"] == ["host:h1"]
    assert (shown["priority"], shown["timeout"], shown["max_attempts"]) == (7, 90.0, 3)
    delay = datetime.fromisoformat(shown["not_before"]) - submitted
    assert timedelta(minutes=59) < delay < timedelta(minutes=61)
    assert shown["created_by"] == f"cli:{getpass.getuser()}"
    [event] = shown["events"]
    assert (event["from"], event["to"], event["message"]) == (None, "new", "submitted")


def test_submit_without_max_attempts_gives_the_action_its_own(sqlite_cli: Cli) -> None:
    """An action declares how many attempts its tasks get unless the submitter says."""
    args = ("--actions", ACTIONS_MODULE, "--json", "submit", "demo.provision", "-p", "vm=web1")
    assert sqlite_cli.ok(*args).json()["max_attempts"] == 4


def test_dispatcher_runs_the_demo_group_while_wait_follows(cli: Cli) -> None:
    """The documented example group: `dispatcher --until-empty` runs it to the end while
    `wait` (another process) follows; the failing task, retried once, sinks its dependent;
    `wait` exits 1 when a task failed, 0 when all completed."""
    group_id = cli.ok("submit-group", str(DEMO_GROUP)).stdout.strip()
    with cli.background("--json", "wait", group_id) as waiting:
        cli.ok("dispatcher", "--until-empty", "--workers", "4", "--poll", "0.2")
        followed = waiting.finish(timeout=10)
    assert followed.code == 1, str(followed)
    tasks = followed.json()
    [flaky] = [t for t in tasks if t["action"] == "fail"]
    [after_flaky] = [t for t in tasks if t["after"] == [flaky["id"]]]
    [report] = [t for t in tasks if len(t["after"]) == 3]
    assert {t["state"] for t in tasks if t["action"] == "sleep"} == {"complete"}
    assert (flaky["state"], flaky["attempt"]) == ("failed", 2)
    assert after_flaky["state"] == "cancelled"
    assert after_flaky["error"]["message"] == f"prerequisite {flaky['id']} failed"

    group, timeline, done = cli.run_all(
        ["show", group_id], ["show", flaky["id"]], ["wait", report["id"]]
    )
    assert group.lines[0] == (
        f"group {group_id} (demo: prepare, run in parallel, then report): failed"
    )
    drawn = [line for line in group.lines[1:] if not line.endswith("(see above)")]
    assert len(drawn) == 7  # each task once, under its first prerequisite
    # Each event line: date, time, from, ->, to, actor, message.
    events = timeline.lines[timeline.lines.index("events:") + 1 :]
    submitted, claimed, retry, claimed_again, failed = (e.split(maxsplit=6) for e in events)
    assert [e[2:5] for e in (submitted, claimed, retry, claimed_again, failed)] == [
        ["-", "->", "new"],
        ["new", "->", "running"],
        ["running", "->", "new"],
        ["new", "->", "running"],
        ["running", "->", "failed"],
    ]
    assert retry[6].startswith("attempt 1 failed: simulated host error; retry at ")
    assert failed[6] == "attempt 2 failed: simulated host error"
    assert done.code == 0, str(done)
    assert done.lines == [f"{report['id']}  complete   noop"]


def test_why_names_the_prerequisite_the_lock_holder_and_not_before(cli: Cli) -> None:
    """`why` names all a new task waits for: its prerequisite, the running task holding its
    lock, its not_before; `status` counts tasks and shows the dispatcher, which SIGTERM
    stops cleanly."""
    holder, later = str(uuid.uuid4()), str(uuid.uuid4())
    for result in cli.run_all(
        ["submit", "sleep", "--id", holder, "-p", "seconds=30", "--lock", "vm:web1"],
        ["submit", "noop", "--id", later, "--not-before", "2h"],
    ):
        assert result.code == 0, str(result)
    dispatch = ("dispatcher", "--workers", "2", "--poll", "0.2", "--grace", "0.2")
    with cli.background(*dispatch) as dispatcher, open_queue(str(cli.url)) as queue:
        blocked = cli.submit("noop", "--after", later, "--lock", "vm:web1", "--not-before", "1h")
        wait_until(lambda: queue.get(holder).state is State.RUNNING, 20, "the lock holder to run")
        why, status = cli.run_all(["why", blocked], ["--json", "status"])
        stopped = dispatcher.stop()

    assert why.lines[0] == f"- waits for prerequisite {later} (noop), which is new"
    assert why.lines[1].startswith(f"- lock vm:web1 is held by task {holder} (running) since ")
    assert why.lines[2].startswith("- not before ")
    assert len(why.lines) == 3
    assert status.json()["counts"] == {
        **dict.fromkeys(("waiting", "complete", "failed", "cancelled"), 0),
        "new": 2,
        "running": 1,
    }
    [alive] = status.json()["dispatchers"]
    assert (alive["pid"], alive["workers"]) == (dispatcher.proc.pid, 2)
    assert stopped.code == 0, str(stopped)
    assert "SIGTERM: stopping" in stopped.stderr


def test_cancel_is_transitive_and_retry_revives(sqlite_cli: Cli) -> None:
    """A group read from stdin, a chain a -> b -> c: cancelling a cancels b and c;
    retrying a brings all three back to new."""
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    chain = {
        "name": "chain",
        "tasks": [
            {"name": "a", "action": "noop", "not_before": later},
            {"name": "b", "action": "noop", "after": ["a"]},
            {"name": "c", "action": "noop", "after": ["b"]},
        ],
    }
    submitted = sqlite_cli.ok("--json", "submit-group", "-", stdin=json.dumps(chain)).json()
    a, b, c = (t["id"] for t in submitted["tasks"])
    assert submitted["group"]["name"] == "chain"

    assert states(sqlite_cli.ok("cancel", a)) == {a: "cancelled", b: "cancelled", c: "cancelled"}
    assert states(sqlite_cli.ok("retry", a)) == {a: "new", b: "new", c: "new"}


def test_list_filters_pages_and_prints_json(sqlite_cli: Cli, sqlite_url: str) -> None:
    """`list` shows tasks newest first, filtered by states, action and group, a page at a
    time (--limit, --cursor)."""
    with open_queue(sqlite_url) as queue:
        _, grouped = queue.submit_group([TaskSpec("noop"), TaskSpec("sleep")])
        sleeping = queue.submit("sleep")
        gone = queue.submit("noop")
        queue.cancel(gone.id)
    newest_first = [str(t.id) for t in (gone, sleeping, grouped[1], grouped[0])]

    table, noops, group, page = sqlite_cli.run_all(
        ["list"],
        ["--json", "list", "--state", "cancelled", "--state", "new", "--action", "noop"],
        ["--json", "list", "--group", str(grouped[0].group_id)],
        ["--json", "list", "--limit", "3"],
    )
    assert table.lines[0].split() == ["ID", "STATE", "ACTION", "TRY", "CREATED"]
    assert [line.split()[:3] for line in table.lines[1:]] == [
        [str(gone.id), "cancelled", "noop"],
        [str(sleeping.id), "new", "sleep"],
        [str(grouped[1].id), "new", "sleep"],
        [str(grouped[0].id), "new", "noop"],
    ]
    assert ids(noops) == [str(gone.id), str(grouped[0].id)]
    assert ids(group) == newest_first[2:]
    assert ids(page) == newest_first[:3]
    rest = sqlite_cli.json("list", "--limit", "3", "--cursor", str(page.json()["next_cursor"]))
    assert [t["id"] for t in rest["tasks"]] == newest_first[3:]
    assert rest["next_cursor"] is None


def test_actions_lists_builtin_and_loaded_actions_without_a_database(home_cli: Cli) -> None:
    """`actions` shows every registered action with its parameters, `--actions` adds a
    module's; it needs no database (here: one that cannot be reached)."""
    builtin, loaded = home_cli.run_all(
        ["--database-url", CLOSED_PORT_URL, "actions"],
        ["--database-url", CLOSED_PORT_URL, "--actions", ACTIONS_MODULE, "--json", "actions"],
    )
    assert builtin.code == 0, str(builtin)
    assert any(line.startswith("sleep(seconds: float = 1.0)  Sleep ") for line in builtin.lines)
    assert loaded.json()["demo.provision"] == {
        "help": "Provision a machine (a stand-in that reports what it was asked).",
        "params": {
            "vm": {"type": "str", "required": True},
            "host": {"type": "str", "required": False, "default": "any"},
            "memory_mb": {"type": "int", "required": False, "default": 1024},
        },
    }


def test_a_reader_that_goes_away_gets_no_traceback(home_cli: Cli) -> None:
    """`taskomatic db schema | head -0`: the closed pipe ends the command quietly."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # before the command writes anything, so there is no race
    try:
        proc = subprocess.run(
            [str(TASKOMATIC), "db", "schema"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=home_cli.env,
            timeout=RUN_TIMEOUT_SECONDS,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.stderr == ""


# -- failures: one line on stderr, their exit code, nothing harmed --------------------------


@dataclass(frozen=True)
class Failure:
    """A command that must fail: its arguments, exit code, and words its one line holds."""

    name: str
    args: tuple[str, ...]
    code: int
    says: str


FILES = {
    "plain-file": "not a directory",
    "not-json.json": "{tasks: [noop]}",
    "no-tasks.json": '{"name": "nightly"}',
    "cycle.json": json.dumps(
        {
            "tasks": [
                {"name": "a", "action": "noop", "after": ["b"]},
                {"name": "b", "action": "noop", "after": ["a"]},
            ]
        }
    ),
    "bad-group-id.json": '{"id": "nightly", "tasks": [{"action": "noop"}]}',
}
"""Files with a mistake each, in the working directory of every FAILURES command."""

FAILURES = [
    Failure("unknown-action", ("submit", "vm.nope"), 2, "unknown action 'vm.nope'; registered"),
    Failure("unknown-param", ("submit", "noop", "-p", "vm=web1"), 2, "has no parameter 'vm'"),
    Failure(
        "missing-param",
        ("--actions", ACTIONS_MODULE, "submit", "demo.provision"),
        2,
        "action 'demo.provision' needs parameter 'vm'",
    ),
    Failure(
        "wrong-type",
        ("submit", "sleep", "-p", "seconds=soon"),
        2,
        "parameter 'seconds' must be a number, got 'soon'",
    ),
    Failure("param-without-value", ("submit", "sleep", "-p", "seconds"), 2, "is not KEY=VALUE"),
    Failure(
        "params-not-json",
        ("submit", "sleep", "--params", "{seconds: 1}"),
        2,
        "--params is not valid JSON",
    ),
    Failure(
        "unknown-prerequisite",
        ("submit", "noop", "--after", UNKNOWN_ID),
        2,
        f"names prerequisite {UNKNOWN_ID}, which is neither an existing task",
    ),
    Failure("malformed-id", ("submit", "noop", "--id", "web1"), 2, "'web1' is not a UUID"),
    Failure(
        "bad-not-before",
        ("submit", "noop", "--not-before", "soon"),
        2,
        "--not-before: not an ISO 8601 time: 'soon'; give an ISO 8601 time",
    ),
    Failure("bad-state", ("list", "--state", "done"), 2, "'done' is not one of 'new'"),
    Failure("unknown-command", ("launch",), 2, "No such command 'launch'. (see 'taskomatic -h')"),
    Failure("show-unknown", ("show", UNKNOWN_ID), 3, f"no task with id {UNKNOWN_ID}"),
    Failure("why-unknown", ("why", UNKNOWN_ID), 3, f"no task with id {UNKNOWN_ID}"),
    Failure("cancel-unknown", ("cancel", UNKNOWN_ID), 3, f"no task with id {UNKNOWN_ID}"),
    Failure(
        "cancel-complete",
        ("cancel", DONE_ID),
        4,
        f"task {DONE_ID} is complete; it cannot move to cancelled",
    ),
    Failure(
        "wait-times-out",
        ("wait", QUEUED_ID, "--timeout", "0.2"),
        6,
        "1 of 1 tasks not finished after 0.2s",
    ),
    Failure("group-missing-file", ("submit-group", "nightly.json"), 2, "No such file"),
    Failure("group-not-json", ("submit-group", "not-json.json"), 2, "not valid JSON"),
    Failure("group-no-tasks", ("submit-group", "no-tasks.json"), 2, "with a 'tasks' list"),
    Failure("group-cycle", ("submit-group", "cycle.json"), 2, "prerequisites form a cycle"),
    Failure("group-bad-id", ("submit-group", "bad-group-id.json"), 2, "'nightly' is not a UUID"),
    *(
        Failure(
            f"unreachable-postgresql-{args[0]}",
            ("--database-url", CLOSED_PORT_URL, *args),
            5,
            "cannot reach the database at postgresql+psycopg://x@127.0.0.1:1/x: connection failed",
        )
        for args in (("status",), ("db", "init"))
    ),
    Failure(
        "sqlite-directory-cannot-be-made",
        ("--database-url", "sqlite:///plain-file/taskomatic.db", "status"),
        5,
        "cannot create the directory of the SQLite database plain-file/taskomatic.db",
    ),
]


@dataclass(frozen=True)
class FailedRun:
    """One FAILURES case as it ran, with its own database before and after."""

    result: Result
    before: Snapshot
    after: Snapshot


@pytest.fixture(scope="module")
def failed_runs(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    actions_path: Path,
) -> dict[str, FailedRun]:
    """The FAILURES cases this session runs, run at once, each on its own copy of an SQLite
    queue holding a completed task DONE_ID, a new task QUEUED_ID and a task after it."""
    cases = _selected_failures(request.session)
    base = tmp_path_factory.mktemp("failures")
    template = base / "template.db"
    with open_queue(f"sqlite:///{template}") as queue:
        queue.init_db()
        run_to_completion(queue, queue.submit("noop", id=DONE_ID))
        queued = queue.submit("sleep", {"seconds": 5}, id=QUEUED_ID, locks=["vm:web1"])
        queue.submit("noop", after=[queued.id])
    runs: list[tuple[Cli, tuple[str, ...]]] = []
    for case in cases:
        home = base / case.name
        home.mkdir()
        shutil.copy(template, home / "taskomatic.db")
        for name, text in FILES.items():
            (home / name).write_text(text)
        runs.append((Cli(home, f"sqlite:///{home / 'taskomatic.db'}", actions_path), case.args))
    before = [snapshot(str(cli.url)) for cli, _ in runs]
    results = run_concurrently(runs)
    return {
        case.name: FailedRun(result, snap, snapshot(str(cli.url)))
        for case, (cli, _), result, snap in zip(cases, runs, results, before, strict=True)
    }


def _selected_failures(session: pytest.Session) -> list[Failure]:
    """The FAILURES cases among the tests this session runs (all, unless `-k` picks some)."""
    chosen = {
        case.name
        for item in session.items
        if isinstance(item, pytest.Function)
        and hasattr(item, "callspec")
        # Other modules parametrize a "case" too, with their own (unhashable) kinds.
        and isinstance(case := item.callspec.params.get("case"), Failure)
    }
    return [case for case in FAILURES if case.name in chosen]


@pytest.mark.parametrize("case", FAILURES, ids=[case.name for case in FAILURES])
def test_failure_is_one_line_with_its_exit_code_and_harms_nothing(
    case: Failure, failed_runs: dict[str, FailedRun]
) -> None:
    """Bad input, an unknown task, a wrong state, a database out of reach: each earns one
    line on stderr (no traceback), its own exit code, at once; what was queued is intact."""
    run = failed_runs[case.name]
    run.result.error(case.code, case.says)
    assert len(run.before["tasks"]) == 3
    assert run.after == run.before


def test_postgresql_without_the_schema_says_to_run_db_init(
    pg_cluster: PostgresCluster | ExternalPostgres, tmp_path: Path, actions_path: Path
) -> None:
    """A PostgreSQL database without the schema is refused with the command that fixes it;
    `db init` creates the schema, and the queue works (also while `db init` runs again)."""
    name = f"taskomatic_noschema_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    try:
        cli = Cli(tmp_path / "home", pg_cluster.url(name), actions_path)
        refused = cli.run("submit", "noop")
        refused.error(5, f"no taskomatic schema in {cli.url}; run `taskomatic db init` first")
        assert cli.ok("db", "init").stdout.startswith(
            f"schema version {SCHEMA_VERSION} ready at postgresql"
        )
        again, submitted = cli.run_all(["db", "init"], ["submit", "noop"])
        assert again.code == submitted.code == 0, f"{again}\n{submitted}"
    finally:
        pg_cluster.terminate_connections(name)
        pg_cluster.drop_database(name)


# -- hosts ----------------------------------------------------------------------------------------

FLEET = Path(__file__).resolve().parents[2] / "docs" / "examples" / "fleet"


def test_hosts_are_added_listed_drained_activated_and_removed(cli: Cli) -> None:
    """The host commands an operator uses, with `--json` for scripts; adding the same host
    again is harmless, and a different definition under the same name is a conflict."""
    uri = f"test://{FLEET}/kvm1.xml"
    cli.ok("hosts", "add", "kvm1", uri, "--capacity", "4")
    cli.ok("hosts", "add", "kvm1", uri, "--capacity", "4")  # the same again: idempotent
    cli.run("hosts", "add", "kvm1", uri, "--capacity", "5").error(4, "host 'kvm1' exists")
    cli.ok("hosts", "add", "kvm2", f"test://{FLEET}/kvm2.xml")
    cli.ok("hosts", "maintenance", "kvm1")
    listed = cli.json("hosts", "list")
    assert [(h["name"], h["state"], h["capacity"]) for h in listed] == [
        ("kvm1", "maintenance", 4),
        ("kvm2", "active", None),
    ]
    assert [h["name"] for h in cli.json("hosts", "list", "--state", "active")] == ["kvm2"]
    table = cli.ok("hosts", "list").lines
    assert table[0].split() == ["NAME", "STATE", "CAPACITY", "URI"]
    assert table[1].split() == ["kvm1", "maintenance", "4", uri]
    assert cli.json("hosts", "activate", "kvm1")["state"] == "active"
    cli.ok("hosts", "remove", "kvm2")
    assert [h["name"] for h in cli.json("hosts", "list")] == ["kvm1"]


def test_bad_host_input_is_one_line_and_changes_nothing(sqlite_cli: Cli) -> None:
    """A bad URI, an unknown host or a URI already taken: one line, its exit code."""
    sqlite_cli.ok("hosts", "add", "kvm1", f"test://{FLEET}/kvm1.xml")
    bad_uri, unknown, taken, removed = sqlite_cli.run_all(
        ["hosts", "add", "x", "kvm1.example.net"],
        ["hosts", "maintenance", "nope"],
        ["hosts", "add", "other", f"test://{FLEET}/kvm1.xml"],
        ["hosts", "remove", "nope"],
    )
    assert "is not a libvirt URI" in bad_uri.error(2)
    assert unknown.error(3) == "no host named 'nope'; `taskomatic hosts list` shows the hosts"
    taken.error(4, "already has URI")
    removed.error(3, "no host named 'nope'")
    [host] = sqlite_cli.json("hosts", "list")
    assert (host["name"], host["state"]) == ("kvm1", "active")


def test_the_readme_demo_runs_the_fleet_flow() -> None:
    """`bin/demo`, the README's first command: the group empties kvm1 onto kvm2 and every
    task completes; the live migration the test driver cannot do fails with libvirt's code."""
    demo = Path(__file__).resolve().parents[2] / "bin" / "demo"
    proc = subprocess.run([str(demo)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ": 13/13 finished (13 complete)" in proc.stderr  # wait's progress line
    moved = [line for line in proc.stdout.splitlines() if "vm.migrate" in line and "from" in line]
    assert any('"host": "kvm2"' in line and '"from": "kvm1"' in line for line in moved)
    assert "failed     vm.migrate" in proc.stdout
    assert "(VIR_ERR_ARGUMENT_UNSUPPORTED)" in proc.stdout
    assert "kvm1             maintenance" in proc.stdout


# -- retention ------------------------------------------------------------------------------------


def test_prune_removes_collected_results_and_status_counts_the_rest(sqlite_cli: Cli) -> None:
    """Fork/wait: results stay until collected; `status` counts the uncollected ones;
    `prune` removes collected ones past the age given, uncollected ones only with --force."""
    first, second = sqlite_cli.submit("noop"), sqlite_cli.submit("noop")
    sqlite_cli.ok("dispatcher", "--until-empty")
    sqlite_cli.ok("collect", first)
    assert sqlite_cli.json("status")["uncollected"] == 1
    assert "1 finished task(s) with results not yet collected" in sqlite_cli.ok("status").stdout
    assert sqlite_cli.ok("prune", "--older-than", "1h").stdout == "removed 0 finished task(s)\n"
    assert sqlite_cli.json("prune", "--older-than", "0s") == {"removed": 1}
    assert ids(sqlite_cli.ok("--json", "list")) == [second]
    assert sqlite_cli.json("prune", "--older-than", "0s", "--force") == {"removed": 1}
    assert sqlite_cli.json("list")["tasks"] == []
    bad = sqlite_cli.run("prune", "--older-than", "last week")
    assert "--older-than: 'last week' is not an age" in bad.error(2)
