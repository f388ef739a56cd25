"""Who may call what: every route of the API and of the dashboard, called with no credential,
a bad one, a revoked one and each role, on both backends. A role below the route's gets 403, no
token 401; a role at or above it gets past authorization (to the handler's own answer)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from taskomatic import defaults
from taskomatic.http import ROUTES, Server
from taskomatic.http import dashboard as dash
from taskomatic.queue import Queue
from taskomatic.tokens import Role, Tokens

ROLES = [r.value for r in Role]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the test looks at the 303 itself


_OPENER = urllib.request.build_opener(_NoRedirect)


def _call(
    url: str,
    method: str,
    *,
    token: str | None = None,
    body: bytes | None = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", content_type)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with _OPENER.open(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _path(pattern: str) -> str:
    """A concrete path for a route: unknown ids and names (the handler answers 404 or 400)."""
    path = pattern.replace("{id}", str(uuid.uuid4())).replace("{name}", "nobody")
    return path + ("?timeout=0" if path.endswith("/wait") else "")


@pytest.fixture
def server(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Server, dict[str, str]]]:
    """A server (no dispatcher) with a token of each role and one revoked token."""
    monkeypatch.setattr(defaults, "TOKEN_SCRYPT_N", 2**10)
    queue = Queue.open(db_url)
    tokens = Tokens(queue)
    secrets = {role: tokens.create(role, role)[1] for role in ROLES}
    secrets["revoked"] = tokens.create("gone", "admin")[1]
    tokens.revoke("gone")
    srv = Server(queue, ("127.0.0.1", 0)).start()
    try:
        yield srv, secrets
    finally:
        srv.stop()
        queue.close()


def test_every_api_route_for_every_role(server: tuple[Server, dict[str, str]]) -> None:
    srv, secrets = server
    checked = 0
    for route in ROUTES:
        url = srv.url + _path(route.pattern)
        body = b"{}" if route.method == "POST" else None
        credentials: list[tuple[str, str | None]] = [
            ("none", None),
            ("malformed", "not-a-token"),
            ("wrong secret", secrets["admin"][:-4] + "AAAA"),
            ("revoked", secrets["revoked"]),
            *((role, secrets[role]) for role in ROLES),
        ]
        for who, token in credentials:
            status, headers, raw = _call(url, route.method, token=token, body=body)
            where = f"{route.method} {route.pattern} as {who}: {status} {raw[:200]!r}"
            if route.role is None:
                assert status == 200, where
                continue
            if who in ROLES:
                allowed = Role(who).allows(route.role)
                assert status not in (401, 403) if allowed else status == 403, where
            else:
                assert status == 401, where
                assert headers["WWW-Authenticate"] == 'Bearer realm="taskomatic"', where
            assert status < 500, where
            if status >= 400:
                payload = json.loads(raw)
                assert set(payload) == {"code", "message", "field"}, where
                assert token is None or token not in payload["message"], where
            checked += 1
    assert checked == sum(7 for r in ROUTES if r.role is not None)


def _sign_in(srv: Server, secret: str) -> tuple[str, str]:
    """Sign in through the form; the session cookie and the page's CSRF token."""
    status, headers, _ = _call(
        srv.url + "/ui/login",
        "POST",
        body=f"token={secret}".encode(),
        content_type="application/x-www-form-urlencoded",
    )
    assert status == 303 and headers["Location"] == "/ui/"
    cookie = headers["Set-Cookie"]
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(cookie.split("; "))
    assert "Secure" not in cookie  # plain HTTP on loopback; over TLS it is Secure
    session = cookie.split(";")[0]
    _, _, page = _call(srv.url + "/ui/", "GET", headers={"Cookie": session})
    found = re.search(rb'name="csrf" value="([^"]+)"', page)
    assert found
    return session, found.group(1).decode()


def test_every_dashboard_route_needs_a_session_of_its_role(
    server: tuple[Server, dict[str, str]],
) -> None:
    srv, secrets = server
    sessions = {role: _sign_in(srv, secrets[role]) for role in ROLES}
    for route in dash.ROUTES:
        url = srv.url + _path(route.pattern)
        if route.role is None:
            continue
        if route.method == "GET" and route.pattern != "/ui/live":
            # Without a session a page sends the browser to the sign-in form.
            status, headers, _ = _call(url, "GET")
            assert (status, headers.get("Location")) == (303, "/ui/login"), route.pattern
            # A bearer token is not a session: the dashboard never reads Authorization.
            status, headers, _ = _call(url, "GET", token=secrets["admin"])
            assert status == 303, route.pattern
        for role, (cookie, csrf) in sessions.items():
            if route.pattern in ("/ui/live", "/ui/logout"):
                continue  # the stream and signing out are exercised below
            body = f"csrf={csrf}".encode() if route.method == "POST" else None
            status, _, page = _call(
                url,
                route.method,
                body=body,
                content_type="application/x-www-form-urlencoded",
                headers={"Cookie": cookie},
            )
            if Role(role).allows(route.role):
                assert status not in (401, 403), (route.pattern, role, status)
            else:
                assert status == 403, (route.pattern, role, status)
                assert f"needs {route.role.value}".encode() in page


