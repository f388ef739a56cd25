"""The benchmark command: runs the workloads on each backend, alternating, and reports.

    bench/run [--quick] [--backend postgresql|sqlite|all] [--repeat N] [--workers N]
              [--workloads a,b,…] [--profile] [--keep]

Each workload runs --repeat times; within a repetition every backend runs it once, the
order of the backends flipping from one repetition to the next, so slow drift of the
machine's load hits all of them alike. Medians with min-max go to stdout, progress to
stderr, everything (every sample, the machine, plans, profiles) to bench/results/*.json.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from bench import machine, peers, report
from bench.databases import Database, PostgresDatabase, make
from bench.procs import BenchError, pyspy
from bench.workloads import FULL, QUICK, WORKLOADS, Env, Sizes, Workload, profile_batch
from taskomatic import defaults

RESULTS_DIR = machine.ROOT / "bench" / "results"
BACKENDS = ("postgresql", "sqlite")
BENCH_WORKERS = 128  # the dispatcher's --workers unless asked otherwise (see --help)


def parse_args(argv: list[str]) -> argparse.Namespace:
    names = [w.name for w in WORKLOADS]
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark taskomatic on a throwaway PostgreSQL and on SQLite.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes for a smoke run ({QUICK.independent:,} tasks, chain {QUICK.chain}, "
        f"fan {QUICK.fan:,}, {QUICK.history:,} history rows, 1 repetition unless --repeat)",
    )
    parser.add_argument("--backend", choices=[*BACKENDS, "all"], default="all")
    parser.add_argument("--repeat", type=int, help="repetitions of each workload (default 3)")
    parser.add_argument(
        "--workers",
        type=int,
        default=BENCH_WORKERS,
        help=f"dispatcher --workers (default {BENCH_WORKERS}: a cycle claims as many tasks as "
        "it has free workers, and no-op tasks free them at once, so the batch bounds the "
        f"drain; taskomatic's own default, {defaults.WORKERS}, is for hypervisor work)",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(names),
        help=f"comma-separated subset of: {', '.join(names)}",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, run the independent and history drains once more per backend, "
        "counting SQL statements in the dispatcher and sampling it with py-spy (if installed)",
    )
    parser.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run pgqueuer and procrastinate (in bench/.peers-venv, created on first use) "
        "on the same PostgreSQL cluster, alternating with taskomatic (default: on)",
    )
    parser.add_argument(
        "--peer",
        action="append",
        choices=peers.PEER_NAMES,
        help="only this peer (repeatable; default: all of them)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (dispatcher logs)"
    )
    args = parser.parse_args(argv)
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(unknown)}")
    args.workloads = chosen
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1 or args.workers < 1:
        parser.error("--repeat and --workers must be at least 1")
    return args


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sizes: Sizes = QUICK if args.quick else FULL
    backends = list(BACKENDS) if args.backend == "all" else [args.backend]
    workloads = [w for w in WORKLOADS if w.name in args.workloads]
    started = datetime.now(UTC)
    run_id = started.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    work_dir = Path(tempfile.mkdtemp(prefix="taskomatic-bench-run-"))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    command = "bench/run " + shlex.join(sys.argv[1:] if argv is None else argv)
    dbs: list[Database] = []
    names = list(backends)  # the report's columns: backends, then the peers run beside them
    samples: list[dict[str, Any]] = []
    failed = False
    data: dict[str, Any] = {"command": command.strip(), "started_at": started.isoformat()}
    try:
        for backend in backends:
            db = make(backend)
            dbs.append(db)
            say(f"starting {backend} …")
            db.start()
        pg = next((d for d in dbs if isinstance(d, PostgresDatabase)), None)
        info = machine.describe(pg.version() if pg else None)
        if pg:
            info["postgresql_settings"] = {
                name: pg.setting(name)
                for name in ("fsync", "synchronous_commit", "wal_sync_method", "shared_buffers")
            }
        data.update(
            machine=info,
            sizes=sizes.__dict__,
            workers=args.workers,
            repeat=args.repeat,
            backends=backends,
        )
        say(f"machine: {machine.one_line(info)}")
        if any(w.needs_history for w in workloads) or args.profile:
            data["history_setup"] = {}
            for db in dbs:
                say(f"{db.backend}: generating {sizes.history:,} finished tasks with events …")
                setup = db.build_history(sizes.history)
                data["history_setup"][db.backend] = setup
                say(
                    f"{db.backend}: history ready in {setup['total_s']:.1f}s "
                    f"({setup['database_mb']:.0f} MB)"
                )
        notes: list[str] = []
        subjects: list[Subject] = []
        for db in dbs:
            subjects.append(Subject(db.backend, db))
            peered = {w.name for w in workloads} & {"independent", "chain", "latency"}
            if db is pg and args.peers and peered:
                data["peer_versions"] = peers.ensure_venv(say)
                say("peers: " + ", ".join(f"{k} {v}" for k, v in data["peer_versions"].items()))
                chosen = args.peer or peers.PEER_NAMES
                subjects += [PeerSubject(name, db) for name in peers.PEER_NAMES if name in chosen]
        names[:] = [s.name for s in subjects]
        failed = measure(subjects, workloads, args, sizes, work_dir, run_id, notes, samples)
        if args.profile:
            if not pyspy():
                notes.append("py-spy not installed: profiles count statements only")
            data["profile"] = {}
            for db in dbs:
                for history in (False, True):
                    env = Env(db, sizes, args.workers, work_dir, RESULTS_DIR, run_id, notes=notes)
                    what = "history" if history else "independent"
                    say(f"profiling {what} on {db.backend} …")
                    try:
                        data["profile"][f"{db.backend}/{what}"] = profile_batch(env, history)
                    except Exception as exc:
                        failed = True
                        say(f"profile {what} {db.backend}: FAILED {exc}")
        data["notes"] = notes
    except KeyboardInterrupt:
        failed = True
        say("interrupted; writing what was measured")
    finally:
        for db in dbs:
            db.close()
        data["finished_at"] = datetime.now(UTC).isoformat()
        data["samples"] = samples
        data["summary"] = report.summarize(samples, names)
        out = RESULTS_DIR / f"{run_id}.json"
        report.write_json(out, data)
        if args.keep or failed:
            say(f"dispatcher logs kept in {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    print_report(data, samples, names, sizes, out)
    return 1 if failed else 0


@dataclass
class Subject:
    """One column of the report: a queue on a backend, running the workloads.

    taskomatic's subjects run each workload function in this process against a fresh
    database of their backend. A peer queue (issue 6) would be another Subject sharing the
    same PostgreSQL cluster, overriding `run` to call its own driver in its own virtual
    environment and returning the same metric names.
    """

    name: str
    db: Database

    def does(self, workload: Workload) -> bool:
        return True

    def run(self, workload: Workload, env: Env) -> tuple[dict[str, Any], dict[str, Any]]:
        return workload.run(env)


@dataclass
class PeerSubject(Subject):
    """A peer queue on the same PostgreSQL cluster, run by bench/peers/driver.py in its own
    virtual environment, on a fresh database per run, with the same metric names."""

    def does(self, workload: Workload) -> bool:
        return workload.name in peers.PEER_WORKLOADS[self.name]

    def run(self, workload: Workload, env: Env) -> tuple[dict[str, Any], dict[str, Any]]:
        n = {
            "independent": env.sizes.independent,
            "chain": env.sizes.chain,
            "latency": env.sizes.latency_samples,
        }[workload.name]
        url = self.db.fresh()
        conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        try:
            metrics = peers.run_peer(
                self.name,
                workload.name,
                conninfo,
                n,
                env.workers,
                self.db.server_cpu,
                timeout=max(300.0, n / 20),
            )
        finally:
            self.db.drop(url)
        return metrics, {}


def measure(
    subjects: list[Subject],
    workloads: list[Workload],
    args: argparse.Namespace,
    sizes: Sizes,
    work_dir: Path,
    run_id: str,
    notes: list[str],
    samples: list[dict[str, Any]],
) -> bool:
    """Every workload, --repeat times, every subject once per repetition (order flipping
    each time); appends to `samples` as it goes; returns whether any run failed.

    Repetitions are the outer loop: a ratio of two workloads (the history over the empty
    table, fan-out over its baseline) pairs runs made a minute apart, not a quarter of an
    hour, so the machine's drift over the run does not land on one side of it."""
    failed = False
    for rep in range(args.repeat):
        for workload in workloads:
            for subject in subjects if rep % 2 == 0 else reversed(subjects):
                if not subject.does(workload):
                    continue
                env = Env(
                    subject.db,
                    sizes,
                    args.workers,
                    work_dir,
                    RESULTS_DIR,
                    run_id,
                    rep=rep,
                    explain=rep == 0 and workload.name in ("independent", "history"),
                    notes=notes,
                )
                sample: dict[str, Any] = {
                    "workload": workload.name,
                    "subject": subject.name,
                    "rep": rep,
                }
                where = f"{workload.name} [{rep + 1}/{args.repeat}] {subject.name}"
                clock = time.monotonic()
                try:
                    metrics, extra = subject.run(workload, env)
                except Exception as exc:
                    failed = True
                    sample["error"] = f"{type(exc).__name__}: {exc}"
                    say(f"{where}: FAILED {exc}")
                    if not isinstance(exc, BenchError):
                        traceback.print_exc()
                else:
                    sample.update(metrics=metrics, **extra)
                    took = time.monotonic() - clock
                    say(f"{where}: {_headline(workload.name, metrics)} ({took:.1f}s)")
                samples.append(sample)
    return failed


