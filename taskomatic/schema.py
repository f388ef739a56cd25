"""The tables, declared once; `taskomatic db schema > schema.sql` generates the checked-in DDL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql.named_types import CreateDomainType
from sqlalchemy.schema import CreateIndex, CreateSequence, CreateTable

from taskomatic.model import LIVE, HostState, State

SCHEMA_VERSION = 6
"""Bumped whenever the tables change; `db init` records it and refuses a mismatch."""

ADDITIVE_UPGRADES = frozenset({1, 2, 3, 4, 5})
"""Versions `db init` upgrades in place, creating the tables, columns and indexes they lack
or define otherwise (2 added the inventory, 3 the API tokens, 4 the host jobs, stop
requests and compensation of tasks, 5 redefined the index of delayed tasks, 6 moved the
checks of tasks' state and counters into domains on PostgreSQL)."""

ADDED_COLUMNS: dict[int, tuple[tuple[str, str], ...]] = {
    4: (
        ("tasks", "job"),
        ("tasks", "stop_request"),
        ("tasks", "compensates"),
        ("task_groups", "on_failure"),
    ),
}
"""(table, column) each version added to an existing table: `db init` adds them."""

REPLACED_INDEXES: dict[int, tuple[str, ...]] = {5: ("tasks_scheduled",)}
"""Indexes each version redefined under the same name: `db init` drops and re-creates them."""

TOKEN_ROLES = ("viewer", "operator", "admin")
"""The roles of API tokens, each allowing what the one before it does and more."""


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on both backends (SQLite stores them naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}; taskomatic stores UTC only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
STATES = ", ".join(f"'{s.value}'" for s in State)
HOST_STATES = ", ".join(f"'{s.value}'" for s in HostState)
LIVE_STATES = ", ".join(f"'{s.value}'" for s in sorted(LIVE - {State.NEW}))

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)

