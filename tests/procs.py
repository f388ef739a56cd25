"""`taskomatic` commands as real OS processes: started as an operator would, never leaked.

A `Processes` belongs to one test. Every command it starts writes its stdout and stderr to a
file in the test's directory (a pipe nobody reads could fill up and stall the process), with
tests/ on PYTHONPATH so `--actions MODULE` finds the test action modules. `kill_all()`, called
at teardown, SIGKILLs whatever still runs and returns what every command printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent

CLI = Path(sys.executable).with_name("taskomatic")
"""The console script installed next to the interpreter running the tests (the venv's)."""

EXIT_TIMEOUT_SECONDS = 30.0
"""How long a command gets to exit when a test waits for it (seconds)."""


@dataclass
class Proc:
    """One started `taskomatic` command: its process and the file holding its output."""

    args: tuple[str, ...]
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        """Whether it has not exited yet (it is reaped if it has)."""
        return self.popen.poll() is None

    def output(self) -> str:
        """Everything it printed so far, stdout and stderr interleaved."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float = EXIT_TIMEOUT_SECONDS) -> int:
        """Its exit status; fails the test, showing its output, if it runs past `timeout` s."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.describe()}") from None

    def stop(self, timeout: float = EXIT_TIMEOUT_SECONDS) -> int:
        """SIGTERM, as an operator stops a dispatcher; its exit status."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL (if it still runs) and reap it."""
        if self.running:
            self.popen.kill()
        self.popen.wait()

    def describe(self) -> str:
        """The command, its pid and status, and its output: what a failure report needs."""
        status = "running" if self.running else f"exit status {self.popen.returncode}"
        header = f"$ taskomatic {' '.join(self.args)}  [pid {self.pid}, {status}]"
        return f"{header}\n{self.output().rstrip()}"


@dataclass
class Processes:
    """The commands one test starts, in `directory`, with `env` added to the environment."""

    directory: Path
    env: Mapping[str, str] = field(default_factory=dict)
    started: list[Proc] = field(default_factory=list)

    def _environment(self) -> dict[str, str]:
        paths = [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths)), **self.env}

    def start(self, *args: str) -> Proc:
        """Start `taskomatic ARGS…` in the background."""
        log_path = self.directory / f"taskomatic-{len(self.started)}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [str(CLI), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                cwd=self.directory,
            )
        proc = Proc(args, popen, log_path)
        self.started.append(proc)
        return proc

    def run(self, *args: str, timeout: float = EXIT_TIMEOUT_SECONDS) -> str:
        """Run `taskomatic ARGS…` to its end; its stdout, failing the test unless it exits 0."""
        done = subprocess.run(
            [str(CLI), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self._environment(),
            cwd=self.directory,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, (
            f"$ taskomatic {' '.join(args)}\nexit status {done.returncode}\n"
            f"{done.stdout}{done.stderr}"
        )
        return done.stdout

    def kill_all(self) -> str:
        """SIGKILL every command still running; the report of all of them, for a failure."""
        for proc in self.started:
            proc.kill()
        return "\n\n".join(proc.describe() for proc in self.started)
