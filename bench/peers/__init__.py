"""The peer queues (pgqueuer, procrastinate) measured beside taskomatic on the same cluster.

They live in their own virtual environment, bench/.peers-venv, which the benchmark creates
on first use (`python -m venv` and pip); they are never taskomatic's dependencies. Each run
is `driver.py` in that environment, on a fresh database of the same throwaway PostgreSQL
cluster, printing its metrics under the same names as taskomatic's workloads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.machine import ROOT
from bench.procs import BenchError, CpuSnapshot

PEERS_VENV = ROOT / "bench" / ".peers-venv"
DRIVER = Path(__file__).resolve().parent / "driver.py"
REQUIREMENTS = (
    "pgqueuer>=1.6.0",
    "procrastinate>=3.10.0",
    "asyncpg",
    "uvloop",
    "psycopg[binary]>=3.1",
)
PEER_NAMES = ("pgqueuer", "procrastinate")
PEER_WORKLOADS = {
    "pgqueuer": ("independent", "chain", "latency"),
    "procrastinate": ("independent", "latency"),
}
"""What each peer runs: the drain, the chain (each job enqueues the next), submit→start.

procrastinate has no chain here (the issue's reference figures have none either): a job
deferred from inside a job is often fetched only by the worker's 5-second polling, so one
chain of 1,000 would take minutes and measure that interval rather than the queue."""


def python() -> Path:
    return PEERS_VENV / "bin" / "python"


def ensure_venv(say: Any) -> dict[str, str]:
    """Create bench/.peers-venv with the peers unless it has them; returns their versions."""
    if not python().exists():
        say(f"creating {PEERS_VENV.relative_to(ROOT)} for the peer queues …")
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    probe = "import pgqueuer, procrastinate, asyncpg, uvloop, psycopg"
    if subprocess.run([str(python()), "-c", probe], capture_output=True).returncode != 0:
        say("installing " + ", ".join(REQUIREMENTS) + " into the peers' environment …")
        pip = subprocess.run(
            [str(python()), "-m", "pip", "install", "-q", *REQUIREMENTS],
            capture_output=True,
            text=True,
        )
        if pip.returncode != 0:
            raise BenchError(f"could not install the peers:\n{pip.stderr.strip()[-2000:]}")
    out = subprocess.run(
        [
            str(python()),
            "-c",
            "import json, importlib.metadata as m; print(json.dumps({n: m.version(n) for n in "
            "('pgqueuer', 'procrastinate', 'asyncpg', 'uvloop', 'psycopg')}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout))


def run_peer(
    peer: str,
    workload: str,
    conninfo: str,
    n: int,
    workers: int,
    server_cpu: Any,
    timeout: float,
) -> dict[str, Any]:
    """One run of `driver.py`: its metrics, plus the PostgreSQL server's CPU while it ran."""
    cmd = [
        str(python()),
        str(DRIVER),
        peer,
        workload,
        "--conninfo",
        conninfo,
        "--n",
        str(n),
        "--workers",
        str(workers),
    ]
    before = CpuSnapshot.take(None, server_cpu)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{peer} {workload}: no result after {timeout:.0f}s") from exc
    after = CpuSnapshot.take(None, server_cpu)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise BenchError(f"{peer} {workload} exited {done.returncode}:\n{tail}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    metrics: dict[str, Any] = result["metrics"]
    if workload == "independent":
        cpu = before.until(after, n)
        # The submission is a few percent of the window: the server's CPU is the drain's.
        metrics["server_cpu_ms_per_task"] = cpu["server_cpu_ms_per_task"]
        metrics["dispatcher_cpu_ms_per_task"] = metrics.pop("process_cpu_ms_per_task")
    return metrics
