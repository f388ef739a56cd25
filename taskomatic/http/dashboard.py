"""The web dashboard: its routes (cookie sessions, not bearer tokens) and their handlers.

Pages are HTML rendered by `pages`; the live view is one server-sent event stream per page
(`/ui/live`), fed by `live.Live`. Sign-in takes an API token once and keeps a session.
"""

from __future__ import annotations

import logging
import threading
from importlib import resources

from taskomatic import defaults, errors
from taskomatic.http import live, pages
from taskomatic.http.router import EVENT_STREAM, HTML, HttpError, Request, Response, Route
from taskomatic.http.sessions import Sessions, cookie
from taskomatic.metrics import host_of
from taskomatic.model import State
from taskomatic.queue import Queue
from taskomatic.tokens import Role

log = logging.getLogger(__name__)

VIEW, OPER, ADMIN = Role.VIEWER, Role.OPERATOR, Role.ADMIN

MAX_STREAMS = 32
"""Live streams served at once, apart from the request slots (HTTP_MAX_REQUESTS): a stream
lasts minutes, so streams must never use up the slots the API's requests need."""

ROUTES: tuple[Route, ...] = (
    Route("GET", "/", None, "root", "The dashboard.", auth="public", produces=HTML),
    Route("GET", "/ui/login", None, "login_form", "Sign in.", auth="public", produces=HTML),
    Route("POST", "/ui/login", None, "login", "Sign in.", auth="public", produces=HTML),
    Route("POST", "/ui/logout", VIEW, "logout", "Sign out.", auth="session", produces=HTML),
    Route("GET", "/ui/", VIEW, "overview", "The overview.", auth="session", produces=HTML),
    Route("GET", "/ui/live", VIEW, "live", "Live view.", auth="session", produces=EVENT_STREAM),
    Route("GET", "/ui/tasks", VIEW, "tasks", "Tasks.", auth="session", produces=HTML),
    Route("GET", "/ui/tasks/{id}", VIEW, "task", "A task.", auth="session", produces=HTML),
    Route("POST", "/ui/tasks/{id}/cancel", OPER, "cancel", "Cancel.", auth="session"),
    Route("POST", "/ui/tasks/{id}/retry", OPER, "retry", "Retry.", auth="session"),
    Route("GET", "/ui/groups/{id}", VIEW, "group", "A group.", auth="session", produces=HTML),
    Route("GET", "/ui/hosts", VIEW, "hosts", "Hosts.", auth="session", produces=HTML),
    Route("POST", "/ui/hosts/{name}/maintenance", ADMIN, "maintenance", "Drain.", auth="session"),
    Route("POST", "/ui/hosts/{name}/activate", ADMIN, "activate", "Use.", auth="session"),
    Route("GET", "/ui/static/{name}", None, "static", "Script and style.", auth="public"),
)

_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


