"""/metrics in the Prometheus text format, computed from the database on each scrape.

Every figure is read from the tables (the events table holds every transition with its
time), so any `serve` process reports the same numbers however many dispatchers run
elsewhere. Counters derived from history go down when `prune` removes tasks; Prometheus
treats a decrease as a counter reset.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from taskomatic import defaults
from taskomatic.model import State
from taskomatic.queue import Queue
from taskomatic.store.observe import Histogram

LATENCY_BOUNDS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
"""Upper bounds (seconds) of the submit-to-start latency buckets."""

DURATION_BOUNDS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600)
"""Upper bounds (seconds) of the action duration buckets."""

WAITING_SCAN = 10_000
"""Waiting tasks read at most to count host jobs by host (the rest count as `unknown`)."""


def render(queue: Queue) -> str:
    """The metrics of `queue`'s database as Prometheus text (format 0.0.4)."""
    store, now = queue.store, queue.now()

    def read(conn: Any) -> dict[str, Any]:
        since = now - timedelta(seconds=defaults.DISPATCHER_DEAD_AFTER_SECONDS)
        waiting = store.waiting_jobs(conn, WAITING_SCAN)
        return {
            "counts": store.counts(conn),
            "runnable": store.runnable_count(conn, now),
            "latency": store.start_latency(conn, LATENCY_BOUNDS),
            "durations": store.action_durations(conn, DURATION_BOUNDS),
            "failures": store.failed_attempts(conn),
            "waiting": waiting,
            "takeovers": store.takeovers(conn),
            "uncollected": store.uncollected(conn),
            "dispatchers": store.alive_dispatchers(conn, since),
        }

    m = queue._read(read)
    out: list[str] = []
    counts = m["counts"]
    _family(out, "taskomatic_tasks", "gauge", "Tasks by state.")
    out += [_sample("taskomatic_tasks", {"state": st.value}, counts.get(st, 0)) for st in State]
    _family(
        out,
        "taskomatic_tasks_runnable",
        "gauge",
        "Tasks runnable now (new, prerequisites done, due, locks free) but not yet dispatched.",
    )
    out.append(_sample("taskomatic_tasks_runnable", {}, m["runnable"]))
    _family(
        out,
        "taskomatic_task_start_latency_seconds",
        "histogram",
        "Seconds from a task's submission to its first start.",
    )
    out += _histogram("taskomatic_task_start_latency_seconds", m["latency"], LATENCY_BOUNDS)
    _family(
        out,
        "taskomatic_action_duration_seconds",
        "histogram",
        "Seconds the last attempt of each finished task ran, by action and outcome.",
    )
    for h in m["durations"]:
        out += _histogram("taskomatic_action_duration_seconds", h, DURATION_BOUNDS)
    _family(
        out,
        "taskomatic_action_failed_attempts_total",
        "counter",
        "Attempts that failed (retried later or failed for good), by action.",
    )
    out += [
        _sample("taskomatic_action_failed_attempts_total", {"action": a}, n)
        for a, n in sorted(m["failures"].items())
    ]
    _family(
        out,
        "taskomatic_waiting_host_jobs",
        "gauge",
        "Tasks waiting for a job on a host, by the host the job runs on.",
    )
    by_host = Counter(host_of(*row) or "unknown" for row in m["waiting"])
    by_host["unknown"] += max(0, counts.get(State.WAITING, 0) - len(m["waiting"]))
    out += [
        _sample("taskomatic_waiting_host_jobs", {"host": h}, n)
        for h, n in sorted(by_host.items())
        if n
    ]
    _family(
        out,
        "taskomatic_lease_takeovers_total",
        "counter",
        "Tasks adopted from a dispatcher whose lease expired.",
    )
    out.append(_sample("taskomatic_lease_takeovers_total", {}, m["takeovers"]))
    _family(
        out,
        "taskomatic_results_uncollected",
        "gauge",
        "Finished tasks whose result no caller has collected.",
    )
    out.append(_sample("taskomatic_results_uncollected", {}, m["uncollected"]))
    _family(out, "taskomatic_dispatchers_alive", "gauge", "Dispatchers with a recent heartbeat.")
    out.append(_sample("taskomatic_dispatchers_alive", {}, len(m["dispatchers"])))
    _family(
        out,
        "taskomatic_workers_alive",
        "gauge",
        "Worker threads of the dispatchers alive.",
    )
    out.append(_sample("taskomatic_workers_alive", {}, sum(d.workers for d in m["dispatchers"])))
    return "\n".join(out) + "\n"


def host_of(job: Any, params: Any, result: Any) -> str | None:
    """Where a task runs: the host of its host job, else its `host` param, else its result's
    `host` (placement at run time reports it there)."""
    for source in (job, params, result):
        if isinstance(source, dict) and isinstance(source.get("host"), str):
            return str(source["host"])
    return None


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def _histogram(name: str, h: Histogram, bounds: Sequence[float]) -> list[str]:
    labels = dict(h.labels)
    lines = [
        _sample(f"{name}_bucket", {**labels, "le": _number(b)}, n)
        for b, n in zip(bounds, h.buckets, strict=True)
    ]
    lines.append(_sample(f"{name}_bucket", {**labels, "le": "+Inf"}, h.count))
    lines.append(_sample(f"{name}_sum", labels, h.sum))
    lines.append(_sample(f"{name}_count", labels, h.count))
    return lines


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    if not labels:
        return f"{name} {_number(value)}"
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {_number(value)}"


def _number(value: float) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "+Inf"
    if isinstance(value, float) and not value.is_integer():
        return repr(value)
    return str(int(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of a Prometheus text page by (name, labels) — for tests and scripts."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in _lines(text):
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = frozenset(
            (k, v.strip('"')) for k, _, v in (p.partition("=") for p in _split(rest.rstrip("}")))
        )
        samples[(name, labels)] = float(value)
    return samples


def _lines(text: str) -> Iterable[str]:
    return (line for line in text.splitlines() if line and not line.startswith("#"))


def _split(labels: str) -> list[str]:
    return [p for p in labels.split(",") if p] if labels else []