task_groups = sa.Table(
    "task_groups",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("name", sa.Text),
    sa.Column("created_by", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # What a failed task does to the rest of the group: "stop" (NULL) cancels its new tasks
    # before compensating; "continue" lets them run (each VM of a host clear moves or not).
    sa.Column("on_failure", sa.Text),
)

task_seq = sa.Sequence("tasks_seq", metadata=metadata)

# On PostgreSQL, what a task's state and counters may hold is checked by domains, not by
# CHECK constraints of the table: PostgreSQL re-reads and plans a table's CHECK constraints
# from their text at every execution of an UPDATE (9 µs each, three per dispatcher cycle,
# one per dependent released), and a domain's check only where a statement assigns the
# column, planned once per session. SQLite keeps the CHECK constraints.
TASK_STATE = postgresql.DOMAIN(
    "task_state",
    sa.String(16),
    constraint_name="task_state_valid",
    check=f"VALUE IN ({STATES})",
    create_type=False,
)
TASK_COUNT = postgresql.DOMAIN(
    "task_count",
    sa.Integer,
    constraint_name="task_count_nonnegative",
    check="VALUE >= 0",
    create_type=False,
)
TASK_MAX_ATTEMPTS = postgresql.DOMAIN(
    "task_max_attempts",
    sa.Integer,
    constraint_name="task_max_attempts_positive",
    check="VALUE >= 1",
    create_type=False,
)
DOMAINS = (TASK_STATE, TASK_COUNT, TASK_MAX_ATTEMPTS)
TASK_DOMAINS = {
    "state": TASK_STATE,
    "max_attempts": TASK_MAX_ATTEMPTS,
    "attempt": TASK_COUNT,
    "pending": TASK_COUNT,
}
"""The tasks columns whose values a domain checks on PostgreSQL."""
REPLACED_CHECKS = ("tasks_state_valid", "tasks_pending_nonnegative", "tasks_attempts_valid")
"""The CHECK constraints of tasks that only SQLite keeps: `db init` replaces them by the
domains in a PostgreSQL database of version 5 or older."""

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    # Submission order: "older first" among equal priorities, and stable pagination.
    sa.Column("seq", sa.BigInteger, task_seq, nullable=False, unique=True),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("params", JSON, nullable=False),
    sa.Column("state", sa.String(16).with_variant(TASK_STATE, "postgresql"), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("not_before", UTCDateTime, nullable=False),
    sa.Column("timeout", sa.Float),
    sa.Column(
        "max_attempts", sa.Integer().with_variant(TASK_MAX_ATTEMPTS, "postgresql"), nullable=False
    ),
    sa.Column("attempt", sa.Integer().with_variant(TASK_COUNT, "postgresql"), nullable=False),
    # Lock keys as submitted (immutable); task_locks holds the same keys for the lock join.
    sa.Column("locks", JSON, nullable=False),
    sa.Column("group_id", sa.Uuid, sa.ForeignKey("task_groups.id")),
    sa.Column("result", JSON),
    sa.Column("error", JSON),
    sa.Column("created_by", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("owner", sa.Uuid),
    sa.Column("lease_until", UTCDateTime),
    sa.Column("deadline", UTCDateTime),
    # Prerequisites not yet complete, maintained in the transaction that completes one.
    sa.Column("pending", sa.Integer().with_variant(TASK_COUNT, "postgresql"), nullable=False),
    sa.Column("collected_at", UTCDateTime),
    # The host job a waiting task tracks (taskomatic.jobs.HostJob), kept once it ends.
    sa.Column("job", JSON),
    # A cancel or timeout asked of a running or waiting task, until its run or job ends.
    sa.Column("stop_request", JSON),
    # The task a compensation task undoes (a group's failure created it).
    sa.Column("compensates", sa.Uuid),
    sa.CheckConstraint(f"state IN ({STATES})", name=REPLACED_CHECKS[0]).ddl_if("sqlite"),
    sa.CheckConstraint("pending >= 0", name=REPLACED_CHECKS[1]).ddl_if("sqlite"),
    sa.CheckConstraint("attempt >= 0 AND max_attempts >= 1", name=REPLACED_CHECKS[2]).ddl_if(
        "sqlite"
    ),
)

# The claim reads only this: live, unblocked tasks in dispatch order. History never enters it.
sa.Index(
    "tasks_ready",
    tasks.c.priority.desc(),
    tasks.c.seq,
    postgresql_where=sa.text("state = 'new' AND pending = 0"),
    sqlite_where=sa.text("state = 'new' AND pending = 0"),
)
# Lease takeover and timeouts read only tasks someone is running.
sa.Index(
    "tasks_leased",
    tasks.c.lease_until,
    postgresql_where=sa.text(f"state IN ({LIVE_STATES})"),
    sqlite_where=sa.text(f"state IN ({LIVE_STATES})"),
)
# The next not_before among blocked-by-time tasks, so the dispatcher can set its timer.
# `priority IS NOT NULL` holds for every row: it is there so that only a query that says
# it (the next due time's) may use this index. The runnable query, which does not, then
# always walks tasks_ready in dispatch order. Otherwise, with statistics taken before a
# burst of new tasks (an ANALYZE sees none), PostgreSQL would read every ready task here
# and sort them for each claim: 33 ms per claim with 20,000 ready over 1,000,000 finished.
SCHEDULED = "state = 'new' AND pending = 0 AND priority IS NOT NULL"
sa.Index(
    "tasks_scheduled",
    tasks.c.not_before,
    postgresql_where=sa.text(SCHEDULED),
    sqlite_where=sa.text(SCHEDULED),
)
sa.Index("tasks_state_seq", tasks.c.state, tasks.c.seq)
sa.Index("tasks_group", tasks.c.group_id, postgresql_where=sa.text("group_id IS NOT NULL"))

task_prerequisites = sa.Table(
    "task_prerequisites",
    metadata,
    sa.Column("task_id", sa.Uuid, sa.ForeignKey("tasks.id"), primary_key=True),
    sa.Column("prerequisite_id", sa.Uuid, sa.ForeignKey("tasks.id"), primary_key=True),
    sa.CheckConstraint("task_id <> prerequisite_id", name="task_prerequisites_no_self_edge"),
)
sa.Index("task_prerequisites_dependents", task_prerequisites.c.prerequisite_id)

task_locks = sa.Table(
    "task_locks",
    metadata,
    sa.Column("task_id", sa.Uuid, sa.ForeignKey("tasks.id"), primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
)

# One row per lock key currently held; the primary key makes two holders impossible.
held_locks = sa.Table(
    "held_locks",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("task_id", sa.Uuid, sa.ForeignKey("tasks.id"), nullable=False),
    sa.Column("since", UTCDateTime, nullable=False),
)
sa.Index("held_locks_task", held_locks.c.task_id)

task_events = sa.Table(
    "task_events",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("task_id", sa.Uuid, sa.ForeignKey("tasks.id"), nullable=False),
    sa.Column("from_state", sa.String(16)),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("message", sa.Text),
)
sa.Index("task_events_task", task_events.c.task_id, task_events.c.id)

dispatchers = sa.Table(
    "dispatchers",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("hostname", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("workers", sa.Integer, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("heartbeat_at", UTCDateTime, nullable=False),
    sa.Column("stopped_at", UTCDateTime),
)

hosts = sa.Table(
    "hosts",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("uri", sa.Text, nullable=False, unique=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("capacity", sa.Integer),  # most VMs placed on the host; NULL: no limit
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("changed_at", UTCDateTime, nullable=False),
    sa.CheckConstraint(f"state IN ({HOST_STATES})", name="hosts_state"),
    sa.CheckConstraint("capacity IS NULL OR capacity >= 0", name="hosts_capacity"),
)


# -- the inventory: what the hosts last reported (kept by taskomatic.virt.inventory) -------------
# Rows are written only when what a host reports changes; a full sync that finds nothing new
# only moves `host_inventory.synced_at`, which confirms every row of that host.

host_inventory = sa.Table(
    "host_inventory",
    metadata,
    sa.Column("host", sa.Text, sa.ForeignKey("hosts.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("reachable", sa.Boolean, nullable=False),
    sa.Column("since", UTCDateTime, nullable=False),  # when `reachable` last changed
    sa.Column("error", sa.Text),  # why it is unreachable
    sa.Column("hostname", sa.Text),
    sa.Column("libvirt_version", sa.Text),
    sa.Column("hypervisor", sa.Text),  # driver and its version, e.g. "QEMU 7.2.0"
    sa.Column("cpus", sa.Integer),
    sa.Column("memory_kib", sa.BigInteger),
    sa.Column("free_memory_kib", sa.BigInteger),
    sa.Column("confirmed_at", UTCDateTime),  # last answer from the host
    sa.Column("synced_at", UTCDateTime),  # last full sync: confirms every row of the host
    # Set by the dispatcher keeping it (a few sync intervals ahead): past it, nobody does.
    sa.Column("valid_until", UTCDateTime, nullable=False),
)

vm_inventory = sa.Table(
    "vm_inventory",
    metadata,
    sa.Column("host", sa.Text, sa.ForeignKey("hosts.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("uuid", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("since", UTCDateTime, nullable=False),  # when this state was first seen
    sa.Column("persistent", sa.Boolean, nullable=False),
    sa.Column("vcpus", sa.Integer),
    sa.Column("memory_kib", sa.BigInteger),
    sa.Column("max_memory_kib", sa.BigInteger),
    sa.Column("disks", JSON, nullable=False),  # [{target, source, format, backing: [...]}]
    sa.Column("snapshots", JSON, nullable=False),  # names
    sa.Column("confirmed_at", UTCDateTime, nullable=False),  # last written from the host
)
sa.Index("vm_inventory_name", vm_inventory.c.name)

pool_inventory = sa.Table(
    "pool_inventory",
    metadata,
    sa.Column("host", sa.Text, sa.ForeignKey("hosts.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("uuid", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("persistent", sa.Boolean, nullable=False),
    sa.Column("autostart", sa.Boolean, nullable=False),
    sa.Column("capacity", sa.BigInteger),  # bytes
    sa.Column("allocation", sa.BigInteger),
    sa.Column("available", sa.BigInteger),
    sa.Column("confirmed_at", UTCDateTime, nullable=False),
)

volume_inventory = sa.Table(
    "volume_inventory",
    metadata,
    sa.Column("host", sa.Text, primary_key=True),
    sa.Column("pool", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("path", sa.Text),
    sa.Column("kind", sa.Text),
    sa.Column("capacity", sa.BigInteger),  # bytes
    sa.Column("allocation", sa.BigInteger),
    sa.Column("confirmed_at", UTCDateTime, nullable=False),
    sa.ForeignKeyConstraint(
        ["host", "pool"], ["pool_inventory.host", "pool_inventory.name"], ondelete="CASCADE"
    ),
)


# -- API tokens (taskomatic.tokens): only a salted slow hash of the secret is stored --------------

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),  # the token's non-secret part, to look it up
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("salt", sa.Text, nullable=False),  # hex
    sa.Column("hash", sa.Text, nullable=False),  # hex scrypt of the secret part
    sa.Column("scrypt_n", sa.Integer, nullable=False),  # the cost it was hashed with
    sa.Column("created_by", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime),
    sa.CheckConstraint(
        "role IN ({})".format(", ".join(f"'{r}'" for r in TOKEN_ROLES)), name="api_tokens_role"
    ),
)
# A name means one live token; revoked ones keep theirs for the record.
sa.Index(
    "api_tokens_live_name",
    api_tokens.c.name,
    unique=True,
    postgresql_where=sa.text("revoked_at IS NULL"),
    sqlite_where=sa.text("revoked_at IS NULL"),
)


def postgresql_ddl() -> str:
    """The PostgreSQL DDL of `metadata`, as checked in to `schema.sql`."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    parts = [
        "-- Generated from taskomatic/schema.py by `taskomatic db schema`; do not edit.",
        f"-- Schema version {SCHEMA_VERSION}.",
    ]
    for domain in DOMAINS:
        parts.append(str(CreateDomainType(domain).compile(dialect=dialect)).strip() + ";")
    parts.append(str(CreateSequence(task_seq).compile(dialect=dialect)).strip() + ";")
    for table in metadata.sorted_tables:
        parts.append(str(CreateTable(table).compile(dialect=dialect)).strip() + ";")
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            parts.append(str(CreateIndex(index).compile(dialect=dialect)).strip() + ";")
    return "\n\n".join(parts) + "\n"
