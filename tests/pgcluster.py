"""A private, throwaway PostgreSQL server for tests and benchmarks, so neither needs a shared one.

`PostgresCluster` runs `initdb` into a temporary directory and serves it on a free TCP port of
127.0.0.1 with durability on (fsync and synchronous_commit at their defaults), so benchmark
figures mean what they would in production. `ExternalPostgres` offers the same API over an
existing server named by `TASKOMATIC_TEST_DSN`; `cluster_from_env()` picks one of the two.

    with PostgresCluster() as cluster:
        cluster.create_database("demo")
        engine = sqlalchemy.create_engine(cluster.url("demo"))

An atexit hook stops the server when a run is aborted (Ctrl-C, an exception). A test process
killed by SIGKILL, or by a SIGTERM it does not handle, runs no Python code and leaks the server.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

PG_BIN_DEFAULT = "/usr/lib/postgresql/15/bin"
"""Where Debian's postgresql-15 package puts the server binaries (override: TASKOMATIC_PG_BIN)."""

DSN_ENV = "TASKOMATIC_TEST_DSN"
"""An SQLAlchemy URL to an existing server on which the tests may create and drop databases."""

PG_CTL_TIMEOUT_SECONDS = 60
"""How long pg_ctl waits for the server to start or stop (seconds)."""

KILL_GRACE_SECONDS = 5.0
"""How long a server sent SIGQUIT gets to exit before SIGKILL (seconds)."""


class _Server:
    """What tests need from a PostgreSQL server: URLs, and databases to create and drop."""

    admin_db = "postgres"

    def url(self, dbname: str) -> str:
        """The SQLAlchemy URL of database `dbname` on this server."""
        raise NotImplementedError

    def start(self) -> None:
        """Make the server ready for connections."""

    def stop(self) -> None:
        """Stop the server; safe to call twice."""

    def restart(self) -> None:
        """Stop and start the server at the same URL, as a crash-recovery test needs."""
        raise NotImplementedError

    def cleanup(self) -> None:
        """Stop the server and remove what it left on disk; safe to call twice."""

    def create_database(self, name: str, template: str | None = None) -> None:
        """Create database `name`, copied from `template` when given."""
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        self._admin_execute(query)

    def drop_database(self, name: str) -> None:
        """Drop database `name` if it exists; fails while someone is connected to it."""
        self._admin_execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))

    def terminate_connections(self, name: str) -> None:
        """Disconnect every session of database `name`, so that it can be dropped or cloned."""
        self._admin_execute(
            sql.SQL(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = {} AND pid <> pg_backend_pid()"
            ).format(sql.Literal(name))
        )

    def _admin_execute(self, query: sql.Composed) -> None:
        """Run one statement outside a transaction, as CREATE and DROP DATABASE require."""
        url = make_url(self.url(self.admin_db)).set(drivername="postgresql")
        with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute(query)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class PostgresCluster(_Server):
    """A PostgreSQL 15 cluster of our own in a temporary directory, gone after `cleanup()`."""

    def __init__(self, bin_dir: str | None = None) -> None:
        self.bin_dir = Path(bin_dir or os.environ.get("TASKOMATIC_PG_BIN") or PG_BIN_DEFAULT)
        for tool in ("initdb", "pg_ctl", "postgres"):
            if not (self.bin_dir / tool).is_file():
                raise RuntimeError(
                    f"PostgreSQL 15 server binaries not found in {self.bin_dir}: "
                    "apt-get install postgresql-15 (or set TASKOMATIC_PG_BIN)"
                )
        # initdb refuses to run as root, so root runs the server as the postgres user.
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root needs a 'postgres' user to own the test cluster: "
                    "apt-get install postgresql-15"
                ) from None
            self._run_as = ["runuser", "-u", "postgres", "--"]
        self.dir: Path | None = Path(tempfile.mkdtemp(prefix="taskomatic-pg-"))
        if self._run_as:
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self.data_dir = self.dir / "data"
        self.log_file = self.dir / "postgres.log"
        self.port = _free_port()
        self._pid: int | None = None
        self._initialized = False
        atexit.register(self.cleanup)

    def url(self, dbname: str) -> str:
        """The SQLAlchemy URL of database `dbname`; unchanged by `restart()`."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        """Create the cluster on first use, then start the server and wait until it accepts."""
        if self._pid is not None:
            return
        if self.dir is None:
            raise RuntimeError("this PostgresCluster was cleaned up; make a new one")
        if not self._initialized:
            self._initdb()
        self._pg_ctl("start", "-l", str(self.log_file))
        self._pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])

    def stop(self) -> None:
        """Fast shutdown (sessions are disconnected), waiting for the server to exit."""
        if self._pid is None:
            return
        pid, self._pid = self._pid, None
        try:
            self._pg_ctl("stop", "-m", "fast")
        except (RuntimeError, subprocess.TimeoutExpired):
            _kill(pid)
        else:
            # pg_ctl returns once postmaster.pid is gone, a moment before the process is.
            _wait_gone(pid, KILL_GRACE_SECONDS)

    def restart(self) -> None:
        """Stop and start on the same port, so URLs and engines stay valid."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the server and remove the temporary directory."""
        self.stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        atexit.unregister(self.cleanup)

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server log, for error messages."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _initdb(self) -> None:
        """Create the cluster files and the settings every start uses."""
        # --locale=C: sort order and messages must not depend on the machine running the tests.
        self._run(
            "initdb",
            *("-D", str(self.data_dir), "-A", "trust", "-U", "postgres"),
            *("--encoding=UTF8", "--locale=C", "--no-sync"),
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.dir}'",
            "max_connections": "200",
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# taskomatic test cluster\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        self._initialized = True

    def _pg_ctl(self, *args: str) -> None:
        """Run pg_ctl on our data directory, waiting for the action to finish."""
        timeout = str(PG_CTL_TIMEOUT_SECONDS)
        self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-t", timeout, *args)

    def _run(self, tool: str, *args: str) -> None:
        """Run a server binary as the cluster's owner; its output goes into the error on failure."""
        command = [*self._run_as, str(self.bin_dir / tool), *args]
        # The cwd must be readable by the postgres user, which the caller's may not be.
        done = subprocess.run(
            command,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PG_CTL_TIMEOUT_SECONDS + 30,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} failed (exit {done.returncode}):\n"
                f"{done.stdout}{done.stderr}{self.log_tail()}"
            )


