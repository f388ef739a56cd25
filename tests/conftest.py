"""Shared fixtures: the databases every test suite runs against, and the rule that nothing skips."""

from __future__ import annotations

import re
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from pgcluster import ExternalPostgres, PostgresCluster, cluster_from_env

# --- Every test runs: a skip fails the session ---------------------------------------------------


class _SkipsFail:
    """Collects skipped tests and fails the session over them, because CI must run every test."""

    def __init__(self) -> None:
        self.skipped: list[str] = []

    def _record(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):  # an xfail is not a skip
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            self.skipped.append(f"{report.nodeid}: {reason}")

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.skipped and session.exitstatus in (
            pytest.ExitCode.OK,
            pytest.ExitCode.NO_TESTS_COLLECTED,
        ):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.skipped:
            terminalreporter.section(
                f"{len(self.skipped)} skipped: every test must run, so a skip fails the run",
                red=True,
                bold=True,
            )
            for line in self.skipped:
                terminalreporter.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_SkipsFail(), "taskomatic-skips-fail")


# --- PostgreSQL ----------------------------------------------------------------------------------

TEMPLATE_DB = "taskomatic_template"
"""The database holding the schema, cloned for every PostgreSQL test."""


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster | ExternalPostgres]:
    """A private PostgreSQL server for the session, or the one TASKOMATIC_TEST_DSN names."""
    cluster = cluster_from_env()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def pg_template(pg_cluster: PostgresCluster | ExternalPostgres) -> Iterator[str]:
    """Creates the schema once, so each test database is a cheap `CREATE DATABASE … TEMPLATE`."""
    # Imported here so that a package which fails to import fails these tests, not collection.
    from taskomatic.store import connect

    pg_cluster.drop_database(TEMPLATE_DB)  # left over by an aborted run on an external server
    pg_cluster.create_database(TEMPLATE_DB)
    store = connect(pg_cluster.url(TEMPLATE_DB))
    try:
        store.init_schema(datetime.now(UTC))
    finally:
        store.close()
    yield TEMPLATE_DB
    pg_cluster.drop_database(TEMPLATE_DB)


@pytest.fixture
def pg_url(
    pg_cluster: PostgresCluster | ExternalPostgres, pg_template: str, request: pytest.FixtureRequest
) -> Iterator[str]:
    """The URL of a fresh PostgreSQL database holding the schema, dropped after the test."""
    # Named after the test, so a database left behind on an external server says where from.
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:30]
    name = f"taskomatic_{slug}_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name, template=pg_template)
    yield pg_cluster.url(name)
    try:
        pg_cluster.terminate_connections(name)  # a test that leaks a connection must not fail here
        pg_cluster.drop_database(name)
    except psycopg.Error as exc:
        warnings.warn(f"could not drop test database {name}: {exc}", stacklevel=1)


# --- SQLite --------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """The URL of a new SQLite database file holding the schema, in the test's own directory."""
    from taskomatic.store import connect

    url = f"sqlite:///{tmp_path}/taskomatic.db"
    store = connect(url)
    try:
        store.init_schema(datetime.now(UTC))
    finally:
        store.close()
    return url


# --- Both backends -------------------------------------------------------------------------------

_BACKEND_FIXTURES = {"sqlite": "sqlite_url", "postgresql": "pg_url"}


@pytest.fixture(params=list(_BACKEND_FIXTURES), ids=list(_BACKEND_FIXTURES))
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh database on each backend in turn; test ids end in [sqlite] or [postgresql]."""
    # Resolved lazily, so `-k sqlite` runs never start PostgreSQL.
    url: str = request.getfixturevalue(_BACKEND_FIXTURES[request.param])
    return url
