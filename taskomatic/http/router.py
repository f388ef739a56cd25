"""A small router: routes as a table of (method, path pattern, role, handler), and errors as JSON.

The table is the one description of the API: the server dispatches from it and the OpenAPI
document is generated from it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from taskomatic import errors
from taskomatic.tokens import Role, Token


class HttpError(errors.TaskomaticError):
    """A request the HTTP layer itself refuses (no such route, body too large, not JSON)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field
        self.headers = headers


@dataclass(frozen=True)
class Request:
    """What a handler sees: path parameters, the query, the parsed body, the caller's token."""

    method: str
    path: str
    params: Mapping[str, str]
    query: Mapping[str, list[str]]
    body: Any
    token: Token | None
    session: Any = None  # the dashboard's `sessions.Session`, on session routes

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The last value of query parameter `name`."""
        values = self.query.get(name)
        return values[-1] if values else default

    def int_arg(self, name: str, default: int | None = None) -> int | None:
        value = self.arg(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise HttpError(
                400, "invalid", f"query parameter {name!r} must be an integer", field=name
            ) from None

    def cursor_arg(self) -> int | None:
        """`cursor` of a paged list: a `next_cursor` a list returned (a positive 64-bit int)."""
        cursor = self.int_arg("cursor")
        if cursor is not None and not 0 < cursor <= MAX_CURSOR:
            raise HttpError(
                400, "invalid", "'cursor' must be a next_cursor a list returned", field="cursor"
            )
        return cursor

    def float_arg(self, name: str, default: float) -> float:
        value = self.arg(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not number >= 0 or number == float("inf"):
            raise HttpError(
                400, "invalid", f"query parameter {name!r} must be a number of seconds", field=name
            )
        return number

    def object_body(self) -> dict[str, Any]:
        """The body, which must be a JSON object."""
        if not isinstance(self.body, dict):
            raise HttpError(400, "invalid", "the request body must be a JSON object")
        return self.body

    @property
    def actor(self) -> str:
        """Who to record in events and `created_by`: the token's name."""
        return f"token:{self.token.name}" if self.token else "http"


MAX_CURSOR = 2**63 - 1
"""The largest cursor (the databases' 64-bit integers)."""

JSON = "application/json"
HTML = "text/html; charset=utf-8"
TEXT = "text/plain; version=0.0.4; charset=utf-8"  # the Prometheus text format's type
EVENT_STREAM = "text/event-stream"


@dataclass(frozen=True)
class Response:
    """What a handler answers: JSON by default (`payload` serialised); for any other
    `content_type` the payload is the text itself. `stream`, if set, is written after the
    headers until it ends (server-sent events), in place of the payload."""

    status: int
    payload: Any
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()
    stream: Iterable[bytes] | None = None

    def body(self) -> bytes:
        if self.content_type == JSON:
            return dumps(self.payload)
        return self.payload.encode() if isinstance(self.payload, str) else bytes(self.payload)


@dataclass(frozen=True)
class Route:
    """One endpoint. `role` is the least role allowed (None: no token needed); `handler` names
    the method of `api.Api` that answers it."""

    method: str
    pattern: str
    role: Role | None
    handler: str
    summary: str
    body: str | None = None  # the name of the request body's schema in the OpenAPI document
    query: Sequence[str] = field(default=())
    # "bearer": an `Authorization: Bearer` token (the API); "session": the dashboard's cookie,
    # with form bodies and a CSRF token on POST; "public": nothing (static files, sign-in page).
    auth: str = "bearer"
    produces: str = JSON  # the content type of a 200, for the OpenAPI document
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.pattern))
        object.__setattr__(self, "regex", re.compile(f"^{regex}$"))


class Router:
    """Finds the route of a request: 404 for an unknown path, 405 for a known path's wrong verb."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed = []
        for route in self.routes:
            found = route.regex.match(path)
            if found:
                if route.method == method:
                    return route, found.groupdict()
                allowed.append(route.method)
        if allowed:
            verbs = ", ".join(sorted(set(allowed)))
            raise HttpError(
                405, "method_not_allowed", f"{path} allows {verbs}", headers=(("Allow", verbs),)
            )
        raise HttpError(404, "not_found", f"no endpoint {path}; GET /v1/openapi.json lists them")


_STATUS: tuple[tuple[type[errors.TaskomaticError], int], ...] = (
    (errors.ValidationError, 400),
    (errors.Unauthorized, 401),
    (errors.Forbidden, 403),
    (errors.TaskNotFound, 404),
    (errors.GroupNotFound, 404),
    (errors.HostNotFound, 404),
    (errors.TokenNotFound, 404),
    (errors.Conflict, 409),
    (errors.HostConflict, 409),
    (errors.TokenConflict, 409),
    (errors.InvalidTransition, 409),
    (errors.InventoryNotCurrent, 409),
    (errors.DatabaseUnavailable, 503),
    (errors.SchemaError, 503),
)


def status_of(exc: errors.TaskomaticError) -> int:
    """The HTTP status of a taskomatic error: 4xx for the caller's mistakes, 503 for outages."""
    if isinstance(exc, HttpError):
        return exc.status
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def error_body(exc: errors.TaskomaticError) -> dict[str, Any]:
    """The JSON every error is answered with: a stable code, a message, the offending field."""
    return {"code": exc.code, "message": exc.message, "field": getattr(exc, "field", None)}


def dumps(payload: Any) -> bytes:
    return json.dumps(payload, default=str).encode()
