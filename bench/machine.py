"""What the figures were measured on: CPU, memory, kernel, versions, the code's commit."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def describe(postgres_version: str | None) -> dict[str, Any]:
    """The machine, the software versions and the state of the checkout."""
    return {
        "cpu_model": _cpu_model(),
        "cpus_online": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
        "kernel": f"{platform.system()} {platform.release()}",
        "os": _os_release(),
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "postgresql": postgres_version,
        "sqlalchemy": _version("sqlalchemy"),
        "psycopg": _version("psycopg"),
        "taskomatic_commit": _git("rev-parse", "--short", "HEAD"),
        "taskomatic_dirty": bool(_git("status", "--porcelain", "--", "taskomatic")),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def one_line(info: dict[str, Any]) -> str:
    """A one-line summary for the printed report."""
    dirty = " + uncommitted changes" if info["taskomatic_dirty"] else ""
    pg = f", PostgreSQL {info['postgresql']}" if info["postgresql"] else ""
    return (
        f"{info['cpu_model']}, {info['cpus_usable']} cores, {info['ram_gib']} GiB RAM, "
        f"{info['kernel']}, {info['os']}; Python {info['python']}, SQLite {info['sqlite']}"
        f"{pg}, SQLAlchemy {info['sqlalchemy']}, psycopg {info['psycopg']}; "
        f"taskomatic {info['taskomatic_commit']}{dirty}; "
        f"load average at start {' '.join(map(str, info['load_average_at_start']))}"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_kib(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()
