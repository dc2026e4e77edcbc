"""Where a sweep's jobs run: on this machine (``--launcher local``, the default) or on Slurm.

Both launchers run the same thing per job: ``python -m promptlab.sweep RUN_DIR/sweep_job.json``
(train or resume, then the missing evaluations), its output appended to ``RUN_DIR/sweep_job.log``.
The local launcher is :func:`promptlab.sweep.run_sweep` (child processes, ``--jobs``, ``--devices``).

``--launcher slurm`` hands each unfinished job of the plan to Slurm through submitit, one sbatch job
per run, with the resources of the recipe's ``launcher:`` section (or ``--partition``, ``--time``, ...,
which override it; a ``per_dataset`` block may give one dataset more time or GPUs), and returns:

- the job ids go into the sweep's ``sweep.json`` (``slurm_jobs`` of each run, oldest first);
- a run that is done is skipped, a run whose last job is still pending or running is left alone,
  any other run (never submitted, failed, cancelled, pre-empted, out of time) is submitted again and
  resumes from its ``checkpoints/last.pt`` (jobs always run with ``resume=true``);
- a job Slurm signals before pre-empting it or at its time limit (submitit's signal, SIGUSR2 unless
  ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise) is requeued by submitit, and the requeued job resumes
  from the last checkpoint the same way;
- ``gpus_per_job`` > 1 trains the run under ``torchrun`` (one process per GPU, the global batch
  sharded, :mod:`promptlab.distributed`); the evaluations then run on rank 0 only;
- ``promptlab sweep --status DIR`` reads each run's folder and asks Slurm (``squeue``, then
  ``sacct`` where accounting is on) for its last job: pending, running, done or failed.

submitit is imported only when jobs are submitted, so ``sweep --help`` and ``--dry-run`` stay light.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptlab import rundir
from promptlab.sweep import JOB_FILE, JOB_LOG, MANIFEST, Job, Sweep, logged_epoch, run_sweep, write_manifest

log = logging.getLogger(__name__)

LAUNCHERS = ("local", "slurm")
SLURM_FOLDER = ".slurm"  # submitit's sbatch scripts, pickles and job logs, under the sweep directory
# Slurm job states (squeue / sacct long names) by what they mean for a run
PENDING_STATES = frozenset(
    {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "RESIZING"}
)
RUNNING_STATES = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING"})
# command-line options -> recipe launcher keys (they become `launcher.<key>=<value>` overrides)
OPTION_KEYS = {
    "partition": "partition",
    "time": "time",
    "gpus_per_job": "gpus_per_job",
    "cpus_per_job": "cpus_per_job",
    "mem": "mem",
}


# ---------------------------------------------------------------------- what a job asks for
def launcher_overrides(args: Any) -> list[str]:
    """``--partition gpu --sbatch qos=high`` as recipe overrides (``launcher.partition=gpu``, ...).

    Going through the recipe, the command line is validated like the ``launcher:`` section itself.
    """
    out = [f"launcher.{key}={getattr(args, opt)}" for opt, key in OPTION_KEYS.items() if getattr(args, opt)]
    for item in args.sbatch or ():
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise ValueError(f"--sbatch {item!r}: expected NAME=VALUE or NAME (a flag), e.g. qos=high")
        out.append(f"launcher.sbatch.{key}={value if eq else 'true'}")
    return out


def sbatch_parameters(job: Job) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters of one job, from its recipe's ``launcher`` section."""
    spec = job.launcher
    params: dict[str, Any] = {
        "job_name": f"promptlab-{job.dataset}-shots{job.shots}-seed{job.seed}",
        "time": int(spec.get("time", 60)),
        "nodes": 1,
        "ntasks_per_node": 1,  # one task; several GPUs are driven by torchrun inside it
        "cpus_per_task": int(spec.get("cpus_per_job", 1)),
    }
    if spec.get("partition"):
        params["partition"] = str(spec["partition"])
    if int(spec.get("gpus_per_job", 0)) > 0:
        params["gpus_per_node"] = int(spec["gpus_per_job"])
    if spec.get("mem") is not None:
        params["mem"] = str(spec["mem"])
    if spec.get("sbatch"):
        params["additional_parameters"] = dict(spec["sbatch"])
    return params


