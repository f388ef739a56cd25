"""The HTTP JSON API: the route table and a few lines per endpoint over Queue, Hosts and Tokens."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa

from taskomatic import defaults, errors
from taskomatic import schema as s
from taskomatic.drift import drift as find_drift
from taskomatic.flows.clear import clear_by_destroying, clear_by_migrating
from taskomatic.flows.create import create_vm
from taskomatic.flows.merge import remove_snapshot
from taskomatic.http.router import TEXT, HttpError, Request, Response, Route
from taskomatic.inventory import Inventory
from taskomatic.model import Dispatcher
from taskomatic.queue import Queue
from taskomatic.submission import TaskSpec
from taskomatic.tokens import Role, Tokens

VIEW, OPER, ADMIN = Role.VIEWER, Role.OPERATOR, Role.ADMIN

MAX_CAPACITY = 2**31 - 1
"""The largest host capacity (the column is a 32-bit integer)."""

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/health", None, "health", "Liveness: the process answers (no token)."),
    Route(
        "GET", "/v1/ready", VIEW, "ready", "Readiness: the database answers, the schema is current."
    ),
    Route("GET", "/v1/openapi.json", VIEW, "openapi", "This API as an OpenAPI 3.1 document."),
    Route("GET", "/v1/status", VIEW, "status", "Tasks by state and uncollected results."),
    Route(
        "POST",
        "/v1/tasks",
        OPER,
        "submit",
        "Submit one task (a chosen id is idempotent).",
        "TaskSpec",
    ),
    Route(
        "GET",
        "/v1/tasks",
        VIEW,
        "list_tasks",
        "Tasks newest first, a page at a time.",
        query=("state", "action", "group", "limit", "cursor"),
    ),
    Route("GET", "/v1/tasks/{id}", VIEW, "get_task", "One task."),
    Route("GET", "/v1/tasks/{id}/events", VIEW, "events", "A task's transitions, oldest first."),
    Route("GET", "/v1/tasks/{id}/why", VIEW, "why", "Why a task is not running (or what it does)."),
    Route(
        "GET",
        "/v1/tasks/{id}/wait",
        VIEW,
        "wait",
        "Long-poll until the task ends or `timeout` seconds pass; 200 either way, "
        "`timed_out` says which.",
        query=("timeout",),
    ),
    Route(
        "POST",
        "/v1/tasks/{id}/cancel",
        OPER,
        "cancel",
        "Cancel a new task and its dependents; ask a running or waiting one to stop.",
        "Cancel",
    ),
    Route(
        "POST",
        "/v1/tasks/{id}/retry",
        OPER,
        "retry",
        "Send a failed or cancelled task back to new.",
    ),
    Route(
        "POST",
        "/v1/tasks/{id}/collect",
        OPER,
        "collect",
        "Read a finished task's result, mark it collected.",
    ),
    Route(
        "POST",
        "/v1/groups",
        OPER,
        "submit_group",
        "Submit a DAG of tasks as one group.",
        "GroupSpec",
    ),
    Route("GET", "/v1/groups/{id}", VIEW, "get_group", "A group, its derived state and its tasks."),
    Route(
        "GET",
        "/v1/groups/{id}/why",
        VIEW,
        "why_group",
        "Where a group is: what sank it, why each live task waits.",
    ),
    Route(
        "POST",
        "/v1/vms",
        OPER,
        "create_vm",
        "Submit the group creating a VM on a new disk and starting it (undone on failure).",
        "VmCreateSpec",
    ),
    Route(
        "POST",
        "/v1/vms/{name}/snapshots/{snapshot}/remove",
        OPER,
        "remove_snapshot",
        "Submit the group removing an external snapshot (live merge while the VM runs).",
        "SnapshotRemovalSpec",
    ),
    Route("GET", "/v1/hosts", VIEW, "list_hosts", "The hypervisors, by name.", query=("state",)),
    Route(
        "POST",
        "/v1/hosts",
        ADMIN,
        "add_host",
        "Register a host (the same again returns it).",
        "HostSpec",
    ),
    Route("GET", "/v1/hosts/{name}", VIEW, "get_host", "One host."),
    Route(
        "POST",
        "/v1/hosts/{name}/maintenance",
        ADMIN,
        "maintenance",
        "Place no new work on the host.",
    ),
    Route(
        "POST", "/v1/hosts/{name}/activate", ADMIN, "activate", "Let new work go to the host again."
    ),
    Route(
        "GET",
        "/v1/hosts/{name}/inventory",
        VIEW,
        "host_inventory",
        "What the inventory knows of a host: versions, CPUs, memory, its VMs and pools.",
    ),
    Route(
        "POST",
        "/v1/hosts/{name}/clear",
        ADMIN,
        "clear_host",
        "Submit the group clearing a host: by migrating its VMs, or by destroying them.",
        "ClearSpec",
    ),
    Route(
        "GET",
        "/v1/vms",
        VIEW,
        "vms",
        "VMs as the hosts last reported them.",
        query=("host", "state"),
    ),
    Route("GET", "/v1/pools", VIEW, "pools", "Storage pools and volumes by host.", query=("host",)),
    Route("GET", "/v1/drift", VIEW, "drift", "Where the hosts disagree with what tasks last did."),
    Route("GET", "/v1/dispatchers", VIEW, "dispatchers", "Dispatchers alive now."),
    Route(
        "GET",
        "/metrics",
        VIEW,
        "metrics",
        "Prometheus metrics, computed from the database (any viewer token may scrape).",
        produces=TEXT,
    ),
    Route(
        "GET",
        "/v1/tokens",
        ADMIN,
        "list_tokens",
        "API tokens (never their secrets).",
        query=("revoked",),
    ),
    Route(
        "POST",
        "/v1/tokens",
        ADMIN,
        "create_token",
        "Create a token; the response shows it once.",
        "TokenSpec",
    ),
    Route("POST", "/v1/tokens/{name}/revoke", ADMIN, "revoke_token", "Revoke a token at once."),
)


class Api:
    """The endpoints, each a method named in ROUTES, over one queue."""

    def __init__(self, queue: Queue, tokens: Tokens) -> None:
        self.queue = queue
        self.tokens = tokens

    # -- service -----------------------------------------------------------------------------

    def health(self, req: Request) -> Response:
        return Response(200, {"status": "ok"})

    def ready(self, req: Request) -> Response:
        try:
            version = self.queue.store.schema_version()
        except sa.exc.DBAPIError as exc:
            raise errors.DatabaseUnavailable("database unavailable") from exc
        if version != s.SCHEMA_VERSION:
            raise errors.SchemaError(
                f"database schema version {version}, this taskomatic expects "
                f"{s.SCHEMA_VERSION}; run `taskomatic db init`"
            )
        return Response(200, {"status": "ready", "schema_version": version})

    def openapi(self, req: Request) -> Response:
        from taskomatic.http.openapi import document

        return Response(200, document())

    def status(self, req: Request) -> Response:
        counts = self.queue.counts()
        return Response(
            200,
            {
                "counts": {st.value: n for st, n in sorted(counts.items())},
                "uncollected": self.queue.uncollected(),
            },
        )

    # -- tasks -------------------------------------------------------------------------------

    def submit(self, req: Request) -> Response:
        spec = TaskSpec.from_dict(req.object_body())
        task = self.queue.submit_many([spec], created_by=req.actor)[0]
        return Response(200, task.to_dict())

    def list_tasks(self, req: Request) -> Response:
        group = req.arg("group")
        page = self.queue.list(
            state=req.query.get("state") or None,
            action=req.arg("action"),
            group=_group_id(group, "group") if group is not None else None,
            limit=req.int_arg("limit", defaults.LIST_LIMIT) or 0,
            cursor=req.cursor_arg(),
        )
        return Response(
            200, {"tasks": [t.to_dict() for t in page.tasks], "next_cursor": page.next_cursor}
        )

    def get_task(self, req: Request) -> Response:
        return Response(200, self.queue.get(req.params["id"]).to_dict())

    def events(self, req: Request) -> Response:
        found = self.queue.events(req.params["id"])
        return Response(200, {"events": [e.to_dict() for e in found]})

    def why(self, req: Request) -> Response:
        return Response(200, self.queue.why(req.params["id"]).to_dict())

    def wait(self, req: Request) -> Response:
        timeout = min(
            req.float_arg("timeout", defaults.HTTP_WAIT_DEFAULT_SECONDS),
            defaults.HTTP_WAIT_MAX_SECONDS,
        )
        try:
            task = self.queue.wait(req.params["id"], timeout=timeout)[0]
            timed_out = False
        except errors.WaitTimeout:
            task = self.queue.get(req.params["id"])
            timed_out = True
        return Response(200, {"task": task.to_dict(), "timed_out": timed_out})

    def cancel(self, req: Request) -> Response:
        body = req.object_body() if req.body is not None else {}
        reason = body.get("reason", "cancelled over HTTP")
        if not isinstance(reason, str):
            raise errors.ValidationError("'reason' must be a string", field="reason")
        tasks = self.queue.cancel(req.params["id"], reason, actor=req.actor)
        return Response(200, {"tasks": [t.to_dict() for t in tasks]})

    def retry(self, req: Request) -> Response:
        tasks = self.queue.retry(req.params["id"], actor=req.actor)
        return Response(200, {"tasks": [t.to_dict() for t in tasks]})

    def collect(self, req: Request) -> Response:
        return Response(200, self.queue.collect(req.params["id"]).to_dict())

    # -- groups ------------------------------------------------------------------------------

    def submit_group(self, req: Request) -> Response:
        doc = req.object_body()
        unknown = sorted(set(doc) - {"id", "name", "tasks"})
        if unknown:
            raise errors.ValidationError(
                f"unknown group field {unknown[0]!r} (known: id, name, tasks)", field=unknown[0]
            )
        if not isinstance(doc.get("tasks"), list) or not doc["tasks"]:
            raise errors.ValidationError("a group needs a non-empty 'tasks' list", field="tasks")
        name = doc.get("name")
        if name is not None and not isinstance(name, str):
            raise errors.ValidationError("'name' must be a string", field="name")
        specs = []
        for item in doc["tasks"]:
            if not isinstance(item, dict):
                raise errors.ValidationError("each task must be an object", field="tasks")
            specs.append(TaskSpec.from_dict(item))
        group, tasks = self.queue.submit_group(
            specs, name=name, group_id=_group_id(doc.get("id")), created_by=req.actor
        )
        return Response(200, {"group": group.to_dict(), "tasks": [t.to_dict() for t in tasks]})

    def get_group(self, req: Request) -> Response:
        group = self.queue.group(req.params["id"])
        page = self.queue.list(group=group.id, limit=defaults.MAX_LIST_LIMIT)
        return Response(
            200,
            {
                "group": group.to_dict(),
                "tasks": [t.to_dict() for t in page.tasks],
                "next_cursor": page.next_cursor,
            },
        )

    # -- hosts -------------------------------------------------------------------------------

    def list_hosts(self, req: Request) -> Response:
        return Response(
            200, {"hosts": [h.to_dict() for h in self.queue.hosts.list(req.arg("state"))]}
        )

    def add_host(self, req: Request) -> Response:
        body = req.object_body()
        unknown = sorted(set(body) - {"name", "uri", "capacity"})
        if unknown:
            raise errors.ValidationError(f"unknown host field {unknown[0]!r}", field=unknown[0])
        for key in ("name", "uri"):
            if not isinstance(body.get(key), str):
                raise errors.ValidationError(f"a host needs a string {key!r}", field=key)
        capacity = body.get("capacity")
        if isinstance(capacity, int) and not 0 <= capacity <= MAX_CAPACITY:
            # (hosts.add checks the rest; a number past the column's range must not reach it)
            raise errors.ValidationError(
                f"capacity is a number of VMs from 0 to {MAX_CAPACITY}", field="capacity"
            )
        host = self.queue.hosts.add(body["name"], body["uri"], capacity=body.get("capacity"))
        return Response(200, host.to_dict())

    def get_host(self, req: Request) -> Response:
        return Response(200, self.queue.hosts.get(req.params["name"]).to_dict())

    def maintenance(self, req: Request) -> Response:
        return Response(
            200, self.queue.hosts.set_state(req.params["name"], "maintenance").to_dict()
        )

    def activate(self, req: Request) -> Response:
        return Response(200, self.queue.hosts.set_state(req.params["name"], "active").to_dict())

    # -- inventory ---------------------------------------------------------------------------

    def host_inventory(self, req: Request) -> Response:
        host = self.queue.hosts.get(req.params["name"])
        view = Inventory(self.queue).host(host.name)
        return Response(200, {"host": host.to_dict(), **view.to_dict(self.queue.now())})

    def clear_host(self, req: Request) -> Response:
        body = req.object_body()
        known = {"how", "i_understand_this_destroys_data", "delete_storage", "copy_storage"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise errors.ValidationError(f"unknown field {unknown[0]!r}", field=unknown[0])
        flags = {k: body.get(k, False) for k in known - {"how"}}
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise errors.ValidationError(f"{key!r} must be true or false", field=key)
        name, how = req.params["name"], body.get("how")
        if how == "migrate":
            group, tasks = clear_by_migrating(
                self.queue, name, copy_storage=flags["copy_storage"], created_by=req.actor
            )
        elif how == "destroy":
            group, tasks = clear_by_destroying(
                self.queue,
                name,
                i_understand_this_destroys_data=flags["i_understand_this_destroys_data"],
                delete_storage=flags["delete_storage"],
                created_by=req.actor,
            )
        else:
            raise errors.ValidationError(
                "say how to clear the host: 'how' is 'migrate' or 'destroy'", field="how"
            )
        return Response(200, {"group": group.to_dict(), "tasks": [t.to_dict() for t in tasks]})

    def why_group(self, req: Request) -> Response:
        return Response(200, self.queue.why_group(req.params["id"]).to_dict())

    def create_vm(self, req: Request) -> Response:
        body = _fields(
            req.object_body(),
            required={"name": str, "host": str, "pool": str, "disk_mib": int},
            optional={"memory_mib": int, "vcpus": int, "network": str},
        )
        group, tasks = create_vm(self.queue, created_by=req.actor, **body)
        return Response(200, {"group": group.to_dict(), "tasks": [t.to_dict() for t in tasks]})

    def remove_snapshot(self, req: Request) -> Response:
        body = _fields(
            req.object_body(),  # {} for the defaults
            required={},
            optional={"host": str, "bandwidth": int},
        )
        group, tasks = remove_snapshot(
            self.queue, req.params["name"], req.params["snapshot"], created_by=req.actor, **body
        )
        return Response(200, {"group": group.to_dict(), "tasks": [t.to_dict() for t in tasks]})

    def vms(self, req: Request) -> Response:
        host = req.arg("host")
        if host is not None:
            self.queue.hosts.get(host)  # an unknown host is a 404, not an empty list
        found = Inventory(self.queue).vms(host=host, state=req.arg("state"))
        return Response(200, {"vms": [vm.to_dict() for vm in found]})

    def pools(self, req: Request) -> Response:
        host = req.arg("host")
        if host is not None:
            self.queue.hosts.get(host)
        return Response(
            200, {"pools": [p.to_dict() for p in Inventory(self.queue).pools(host=host)]}
        )

    def drift(self, req: Request) -> Response:
        return Response(200, {"drift": [d.to_dict() for d in find_drift(Inventory(self.queue))]})

    def dispatchers(self, req: Request) -> Response:
        return Response(200, {"dispatchers": [_dispatcher(d) for d in self.queue.dispatchers()]})

    def metrics(self, req: Request) -> Response:
        from taskomatic import metrics

        return Response(200, metrics.render(self.queue), TEXT)

    # -- tokens ------------------------------------------------------------------------------

    def list_tokens(self, req: Request) -> Response:
        revoked = req.arg("revoked", "false")
        if revoked not in ("true", "false"):
            raise HttpError(400, "invalid", "'revoked' is true or false", field="revoked")
        return Response(
            200,
            {"tokens": [t.to_dict() for t in self.tokens.list(include_revoked=revoked == "true")]},
        )

    def create_token(self, req: Request) -> Response:
        body = req.object_body()
        for key in ("name", "role"):
            if not isinstance(body.get(key), str):
                raise errors.ValidationError(f"a token needs a string {key!r}", field=key)
        row, secret = self.tokens.create(body["name"], body["role"], created_by=req.actor)
        return Response(200, {**row.to_dict(), "token": secret})

    def revoke_token(self, req: Request) -> Response:
        return Response(200, self.tokens.revoke(req.params["name"]).to_dict())


def _fields(
    body: dict[str, Any], *, required: dict[str, type], optional: dict[str, type]
) -> dict[str, Any]:
    """The body's fields, each of its declared JSON type; 400 naming the first that is
    missing, unknown or of the wrong type."""
    declared = {**required, **optional}
    for name in body:
        if name not in declared:
            raise errors.ValidationError(f"unknown field {name!r}", field=name)
    for name in required:
        if name not in body:
            raise errors.ValidationError(f"missing field {name!r}", field=name)
    out: dict[str, Any] = {}
    for name, value in body.items():
        if value is None and name in optional:
            continue
        if declared[name] is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise errors.ValidationError(f"{name!r} must be a whole number", field=name)
            if not 1 <= value <= MAX_CAPACITY:
                raise errors.ValidationError(
                    f"{name!r} must be between 1 and {MAX_CAPACITY}", field=name
                )
        elif not isinstance(value, str) or not value or "\x00" in value:
            raise errors.ValidationError(f"{name!r} must be a non-empty string", field=name)
        out[name] = value
    return out


def _group_id(value: Any, field: str = "id") -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise HttpError(
            400, "invalid", f"group {field!r} {value!r} is not a UUID", field=field
        ) from None


def _dispatcher(d: Dispatcher) -> dict[str, Any]:
    return {
        "id": str(d.id),
        "host": d.hostname,
        "pid": d.pid,
        "workers": d.workers,
        "started_at": d.started_at.isoformat(),
        "heartbeat_at": d.heartbeat_at.isoformat(),
    }
