"""Medians with min-max per workload and subject: the printed table and the JSON results."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.workloads import Sizes

Sample = dict[str, Any]


@dataclass(frozen=True)
class Row:
    """One line of the table: a metric of a workload, or a ratio between two workloads."""

    workload: str
    metric: str
    label: str
    fmt: str = "{:,.0f}"
    over: str | None = None  # ratio: this workload's metric / the same metric of `over`
    over_metric: str | None = None


ROWS = (
    Row("independent", "submit_rate", "submit, one call (tasks/s)"),
    Row("independent", "drain_rate", "drain (tasks/s)"),
    Row("independent", "total_rate", "submit + drain (tasks/s)"),
    Row("independent", "first_start_ms", "first start after the submit returned (ms)", "{:.1f}"),
    Row("independent", "dispatcher_cpu_ms_per_task", "dispatcher CPU (ms/task)", "{:.2f}"),
    Row("independent", "server_cpu_ms_per_task", "PostgreSQL CPU (ms/task)", "{:.2f}"),
    Row("independent", "commits_per_task", "commits per task (server count)", "{:.2f}"),
    Row("independent", "wal_syncs_per_task", "WAL fsyncs per task", "{:.2f}"),
    Row("independent", "peak_rss_mb", "dispatcher peak RSS (MB)", "{:.0f}"),
    Row("chain", "hop_p50_ms", "hop p50 (ms)", "{:.2f}"),
    Row("chain", "hop_p95_ms", "hop p95 (ms)", "{:.2f}"),
    Row("chain", "total_s", "whole chain (s)", "{:.2f}"),
    Row("fan_baseline", "total_s", "independent, submit + drain (s)", "{:.2f}"),
    Row("fan_out", "total_s", "fan-out 1→N, submit + drain (s)", "{:.2f}"),
    Row("fan_out", "total_s", "  ratio to independent", "{:.2f}x", over="fan_baseline"),
    Row("fan_in", "total_s", "fan-in N→1, submit + drain (s)", "{:.2f}"),
    Row("fan_in", "total_s", "  ratio to independent", "{:.2f}x", over="fan_baseline"),
    Row("history", "drain_rate", "drain (tasks/s)"),
    Row("history", "drain_rate", "  ratio to empty table", "{:.2f}x", over="independent"),
    Row("history", "total_rate", "submit + drain (tasks/s)"),
    Row("history", "submit_rate", "submit, one call (tasks/s)"),
    Row("history", "peak_rss_mb", "dispatcher peak RSS (MB)", "{:.0f}"),
    Row("latency", "start_p50_ms", "to started_at, dispatcher process: p50 (ms)", "{:.2f}"),
    Row("latency", "start_p95_ms", "to started_at, dispatcher process: p95 (ms)", "{:.2f}"),
    Row("latency", "action_p50_ms", "to the action's first line: p50 (ms)", "{:.2f}"),
    Row("latency", "action_p95_ms", "to the action's first line: p95 (ms)", "{:.2f}"),
    Row("latency_inprocess", "start_p50_ms", "to started_at, in-process: p50 (ms)", "{:.2f}"),
    Row("latency_inprocess", "action_p50_ms", "to the action, in-process: p50 (ms)", "{:.2f}"),
)

SECTIONS: dict[str, Callable[[Sizes], str]] = {
    "independent": lambda s: f"{s.independent:,} independent noop tasks, submitted in one call",
    "chain": lambda s: f"chain of {s.chain:,} tasks (hop = start of one to start of the next)",
    "fan_baseline": lambda s: f"fan-out and fan-in, N = {s.fan:,}",
    "history": lambda s: f"{s.independent:,} independent tasks over {s.history:,} finished ones",
    "latency": lambda s: (
        f"submit→start of one task on an idle dispatcher ({s.latency_samples} samples per run;"
        " started_at: the claim's start; the action: after the claim committed, as the peers)"
    ),
}


PEER_RATIOS = (
    ("independent", "drain_rate", "drain (tasks/s), taskomatic ÷ peer (>1: taskomatic faster)"),
    ("chain", "hop_p50_ms", "chain hop p50, taskomatic ÷ peer (<1: taskomatic faster)"),
    ("latency", "action_p50_ms", "submit→action p50, taskomatic ÷ peer (<1: taskomatic faster)"),
)
"""The comparisons with the peer queues, each taskomatic-on-PostgreSQL over the peer."""

TASKOMATIC_PG = "postgresql"
HEADERS = {"postgresql": "taskomatic PG", "sqlite": "taskomatic SQLite"}


def _values(samples: Sequence[Sample], workload: str, subject: str, metric: str) -> list[float]:
    """The metric of each successful repetition, in repetition order."""
    out = []
    for s in sorted(samples, key=lambda s: s["rep"]):
        if s["workload"] == workload and s["subject"] == subject and "metrics" in s:
            value = s["metrics"].get(metric)
            if isinstance(value, int | float) and not math.isnan(value):
                out.append(float(value))
    return out


def _ratios(samples: Sequence[Sample], row: Row, subject: str) -> list[float]:
    """Per-repetition ratios, pairing repetition i of both workloads."""
    assert row.over is not None
    mine = {
        s["rep"]: s["metrics"][row.metric]
        for s in samples
        if s["workload"] == row.workload and s["subject"] == subject and "metrics" in s
    }
    base = {
        s["rep"]: s["metrics"][row.over_metric or row.metric]
        for s in samples
        if s["workload"] == row.over and s["subject"] == subject and "metrics" in s
    }
    return [mine[r] / base[r] for r in sorted(mine) if base.get(r)]


def _peer_ratios(samples: Sequence[Sample], workload: str, metric: str, peer: str) -> list[float]:
    """taskomatic's metric over the peer's, pairing the runs of the same repetition."""
    mine = {
        s["rep"]: s["metrics"].get(metric)
        for s in samples
        if s["workload"] == workload and s["subject"] == TASKOMATIC_PG and "metrics" in s
    }
    theirs = {
        s["rep"]: s["metrics"].get(metric)
        for s in samples
        if s["workload"] == workload and s["subject"] == peer and "metrics" in s
    }
    return [mine[r] / theirs[r] for r in sorted(mine) if mine[r] and theirs.get(r)]


def stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(samples: Sequence[Sample], subjects: Sequence[str]) -> dict[str, Any]:
    """{workload: {subject: {metric: stats}}} plus the ratio rows."""
    out: dict[str, Any] = {}
    for s in samples:
        if "metrics" not in s:
            continue
        per = out.setdefault(s["workload"], {}).setdefault(s["subject"], {})
        for metric in s["metrics"]:
            if metric not in per:
                found = stats(_values(samples, s["workload"], s["subject"], metric))
                if found:
                    per[metric] = found
    ratios: dict[str, Any] = {}
    for row in ROWS:
        if row.over:
            for subject in subjects:
                found = stats(_ratios(samples, row, subject))
                if found:
                    key = (
                        f"{row.workload}.{row.metric} / {row.over}.{row.over_metric or row.metric}"
                    )
                    ratios.setdefault(key, {})[subject] = found
    out["ratios"] = ratios
    vs: dict[str, Any] = {}
    for workload, metric, _label in PEER_RATIOS:
        for peer in subjects:
            if peer in HEADERS:
                continue
            found = stats(_peer_ratios(samples, workload, metric, peer))
            if found:
                vs.setdefault(f"{workload}.{metric}", {})[peer] = found
    out["taskomatic_over_peer"] = vs
    return out


def _cell(values: Sequence[float], fmt: str) -> str:
    found = stats(values)
    if found is None:
        return "—"
    med, lo, hi = (fmt.format(found[k]) for k in ("median", "min", "max"))
    return med if found["n"] == 1 else f"{med} ({lo}-{hi})"


def table(samples: Sequence[Sample], subjects: Sequence[str], sizes: Sizes) -> str:
    """The report: one section per workload, one column per subject, median (min-max)."""
    present = {s["workload"] for s in samples}
    lines = []
    width = 40
    col = 26
    header = f"{'':<{width}}" + "".join(f"{HEADERS.get(s, s):>{col}}" for s in subjects)
    lines.append(header)
    shown: set[str] = set()
    for row in ROWS:
        if row.workload not in present or (row.over and row.over not in present):
            continue
        section = SECTIONS.get(row.workload)
        if section and row.workload not in shown:
            shown.add(row.workload)
            lines += ["", section(sizes)]
        cells = []
        for subject in subjects:
            if row.over:
                values = _ratios(samples, row, subject)
            else:
                values = _values(samples, row.workload, subject, row.metric)
            cells.append(_cell(values, row.fmt))
        if all(c == "—" for c in cells):
            continue
        lines.append(f"  {row.label:<{width - 2}}" + "".join(f"{c:>{col}}" for c in cells))
    peers = [s for s in subjects if s not in HEADERS]
    compared = []
    for workload, metric, label in PEER_RATIOS:
        cells = [_cell(_peer_ratios(samples, workload, metric, p), "{:.2f}x") for p in peers]
        if any(c != "—" for c in cells):
            compared.append(f"  {label:<{width + 22}}" + "".join(f"{c:>{col}}" for c in cells))
    if compared:
        head = "".join(f"{'vs ' + p:>{col}}" for p in peers)
        title = "taskomatic on PostgreSQL against the peers, same run"
        lines += ["", f"{title:<{width + 24}}{head}"]
        lines += compared
    return "\n".join(lines)


def load_line(samples: Sequence[Sample]) -> str:
    """How busy the machine was with other work while we measured."""
    other = [
        s["metrics"]["other_cores"]
        for s in samples
        if "metrics" in s and "other_cores" in s["metrics"]
    ]
    if not other:
        return ""
    return (
        f"other processes on the machine used {statistics.median(other):.2f} cores "
        f"(median over drains; max {max(other):.2f})"
    )


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))