class ExternalPostgres(_Server):
    """An existing server (`TASKOMATIC_TEST_DSN`) on which tests create and drop databases."""

    def __init__(self, dsn: str) -> None:
        url = make_url(dsn)
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        self._url = url
        self.admin_db = url.database or "postgres"

    def url(self, dbname: str) -> str:
        """The DSN with its database replaced by `dbname`."""
        return self._url.set(database=dbname).render_as_string(hide_password=False)

    def restart(self) -> None:
        """An external server is not ours to restart; tests that need it need a private cluster."""
        raise RuntimeError(
            f"cannot restart an external server ({DSN_ENV} is set); "
            f"unset {DSN_ENV} to run against a private cluster"
        )


def cluster_from_env() -> PostgresCluster | ExternalPostgres:
    """The server named by TASKOMATIC_TEST_DSN if set, else a new private cluster (not started)."""
    dsn = os.environ.get(DSN_ENV)
    return ExternalPostgres(dsn) if dsn else PostgresCluster()


def _free_port() -> int:
    """A TCP port of 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _kill(pid: int) -> None:
    """Stop a postmaster that pg_ctl could not: SIGQUIT (immediate shutdown), then SIGKILL."""
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if _wait_gone(pid, KILL_GRACE_SECONDS):
            return


def _wait_gone(pid: int, seconds: float) -> bool:
    """Wait until process `pid` has exited; False on timeout."""
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs; a zombie does not, though signals still reach it."""
    # The postmaster is an orphan once pg_ctl exits; a lazy init can leave it a zombie for seconds.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it in case it is our child
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False
        try:  # no /proc on this system
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
