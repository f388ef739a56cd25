"""The dashboard's sign-in: a token posted once buys a cookie naming a server-side session.

The cookie holds only a random session id; the session remembers which token signed in (by
its id, never its secret) and a CSRF token that every form of the dashboard carries. Each
request reads the token's row again, so revoking the token ends its sessions at once.
Sessions live in the memory of the serving process: a restart signs everyone out, and
several `serve` processes behind one address need sticky sessions.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from taskomatic import errors
from taskomatic.store.tokens import TokenStatements
from taskomatic.tokens import Token

if TYPE_CHECKING:
    from taskomatic.queue import Queue
    from taskomatic.tokens import Tokens

COOKIE = "taskomatic_session"
"""The name of the session cookie."""

IDLE_SECONDS = 8 * 3600.0
"""A session unused this long (seconds) is forgotten: sign in again."""

MAX_SESSIONS = 10_000
"""Sessions kept at most; past it the least recently used is forgotten first."""


@dataclass(frozen=True)
class Session:
    """One signed-in browser: which token, its CSRF token, and when it was last used."""

    id: str
    token: Token
    csrf: str
    used: float  # time.monotonic() of the last request


class Sessions:
    """The live sessions of one server, in memory."""

    def __init__(self, queue: Queue, tokens: Tokens) -> None:
        self._queue = queue
        self._tokens = tokens
        self._sql = TokenStatements()
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def sign_in(self, presented: str) -> Session:
        """A new session for a valid token; `Unauthorized` otherwise (never echoing it)."""
        token = self._tokens.verify(presented.strip())
        session = Session(
            secrets.token_urlsafe(32), token, secrets.token_urlsafe(32), time.monotonic()
        )
        with self._lock:
            if len(self._by_id) >= MAX_SESSIONS:
                oldest = min(self._by_id.values(), key=lambda s: s.used)
                del self._by_id[oldest.id]
            self._by_id[session.id] = session
        return session

    def find(self, session_id: str | None) -> Session:
        """The live session of this cookie value, its token re-read (revocation ends it)."""
        if not session_id:
            raise errors.Unauthorized("sign in with a token at /ui/login")
        now = time.monotonic()
        with self._lock:
            session = self._by_id.get(session_id)
            if session is not None and now - session.used > IDLE_SECONDS:
                del self._by_id[session_id]
                session = None
        if session is None:
            raise errors.Unauthorized("the session ended; sign in again at /ui/login")
        token_id = session.token.id
        row = self._queue._read(lambda conn: self._sql.token_by_id(conn, token_id))
        if row is None or row.revoked_at is not None:
            self.sign_out(session_id)
            raise errors.Unauthorized("the token of this session was revoked; sign in again")
        session = replace(session, token=Token.from_row(row), used=now)
        with self._lock:
            if session_id in self._by_id:
                self._by_id[session_id] = session
        return session

    def sign_out(self, session_id: str) -> None:
        with self._lock:
            self._by_id.pop(session_id, None)

    @staticmethod
    def check_csrf(session: Session, presented: str | None) -> None:
        """A form's CSRF token must be its session's: a page of another site cannot know it."""
        if not presented or not hmac.compare_digest(presented, session.csrf):
            raise errors.Forbidden("the form's CSRF token is missing or stale; reload the page")

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)


def cookie(session_id: str, *, secure: bool, clear: bool = False) -> str:
    """The Set-Cookie value: HttpOnly (no script reads it), SameSite=Strict (no other site
    sends it), Secure over TLS; `clear` expires it."""
    parts = [f"{COOKIE}={'' if clear else session_id}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if clear:
        parts.append("Max-Age=0")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)