def sbatch_flags(params: dict[str, Any]) -> str:
    """The ``#SBATCH`` options ``params`` become (as submitit writes them), for ``--dry-run``."""
    flat = {k: v for k, v in params.items() if k != "additional_parameters"}
    flat.update(params.get("additional_parameters", {}))
    parts = []
    for key, value in flat.items():
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag}={value}")
    return " ".join(parts)


def job_command(job_file: str | Path, gpus: int = 0) -> list[str]:
    """The job process: ``python -m promptlab.sweep JOB.json``, under torchrun for more than one GPU."""
    if gpus > 1:
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
        return [sys.executable, *launch, "-m", "promptlab.sweep", str(job_file)]
    return [sys.executable, "-m", "promptlab.sweep", str(job_file)]


class SlurmRun:
    """What submitit runs inside the Slurm job: the job process, its output appended to ``sweep_job.log``.

    It has submitit's ``checkpoint`` hook, so submitit requeues the job when Slurm signals a
    pre-emption or the time limit; the requeued job runs this again, and the engine resumes the run
    from ``checkpoints/last.pt`` (the job's overrides hold ``resume=true``). The job process gets the
    signal too and ends; what it lost is the part of an epoch since the last checkpoint.
    """

    def __init__(self, run_dir: str, gpus: int = 0) -> None:
        self.run_dir, self.gpus = run_dir, gpus

    def __call__(self) -> None:
        run_dir = Path(self.run_dir)
        with open(run_dir / JOB_LOG, "ab") as logf:
            logf.write(f"--- slurm job {os.environ.get('SLURM_JOB_ID', '?')} starts\n".encode())
            logf.flush()
            rc = subprocess.call(
                job_command(run_dir / JOB_FILE, self.gpus), stdout=logf, stderr=subprocess.STDOUT
            )
        if rc != 0:
            raise RuntimeError(f"{run_dir}: the job process exited with {rc}; see {run_dir / JOB_LOG}")

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's hook on pre-emption / time-out: run the same job again (it resumes)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(SlurmRun(self.run_dir, self.gpus), *args, **kwargs)


# ---------------------------------------------------------------------- what Slurm says
def _run(cmd: Sequence[str]) -> str | None:
    """A Slurm client command's output; None when it is missing or fails (unknown ids, no accounting)."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def slurm_states(job_ids: Iterable[str]) -> dict[str, str]:
    """Job id -> Slurm state (``PENDING``, ``RUNNING``, ``COMPLETED``, ``CANCELLED``, ...) where Slurm knows it.

    ``squeue -t all`` knows jobs that are queued, running or recently ended; ``sacct`` (where
    accounting is on) the older ones. A job neither knows is absent.
    """
    ids = sorted({str(i) for i in job_ids})
    states: dict[str, str] = {}
    if not ids:
        return states
    out = _run(["squeue", "-h", "-t", "all", "-o", "%i|%T", "-j", ",".join(ids)]) or ""
    for line in out.splitlines():
        jid, _, state = line.strip().partition("|")
        states[jid] = state
    rest = [i for i in ids if i not in states]
    if rest:
        out = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(rest)]) or ""
        for line in out.splitlines():
            jid, _, state = line.strip().partition("|")
            states.setdefault(jid, state.split()[0] if state else "")  # "CANCELLED by 0" -> CANCELLED
    return states


@dataclass
class RunState:
    """One run of a sweep as ``--status`` shows it."""

    dir: str
    dataset: str
    shots: int
    seed: int
    state: str  # done / pending / running / failed / not submitted / interrupted
    job_id: str | None = None
    slurm_state: str | None = None
    epoch: int = 0
    epochs: int | None = None


def _run_done(run_dir: Path, entry: dict[str, Any]) -> bool:
    files = [e["file"] for e in entry.get("evaluations") or ()]
    return (run_dir / "metrics.json").is_file() and all((run_dir / f).is_file() for f in files)


def sweep_states(sweep_dir: str | Path) -> list[RunState]:
    """Each run of the sweep in ``sweep_dir``: from its folder first (done), then Slurm (its last job)."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {sweep_dir} is not a sweep directory")
    runs = json.loads(path.read_text())["runs"]
    last = {r["dir"]: str(r["slurm_jobs"][-1]) for r in runs if r.get("slurm_jobs")}
    slurm = slurm_states(last.values())
    rows = []
    for r in runs:
        d = sweep_dir / r["dir"]
        jid = last.get(r["dir"])
        sstate = slurm.get(jid) if jid else None
        if _run_done(d, r):
            state = "done"
        elif sstate in PENDING_STATES:
            state = "pending"
        elif sstate in RUNNING_STATES:
            state = "running"
        elif jid:  # its last job ended (or Slurm forgot it) without finishing the run
            state = "failed"
        else:
            state = "interrupted" if (d / "checkpoints" / "last.pt").is_file() else "not submitted"
        rows.append(
            RunState(
                r["dir"],
                r["dataset"],
                r["shots"],
                r["seed"],
                state,
                jid,
                sstate,
                logged_epoch(d),
                r.get("epochs"),
            )
        )
    return rows


