"""The HTTP server: a thread per request (long-polls block only their own), TLS when given a
certificate, bearer tokens (the API) or session cookies (the dashboard) checked before any
handler runs, JSON errors for every refusal of the API, and event streams for the live view."""

from __future__ import annotations

import json
import logging
import select
import ssl
import threading
import time
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from taskomatic import defaults, errors
from taskomatic.http import dashboard, pages
from taskomatic.http.api import ROUTES, Api
from taskomatic.http.router import (
    HTML,
    JSON,
    HttpError,
    Request,
    Response,
    Route,
    Router,
    error_body,
    status_of,
)
from taskomatic.http.sessions import COOKIE, Session, Sessions
from taskomatic.queue import Queue
from taskomatic.tokens import Token, Tokens

log = logging.getLogger(__name__)

_DRAIN_LIMIT = 16 * 1024 * 1024
"""An oversized body up to this size is read and dropped before the 413, so that the client,
still sending, reads the answer instead of a reset connection (bytes)."""


_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class Server(ThreadingHTTPServer):
    """The API of one queue on one address; `serve_forever()` runs it, `shutdown()` ends it."""

    daemon_threads = True  # a long-poll in progress must not hold the process at exit
    block_on_close = False

    def __init__(
        self,
        queue: Queue,
        address: tuple[str, int],
        *,
        tls: ssl.SSLContext | None = None,
        max_body: int = defaults.HTTP_MAX_BODY_BYTES,
        max_requests: int = defaults.HTTP_MAX_REQUESTS,
        max_streams: int = dashboard.MAX_STREAMS,
    ) -> None:
        self.queue = queue
        self.max_requests = max_requests
        self.slots = threading.BoundedSemaphore(max_requests)
        self.api = Api(queue, Tokens(queue))
        self.sessions = Sessions(queue, self.api.tokens)
        self.dashboard = dashboard.Dashboard(
            queue, self.sessions, secure=tls is not None, max_streams=max_streams
        )
        self.router = Router(ROUTES + dashboard.ROUTES)
        self.handlers = {(r.method, r.pattern): getattr(self.api, r.handler) for r in ROUTES}
        self.handlers.update(
            {(r.method, r.pattern): getattr(self.dashboard, r.handler) for r in dashboard.ROUTES}
        )
        self.max_body = max_body
        self.tls = tls
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.tls is not None:
            # The handshake happens in the request's own thread (do_handshake_on_connect), so a
            # slow or broken client cannot stall the accept loop.
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is not None:
            request.settimeout(_Handler.timeout)
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                log.info("TLS handshake with %s failed: %s", client_address[0], exc)
                return
        super().finish_request(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = host.decode() if isinstance(host, bytes) else host
        if ":" in shown:
            shown = f"[{shown}]"
        return f"{'https' if self.tls else 'http'}://{shown}:{port}"

    def start(self) -> Server:
        """Serve in a background thread (tests, embedding)."""
        threading.Thread(target=self.serve_forever, name="taskomatic-http", daemon=True).start()
        return self

    def shutdown(self) -> None:
        self.dashboard.closing.set()  # live streams end within a poll
        super().shutdown()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server TLS context from PEM files; TLS 1.2 at least."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise errors.ValidationError(
            f"cannot load the TLS certificate {cert} and key {key}: {exc}", field="tls"
        ) from None
    return context


