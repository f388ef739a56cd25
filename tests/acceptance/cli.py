"""Running the `taskomatic` command as a user runs it, for the acceptance tests.

Every run is a fresh process of the venv's console script, with a user's environment: HOME
(a temporary directory), and `TASKOMATIC_DATABASE_URL` or none. tests/acceptance/conftest.py
offers `Cli`s on fresh databases as fixtures.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASKOMATIC = Path(sys.executable).with_name("taskomatic")
"""The console script of the venv running the tests: what installing taskomatic gives a user."""

RUN_TIMEOUT_SECONDS = 60.0
"""Longest any one command may run before the test fails (seconds)."""

FAIL_FAST_SECONDS = 10.0
"""A failing command, even on an unreachable database, gives up within this; the retrying
it must not do would last minutes (seconds)."""

ACTIONS_MODULE = "cli_test_actions"
ACTIONS_SOURCE = '''
"""An action module as users write them, loaded with `taskomatic --actions cli_test_actions`."""

import taskomatic
from taskomatic import Param


@taskomatic.action(
    "demo.provision",
    params={"vm": str, "host": Param(str, default="any"), "memory_mb": Param(int, default=1024)},
    max_attempts=4,
)
def provision(ctx):
    """Provision a machine (a stand-in that reports what it was asked)."""
    return {"vm": ctx.params["vm"], "host": ctx.params["host"]}
'''


# -- running the command --------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """What one run of `taskomatic` left behind."""

    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    def json(self) -> Any:
        return json.loads(self.stdout)

    def problem_with_error(self, code: int, says: str) -> str | None:
        """Why this is not a clean failure (exit `code`, one error line that contains
        `says`, nothing on stdout, quickly), or None if it is one."""
        lines = self.stderr.splitlines()
        if self.code != code:
            return f"exit code {self.code}, expected {code}"
        if len(lines) != 1 or not lines[0].startswith("taskomatic: error: "):
            return "stderr is not one 'taskomatic: error: ' line"
        if says not in lines[0]:
            return f"the error does not say {says!r}"
        if self.stdout:
            return "it printed to stdout as well"
        if self.seconds > FAIL_FAST_SECONDS:
            return f"it took {self.seconds:.1f}s to give up"
        return None

    def error(self, code: int, says: str = "") -> str:
        """Assert a clean failure (see `problem_with_error`); returns the message."""
        problem = self.problem_with_error(code, says)
        assert problem is None, f"{problem}:\n{self}"
        return self.stderr.strip().removeprefix("taskomatic: error: ")

    def __str__(self) -> str:
        return (
            f"$ taskomatic {' '.join(self.args)}\n"
            f"exit {self.code} after {self.seconds:.2f}s\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


class Background:
    """A `taskomatic` command running beside the test, its output going to files."""

    def __init__(self, cli: Cli, args: tuple[str, ...]) -> None:
        self.args = args
        self.started = time.monotonic()
        self._out = cli.home / f"{uuid.uuid4().hex}.out"
        self._err = self._out.with_suffix(".err")
        with self._out.open("w") as out, self._err.open("w") as err:
            self.proc = subprocess.Popen(
                [str(TASKOMATIC), *args], stdout=out, stderr=err, env=cli.env, cwd=cli.home
            )

    def first_line(self, timeout: float = RUN_TIMEOUT_SECONDS) -> str:
        """The first line the command printed, once it has printed one (or its output if it
        ended without one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self._out.read_text()
            if "\n" in text:
                return text.splitlines()[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"it ended without printing a line:\n{self.finish()}")
            time.sleep(0.05)
        raise AssertionError(f"no line after {timeout}s")

    def finish(self, timeout: float = RUN_TIMEOUT_SECONDS) -> Result:
        """Wait for the command to end by itself; what it left behind."""
        code = self.proc.wait(timeout=timeout)
        seconds = time.monotonic() - self.started
        return Result(self.args, code, self._out.read_text(), self._err.read_text(), seconds)

    def stop(self) -> Result:
        """SIGTERM, as a service manager stops it; SIGKILL if that does not end it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.finish()


class Cli:
    """Runs `taskomatic` in a subprocess with a user's environment: HOME, a database URL."""

    def __init__(self, home: Path, url: str | None, actions_path: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.url = url
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("TASKOMATIC_") and k not in ("XDG_DATA_HOME", "PYTHONPATH")
        }
        self.env.update(HOME=str(home), PYTHONPATH=str(actions_path))
        if url is not None:
            self.env["TASKOMATIC_DATABASE_URL"] = url

    def run(self, *args: str, stdin: str | None = None) -> Result:
        """Run `taskomatic ARGS...` to its end, in HOME."""
        started = time.monotonic()
        proc = subprocess.run(
            [str(TASKOMATIC), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.home,
            timeout=RUN_TIMEOUT_SECONDS,
            check=False,
        )
        return Result(args, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)

    def run_all(self, *commands: Sequence[str]) -> list[Result]:
        """Run independent commands at the same time; results in the order given."""
        return run_concurrently([(self, tuple(c)) for c in commands])

    def ok(self, *args: str, stdin: str | None = None) -> Result:
        """Run a command that must succeed."""
        result = self.run(*args, stdin=stdin)
        assert result.code == 0, str(result)
        return result

    def json(self, *args: str) -> Any:
        """Run `taskomatic --json ARGS...`, which must succeed; what it printed, parsed."""
        return self.ok("--json", *args).json()

    def submit(self, *args: str) -> str:
        """Submit a task; returns the id the command printed (and nothing else)."""
        printed = self.ok("submit", *args).stdout
        assert printed == f"{uuid.UUID(printed.strip())}\n"
        return printed.strip()

    @contextmanager
    def background(self, *args: str) -> Iterator[Background]:
        """`taskomatic ARGS...` running beside the block; stopped at its end if still running."""
        command = Background(self, args)
        try:
            yield command
        finally:
            command.stop()


def run_concurrently(runs: Sequence[tuple[Cli, tuple[str, ...]]]) -> list[Result]:
    """Run each (cli, args), as many at a time as there are CPUs; results in order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(lambda run: run[0].run(*run[1]), runs))
