"""API tokens: created once and shown once, stored as a salted scrypt hash, checked per request.

A token reads `tkm_<id>_<secret>`. The id is not secret: it finds the row in one indexed
read, so checking a token costs one scrypt, not one per stored token. A checked token is
remembered briefly (by a digest of it, never the token) so that a busy client does not pay
the slow hash on every request; its row is still read every time, so revocation is at once.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from taskomatic import defaults, errors
from taskomatic.store.tokens import TokenStatements

if TYPE_CHECKING:
    from taskomatic.queue import Queue

PREFIX = "tkm_"
"""How every token starts, so that secret scanners and people can recognise one."""

ID_CHARS = 12
"""Length of the token's non-secret id (hex characters)."""

_SCRYPT_R = 8
_SCRYPT_P = 1


class Role(enum.StrEnum):
    """What a token may do; each role allows everything the ones before it do."""

    VIEWER = "viewer"  # read
    OPERATOR = "operator"  # + submit, cancel, retry, collect
    ADMIN = "admin"  # + hosts, tokens

    def allows(self, needed: Role) -> bool:
        order = list(Role)
        return order.index(self) >= order.index(needed)


@dataclass(frozen=True)
class Token:
    """A stored token, without its secret (which is never stored)."""

    id: str
    name: str
    role: Role
    created_by: str | None
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> Token:
        m = row._mapping
        return cls(
            m["id"], m["name"], Role(m["role"]), m["created_by"], m["created_at"], m["revoked_at"]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role.value,
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


class Tokens:
    """API tokens, over the same transactions as the queue."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue
        self._sql = TokenStatements()
        self._verified: dict[str, tuple[bytes, float]] = {}  # id -> (digest, valid until)
        self._lock = threading.Lock()

    def create(
        self, name: str, role: Role | str, *, created_by: str | None = None
    ) -> tuple[Token, str]:
        """A new token: its row, and the token itself — shown this once, never stored."""
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            raise errors.ValidationError("a token name is 1 to 100 characters", field="name")
        wanted = _role(role)
        token_id = secrets.token_hex(ID_CHARS // 2)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        n = defaults.TOKEN_SCRYPT_N
        digest = _scrypt(secret, salt, n)

        def insert(conn: sa.Connection, now: datetime) -> Token:
            if self._sql.live_token_by_name(conn, name) is not None:
                raise errors.TokenConflict(
                    f"a live token is named {name!r}; revoke it first or choose another name"
                )
            values = {
                "id": token_id,
                "name": name,
                "role": wanted.value,
                "salt": salt.hex(),
                "hash": digest.hex(),
                "scrypt_n": n,
                "created_by": created_by,
                "created_at": now,
                "revoked_at": None,
            }
            self._sql.insert_token(conn, values)
            return Token.from_row(self._sql.token_by_id(conn, token_id))

        try:
            row = self._queue._write(insert, changed=lambda _: False)
        except sa.exc.IntegrityError:
            # A racing create took the name first (the unique index on live names).
            raise errors.TokenConflict(
                f"a live token is named {name!r}; revoke it first or choose another name"
            ) from None
        return row, f"{PREFIX}{token_id}_{secret}"

    def list(self, *, include_revoked: bool = False) -> list[Token]:
        """Tokens, oldest first; revoked ones too if asked."""
        rows = self._queue._read(lambda conn: self._sql.tokens(conn, include_revoked))
        return [Token.from_row(r) for r in rows]

    def revoke(self, name: str) -> Token:
        """Revoke the live token `name`: from now on it is refused."""
        row = self._queue._write(
            lambda conn, now: self._sql.revoke_token(conn, name, now), changed=lambda _: False
        )
        if row is None:
            raise errors.TokenNotFound(name)
        return Token.from_row(row)

    def verify(self, presented: str) -> Token:
        """The live token `presented` is; `Unauthorized` if it is none (malformed, unknown,
        wrong secret, revoked). The message never repeats what was presented."""
        token_id, secret = _split(presented)
        row = self._queue._read(lambda conn: self._sql.token_by_id(conn, token_id))
        if row is None or row.revoked_at is not None:
            raise errors.Unauthorized("unknown or revoked token")
        # The cache key is a digest of the whole token, so a cached entry proves the secret.
        quick = hashlib.sha256(presented.encode()).digest()
        with self._lock:
            cached = self._verified.get(token_id)
        if (
            cached is None
            or cached[1] < time.monotonic()
            or not hmac.compare_digest(cached[0], quick)
        ):
            expected = bytes.fromhex(row.hash)
            if not hmac.compare_digest(
                _scrypt(secret, bytes.fromhex(row.salt), row.scrypt_n), expected
            ):
                raise errors.Unauthorized("unknown or revoked token")
            with self._lock:
                self._verified[token_id] = (quick, time.monotonic() + defaults.TOKEN_CACHE_SECONDS)
        return Token.from_row(row)


def _split(presented: str) -> tuple[str, str]:
    body = presented.removeprefix(PREFIX) if presented.startswith(PREFIX) else None
    if body is None or len(body) < ID_CHARS + 2 or body[ID_CHARS] != "_":
        raise errors.Unauthorized("malformed token; tokens look like tkm_<id>_<secret>")
    token_id, secret = body[:ID_CHARS], body[ID_CHARS + 1 :]
    if any(c not in "0123456789abcdef" for c in token_id) or len(secret) > 200:
        raise errors.Unauthorized("malformed token; tokens look like tkm_<id>_<secret>")
    return token_id, secret


def _scrypt(secret: str, salt: bytes, n: int) -> bytes:
    return hashlib.scrypt(
        secret.encode(), salt=salt, n=n, r=_SCRYPT_R, p=_SCRYPT_P, maxmem=2**26, dklen=32
    )


def _role(value: Role | str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise errors.ValidationError(
            f"unknown role {value!r}; roles are: {', '.join(r.value for r in Role)}", field="role"
        ) from None