class Dashboard:
    """The dashboard's handlers, each a method named in ROUTES, over one queue."""

    def __init__(
        self, queue: Queue, sessions: Sessions, *, secure: bool, max_streams: int = MAX_STREAMS
    ) -> None:
        self.queue = queue
        self.sessions = sessions
        self.secure = secure  # served over TLS: the cookie is marked Secure
        self.feed = live.Live(queue)
        self.max_streams = max_streams
        self.streams = threading.BoundedSemaphore(max_streams)
        self.closing = threading.Event()  # set when the server stops: streams end

    # -- signing in --------------------------------------------------------------------------

    def root(self, req: Request) -> Response:
        return redirect("/ui/")

    def login_form(self, req: Request) -> Response:
        return Response(200, pages.login(), HTML)

    def login(self, req: Request) -> Response:
        presented = (req.body or {}).get("token") if isinstance(req.body, dict) else None
        if not presented:
            return Response(400, pages.login("enter a token"), HTML)
        try:
            session = self.sessions.sign_in(presented)
        except errors.Unauthorized as exc:
            log.info("dashboard sign-in refused: %s", exc.message)
            return Response(401, pages.login(exc.message), HTML)
        log.info("dashboard sign-in: token %s (%s)", session.token.name, session.token.role.value)
        return redirect("/ui/", cookie(session.id, secure=self.secure))

    def logout(self, req: Request) -> Response:
        self.sessions.sign_out(req.session.id)
        return redirect("/ui/login", cookie("", secure=self.secure, clear=True))

    # -- pages -------------------------------------------------------------------------------

    def overview(self, req: Request) -> Response:
        return Response(200, pages.overview(req.session), HTML)

    def tasks(self, req: Request) -> Response:
        state = req.arg("state") or None
        action = req.arg("action") or None
        page = self.queue.list(
            state=state,
            action=action,
            limit=min(req.int_arg("limit", defaults.LIST_LIMIT) or 1, defaults.MAX_LIST_LIMIT),
            cursor=req.cursor_arg(),
        )
        body = pages.tasks(req.session, page.tasks, page.next_cursor, state, action)
        return Response(200, body, HTML)

    def task(self, req: Request) -> Response:
        task = self.queue.get(req.params["id"])
        events = self.queue.events(task.id)
        why = self.queue.why(task.id)
        return Response(200, pages.task(req.session, task, events, why), HTML)

    def group(self, req: Request) -> Response:
        group = self.queue.group(req.params["id"])
        page = self.queue.list(group=group.id, limit=live.GROUP_TASKS)
        body = pages.group(req.session, group, page.tasks, page.next_cursor is not None)
        return Response(200, body, HTML)

    def hosts(self, req: Request) -> Response:
        found = self.queue.hosts.list(None)
        reachable = {
            r.host: r for r in self.queue._read(lambda conn: self.queue.store.inventory_hosts(conn))
        }
        waiting: dict[str, int] = {}
        for t in self.queue.list(state=State.WAITING, limit=defaults.MAX_LIST_LIMIT).tasks:
            host = host_of(t.job, t.params, t.result)
            if host:
                waiting[host] = waiting.get(host, 0) + 1
        return Response(200, pages.hosts(req.session, found, reachable, waiting), HTML)

    # -- actions -----------------------------------------------------------------------------

    def cancel(self, req: Request) -> Response:
        actor = f"token:{req.session.token.name}"
        self.queue.cancel(req.params["id"], "cancelled from the dashboard", actor=actor)
        return redirect(f"/ui/tasks/{req.params['id']}")

    def retry(self, req: Request) -> Response:
        self.queue.retry(req.params["id"], actor=f"token:{req.session.token.name}")
        return redirect(f"/ui/tasks/{req.params['id']}")

    def maintenance(self, req: Request) -> Response:
        self.queue.hosts.set_state(req.params["name"], "maintenance")
        return redirect("/ui/hosts")

    def activate(self, req: Request) -> Response:
        self.queue.hosts.set_state(req.params["name"], "active")
        return redirect("/ui/hosts")

    # -- live and static ---------------------------------------------------------------------

    def live(self, req: Request) -> Response:
        key = live.snapshot_key(req.arg("group"), req.arg("task"))
        if key != "overview":  # an unknown id is a 404 now, not an error in the stream
            self.feed.snapshot(key)
        if not self.streams.acquire(blocking=False):
            raise HttpError(
                503,
                "busy",
                f"the server is serving its limit of {self.max_streams} live streams; "
                "the page retries by itself",
            )
        stream = live.Stream(self.feed.stream(key, self.closing), self.streams.release)
        return Response(200, "", EVENT_STREAM, (("X-Accel-Buffering", "no"),), stream=stream)

    def static(self, req: Request) -> Response:
        name = req.params["name"]
        if name not in _STATIC:
            raise HttpError(404, "not_found", f"no static file {name}")
        text = resources.files("taskomatic.http").joinpath("static", name).read_text()
        return Response(200, text, f"{_STATIC[name]}; charset=utf-8")


def redirect(location: str, set_cookie: str | None = None) -> Response:
    """A 303 See Other (after a form's POST the browser GETs `location`)."""
    headers = [("Location", location)]
    if set_cookie is not None:
        headers.append(("Set-Cookie", set_cookie))
    return Response(303, "", HTML, tuple(headers))
