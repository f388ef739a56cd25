"""The API tokens' SQL: insert, look up by id, list, revoke. The same on both backends."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from taskomatic import schema as s

k = s.api_tokens


class TokenStatements:
    """Every statement on the `api_tokens` table, each a named method."""

    def insert_token(self, conn: sa.Connection, values: dict[str, Any]) -> None:
        conn.execute(k.insert().values(values))

    def token_by_id(self, conn: sa.Connection, token_id: str) -> Any:
        """The row of the token with this id (revoked or not), or None."""
        return conn.execute(sa.select(k).where(k.c.id == token_id)).first()

    def live_token_by_name(self, conn: sa.Connection, name: str) -> Any:
        return conn.execute(sa.select(k).where(k.c.name == name, k.c.revoked_at.is_(None))).first()

    def tokens(self, conn: sa.Connection, include_revoked: bool) -> list[Any]:
        """Token rows by creation, oldest first; only live ones unless `include_revoked`."""
        query = sa.select(k).order_by(k.c.created_at, k.c.name)
        if not include_revoked:
            query = query.where(k.c.revoked_at.is_(None))
        return list(conn.execute(query))

    def revoke_token(self, conn: sa.Connection, name: str, now: datetime) -> Any:
        """Revoke the live token `name` (guarded: only a live one); its row, or None."""
        row = self.live_token_by_name(conn, name)
        if row is None:
            return None
        done = conn.execute(
            k.update().where(k.c.id == row.id, k.c.revoked_at.is_(None)).values(revoked_at=now)
        )
        return self.token_by_id(conn, row.id) if done.rowcount == 1 else None
