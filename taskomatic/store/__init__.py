"""The database seam: every SQL statement, one subclass per backend."""

from __future__ import annotations

from taskomatic.store.base import Store

__all__ = ["Store", "connect"]


def connect(url: str, **kwargs: object) -> Store:
    """Open the store for a database URL (postgresql://… or sqlite:///…)."""
    from taskomatic.store.base import open_store

    return open_store(url, **kwargs)
