"""The test PostgreSQL helper does what the suites and benchmarks rely on."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from pgcluster import ExternalPostgres, PostgresCluster

Cluster = PostgresCluster | ExternalPostgres


@pytest.fixture
def dbname(pg_cluster: Cluster) -> Iterator[str]:
    """A new empty database, dropped afterwards."""
    name = f"taskomatic_pgcluster_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    yield name
    pg_cluster.terminate_connections(name)
    pg_cluster.drop_database(name)


def _scalar(url: str, query: str) -> object:
    """One value from a short-lived engine, so no pooled connection outlives the call."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(query)).scalar_one()
    finally:
        engine.dispose()


def test_created_database_accepts_connections(pg_cluster: Cluster, dbname: str) -> None:
    assert _scalar(pg_cluster.url(dbname), "SELECT current_database()") == dbname


def test_template_copies_tables_and_rows(pg_cluster: Cluster, dbname: str) -> None:
    engine = sa.create_engine(pg_cluster.url(dbname))
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (v text); INSERT INTO t VALUES ('kept')"))
    engine.dispose()
    clone = f"{dbname}_clone"
    pg_cluster.create_database(clone, template=dbname)
    try:
        assert _scalar(pg_cluster.url(clone), "SELECT v FROM t") == "kept"
    finally:
        pg_cluster.drop_database(clone)


def test_restart_keeps_data_and_url(pg_cluster: Cluster, dbname: str) -> None:
    url = pg_cluster.url(dbname)
    engine = sa.create_engine(url, pool_pre_ping=True)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (v text); INSERT INTO t VALUES ('committed')"))
    pg_cluster.restart()
    assert pg_cluster.url(dbname) == url
    # The pooled connection died with the server; pre-ping replaces it.
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT v FROM t")).scalar_one() == "committed"
    engine.dispose()


def test_private_cluster_is_durable_and_cleans_up() -> None:
    with PostgresCluster() as cluster:
        settings = "SELECT current_setting('fsync') || ' ' || current_setting('synchronous_commit')"
        assert _scalar(cluster.url("postgres"), settings) == "on on"
        directory = cluster.dir
        assert directory is not None
    assert not directory.exists()
    cluster.stop()  # twice is harmless
    cluster.cleanup()
