"""Runs one workload on one peer queue and prints its metrics as one JSON line.

    python driver.py pgqueuer|procrastinate independent|chain|latency --conninfo DSN
                     --n N --workers W

Runs in the peers' own virtual environment (bench/.peers-venv), never taskomatic's: it
imports only the peer, its driver and the standard library. Each peer is used the way its
documentation shows: pgqueuer through `PgQueuer` with asyncpg (and uvloop), its default
batch size of 10, jobs enqueued with `Queries.enqueue` lists; procrastinate through `App`
with a `PsycopgConnector`, jobs deferred with `batch_defer_async`, a worker with
`concurrency` = the taskomatic dispatcher's worker count. The consumer runs in this process
on its own connections, started before the submission and idle until the submitter's commit
wakes it through the peer's LISTEN/NOTIFY, as taskomatic's dispatcher does.

Metrics use the same names as taskomatic's workloads: drain = the end of the submission to
the last completion the database recorded (pgqueuer's log row, procrastinate's event row: the
time of the completing transaction, as taskomatic's `finished_at`); submit→start = before the
submitting call to the job function's first line (after its claim committed; taskomatic's
`action_*` figures end at the same point, its `start_*` ones earlier); a chain hop = one job's
start to the next's, each job enqueueing the next before it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

SETTLE_SECONDS = 0.5
"""After start-up, before the first submission: the consumer is listening and idle."""


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Recorder:
    """What the job function saw: start times, and a way to wait for the n-th job."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.target = 0
        self.reached = asyncio.Event()

    def expect(self, n: int) -> None:
        self.target = len(self.starts) + n
        self.reached = asyncio.Event()

    def started(self) -> None:
        self.starts.append(time.time())
        if len(self.starts) >= self.target:
            self.reached.set()


# --- pgqueuer -------------------------------------------------------------------------------


class PgQueuerPeer:
    name = "pgqueuer"

    def __init__(self, dsn: str, workers: int) -> None:
        self.dsn = dsn
        self.workers = workers
        self.rec = Recorder()
        self.next_hops = 0

    async def setup(self) -> None:
        import asyncpg
        from pgqueuer import AsyncpgDriver, PgQueuer, Queries

        admin = await asyncpg.connect(self.dsn)
        await Queries(AsyncpgDriver(admin)).install()
        await admin.close()
        self.consumer_conn = await asyncpg.connect(self.dsn)
        self.producer_conn = await asyncpg.connect(self.dsn)
        self.producer = Queries(AsyncpgDriver(self.producer_conn))
        self.pgq = PgQueuer(AsyncpgDriver(self.consumer_conn))
        rec = self.rec

        @self.pgq.entrypoint("noop")
        async def noop(job: Any) -> None:
            rec.started()

        @self.pgq.entrypoint("hop")
        async def hop(job: Any) -> None:
            rec.started()
            if self.next_hops > 0:
                self.next_hops -= 1
                await self.producer_for_jobs.enqueue("hop", None, 0)

        self.jobs_conn = await asyncpg.connect(self.dsn)
        self.producer_for_jobs = Queries(AsyncpgDriver(self.jobs_conn))
        self.runner = asyncio.create_task(self.pgq.run(batch_size=10))

    async def submit(self, n: int, entrypoint: str = "noop") -> None:
        if n == 1:
            await self.producer.enqueue(entrypoint, None, 0)
        else:
            await self.producer.enqueue([entrypoint] * n, [None] * n, [0] * n)

    async def finished(self) -> list[float]:
        """Completion times of every job, from the database (its log of status changes)."""
        rows = await self.producer_conn.fetch(
            "SELECT created FROM pgqueuer_log WHERE status = 'successful'"
        )
        return [r["created"].timestamp() for r in rows]

    async def remaining(self) -> int:
        return int(await self.producer_conn.fetchval("SELECT count(*) FROM pgqueuer"))

    async def close(self) -> None:
        self.pgq.shutdown.set()
        try:
            await asyncio.wait_for(self.runner, 10)
        except (TimeoutError, asyncio.CancelledError):
            self.runner.cancel()
        for conn in (self.consumer_conn, self.producer_conn, self.jobs_conn):
            await conn.close()


# --- procrastinate ---------------------------------------------------------------------------