def test_dashboard_forms_need_the_csrf_token_and_the_same_origin(
    server: tuple[Server, dict[str, str]],
) -> None:
    srv, secrets = server
    queue = srv.queue
    task = queue.submit("noop")
    cookie, csrf = _sign_in(srv, secrets["operator"])
    url = f"{srv.url}/ui/tasks/{task.id}/cancel"
    form = "application/x-www-form-urlencoded"

    def post(body: str, **headers: str) -> int:
        sent = {"Cookie": cookie, **headers}
        return _call(url, "POST", body=body.encode(), content_type=form, headers=sent)[0]

    assert post("") == 403  # no CSRF token
    assert post("csrf=" + "x" * len(csrf)) == 403  # another one
    assert post(f"csrf={csrf}", Origin="http://evil.example") == 403  # another site's page
    assert queue.get(task.id).state.value == "new"
    assert post(f"csrf={csrf}", Origin=srv.url) == 303
    assert queue.get(task.id).state.value == "cancelled"
    [event] = [e for e in queue.events(task.id) if e.to_state.value == "cancelled"]
    assert event.actor == "token:operator"

    # Signing out (a form too) ends the session; so does revoking its token.
    assert _call(f"{srv.url}/ui/logout", "POST", body=b"", content_type=form,
                 headers={"Cookie": cookie})[0] == 403  # fmt: skip
    status, headers, _ = _call(
        f"{srv.url}/ui/logout", "POST", body=f"csrf={csrf}".encode(), content_type=form,
        headers={"Cookie": cookie},
    )  # fmt: skip
    assert status == 303 and "Max-Age=0" in headers["Set-Cookie"]
    assert _call(srv.url + "/ui/", "GET", headers={"Cookie": cookie})[0] == 303
    viewer_cookie, _ = _sign_in(srv, secrets["viewer"])
    assert _call(srv.url + "/ui/", "GET", headers={"Cookie": viewer_cookie})[0] == 200
    Tokens(queue).revoke("viewer")
    assert _call(srv.url + "/ui/", "GET", headers={"Cookie": viewer_cookie})[0] == 303


def test_sign_in_refuses_bad_tokens_without_echoing_them(
    server: tuple[Server, dict[str, str]],
) -> None:
    srv, secrets = server
    form = "application/x-www-form-urlencoded"
    for presented in ("", "nonsense", secrets["revoked"], secrets["viewer"] + "x"):
        status, headers, page = _call(
            srv.url + "/ui/login", "POST", body=f"token={presented}".encode(), content_type=form
        )
        assert status in (400, 401) and "Set-Cookie" not in headers, presented
        assert b'id="login-error"' in page
        assert not presented or presented.encode() not in page


def test_an_admin_session_takes_a_host_into_maintenance_and_back(
    server: tuple[Server, dict[str, str]],
) -> None:
    srv, secrets = server
    srv.queue.hosts.add("kvm1", "test:///default")
    form = "application/x-www-form-urlencoded"
    operator, _ = _sign_in(srv, secrets["operator"])
    page = _call(srv.url + "/ui/hosts", "GET", headers={"Cookie": operator})[2]
    assert b"kvm1" in page and b"/ui/hosts/kvm1/maintenance" not in page  # no button
    cookie, csrf = _sign_in(srv, secrets["admin"])
    page = _call(srv.url + "/ui/hosts", "GET", headers={"Cookie": cookie})[2]
    assert b'action="/ui/hosts/kvm1/maintenance"' in page
    for verb, state in (("maintenance", "maintenance"), ("activate", "active")):
        status, headers, _ = _call(
            f"{srv.url}/ui/hosts/kvm1/{verb}", "POST", body=f"csrf={csrf}".encode(),
            content_type=form, headers={"Cookie": cookie},
        )  # fmt: skip
        assert (status, headers["Location"]) == (303, "/ui/hosts")
        assert srv.queue.hosts.get("kvm1").state.value == state