def _headline(workload: str, m: dict[str, Any]) -> str:
    if workload.startswith("latency"):
        action = f"to the action p50 {m['action_p50_ms']:.2f} ms, p95 {m['action_p95_ms']:.2f} ms"
        if "start_p50_ms" not in m:  # a peer: its figure ends at its job's first line
            return action
        return (
            f"to started_at p50 {m['start_p50_ms']:.2f} ms, p95 {m['start_p95_ms']:.2f}; {action}"
        )
    if workload == "chain":
        return f"hop p50 {m['hop_p50_ms']:.2f} ms, p95 {m['hop_p95_ms']:.2f} ms"
    head = (
        f"submit {m['submit_rate']:,.0f}/s, drain {m['drain_rate']:,.0f}/s, "
        f"whole {m['total_s']:.2f}s, RSS {m['peak_rss_mb']:.0f} MB"
    )
    if "dispatcher_cores" not in m:  # a peer: CPU per task instead of cores
        return head + (
            f", CPU ms/task: queue {m['dispatcher_cpu_ms_per_task']:.2f} "
            f"server {m['server_cpu_ms_per_task']:.2f}"
        )
    server = f" server {m['server_cores']:.2f}" if "server_cores" in m else ""
    return (
        head + f", cores: dispatcher {m['dispatcher_cores']:.2f}{server} "
        f"other {m['other_cores']:.2f}"
    )