class _Handler(BaseHTTPRequestHandler):
    server: Server
    server_version = "taskomatic"
    sys_version = ""
    timeout = 60  # seconds a client may take to send its request

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    # Any other method (HEAD, OPTIONS, TRACE, …): no route answers it, so it gets the JSON 405
    # (or 404) rather than http.server's HTML 501. A HEAD's answer has the headers only.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):
            return lambda: self._handle(name[3:])
        raise AttributeError(name)

    def _handle(self, method: str) -> None:
        started = time.monotonic()
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        held = False  # one of the server's slots; liveness answers without one
        route: Route | None = None
        session: Session | None = None
        try:
            route, params = self.server.router.match(method, path)
            if route.role is not None:
                held = self.server.slots.acquire(blocking=False)
                if not held:
                    raise HttpError(
                        503,
                        "busy",
                        f"the server is serving its limit of {self.server.max_requests} "
                        "requests at once; retry shortly",
                    )
            query = parse_qs(parts.query, keep_blank_values=True)
            _check_text(path, query)
            if route.auth == "bearer":
                unknown = sorted(set(query) - set(route.query))
                if unknown:
                    known = ", ".join(route.query) or "none"
                    raise HttpError(
                        400,
                        "invalid",
                        f"unknown query parameter {unknown[0]!r} (known: {known})",
                        field=unknown[0],
                    )
            token = None
            if route.auth == "session":
                session = self._session(route)
                token = session.token
            else:
                token = self._authorize(route.role)
            body = self._body(forms=route.auth != "bearer")
            if session is not None and method == "POST":
                self._check_form(session, body)
            request = Request(
                method,
                path,
                params,
                query,
                body,
                token,
                session,
            )
            response: Response = self.server.handlers[(route.method, route.pattern)](request)
        except errors.TaskomaticError as exc:
            response = self._error(route, session, status_of(exc), exc)
            if response.status >= 500:
                log.warning("%s %s: %s", method, path, exc.message)
        except Exception:
            log.exception("%s %s failed", method, path)
            internal = HttpError(500, "internal", "internal error; see the log")
            response = self._error(route, session, 500, internal)
        finally:
            if held:
                self.server.slots.release()
        self._send(response)
        ms = (time.monotonic() - started) * 1000
        log.info(
            "%s %s %d %.0fms",
            method,
            path,
            response.status,
            ms,
            extra={"http": {"method": method, "path": path, "status": response.status}},
        )

    def _error(
        self,
        route: Route | None,
        session: Session | None,
        status: int,
        exc: errors.TaskomaticError,
    ) -> Response:
        """JSON for the API; for the dashboard's pages an HTML page, or the sign-in page when
        the session is missing or over."""
        headers = exc.headers if isinstance(exc, HttpError) else ()
        if (
            route is None
            or route.auth == "bearer"
            or not (route.produces == HTML or route.method == "POST")
        ):
            return Response(status, error_body(exc), headers=headers)
        if status == 401:
            from taskomatic.http.dashboard import redirect

            return redirect("/ui/login")
        return Response(status, pages.error(status, exc.message, session), HTML)

    def _authorize(self, needed: Any) -> Token | None:
        if needed is None:
            return None
        header = self.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise errors.Unauthorized("send `Authorization: Bearer <token>`")
        token = self.server.api.tokens.verify(presented.strip())
        if not token.role.allows(needed):
            raise errors.Forbidden(
                f"token {token.name!r} has role {token.role.value}; this needs {needed.value}"
            )
        return token

    def _session(self, route: Route) -> Session:
        """The dashboard session of the request's cookie, allowed `route`'s role."""
        try:
            jar = SimpleCookie(self.headers.get("Cookie", ""))
        except CookieError:
            jar = SimpleCookie()
        morsel = jar.get(COOKIE)
        session = self.server.sessions.find(morsel.value if morsel else None)
        if route.role is not None and not session.token.role.allows(route.role):
            raise errors.Forbidden(
                f"you signed in as {session.token.name!r} with role "
                f"{session.token.role.value}; this needs {route.role.value}"
            )
        return session

    def _check_form(self, session: Session, body: Any) -> None:
        """A dashboard POST comes from one of its own forms: same origin, and the session's
        CSRF token (SameSite=Strict already keeps other sites' requests cookie-less)."""
        origin = self.headers.get("Origin")
        if origin and origin != "null":
            host = urlsplit(origin).netloc
            if host != self.headers.get("Host"):
                raise errors.Forbidden(f"a form posted from {origin} is refused")
        presented = body.get("csrf") if isinstance(body, dict) else None
        self.server.sessions.check_csrf(session, presented)

    def _body(self, *, forms: bool = False) -> Any:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise HttpError(411, "length_required", "send the body with a Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise HttpError(400, "invalid", "Content-Length is not a number") from None
        if length < 0:
            raise HttpError(400, "invalid", "Content-Length is negative")
        if length > self.server.max_body:
            if length <= _DRAIN_LIMIT:
                self._drain(length)
            self.close_connection = True
            raise HttpError(
                413, "too_large", f"the body is {length} bytes; at most {self.server.max_body}"
            )
        if length == 0:
            return None
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        raw = self.rfile.read(length)
        if forms and kind == "application/x-www-form-urlencoded":
            try:
                fields = parse_qs(raw.decode(), keep_blank_values=True)
            except UnicodeDecodeError:
                raise HttpError(400, "invalid", "the form is not UTF-8") from None
            return {name: values[-1] for name, values in fields.items()}
        if kind != "application/json":
            raise HttpError(
                415, "unsupported_media_type", "send the body as Content-Type: application/json"
            )
        try:
            parsed = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HttpError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            raise HttpError(400, "bad_json", "the body is nested too deeply") from None
        _check_json_text(parsed)
        return parsed

    def _drain(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                return
            length -= len(chunk)

    def _send(self, response: Response) -> None:
        data = b"" if response.stream is not None else response.body()
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            if response.stream is None:
                self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for name, value in response.headers:
                self.send_header(name, value)
            if response.content_type != JSON:
                # The dashboard runs only its own script and style, and in no one's frame.
                self.send_header("Content-Security-Policy", _CSP)
                self.send_header("X-Frame-Options", "DENY")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Referrer-Policy", "same-origin")
            if response.status == 401 and response.content_type == JSON:
                self.send_header("WWW-Authenticate", 'Bearer realm="taskomatic"')
            self.end_headers()
            if response.stream is None:
                if self.command != "HEAD":
                    self.wfile.write(data)
                return
            self.close_connection = True
            for chunk in response.stream:
                if chunk:
                    self.wfile.write(chunk)
                elif select.select([self.connection], [], [], 0)[0]:
                    return  # the client sends nothing on a stream: readable means it closed
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
            pass  # the client went away; nothing to tell it
        finally:
            close = getattr(response.stream, "close", None)
            if close is not None:
                close()

    def log_message(self, format: str, *args: Any) -> None:
        # http.server's own lines (request lines, errors) go to debug; _handle logs each request
        # without its query or headers, so no token ever reaches a log.
        log.debug("%s " + format, self.address_string(), *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


_NUL = "the request contains a NUL character, which no name, id or text here may hold"


def _check_text(path: str, query: dict[str, list[str]]) -> None:
    """NUL characters are refused up front (400): PostgreSQL cannot store them in text."""
    if "\x00" in path or any(
        "\x00" in k or any("\x00" in v for v in vs) for k, vs in query.items()
    ):
        raise HttpError(400, "invalid", _NUL)


def _check_json_text(value: Any) -> None:
    """No string (key or value) of a JSON body holds a NUL character."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise HttpError(400, "invalid", _NUL)
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
