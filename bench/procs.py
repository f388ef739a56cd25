"""Processes: `taskomatic dispatcher` as users run it, CPU and memory accounting, py-spy."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.machine import ROOT

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STAMP_MODULE = "bench.stamp"  # the latency workloads' action (see bench/stamp.py)
VENV_BIN = Path(sys.executable).parent


class BenchError(RuntimeError):
    """A measurement that could not be taken (a dispatcher died, a run never drained)."""


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (its threads included)."""
    try:
        fields = _stat_fields(pid)
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def process_tree_cpu(root: int) -> float:
    """CPU seconds of `root` and its direct children (a postmaster and its backends), the
    children that have exited included (the root's cutime and cstime count them once it has
    reaped them: a peer's connections are closed by the time its run is measured)."""
    total = process_cpu(root)
    try:
        fields = _stat_fields(root)
        total += (int(fields[13]) + int(fields[14])) / CLOCK_TICKS  # cutime, cstime
    except (OSError, IndexError):
        pass
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry.name))[1]) == root:
                total += process_cpu(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def self_cpu() -> float:
    """CPU seconds of this (harness) process."""
    times = os.times()
    return times.user + times.system


@dataclass
class CpuSnapshot:
    """CPU counters at one moment; subtract two to see who used the cores in between."""

    wall: float
    dispatcher: float
    server: float
    harness: float
    machine_busy: float

    @classmethod
    def take(cls, dispatcher_pid: int | None, server_cpu: Callable[[], float]) -> CpuSnapshot:
        return cls(
            time.monotonic(),
            process_cpu(dispatcher_pid) if dispatcher_pid else 0.0,
            server_cpu(),
            self_cpu(),
            machine_cpu()[0],
        )

    def until(self, later: CpuSnapshot, tasks: int) -> dict[str, float]:
        """Cores used on average in between, and CPU milliseconds per task."""
        wall = max(later.wall - self.wall, 1e-9)
        out: dict[str, float] = {}
        for name in ("dispatcher", "server", "harness", "machine_busy"):
            used = getattr(later, name) - getattr(self, name)
            out[f"{name}_cores"] = used / wall
            if name != "machine_busy":
                out[f"{name}_cpu_ms_per_task"] = used * 1000 / max(tasks, 1)
        ours = sum(out[f"{n}_cores"] for n in ("dispatcher", "server", "harness"))
        out["other_cores"] = max(out["machine_busy_cores"] - ours, 0.0)
        return out


class DispatcherProcess:
    """`taskomatic dispatcher` in its own process, started and stopped as an operator would.

    With `statements_out`, the same CLI runs under bench.profiling, which counts the SQL
    statements and commits the process issues and writes them there on exit.
    """

    def __init__(
        self,
        url: str,
        workers: int,
        log_path: Path,
        statements_out: Path | None = None,
    ) -> None:
        self.url = url
        self.workers = workers
        self.log_path = log_path
        self.statements_out = statements_out
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("dispatcher not started")
        return self.proc.pid

    def start(self, registered: Callable[[int], bool], timeout: float = 60.0) -> DispatcherProcess:
        """Start, and return once it has announced itself and had time to LISTEN."""
        args = [
            "--database-url",
            self.url,
            *("--actions", STAMP_MODULE),
            "dispatcher",
            *("--workers", str(self.workers)),
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        if self.statements_out is not None:
            command = [sys.executable, "-m", "bench.profiling", *args]
            env["BENCH_STATEMENTS_OUT"] = str(self.statements_out)
        else:
            command = [str(VENV_BIN / "taskomatic"), *args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=ROOT
            )
        deadline = time.monotonic() + timeout
        while not registered(self.proc.pid):
            self.check_alive()
            if time.monotonic() > deadline:
                self.kill()
                raise BenchError(f"dispatcher did not start within {timeout:.0f}s{self.tail()}")
            time.sleep(0.02)
        # The watcher thread starts right after registration; its LISTEN (or data_version
        # baseline) takes a few milliseconds. A missed wake-up would only cost latency (the
        # watcher fires once when it starts), but the first run should not pay that either.
        time.sleep(0.3)
        return self

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"dispatcher exited with {self.proc.returncode}{self.tail()}")

    def peak_rss_mb(self) -> float:
        """VmHWM: the most resident memory the process has had so far."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as an operator stops it; returns the exit status (0 expected)."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(
                f"dispatcher ignored SIGTERM for {timeout:.0f}s{self.tail()}"
            ) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_lines(self, *levels: str) -> list[str]:
        """Lines of the dispatcher's log at these levels (e.g. WARNING: missed wake-ups)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if any(f" {lv} " in line for lv in levels)]

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return ("\n  dispatcher log:\n  " + "\n  ".join(text)) if text else ""


class Sampler:
    """py-spy recording a process (all threads, idle ones too) until `stop()`."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [
                *(str(pyspy()), "record", "--pid", str(pid), "--format", "raw"),
                *("--rate", str(rate), "--threads", "--idle", "--nonblocking"),
                *("--output", str(out)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.3)  # attached before the measured work starts

    def stop(self) -> str:
        """Stop recording and write the collapsed stacks; returns py-spy's complaints."""
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode(errors="replace") if self.proc.returncode else ""


def pyspy() -> Path | None:
    """py-spy from the venv or PATH, if installed (it is not a dependency)."""
    found = VENV_BIN / "py-spy"
    if found.exists():
        return found
    which = shutil.which("py-spy")
    return Path(which) if which else None