def format_states(rows: Sequence[RunState]) -> str:
    """The ``--status`` table: one line per run, then the count of each state."""
    lines = [f"{'state':13} {'job':>10} {'slurm':12} {'epoch':>9}  run"]
    for r in rows:
        epoch = f"{r.epoch}/{r.epochs}" if r.epochs is not None else str(r.epoch)
        lines.append(f"{r.state:13} {r.job_id or '-':>10} {r.slurm_state or '-':12} {epoch:>9}  {r.dir}")
    order = ("done", "running", "pending", "failed", "interrupted", "not submitted")
    lines.append(", ".join(f"{n} {s}" for s in order if (n := sum(r.state == s for r in rows))))
    return "\n".join(lines)


# ---------------------------------------------------------------------- submitting
def _record_jobs(sweep_dir: Path, submitted: dict[str, str]) -> None:
    """Append each new job id to its run's ``slurm_jobs`` in ``sweep.json`` (under the sweep's lock)."""
    from promptlab.io import atomic_write_json

    path = sweep_dir / MANIFEST
    manifest = json.loads(path.read_text())
    for run in manifest["runs"]:
        if run["dir"] in submitted:
            run["slurm_jobs"] = [*run.get("slurm_jobs", []), submitted[run["dir"]]]
    atomic_write_json(path, manifest)


def _rel(sweep: Sweep, job: Job) -> str:
    return Path(job.run_dir).relative_to(sweep.out).as_posix()


def plan_submissions(sweep: Sweep) -> list[tuple[Job, str, str | None]]:
    """``(job, action, detail)`` per job: ``submit`` (with its run status), ``skip`` (done) or ``queued`` (its job id)."""
    statuses = run_sweep(sweep, dry_run=True).statuses  # also refuses run dirs of another configuration
    states = {r.dir: r for r in sweep_states(sweep.out)} if (sweep.out / MANIFEST).is_file() else {}
    plan = []
    for job, status in statuses:
        known = states.get(_rel(sweep, job))
        if status == "done":
            plan.append((job, "skip", "done"))
        elif known is not None and known.state in ("pending", "running"):
            plan.append((job, "queued", f"job {known.job_id} {known.slurm_state}"))
        else:
            plan.append((job, "submit", status))
    return plan


