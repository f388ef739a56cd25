"""The OpenAPI document, generated from the route table; `python -m taskomatic.http.openapi`
prints what `docs/openapi.json` holds (a test fails when they differ)."""

from __future__ import annotations

import json
import re
from typing import Any

from taskomatic import defaults
from taskomatic.http.api import MAX_CAPACITY, ROUTES
from taskomatic.http.router import JSON, MAX_CURSOR, Route
from taskomatic.inventory import VM_STATES
from taskomatic.model import HostState, State

_ERROR = {
    "type": "object",
    "required": ["code", "message", "field"],
    "properties": {
        "code": {"type": "string", "description": "stable, e.g. invalid, not_found, conflict"},
        "message": {"type": "string", "description": "what went wrong and what to do"},
        "field": {"type": ["string", "null"], "description": "the offending field, if one"},
    },
}

_TASK_SPEC = {
    "type": "object",
    "required": ["action"],
    "additionalProperties": False,
    "properties": {
        "action": {"type": "string"},
        "params": {"type": "object"},
        "id": {
            "type": "string",
            "format": "uuid",
            "description": "choose it to make it idempotent",
        },
        "name": {"type": "string", "description": "for `after` within a group"},
        "after": {"type": "array", "items": {"type": "string"}},
        "locks": {"type": "array", "items": {"type": "string"}},
        "priority": {"type": "integer"},
        "not_before": {"type": "string", "format": "date-time"},
        "timeout": {"type": "number", "exclusiveMinimum": 0},
        "max_attempts": {"type": "integer", "minimum": 1},
    },
}

_NAMES_A_HOST = frozenset({"VmCreateSpec", "SnapshotRemovalSpec"})
"""Request bodies that name a host, which may not exist (404)."""

_WHOLE: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": MAX_CAPACITY}
_NAME: dict[str, Any] = {"type": "string", "minLength": 1, "pattern": "^[^\\x00]*$"}


def _optional(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional field: null means absent (the default)."""
    return {**schema, "type": [schema["type"], "null"]}


SCHEMAS: dict[str, Any] = {
    "Error": _ERROR,
    "TaskSpec": _TASK_SPEC,
    "GroupSpec": {
        "type": "object",
        "required": ["tasks"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "name": {"type": "string"},
            "tasks": {
                "type": "array",
                "minItems": 1,
                "items": {"$ref": "#/components/schemas/TaskSpec"},
            },
        },
    },
    "Cancel": {"type": "object", "properties": {"reason": {"type": "string"}}},
    "HostSpec": {
        "type": "object",
        "required": ["name", "uri"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^\\S+$"},
            "uri": {
                "type": "string",
                "pattern": "^[a-z]+(\\+[a-z]+)?://",
                "description": "a libvirt URI",
            },
            "capacity": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_CAPACITY},
        },
    },
    "ClearSpec": {
        "type": "object",
        "required": ["how"],
        "additionalProperties": False,
        "properties": {
            "how": {"enum": ["migrate", "destroy"]},
            "i_understand_this_destroys_data": {
                "type": "boolean",
                "description": "required (true) with how=destroy",
            },
            "delete_storage": {"type": "boolean", "description": "how=destroy: pools' data too"},
            "copy_storage": {"type": "boolean", "description": "how=migrate: copy disks"},
        },
    },
    "VmCreateSpec": {
        "type": "object",
        "required": ["name", "host", "pool", "disk_mib"],
        "additionalProperties": False,
        "properties": {
            "name": _NAME,
            "host": _NAME,
            "pool": {**_NAME, "description": "the storage pool of its new disk"},
            "disk_mib": _WHOLE,
            "memory_mib": _optional(_WHOLE),
            "vcpus": _optional(_WHOLE),
            "network": _optional(_NAME),
        },
    },
    "SnapshotRemovalSpec": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "host": {**_optional(_NAME), "description": "default: wherever the VM is defined"},
            "bandwidth": {**_optional(_WHOLE), "description": "MiB/s for each block commit"},
        },
    },
    "TokenSpec": {
        "type": "object",
        "required": ["name", "role"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 100},
            "role": {"enum": ["viewer", "operator", "admin"]},
        },
    },
    "Task": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "action": {"type": "string"},
            "state": {"enum": [s.value for s in State]},
            "params": {"type": "object"},
            "after": {"type": "array", "items": {"type": "string"}},
            "group": {"type": ["string", "null"]},
            "result": {},
            "error": {"type": ["object", "null"]},
        },
    },
}

_STATUS_TEXT = {
    "400": "bad input",
    "401": "no valid token",
    "403": "the token's role does not allow this",
    "404": "not found",
    "409": "conflict or wrong state",
    "413": "body too large",
    "415": "body not application/json",
    "503": "database unavailable, schema not current, or the server at its request limit",
}


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route in `api.ROUTES`."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        op: dict[str, Any] = {
            "operationId": route.handler,
            "summary": route.summary,
            "responses": {"200": {"description": "ok", "content": _ok(route.produces)}},
        }
        if route.role is not None:
            op["security"] = [{"bearer": []}]
            op["x-role"] = route.role.value
        else:
            op["security"] = []
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": _path_schema(route, name)}
            for name in re.findall(r"\{(\w+)\}", route.pattern)
        ]
        parameters += [
            {"name": name, "in": "query", "required": False, "schema": _query_schema(route, name)}
            for name in route.query
        ]
        if parameters:
            op["parameters"] = parameters
        if route.body:
            op["requestBody"] = {
                "required": route.body != "Cancel",
                "content": _json({"$ref": f"#/components/schemas/{route.body}"}),
            }
        codes = ["400", "503"]
        if route.role is not None:
            codes += ["401", "403"]
        if "{" in route.pattern or "host" in route.query or route.body in _NAMES_A_HOST:
            codes.append("404")
        if route.method == "POST":
            codes += ["409", "413", "415"]
        for code in sorted(codes):
            op["responses"][code] = {
                "description": _STATUS_TEXT[code],
                "content": _json({"$ref": "#/components/schemas/Error"}),
            }
        paths.setdefault(route.pattern, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "taskomatic",
            "version": "1",
            "description": "The HTTP JSON API of taskomatic; see docs/http.md.",
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


_UUID = {"type": "string", "format": "uuid"}
_QUERY: dict[str, Any] = {
    "limit": {"type": "integer", "minimum": 1, "maximum": defaults.MAX_LIST_LIMIT},
    "cursor": {"type": "integer", "minimum": 1, "maximum": MAX_CURSOR},
    "group": _UUID,
    "timeout": {"type": "number", "minimum": 0},
    "revoked": {"enum": ["true", "false"]},
    "action": {"type": "string"},
    "host": {"type": "string", "minLength": 1},
}
_STATE_QUERY: dict[str, Any] = {
    "list_tasks": {"enum": [s.value for s in State]},
    "list_hosts": {"enum": [s.value for s in HostState]},
    "vms": {"enum": list(VM_STATES)},
}


def _path_schema(route: Route, name: str) -> dict[str, Any]:
    if name == "id":  # tasks and groups are known by UUID; hosts and tokens by name
        return _UUID
    return {"type": "string", "minLength": 1}


def _query_schema(route: Route, name: str) -> dict[str, Any]:
    if name == "state":
        return _STATE_QUERY[route.handler]
    return _QUERY[name]


def _ok(produces: str) -> dict[str, Any]:
    if produces == JSON:
        return _json({"type": "object"})
    return {produces.split(";")[0]: {"schema": {"type": "string"}}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


if __name__ == "__main__":
    print(json.dumps(document(), indent=2))
