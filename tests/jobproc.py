"""Actions whose host job is a real process on this machine, and actions that leave marks.

`proc.run` starts `sh` in its own session (it outlives a killed dispatcher, as a libvirt job
outlives its client), records each start in `<dir>/starts`, and is ensure-style: a run finds
the job's process (or its outcome) before starting another. The job's outcome is the file
`<dir>/done`, which the process writes only when it succeeds; a process that ends without
it is a job that vanished without its outcome.

`mark` writes `<dir>/<name>` and is undone by `unmark`; `mark.fail` fails. Load this module
into a dispatcher process with `--actions jobproc`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from taskomatic import errors
from taskomatic.actions.registry import Context, Param, Registry
from taskomatic.actions.registry import registry as default_registry
from taskomatic.failpoints import crash_point
from taskomatic.jobs import HostJob, JobHooks, JobStatus
from taskomatic.submission import Expansion, TaskSpec


def register(registry: Registry) -> None:
    """Add the actions to `registry`."""
    registry.action(
        "proc.run",
        params={
            "dir": str,
            "seconds": float,
            "succeed": Param(bool, default=True),
            "locks": Param(list, default=[]),
        },
        locks=lambda p: p["locks"],
        job=JobHooks(poll, finish, abort),
        compensate=lambda p, _r: ("unmark", {"dir": p["dir"], "name": "done"}),
    )(run)
    registry.action(
        "mark",
        params={"dir": str, "name": str},
        compensate=lambda p, _r: ("unmark", {"dir": p["dir"], "name": p["name"]}),
    )(mark)
    registry.action("unmark", params={"dir": str, "name": str})(unmark)
    registry.action("mark.many", params={"dir": str, "names": list})(mark_many)
    registry.action("mark.fail", params={"dir": str, "message": Param(str, default="boom")})(
        mark_fail
    )


def run(ctx: Context) -> Any:
    where = Path(ctx.params["dir"])
    if (where / "done").exists():
        return {"done": True}
    pid = _pid(where)
    if pid is not None and _alive(pid):
        return _job(pid, where)  # started before a crash: adopt it, never start a second
    seconds, succeed = ctx.params["seconds"], ctx.params["succeed"]
    script = f"sleep {seconds}" + (f" && echo ok > {where / 'done'}" if succeed else "")
    crash_point("proc.run:before-start")
    child = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    (where / "pid").write_text(str(child.pid))
    with (where / "starts").open("a") as starts:
        starts.write(f"{child.pid}\n")
    crash_point("proc.run:started")
    return _job(child.pid, where)


def poll(ctx: Context, job: HostJob) -> JobStatus:
    if _alive(job.details["pid"]):
        return JobStatus(True, {"pid": job.details["pid"]})
    return JobStatus.gone()


def finish(ctx: Context, job: HostJob) -> Any:
    if (Path(job.details["dir"]) / "done").exists():
        return {"done": True}
    raise errors.ActionFailed(
        f"process {job.details['pid']} ended without writing its outcome (done)"
    )


def abort(ctx: Context, job: HostJob) -> None:
    with contextlib.suppress(ProcessLookupError):  # gone already
        os.killpg(job.details["pid"], signal.SIGTERM)


def mark(ctx: Context) -> Mapping[str, Any]:
    path = Path(ctx.params["dir"]) / ctx.params["name"]
    path.write_text("marked")
    return {"marked": str(path)}


def unmark(ctx: Context) -> Mapping[str, Any]:
    crash_point(f"unmark:{ctx.params['name']}")
    path = Path(ctx.params["dir"]) / ctx.params["name"]
    path.unlink(missing_ok=True)
    with (Path(ctx.params["dir"]) / "undone").open("a") as undone:
        undone.write(ctx.params["name"] + "\n")
    return {"unmarked": str(path)}


def mark_many(ctx: Context) -> Expansion:
    """Add one `mark` per name to the group; the task's dependents wait for them."""
    with (Path(ctx.params["dir"]) / "expansions").open("a") as runs:
        runs.write("ran\n")
    where = ctx.params["dir"]
    tasks = [TaskSpec("mark", {"dir": where, "name": n}, name=n) for n in ctx.params["names"]]
    return Expansion(tasks, result={"added": len(tasks)})


def mark_fail(ctx: Context) -> None:
    raise errors.ActionFailed(ctx.params["message"])


def starts(where: Path) -> list[int]:
    """The pids of every process `proc.run` started in `where`."""
    path = where / "starts"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _job(pid: int, where: Path) -> HostJob:
    return HostJob("local", "process", {"pid": pid, "dir": str(where)})


def _pid(where: Path) -> int | None:
    path = where / "pid"
    return int(path.read_text()) if path.exists() else None


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


register(default_registry)