class ProcrastinatePeer:
    name = "procrastinate"

    def __init__(self, dsn: str, workers: int) -> None:
        self.dsn = dsn
        self.workers = workers
        self.rec = Recorder()
        self.next_hops = 0

    async def setup(self) -> None:
        import procrastinate

        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=self.dsn))
        await self.app.open_async()
        await self.app.schema_manager.apply_schema_async()
        rec = self.rec

        @self.app.task(name="noop")
        async def noop() -> None:
            rec.started()

        @self.app.task(name="hop")
        async def hop() -> None:
            rec.started()
            if self.next_hops > 0:
                self.next_hops -= 1
                await hop.defer_async()

        self.noop, self.hop = noop, hop
        self.runner = asyncio.create_task(
            self.app.run_worker_async(concurrency=self.workers, install_signal_handlers=False)
        )

    async def submit(self, n: int, entrypoint: str = "noop") -> None:
        task = self.noop if entrypoint == "noop" else self.hop
        if n == 1:
            await task.defer_async()
        else:
            await task.batch_defer_async(*({} for _ in range(n)))

    async def _fetch(self, query: str) -> list[tuple[Any, ...]]:
        async with self.app.connector.pool.connection() as conn:  # type: ignore[attr-defined]
            cur = await conn.execute(query)
            return list(await cur.fetchall())

    async def finished(self) -> list[float]:
        rows = await self._fetch("SELECT at FROM procrastinate_events WHERE type = 'succeeded'")
        return [r[0].timestamp() for r in rows]

    async def remaining(self) -> int:
        rows = await self._fetch(
            "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        )
        return int(rows[0][0])

    async def close(self) -> None:
        self.runner.cancel()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self.runner, 10)
        await self.app.close_async()


PEERS: dict[str, Callable[[str, int], Any]] = {
    "pgqueuer": PgQueuerPeer,
    "procrastinate": ProcrastinatePeer,
}


# --- workloads ---------------------------------------------------------------------------------


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not done after {timeout:.0f}s")
        await asyncio.sleep(0.05)


async def independent(peer: Any, n: int) -> dict[str, Any]:
    peer.rec.expect(n)
    cpu0 = cpu_seconds()
    t0 = time.time()
    await peer.submit(n)
    t1 = time.time()
    await asyncio.wait_for(peer.rec.reached.wait(), max(300.0, n / 20))

    async def settled() -> bool:
        return await peer.remaining() == 0 and len(await peer.finished()) >= n

    await wait_until(settled, 60, "completions")
    cpu1 = cpu_seconds()
    last = max(await peer.finished())
    return {
        "tasks": n,
        "submit_s": t1 - t0,
        "submit_rate": n / (t1 - t0),
        "drain_s": last - t1,
        "drain_rate": n / (last - t1),
        "total_s": last - t0,
        "total_rate": n / (last - t0),
        "first_start_ms": (min(peer.rec.starts) - t1) * 1000,
        "process_cpu_ms_per_task": (cpu1 - cpu0) * 1000 / n,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


async def chain(peer: Any, n: int) -> dict[str, Any]:
    peer.rec.expect(n)
    peer.next_hops = n - 1
    t0 = time.time()
    await peer.submit(1, "hop")
    await asyncio.wait_for(peer.rec.reached.wait(), max(300.0, n / 5))
    starts = peer.rec.starts[-n:]
    hops = [(b - a) * 1000 for a, b in itertools.pairwise(starts)]
    return {
        "tasks": n,
        "hop_p50_ms": percentile(hops, 50),
        "hop_p95_ms": percentile(hops, 95),
        "hop_p99_ms": percentile(hops, 99),
        "hop_max_ms": max(hops),
        "hop_mean_ms": statistics.fmean(hops),
        "total_s": starts[-1] - t0,
    }


async def latency(peer: Any, samples: int) -> dict[str, Any]:
    starts, calls = [], []
    for i in range(samples + 5):  # the first few warm up connections and statements
        await asyncio.sleep(random.uniform(0.01, 0.07))
        peer.rec.expect(1)
        t0 = time.time()
        await peer.submit(1)
        t1 = time.time()
        await asyncio.wait_for(peer.rec.reached.wait(), 60)
        if i >= 5:
            starts.append((peer.rec.starts[-1] - t0) * 1000)
            calls.append((t1 - t0) * 1000)
    # The job function's first line, after the peer's claim committed: taskomatic's
    # `action_*` figures end there too (its `start_*` figures, at `started_at`, earlier).
    return {
        "samples": samples,
        "action_p50_ms": percentile(starts, 50),
        "action_p95_ms": percentile(starts, 95),
        "action_max_ms": max(starts),
        "submit_call_p50_ms": percentile(calls, 50),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    peer = PEERS[args.peer](args.conninfo, args.workers)
    await peer.setup()
    try:
        await asyncio.sleep(SETTLE_SECONDS)
        if args.workload == "independent":
            return await independent(peer, args.n)
        if args.workload == "chain":
            return await chain(peer, args.n)
        return await latency(peer, args.n)
    finally:
        await peer.close()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("pgqueuer", "procrastinate", "asyncpg", "uvloop", "psycopg"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("workload", choices=["independent", "chain", "latency"])
    parser.add_argument("--conninfo", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    if args.peer == "pgqueuer":
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run
    started = datetime.now().isoformat()
    metrics = runner(main_async(args))
    print(
        json.dumps(
            {"metrics": metrics, "versions": versions(), "started": started, "pid": os.getpid()}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