def print_report(
    data: dict[str, Any],
    samples: list[dict[str, Any]],
    backends: list[str],
    sizes: Sizes,
    out: Path,
) -> None:
    """The table, the machine, the caveats, and (with --profile) where the time goes."""
    print()
    print(f"taskomatic benchmark — {data['started_at'][:19]}Z — {data['command']}")
    if "machine" in data:
        print(f"machine: {machine.one_line(data['machine'])}")
    print(
        f"dispatcher: `taskomatic dispatcher --workers {data.get('workers')}` in its own process "
        f"(except the in-process latency row); {data.get('repeat')} repetition(s); "
        "median (min-max)"
    )
    print()
    print(report.table(samples, backends, sizes))
    print()
    load = report.load_line(samples)
    if load:
        print(load)
    for s in samples:
        if "error" in s:
            print(f"FAILED {s['workload']} rep {s['rep'] + 1} {s['subject']}: {s['error']}")
        elif s.get("metrics", {}).get("missed_wakeups"):
            print(
                f"{s['workload']} rep {s['rep'] + 1} {s['subject']}: "
                f"{s['metrics']['missed_wakeups']} missed wake-up(s) logged by the safety poll"
            )
    for note in data.get("notes", []):
        print(f"note: {note}")
    for key, prof in data.get("profile", {}).items():
        print()
        print(f"profile {key}: {prof['metrics']['drain_rate']:,.0f} tasks/s while profiled")
        st = prof.get("statements")
        if st:
            print(
                f"  dispatcher: {st['statements_per_task']:.2f} statements and "
                f"{st['commits_per_task']:.3f} commits per task; "
                f"SQL {st['statement_ms_per_task']:.3f} ms/task + "
                f"commit {st['commit_ms_per_task']:.3f} ms/task"
            )
            for k in st["by_statement"][:8]:
                print(
                    f"    {k['ms_per_task']:7.3f} ms/task {k['per_task']:6.3f}x/task "
                    f"{k['mean_ms']:7.3f} ms each  {k['statement'][:110]}"
                )
        stacks = prof.get("stacks")
        if stacks:
            shares = ", ".join(
                f"{name} {share:.0%}" for name, share in stacks["loop_share_by_activity"].items()
            )
            print(f"  dispatcher loop thread (py-spy, idle included): {shares}")
    for s in samples:
        if "plans" in s:
            print_plans(s)
    print()
    print(f"results: {os.path.relpath(out, machine.ROOT)}")


def print_plans(sample: dict[str, Any]) -> None:
    """The claim's plan in full; one line for each other hot statement."""
    plans = sample["plans"]
    print()
    print(
        f"hot statements, {sample['subject']}, after {sample['workload']} "
        f"({plans['all_tasks']:,} tasks in the table, {plans['live_tasks']:,} live):"
    )
    claim_shown = False
    for st in plans["statements"]:
        flag = "  SCANS HISTORY" if st["scans_history"] else ""
        planning = f", planning {st['planning_ms']:.3f} ms" if st.get("planning_ms") else ""
        print(
            f"  {st['call']}: {st['execution_ms'] or 0:.3f} ms{planning}{flag}  "
            f"{st['statement'][:90]}"
        )
        if st["call"] == "claim" and not claim_shown:
            claim_shown = True
            for line in st["plan"].splitlines():
                print(f"      {line}")
    for failure in plans.get("failed_calls", []):
        print(f"  could not explain {failure}")
    generic = plans.get("claim_generic_plan")
    if generic:
        flag = "  SCANS HISTORY" if generic["scans_history"] else ""
        print(f"  claim as a generic plan: {generic['execution_ms'] or 0:.3f} ms{flag}")