def format_submissions(sweep: Sweep, plan: Sequence[tuple[Job, str, str | None]]) -> str:
    """The ``--dry-run`` listing of a Slurm sweep: what each job would do, and its sbatch options."""
    lines = [f"{'action':7} {'dataset':16} {'shots':>5} {'seed':>4} {'epochs':>6}  run directory / sbatch"]
    for job, action, detail in plan:
        lines.append(
            f"{action:7} {job.dataset:16} {job.shots:5d} {job.seed:4d} {job.epochs:6d}  {job.run_dir} ({detail})"
        )
        if action == "submit":
            lines.append(f"{'':44}{sbatch_flags(sbatch_parameters(job))}")
    counts = {a: sum(1 for _, act, _ in plan if act == a) for a in ("submit", "queued", "skip")}
    lines.append(f"{counts['submit']} to submit, {counts['queued']} still queued, {counts['skip']} done")
    return "\n".join(lines)


def submit(sweep: Sweep, plan: Sequence[tuple[Job, str, str | None]]) -> dict[str, str]:
    """Submit the ``submit`` jobs of ``plan`` through submitit; run dir (relative) -> Slurm job id."""
    if shutil.which("sbatch") is None:
        raise FileNotFoundError("sbatch not found: --launcher slurm needs Slurm's client commands on PATH")
    import submitit

    folder = sweep.out / SLURM_FOLDER / "%j"
    submitted: dict[str, str] = {}
    with rundir.lock_dir(sweep.out, "sweep"):
        write_manifest(sweep)
        for job, action, _ in plan:
            if action != "submit":
                continue
            run_dir = Path(job.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / JOB_FILE).write_text(json.dumps(job.to_json(), indent=2))
            executor = submitit.SlurmExecutor(folder=folder)
            executor.update_parameters(**sbatch_parameters(job))
            sjob = executor.submit(SlurmRun(str(run_dir), int(job.launcher.get("gpus_per_job", 0))))
            submitted[_rel(sweep, job)] = str(sjob.job_id)
            log.info("submitted %s as Slurm job %s", job.run_dir, sjob.job_id)
            _record_jobs(
                sweep.out, {_rel(sweep, job): str(sjob.job_id)}
            )  # each at once: a failure keeps the others
    return submitted


def wait(sweep_dir: Path, every: float = 60.0, stream: Any = None) -> list[RunState]:
    """Poll until no run of the sweep is pending or running; a line each time the counts change."""
    stream = sys.stderr if stream is None else stream
    shown = ""
    while True:
        rows = sweep_states(sweep_dir)
        counts = {s: sum(r.state == s for r in rows) for s in ("pending", "running", "done", "failed")}
        line = "slurm: " + ", ".join(f"{n} {s}" for s, n in counts.items())
        if line != shown:
            print(line, file=stream, flush=True)
            shown = line
        if not counts["pending"] and not counts["running"]:
            return rows
        time.sleep(every)


def slurm_sweep(sweep: Sweep, *, dry_run: bool = False, wait_for: bool = False, every: float = 60.0) -> int:
    """``promptlab sweep RECIPE --launcher slurm``: submit what is left; the exit code (0 ok, 1 failures)."""
    plan = plan_submissions(sweep)
    if dry_run:
        print(f"{sweep.protocol} sweep of {sweep.recipe} into {sweep.out}, on Slurm (submitit)")
        print(format_submissions(sweep, plan))
        return 0
    submitted = submit(sweep, plan)
    queued = sum(1 for _, a, _ in plan if a == "queued")
    done = sum(1 for _, a, _ in plan if a == "skip")
    ids = ", ".join(submitted.values()) or "none"
    print(f"{len(submitted)} jobs submitted ({ids}), {queued} still queued, {done} done -> {sweep.out}")
    if not wait_for:
        print(f"follow them: promptlab sweep --status {sweep.out}")
        return 0
    rows = wait(sweep.out, every)
    failed = [r for r in rows if r.state != "done"]
    if failed:
        print(format_states(rows), file=sys.stderr)
        return 1
    print(f"tables and plots: promptlab report {sweep.out}")
    return 0


def cmd_status(sweep_dir: str) -> int:
    """``promptlab sweep --status DIR``: one line per run, then the counts."""
    print(format_states(sweep_states(sweep_dir)))
    return 0
