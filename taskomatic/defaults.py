"""Every tunable of taskomatic in one place, one constant per line, each with its unit."""

from __future__ import annotations

WORKERS = 8
"""Worker threads of one dispatcher (count)."""

LEASE_SECONDS = 30.0
"""How long a claimed task belongs to its dispatcher without renewal (seconds)."""

LEASE_RENEW_FRACTION = 1 / 3
"""Renew leases when this fraction of the lease has elapsed (ratio of LEASE_SECONDS)."""

SAFETY_POLL_SECONDS = 5.0
"""Interval of the safety poll that catches missed wake-ups (seconds)."""

RECOVERY_SECONDS = 10.0
"""Interval between lease-takeover sweeps, also run at start-up (seconds)."""

HEARTBEAT_SECONDS = 5.0
"""Interval between dispatcher heartbeats (seconds)."""

DISPATCHER_DEAD_AFTER_SECONDS = 30.0
"""A dispatcher without a heartbeat for this long counts as dead (seconds)."""

MISSED_WAKE_GRACE_SECONDS = 1.0
"""Runnable this long past a safety poll interval means a wake-up was missed (seconds)."""

SQLITE_DATA_VERSION_POLL_SECONDS = 0.05
"""How often a SQLite dispatcher checks for commits by other processes (seconds)."""

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for the write lock before failing (milliseconds)."""

LISTEN_PING_SECONDS = 10.0
"""How often the PostgreSQL LISTEN connection is pinged to detect a half-open socket (seconds)."""

NOTIFY_CHANNEL = "taskomatic"
"""PostgreSQL channel used for wake-ups (name)."""

NOTIFY_COALESCE_SECONDS = 0.01
"""A busy PostgreSQL dispatcher tells other processes of its changes at most this often
(seconds), unless it leaves runnable work for them: a NOTIFY per cycle cost a chain of
tasks 0.07 ms per hop. Waiters in other processes hear of a change this much later at most."""

RETRY_BACKOFF_BASE_SECONDS = 1.0
"""First retry delay of a failed task; doubles per attempt (seconds)."""

RETRY_BACKOFF_MAX_SECONDS = 600.0
"""Upper bound of a task's retry delay (seconds)."""

RETRY_JITTER = 0.2
"""Random spread applied to each retry delay (fraction of the delay)."""

DB_RETRY_BASE_SECONDS = 0.1
"""First delay before retrying a transaction after a dropped database connection (seconds)."""

DB_RETRY_MAX_SECONDS = 5.0
"""Upper bound of the delay between database reconnection attempts (seconds)."""

DB_RETRY_GIVE_UP_SECONDS = 300.0
"""A queue call gives up after the database has been unreachable this long (seconds)."""

CLI_DB_GIVE_UP_SECONDS = 10.0
"""The same for one CLI command (not the dispatcher): a person is waiting (seconds)."""

SHUTDOWN_GRACE_SECONDS = 30.0
"""How long a stopping dispatcher lets running actions finish (seconds)."""

CLAIM_BATCH = 64
"""Most tasks claimed in one transaction (count)."""

LIST_LIMIT = 50
"""Default page size of list (count)."""

MAX_LIST_LIMIT = 1000
"""Largest page a list call may ask for (count)."""

MAX_ATTEMPTS = 1
"""Attempts of a task unless the submitter says otherwise (count)."""

HOST_RETRY_BASE_SECONDS = 1.0
"""First delay before re-opening a connection to a host that could not be reached (seconds)."""

HOST_RETRY_MAX_SECONDS = 60.0
"""Upper bound of the delay between connection attempts to an unreachable host (seconds)."""

HOST_KEEPALIVE_SECONDS = 5
"""Interval of libvirt keepalive messages on remote host connections (seconds)."""

HOST_KEEPALIVE_COUNT = 3
"""Unanswered keepalives after which a host connection counts as dead (count)."""

HOST_ACTION_MAX_ATTEMPTS = 5
"""Attempts of a libvirt action unless the submitter says otherwise; transient host faults
are retried, permanent ones fail at once (count)."""

VM_SHUTDOWN_TIMEOUT_SECONDS = 120.0
"""How long vm.shutdown waits for the guest to power off before giving up or forcing (seconds)."""

HOST_STATE_POLL_SECONDS = 0.2
"""How often an action re-reads an object's state while waiting for it to change (seconds)."""

INVENTORY_SYNC_SECONDS = 30.0
"""Interval between full inventory syncs of every host, which repair missed events (seconds)."""

INVENTORY_VALID_SYNCS = 3
"""A host's inventory counts as current for this many sync intervals after its last answer;
after that its VMs read "unknown" (count of INVENTORY_SYNC_SECONDS)."""

INVENTORY_EVENT_BATCH_SECONDS = 0.05
"""How long the inventory gathers libvirt events before reading and writing them at once
(seconds)."""

PRUNE_BATCH = 1000
"""Tasks removed per transaction by `prune` (count)."""

TOKEN_SCRYPT_N = 2**14
"""scrypt cost of a stored API token's hash: CPU and memory grow with it (iterations, a
power of 2; with r=8 each check takes 16 MiB and tens of milliseconds)."""

TOKEN_CACHE_SECONDS = 60.0
"""How long a verified token skips the slow hash; revocation still applies at once, since each
request re-reads the token's row (seconds)."""

HTTP_BIND = "127.0.0.1:8080"
"""Where `taskomatic serve` listens unless told otherwise (host:port)."""

HTTP_MAX_BODY_BYTES = 1024 * 1024
"""Largest request body the HTTP API reads; larger ones are answered 413 (bytes)."""

HTTP_MAX_REQUESTS = 128
"""Requests the API serves at once (long-polls included); more are answered 503 at once, so a
crowd of slow clients cannot pile up threads without bound (count)."""

HTTP_WAIT_MAX_SECONDS = 60.0
"""Longest long-poll of GET /v1/tasks/{id}/wait; larger timeouts are cut to it (seconds)."""

HTTP_WAIT_DEFAULT_SECONDS = 30.0
"""Long-poll of GET /v1/tasks/{id}/wait when the caller names no timeout (seconds)."""

JOB_POLL_FIRST_SECONDS = 0.5
"""First interval between polls of a host job, and again whenever it moves (seconds)."""

JOB_POLL_BACKOFF = 1.5
"""Each poll that finds nothing new waits this much longer before the next (factor)."""

JOB_POLL_MAX_SECONDS = 15.0
"""Longest interval between polls of a host job; libvirt events cut it short (seconds)."""

STOP_CHECK_SECONDS = 1.0
"""How often a dispatcher holding tasks looks for cancels of them recorded by any process:
the longest a cancel takes to reach a running action or a host job (seconds)."""
