"""The HTTP server: a thread per request (long-polls block only their own), TLS when given a
certificate, bearer tokens checked before any handler runs, JSON errors for every refusal."""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from taskomatic import defaults, errors
from taskomatic.http.api import ROUTES, Api
from taskomatic.http.router import (
    HttpError,
    Request,
    Response,
    Router,
    dumps,
    error_body,
    status_of,
)
from taskomatic.queue import Queue
from taskomatic.tokens import Token, Tokens

log = logging.getLogger(__name__)

_DRAIN_LIMIT = 16 * 1024 * 1024
"""An oversized body up to this size is read and dropped before the 413, so that the client,
still sending, reads the answer instead of a reset connection (bytes)."""


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
    ) -> None:
        self.queue = queue
        self.max_requests = max_requests
        self.slots = threading.BoundedSemaphore(max_requests)
        self.api = Api(queue, Tokens(queue))
        self.router = Router(ROUTES)
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

    def _handle(self, method: str) -> None:
        started = time.monotonic()
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        held = False  # one of the server's slots; liveness answers without one
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
            token = self._authorize(route.role)
            body = self._body()
            request = Request(
                method, path, params, parse_qs(parts.query, keep_blank_values=True), body, token
            )
            response: Response = getattr(self.server.api, route.handler)(request)
        except errors.TaskomaticError as exc:
            response = Response(status_of(exc), error_body(exc))
            if response.status >= 500:
                log.warning("%s %s: %s", method, path, exc.message)
        except Exception:
            log.exception("%s %s failed", method, path)
            response = Response(
                500, {"code": "internal", "message": "internal error; see the log", "field": None}
            )
        finally:
            if held:
                self.server.slots.release()
        self._send(response)
        log.info(
            "%s %s %d %.0fms", method, path, response.status, (time.monotonic() - started) * 1000
        )

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

    def _body(self) -> Any:
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
        if kind != "application/json":
            raise HttpError(
                415, "unsupported_media_type", "send the body as Content-Type: application/json"
            )
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HttpError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            raise HttpError(400, "bad_json", "the body is nested too deeply") from None

    def _drain(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                return
            length -= len(chunk)

    def _send(self, response: Response) -> None:
        data = dumps(response.payload)
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            if response.status == 401:
                self.send_header("WWW-Authenticate", 'Bearer realm="taskomatic"')
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; nothing to tell it

    def log_message(self, format: str, *args: Any) -> None:
        # http.server's own lines (request lines, errors) go to debug; _handle logs each request
        # without its query or headers, so no token ever reaches a log.
        log.debug("%s " + format, self.address_string(), *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass
