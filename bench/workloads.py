"""The workloads: each takes a fresh database and returns one sample of metrics.

Every workload but `latency_inprocess` runs tasks in a separate `taskomatic dispatcher`
process (default options except --workers), started before the submission and idle until
the submitter's commit wakes it, so the figures include the real cross-process wake-up
(NOTIFY on PostgreSQL, PRAGMA data_version on SQLite). Task timestamps are the dispatcher's
own (`started_at` when the claiming transaction began, `finished_at` when the completing one
began); the harness runs on the same clock.
"""

from __future__ import annotations

import itertools
import json
import random
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import plans, profiling, stamp
from bench.databases import Database, Reader, TaskTimes
from bench.procs import BenchError, CpuSnapshot, DispatcherProcess, Sampler, pyspy
from taskomatic import Dispatcher, Queue, TaskSpec

Metrics = dict[str, Any]


@dataclass(frozen=True)
class Sizes:
    """How big each workload is."""

    independent: int
    chain: int
    fan: int
    history: int
    latency_samples: int


FULL = Sizes(independent=20_000, chain=1_000, fan=10_000, history=1_000_000, latency_samples=200)
QUICK = Sizes(independent=2_000, chain=200, fan=1_000, history=100_000, latency_samples=50)


@dataclass
class Env:
    """What a workload needs: the database, sizes, worker count, where files go."""

    db: Database
    sizes: Sizes
    workers: int
    work_dir: Path
    results_dir: Path
    run_id: str
    rep: int = 0
    explain: bool = False
    notes: list[str] = field(default_factory=list)

    def log_path(self, name: str) -> Path:
        return self.work_dir / f"{self.db.backend}-{name}-{self.rep}.log"


# --- specs ------------------------------------------------------------------------------------


def independent(n: int) -> list[TaskSpec]:
    return [TaskSpec("noop") for _ in range(n)]


def chain(n: int) -> list[TaskSpec]:
    """n tasks, each after the previous one."""
    ids = [uuid.uuid4() for _ in range(n)]
    return [TaskSpec("noop", id=tid, after=[ids[i - 1]] if i else []) for i, tid in enumerate(ids)]


def fan_out(n: int) -> list[TaskSpec]:
    """One task, then n tasks after it."""
    root = uuid.uuid4()
    return [TaskSpec("noop", id=root), *(TaskSpec("noop", after=[root]) for _ in range(n))]


def fan_in(n: int) -> list[TaskSpec]:
    """n tasks, then one task after all of them."""
    ids = [uuid.uuid4() for _ in range(n)]
    return [*(TaskSpec("noop", id=i) for i in ids), TaskSpec("noop", after=ids)]


# --- one batch: submit, then drain with a dispatcher process ------------------------------------


@dataclass
class Batch:
    """What one submit-then-drain run observed."""

    metrics: Metrics
    times: list[TaskTimes]
    extra: dict[str, Any] = field(default_factory=dict)


def run_batch(
    env: Env,
    name: str,
    specs: Sequence[TaskSpec],
    *,
    history: bool = False,
    profile: bool = False,
) -> Batch:
    """Start a dispatcher on a fresh database, submit `specs` in one call, wait until all ran."""
    n = len(specs)
    url = env.db.fresh(history)
    counters0 = env.db.counters(url)
    reader = Reader(url)
    queue = Queue.open(url, actor="bench")
    stem = f"{env.run_id}-{env.db.backend}-{name}"
    statements_out = env.results_dir / f"{stem}-statements.json" if profile else None
    disp = DispatcherProcess(url, env.workers, env.log_path(name), statements_out)
    extra: dict[str, Any] = {}
    try:
        base = reader.max_seq()
        disp.start(reader.dispatcher_registered)
        sampler = None
        if profile and pyspy():
            sampler = Sampler(disp.pid, env.results_dir / f"{stem}-pyspy.txt")
        t0 = time.time()
        queue.submit_many(specs)
        t1 = time.time()
        cpu0 = CpuSnapshot.take(disp.pid, env.db.server_cpu)
        lsn0 = reader.wal_lsn()
        _wait_drained(reader, disp, timeout=max(300.0, n / 20))
        cpu1 = CpuSnapshot.take(disp.pid, env.db.server_cpu)
        lsn1 = reader.wal_lsn()
        rss = disp.peak_rss_mb()
        if sampler is not None:
            complaint = sampler.stop()
            if complaint:
                env.notes.append(f"py-spy: {complaint.strip()[-300:]}")
            extra["stacks"] = profiling.summarize_stacks(sampler.out)
        status = disp.stop()
        queue.close()
        times = reader.times(base)
        events = reader.event_count(base)
        reader_statements = reader.statements
        reader.close()  # its server process exits and flushes its statistics
        time.sleep(0.3)
        counters1 = env.db.counters(url)
        if statements_out is not None and statements_out.exists():
            extra["statements"] = profiling.summarize_statements(
                json.loads(statements_out.read_text()), n
            )
        if env.explain:
            queue = Queue.open(url, actor="bench")
            # As many new tasks as the drain started with: the plans see its worst case.
            queue.submit_many(independent(n))
            queue.close()
            extra["plans"] = plans.explain(url, env.workers)
    finally:
        disp.kill()
        queue.close()
        reader.close()
        env.db.drop(url)
    _check_complete(times, n, name)
    started = [x.started_at for x in times if x.started_at]
    last = max(_ts(x.finished_at) for x in times if x.finished_at)
    warnings = disp.log_lines("WARNING", "ERROR")
    metrics: Metrics = {
        "tasks": n,
        "submit_s": t1 - t0,
        "submit_rate": n / (t1 - t0),
        "drain_s": last - t1,
        "drain_rate": n / (last - t1),
        "total_s": last - t0,
        "total_rate": n / (last - t0),
        "first_start_ms": (min(_ts(s) for s in started) - t1) * 1000,
        "peak_rss_mb": rss,
        "events_per_task": events / n,
        "dispatcher_exit": status,
        "warnings": len(warnings),
        "missed_wakeups": sum("wake-up was missed" in w for w in warnings),
        **cpu0.until(cpu1, n),
    }
    if not env.db.has_server:
        metrics = {k: v for k, v in metrics.items() if not k.startswith("server_")}
    if counters1:
        delta = {k: counters1[k] - counters0.get(k, 0.0) for k in counters1}
        # The harness's own statements are autocommit transactions: leave them out.
        metrics["commits_per_task"] = (delta["commits"] - reader_statements) / n
        metrics["rows_inserted_per_task"] = delta["rows_inserted"] / n
        metrics["rows_updated_per_task"] = delta["rows_updated"] / n
        metrics["wal_syncs_per_task"] = delta["wal_syncs"] / n
        metrics["wal_records_per_task"] = delta["wal_records"] / n
    if lsn0 is not None and lsn1 is not None:
        metrics["drain_wal_kb_per_task"] = (lsn1 - lsn0) / 1024 / n
    if warnings:
        extra["warnings"] = warnings[:20]
    return Batch(metrics, times, extra)


def _wait_drained(reader: Reader, disp: DispatcherProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while reader.live():
        disp.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"tasks still live after {timeout:.0f}s{disp.tail()}")
        time.sleep(0.05)


def _check_complete(times: list[TaskTimes], n: int, name: str) -> None:
    states = Counter(x.state for x in times)
    if len(times) != n or states.get("complete") != n:
        raise BenchError(f"{name}: expected {n} complete tasks, found {dict(states)}")


def _ts(value: datetime | None) -> float:
    if value is None:
        raise BenchError("a finished task without a timestamp")
    return value.timestamp()


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), linear between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# --- the workloads ------------------------------------------------------------------------------


def w_independent(env: Env) -> tuple[Metrics, dict[str, Any]]:
    """N independent noop tasks submitted in one call, then drained."""
    batch = run_batch(env, "independent", independent(env.sizes.independent))
    return batch.metrics, batch.extra


def w_chain(env: Env) -> tuple[Metrics, dict[str, Any]]:
    """A chain of N tasks; a hop is one task's start to the next one's start."""
    batch = run_batch(env, "chain", chain(env.sizes.chain))
    starts = [_ts(x.started_at) for x in batch.times]
    hops = [(b - a) * 1000 for a, b in itertools.pairwise(starts)]
    metrics = {
        **batch.metrics,
        "hop_p50_ms": percentile(hops, 50),
        "hop_p95_ms": percentile(hops, 95),
        "hop_p99_ms": percentile(hops, 99),
        "hop_max_ms": max(hops),
        "hop_mean_ms": statistics.fmean(hops),
        "hops_over_1s": sum(h > 1000 for h in hops),
    }
    return metrics, batch.extra


def w_fan_baseline(env: Env) -> tuple[Metrics, dict[str, Any]]:
    """N independent tasks: the yardstick of the fan workloads."""
    batch = run_batch(env, "fan_baseline", independent(env.sizes.fan))
    return batch.metrics, batch.extra


def w_fan_out(env: Env) -> tuple[Metrics, dict[str, Any]]:
    """One task, then N after it (all released by one completion)."""
    batch = run_batch(env, "fan_out", fan_out(env.sizes.fan))
    return batch.metrics, batch.extra


def w_fan_in(env: Env) -> tuple[Metrics, dict[str, Any]]:
    """N tasks, then one after all of them (its pending count falls to zero)."""
    batch = run_batch(env, "fan_in", fan_in(env.sizes.fan))
    return batch.metrics, batch.extra


def w_history(env: Env) -> tuple[Metrics, dict[str, Any]]:
    """The independent workload over a table already holding the finished history."""
    batch = run_batch(env, "history", independent(env.sizes.independent), history=True)
    return batch.metrics, batch.extra


def _latency(env: Env, queue: Queue, samples: int) -> Metrics:
    """Submit one task at a time on an idle dispatcher; how soon does it start? Two ends:
    `started_at` (the claiming transaction's start, as the task records it) and the first
    line of the action (after the claim committed: where the peers' figure ends)."""
    starts, actions, calls, seen = [], [], [], []
    for i in range(samples + 5):  # the first few open connections and the LISTEN
        # Idle again by then; spread over more than SQLite's data_version poll period, so
        # that the submissions do not fall into step with the dispatcher's polling.
        time.sleep(random.uniform(0.01, 0.07))
        t0 = time.time()
        task = queue.submit(stamp.ACTION)
        t1 = time.time()
        done = queue.wait(task.id, timeout=60)[0]
        t2 = time.time()
        if i < 5:
            continue
        starts.append((_ts(done.started_at) - t0) * 1000)
        actions.append((done.result - t0) * 1000)
        calls.append((t1 - t0) * 1000)
        seen.append((t2 - t0) * 1000)
    return {
        "samples": samples,
        "start_p50_ms": percentile(starts, 50),
        "start_p95_ms": percentile(starts, 95),
        "start_max_ms": max(starts),
        "action_p50_ms": percentile(actions, 50),
        "action_p95_ms": percentile(actions, 95),
        "submit_call_p50_ms": percentile(calls, 50),
        "complete_seen_p50_ms": percentile(seen, 50),
    }


def w_latency(env: Env) -> tuple[Metrics, dict[str, Any]]:
    """Submit→start of single tasks, dispatcher in its own process (cross-process wake-up)."""
    url = env.db.fresh()
    reader = Reader(url)
    queue = Queue.open(url, actor="bench")
    disp = DispatcherProcess(url, env.workers, env.log_path("latency"))
    try:
        disp.start(reader.dispatcher_registered)
        metrics = _latency(env, queue, env.sizes.latency_samples)
        metrics["peak_rss_mb"] = disp.peak_rss_mb()
        metrics["dispatcher_exit"] = disp.stop()
    finally:
        disp.kill()
        queue.close()
        reader.close()
        env.db.drop(url)
    warnings = disp.log_lines("WARNING", "ERROR")
    metrics["missed_wakeups"] = sum("wake-up was missed" in w for w in warnings)
    return metrics, ({"warnings": warnings[:20]} if warnings else {})


def w_latency_inprocess(env: Env) -> tuple[Metrics, dict[str, Any]]:
    """Submit→start with an embedded Dispatcher in the submitting process (in-process wake)."""
    url = env.db.fresh()
    queue = Queue.open(url, actor="bench")
    dispatcher = Dispatcher(queue, workers=env.workers)
    try:
        dispatcher.start()
        metrics = _latency(env, queue, env.sizes.latency_samples)
        metrics["missed_wakeups"] = dispatcher.missed_wakeups
    finally:
        dispatcher.stop(grace=5)
        queue.close()
        env.db.drop(url)
    return metrics, {}


def profile_batch(env: Env, history: bool) -> dict[str, Any]:
    """The independent workload once more, counting statements and sampling with py-spy."""
    name = "profile_history" if history else "profile_independent"
    batch = run_batch(env, name, independent(env.sizes.independent), history=history, profile=True)
    return {"metrics": batch.metrics, **batch.extra}


@dataclass(frozen=True)
class Workload:
    """A named workload and how the report shows it."""

    name: str
    run: Callable[[Env], tuple[Metrics, dict[str, Any]]]
    title: Callable[[Sizes], str]
    needs_history: bool = False


WORKLOADS = (
    Workload("independent", w_independent, lambda s: f"{s.independent:,} independent tasks"),
    # Right after the empty table it is compared with (see harness.measure).
    Workload(
        "history",
        w_history,
        lambda s: f"{s.independent:,} tasks over {s.history:,} finished",
        needs_history=True,
    ),
    Workload("chain", w_chain, lambda s: f"chain of {s.chain:,} tasks"),
    Workload("fan_baseline", w_fan_baseline, lambda s: f"{s.fan:,} independent tasks"),
    Workload("fan_out", w_fan_out, lambda s: f"fan-out 1→{s.fan:,}"),
    Workload("fan_in", w_fan_in, lambda s: f"fan-in {s.fan:,}→1"),
    Workload("latency", w_latency, lambda s: "submit→start, dispatcher process"),
    Workload("latency_inprocess", w_latency_inprocess, lambda s: "submit→start, in-process"),
)
