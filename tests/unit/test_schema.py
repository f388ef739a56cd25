"""The checked-in schema.sql is exactly what the SQLAlchemy tables generate."""

from __future__ import annotations

from pathlib import Path

from taskomatic.schema import SCHEMA_VERSION, postgresql_ddl

ROOT = Path(__file__).resolve().parents[2]


def test_schema_sql_matches_the_tables() -> None:
    checked_in = (ROOT / "schema.sql").read_text()
    assert checked_in == postgresql_ddl(), (
        "schema.sql differs from taskomatic/schema.py; regenerate it with "
        "`taskomatic db schema > schema.sql`"
    )


def test_schema_sql_names_its_version() -> None:
    assert f"-- Schema version {SCHEMA_VERSION}." in (ROOT / "schema.sql").read_text()
