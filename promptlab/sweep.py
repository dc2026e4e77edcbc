"""``promptlab sweep``: a protocol's whole grid of runs from one recipe, resumable and parallel.

The incumbents keep the experiment grid in bash loops over datasets and seeds. Here a sweep is
planned as data (one :class:`Job` per dataset x shots x seed), each job runs in its own run
directory ``<sweep>/<dataset>/shots<K>/seed<S>``, and the state on disk says what is left:

- ``metrics.json`` present and every evaluation file present: done, skipped;
- ``metrics.json`` present, an evaluation missing: only the evaluation runs;
- otherwise the run starts, or resumes from ``checkpoints/last.pt`` (jobs always run with
  ``resume=true``; the engine's resume ends with the numbers of an uninterrupted run).

A run directory that holds a run of a *different* configuration is never resumed into: the
sweep stops and names the differing keys.

Protocols (``protocol=`` on the command line; without it, a recipe with ``subsample: base`` means
base2new and any other recipe fewshot; crossdataset is always asked for explicitly):

- ``base2new``: train on the base half of the classes (``subsample=base``); ``metrics.json`` is the
  last-epoch accuracy on the base test classes; the learned prompts are then evaluated on the new
  test classes (``eval_<dataset>_new_test.json``, class names switched with ``set_classnames``).
- ``fewshot``: all classes, ``shots=1,2,4,8,16`` by default, each with the recipe's per-shot epochs
  (``train.epochs_by_shots``).
- ``crossdataset``: train on each source dataset (the recipe's, e.g. ImageNet 16 shots), evaluate
  the prompts on every target (``targets=all``: the other base-to-new datasets and ImageNetV2,
  -Sketch, -A and -R), each file ``eval_<target>_all_test.json``.

Each job runs in a fresh process, ``--jobs N`` of them at a time; ``--devices 0,1`` gives each process
one GPU through ``CUDA_VISIBLE_DEVICES``. Job processes are forked from a forkserver that has imported
torch, the backbone libraries and promptlab once (:data:`PRELOAD`): each job still starts from a clean
process, without paying its imports again (15.7 s of startup + setup per job before, 1.5 s after,
in the sandbox battery's profile on the idle 2-core CPU; ``PROMPTLAB_JOB_START=exec`` starts each as
``python -m promptlab.sweep JOB.json`` instead, as does a platform without forkserver).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from omegaconf import OmegaConf

from promptlab import rundir
from promptlab.config import ConfigError, epochs_for, load_recipe
from promptlab.runlog import LOG_FILE, is_terminal

log = logging.getLogger(__name__)

PROTOCOLS = ("base2new", "fewshot", "crossdataset")
# The 11 datasets of the base-to-new and cross-dataset tables, in the papers' column order.
BENCHMARK_DATASETS = (
    "imagenet",
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)
DOMAIN_SHIFT_DATASETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
FEWSHOT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_SEEDS = (1, 2, 3)
SWEEP_KEYS = ("protocol", "datasets", "seeds", "shots", "targets")
MANIFEST = "sweep.json"
JOB_FILE = "sweep_job.json"
JOB_LOG = "sweep_job.log"
# What the forkserver imports before it forks job processes: everything a job imports anyway (torch
# and torchvision 5.5 s, open_clip with timm and transformers 2.1 s, measured on the 2-core CPU lightly
# loaded), never anything that starts torch's thread pools or CUDA, which a forked child could not use.
PRELOAD = ("torch", "torchvision", "open_clip", "promptlab.runner", "promptlab.sweep", "promptlab.cli")


@dataclass(frozen=True)
class Evaluation:
    """An evaluation of a finished run's prompts on other classes (``promptlab eval RUN_DIR ...``)."""

    dataset: str  # data.name of the classes to evaluate on
    subsample: str  # "new" (base-to-new) or "all" (cross-dataset)
    name: str  # the dataset's own name (its YAML's ``name``), as used in the result file name

    @property
    def overrides(self) -> list[str]:
        return [f"data.name={self.dataset}", f"subsample={self.subsample}"]

    def result_file(self, split: str = "test") -> str:
        return f"eval_{self.name}_{self.subsample}_{split}.json"  # the name runner.eval_prompts writes


@dataclass(frozen=True)
class Job:
    """One run of the grid: train (or resume) the recipe with ``overrides``, then its evaluations."""

    recipe: str
    dataset: str
    shots: int
    seed: int
    run_dir: str
    overrides: tuple[str, ...]
    evaluations: tuple[Evaluation, ...] = ()
    epochs: int = 0
    split: str = "test"
    launcher: dict[str, Any] = field(default_factory=dict)  # the recipe's launcher section (Slurm resources)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        evals = tuple(Evaluation(**e) for e in data.get("evaluations", ()))
        return cls(**{**data, "overrides": tuple(data["overrides"]), "evaluations": evals})

    def status(self) -> str:
        """``done``, ``evaluate`` (trained, an evaluation missing), ``resume`` (checkpoint, no metrics) or ``new``."""
        d = Path(self.run_dir)
        if (d / "metrics.json").is_file():
            missing = [e for e in self.evaluations if not (d / e.result_file(self.split)).is_file()]
            return "evaluate" if missing else "done"
        return "resume" if (d / "checkpoints" / "last.pt").is_file() else "new"


@dataclass
class Sweep:
    """The planned grid; ``jobs`` in run order."""

    protocol: str
    recipe: str
    out: Path
    datasets: list[str]
    seeds: list[int]
    shots: list[int]
    targets: list[str]
    overrides: list[str]
    jobs: list[Job] = field(default_factory=list)


# ---------------------------------------------------------------------- planning
def split_sweep_args(args: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Separate the sweep's own keys (``datasets=``, ``seeds=``, ...) from recipe overrides.

    ``seed=S`` (the recipe key) counts as ``seeds=S``, ``data.name=X`` as ``datasets=X``, so a
    command line that names one run sweeps exactly that run.
    """
    aliases = {"seed": "seeds", "data.name": "datasets"}
    own: dict[str, str] = {}
    aliased: dict[str, str] = {}
    overrides = []
    for a in args:
        key, eq, value = (p.strip() for p in a.partition("="))
        if eq and key in SWEEP_KEYS:
            own[key] = value
        elif eq and key in aliases:
            aliased[aliases[key]] = value
        else:
            overrides.append(a)
    return {**aliased, **own}, overrides


def _list(value: str | None) -> list[str]:
    if value is None:
        return []
    return [v.strip() for v in value.strip("[]() ").split(",") if v.strip()]


def _ints(value: str | None, key: str) -> list[int]:
    try:
        return [int(v) for v in _list(value)]
    except ValueError as e:
        raise ConfigError(f"{key}= takes comma-separated integers, got {value!r}") from e


def _dataset_name(name: str) -> str:
    """The dataset's own name (a ``data.name`` may also be a YAML path); fails early on a typo."""
    from promptlab.data import get_spec

    return get_spec(name).name


def default_out(recipe: Path, protocol: str) -> Path:
    """``runs/sweeps/<recipe relative to recipes/, or its stem>-<protocol>``."""
    from promptlab.resources import RECIPES_DIR

    try:
        rel = recipe.resolve().relative_to(RECIPES_DIR.resolve()).with_suffix("")
    except ValueError:
        rel = Path(recipe.stem)
    return Path("runs") / "sweeps" / f"{rel.as_posix()}-{protocol}"


def plan_sweep(
    recipe: str | Path,
    args: Sequence[str] = (),
    out: str | Path | None = None,
    *,
    check_components: bool = True,
    under: str | Path | None = None,
) -> Sweep:
    """Plan the grid of a recipe under a protocol; every job's config is loaded (validated) now.

    Args:
        recipe: the recipe file.
        args: ``protocol= datasets= seeds= shots= targets=`` and any recipe ``key=value`` overrides.
        out: the sweep directory (default :func:`default_out`).
        under: instead of ``out``, the folder that holds it, as ``<under>/<recipe>-<protocol>`` (the
            sweeps of several recipes side by side).
        check_components: import the method, optimizer and backbone to check their arguments
            (torch: seconds). ``--dry-run`` leaves it off so that a plan lists at once.

    Raises:
        ConfigError: a bad sweep key or recipe override, naming it.
        KeyError: an unknown dataset name.
    """
    recipe = Path(recipe).resolve()
    own, overrides = split_sweep_args(args)
    base = load_recipe(recipe, overrides, check_paths=False, check_components=check_components)
    if base.task != "classification":  # the protocols are grids of datasets, shots and class halves
        raise ConfigError(
            f"sweeps run classification recipes; this one is `task: {base.task}` "
            "(run its seeds with `promptlab run RECIPE seed=N`)",
            key="task",
            source=str(recipe),
        )
    protocol = own.get("protocol") or ("base2new" if base.subsample == "base" else "fewshot")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}", key="protocol")
    datasets = _list(own.get("datasets")) or [str(base.data.name)]
    if datasets == ["all"]:
        datasets = list(BENCHMARK_DATASETS)
    seeds = _ints(own.get("seeds"), "seeds") or list(DEFAULT_SEEDS)
    shots = _ints(own.get("shots"), "shots") or (
        list(FEWSHOT_SHOTS) if protocol == "fewshot" else [int(base.shots)]
    )
    targets: list[str] = []
    if protocol == "crossdataset":
        targets = _list(own.get("targets")) or ["all"]
        if targets == ["all"]:
            targets = [*BENCHMARK_DATASETS, *DOMAIN_SHIFT_DATASETS]
    elif "targets" in own:
        raise ConfigError("targets= is for protocol=crossdataset", key="targets")
    if out is None:
        out = default_out(recipe, protocol)
        out = Path(under) / out.name if under is not None else out
    out = Path(out)
    sweep = Sweep(protocol, str(recipe), out, datasets, seeds, shots, targets, list(overrides))
    subsample = "base" if protocol == "base2new" else "all"
    for dataset in datasets:
        name = _dataset_name(dataset)
        if protocol == "base2new":
            evals = [Evaluation(dataset, "new", name)]
        else:
            evals = [Evaluation(t, "all", _dataset_name(t)) for t in targets if _dataset_name(t) != name]
        for k in shots:
            for seed in seeds:
                run_dir = out / name / f"shots{k}" / f"seed{seed}"
                job_overrides = [
                    *overrides,
                    f"data.name={dataset}",
                    f"shots={k}",
                    f"seed={seed}",
                    f"subsample={subsample}",
                    f"output_dir={run_dir}",
                    "resume=true",
                ]
                cfg = load_recipe(recipe, job_overrides, check_paths=False, check_components=check_components)
                sweep.jobs.append(
                    Job(
                        str(recipe),
                        name,
                        k,
                        seed,
                        str(run_dir),
                        tuple(job_overrides),
                        tuple(evals),
                        epochs_for(cfg),
                        str(cfg.eval.split),
                        OmegaConf.to_container(cfg.launcher, resolve=True),
                    )
                )
    return sweep


def config_conflicts(job: Job) -> list[str]:
    """Keys whose value in the run directory's ``config.yaml`` differs from the job's config."""
    saved = Path(job.run_dir) / "config.yaml"
    if not saved.is_file():
        return []
    return rundir.config_conflicts(saved, load_recipe(job.recipe, job.overrides, check_paths=False))


def write_manifest(sweep: Sweep) -> Path:
    """``<out>/sweep.json``: what the sweep is (the report reads it); runs of earlier plans are kept."""
    from promptlab import __version__
    from promptlab.io import atomic_write_json

    path = sweep.out / MANIFEST
    runs: dict[str, dict[str, Any]] = {}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("protocol") != sweep.protocol:
            raise ConfigError(
                f"{path} holds a {old.get('protocol')} sweep, not {sweep.protocol}; choose another --out"
            )
        runs = {r["dir"]: r for r in old.get("runs", [])}
    for job in sweep.jobs:
        rel = Path(job.run_dir).relative_to(sweep.out).as_posix()
        runs[rel] = {
            **runs.get(rel, {}),  # keeps what a launcher recorded (slurm_jobs)
            "dir": rel,
            "dataset": job.dataset,
            "shots": job.shots,
            "seed": job.seed,
            "epochs": job.epochs,
            "evaluations": [
                dataclasses.asdict(e) | {"file": e.result_file(job.split)} for e in job.evaluations
            ],
        }
    manifest = {
        "protocol": sweep.protocol,
        "recipe": sweep.recipe,
        "overrides": sweep.overrides,
        "datasets": sweep.datasets,
        "seeds": sweep.seeds,
        "shots": sweep.shots,
        "targets": sweep.targets,
        "promptlab_version": __version__,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": sorted(runs.values(), key=lambda r: r["dir"]),
    }
    return atomic_write_json(path, manifest)


# ---------------------------------------------------------------------- running
def execute_job(job: Job) -> None:
    """Train (or resume) one run unless its metrics exist, then run its missing evaluations."""
    from promptlab import timing
    from promptlab.runner import ensure_data, eval_prompts, run

    timing.reset()
    run_dir = Path(job.run_dir)
    if not (run_dir / "metrics.json").is_file():
        cfg = load_recipe(job.recipe, job.overrides, check_paths=False)
        ensure_data(cfg)
        run(load_recipe(job.recipe, job.overrides, check_paths=True))
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun (gpus_per_job > 1) rank 0 alone evaluates, as it alone writes files
    for ev in job.evaluations:
        if not (run_dir / ev.result_file(job.split)).is_file():
            eval_prompts(run_dir, ev.overrides)


_EPOCH_LINE = re.compile(rb"\bepoch (\d+)/(\d+)\b")


def logged_epoch(run_dir: str | Path) -> int:
    """The last epoch a run's ``log.txt`` reports (``epoch e/E ...``, ``resumed ... at epoch e/E``); 0 if none."""
    path = Path(run_dir) / LOG_FILE
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 16384))
            found = _EPOCH_LINE.findall(f.read())
    except OSError:
        return 0
    return int(found[-1][0]) if found else 0


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class SweepProgress:
    """What a sweep shows while it runs: a line when a job starts and ends, and one progress line.

    The progress line (jobs done / N, each running job's epoch read from its ``log.txt``, ETA) is
    redrawn in place on a terminal; to a pipe or a file it is a plain line every ``every`` seconds,
    with no escape sequences. Per-run detail stays in each run's ``log.txt`` and ``sweep_job.log``.
    The ETA assumes the remaining epochs take as long as the ones done in this invocation (one
    extra unit per job stands for its setup and evaluations).
    """

    def __init__(self, statuses: Sequence[tuple[Job, str]], stream: Any = None, every: float = 60.0):
        self.stream = sys.stderr if stream is None else stream
        self.tty = is_terminal(self.stream)
        self.every = 1.0 if self.tty else every
        self.jobs = [j for j, _ in statuses]
        self.index = {j.run_dir: i for i, j in enumerate(self.jobs, 1)}
        # epochs already done when the sweep starts (a resumed run; an evaluation-only run: all of them)
        self.first = {
            j.run_dir: j.epochs if st == "evaluate" else logged_epoch(j.run_dir) for j, st in statuses
        }
        self.total = sum(j.epochs - self.first[j.run_dir] + 1 for j in self.jobs)
        self.running: dict[str, float] = {}  # run_dir -> start time
        self.done: dict[str, bool] = {}  # run_dir -> ok
        self.took: dict[str, float] = {}  # run_dir -> wall seconds of its job (process start to exit)
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False

    def __enter__(self) -> SweepProgress:
        self._thread = threading.Thread(target=self._loop, name="sweep-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self.lock:
            if self._shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            with self.lock:
                self._write(self.line(), status=True)

    def _write(self, text: str, status: bool = False) -> None:
        if (
            self.tty
        ):  # one line redrawn in place (cut to the width: a wrapped line cannot be); messages above it
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r\x1b[K" + (text[:width] if status else text + "\n"))
            self._shown = status
            if not status and self.running:
                self.stream.write(self.line()[:width])
                self._shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _label(self, job: Job) -> str:
        return (
            f"job {self.index[job.run_dir]}/{len(self.jobs)} {job.dataset} shots={job.shots} seed={job.seed}"
        )

    def started(self, job: Job, status: str) -> None:
        with self.lock:
            self.running[job.run_dir] = time.monotonic()
            what = "evaluate" if status == "evaluate" else f"{status}, {job.epochs} epochs"
            self._write(f"{self._label(job)}: start ({what}); log: {Path(job.run_dir) / LOG_FILE}")

    def finished(self, job: Job, ok: bool, detail: str = "") -> None:
        with self.lock:
            took = time.monotonic() - self.running.pop(job.run_dir, time.monotonic())
            self.done[job.run_dir] = ok
            self.took[job.run_dir] = took
            self._write(f"{self._label(job)}: {'done' if ok else 'FAILED'} in {_duration(took)}{detail}")

    def line(self) -> str:
        """``sweep 2/6 done | job 3/6 dtd shots=16 seed=3 epoch 45/200 | elapsed 4m10s, ETA 9m30s``."""
        work = sum(self.jobs[self.index[d] - 1].epochs - self.first[d] + 1 for d in self.done)
        parts = [
            f"sweep {len(self.done)}/{len(self.jobs)} done"
            + (f" ({sum(not ok for ok in self.done.values())} failed)" if not all(self.done.values()) else "")
        ]
        for d in self.running:
            job = self.jobs[self.index[d] - 1]
            epoch = logged_epoch(d)
            work += max(0, epoch - self.first[d])
            parts.append(f"{self._label(job)} epoch {epoch}/{job.epochs}")
        elapsed = time.monotonic() - self.t0
        eta = _duration(elapsed * (self.total - work) / work) if work > 0 else "?"
        parts.append(f"elapsed {_duration(elapsed)}, ETA {eta}")
        return " | ".join(parts)


class JobProcess(Protocol):
    """A started job process, as :func:`start_job` returns it (``subprocess.Popen``'s interface)."""

    def wait(self, timeout: float | None = None) -> int: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class _ForkedJob:
    """A job process forked from the forkserver, behind ``subprocess.Popen``'s ``wait``/``terminate``/``kill``."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        self.process = process

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(str(self.process.name), timeout or 0.0)
        return self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()

    def kill(self) -> None:
        self.process.kill()


def _forkserver() -> multiprocessing.context.BaseContext | None:
    """The forkserver context job processes are forked from (imports :data:`PRELOAD` when it starts),
    or None: ``PROMPTLAB_JOB_START=exec``, or a platform without forkserver (Windows)."""
    if os.environ.get("PROMPTLAB_JOB_START", "forkserver") == "exec":
        return None
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def start_job(job_file: Path, log_file: Path, env: dict[str, str]) -> JobProcess:
    """Start the process of one job (:func:`execute_job` on ``job_file``), its output appended to
    ``log_file``, with exactly the environment ``env`` (its GPU, its thread count)."""
    ctx = _forkserver()
    if ctx is None:
        with open(log_file, "ab") as logf:
            return subprocess.Popen(
                [sys.executable, "-m", "promptlab.sweep", str(job_file)],
                env=env,
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
    process = ctx.Process(
        target=_forked_job_main, args=(str(job_file), str(log_file), env), name=str(job_file)
    )
    process.start()
    return _ForkedJob(process)


def _forked_job_main(job_file: str, log_file: str, env: dict[str, str]) -> None:
    """A forked job process: what an exec'd one gets from its command line (environment, output to
    the job log, torch threads, since OMP_NUM_THREADS was read when the forkserver imported torch),
    then the job. An exception is printed to the job log and exits with 1."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if env.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    code = _job_main([job_file])
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        sys.exit(code)


class _Launcher:
    """Runs jobs as child processes (:func:`start_job`), each with its device slot; stops them all on Ctrl-C."""

    def __init__(self, slots: list[str | None], on_start: Any = None, threads: int | None = None):
        self.on_start = on_start  # called with the job when its process starts
        self.threads = threads  # OMP_NUM_THREADS of each job process (None: inherit)
        self.slots: queue.Queue[str | None] = queue.Queue()
        for s in slots:
            self.slots.put(s)
        self.running: set[JobProcess] = set()
        self.lock = threading.Lock()
        self.stopping = False

    def __call__(self, job: Job) -> int:
        device = self.slots.get()
        try:
            run_dir = Path(job.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / JOB_FILE).write_text(json.dumps(job.to_json(), indent=2))
            env = dict(os.environ)
            if device is not None:
                env["CUDA_VISIBLE_DEVICES"] = device
            if self.threads is not None:
                env.setdefault("OMP_NUM_THREADS", str(self.threads))
            with self.lock:
                if self.stopping:
                    return -1
                proc = start_job(run_dir / JOB_FILE, run_dir / JOB_LOG, env)
                self.running.add(proc)
            if self.on_start is not None:
                self.on_start(job)
            rc = proc.wait()
            with self.lock:
                self.running.discard(proc)
            return rc
        finally:
            self.slots.put(device)

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            for proc in self.running:
                proc.terminate()
        for proc in list(self.running):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def device_slots(jobs: int | None, devices: Sequence[str] | None) -> list[str | None]:
    """One entry per parallel job: the CUDA_VISIBLE_DEVICES value it gets (None: inherit).

    ``--devices 0,1`` alone gives one job per device; ``--jobs 4 --devices 0,1`` two per device.
    """
    devices = list(devices or [])
    n = jobs if jobs is not None else max(len(devices), 1)
    if n < 1:
        raise ValueError(f"--jobs must be at least 1, got {n}")
    return [devices[i % len(devices)] if devices else None for i in range(n)]


def cpu_threads(slots: Sequence[str | None]) -> int | None:
    """Torch threads per job process when several share this machine's CPU cores (no GPU ids): an equal
    share of the cores (at least 1); None for one job, or jobs on GPUs (they keep torch's default)."""
    if len(slots) < 2 or any(s is not None for s in slots):
        return None
    return max(1, (os.cpu_count() or 1) // len(slots))


@dataclass
class SweepResult:
    """What one invocation did, job by job (status before running: done / evaluate / resume / new)."""

    statuses: list[tuple[Job, str]]
    failed: list[Job] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # run_dir -> wall seconds of the jobs that ran

    @property
    def ran(self) -> list[Job]:
        return [j for j, s in self.statuses if s != "done"]


def run_sweep(
    sweep: Sweep | Sequence[Sweep],
    *,
    jobs: int | None = None,
    devices: Sequence[str] | None = None,
    in_process: bool = False,
    dry_run: bool = False,
    progress_every: float = 60.0,
) -> SweepResult:
    """Run every unfinished job of ``sweep``; finished ones are skipped, interrupted ones resumed.

    Args:
        sweep: from :func:`plan_sweep`, or several (the sweeps of several recipes): their jobs share the
            ``jobs`` slots, so that one recipe's last seed does not leave a slot idle.
        jobs: how many runs side by side (one process each, see :func:`start_job`: as with
            ``multiprocessing``, a script calling this needs an ``if __name__ == "__main__":`` guard,
            since each job process imports the script's main module); default one per device, or 1. Without
            devices, each of N parallel jobs gets a 1/N share of the CPU cores as its torch threads
            (``OMP_NUM_THREADS``, unless set): more threads than cores cost more than they give.
        devices: GPU ids; each job process sees one of them as its only GPU.
        in_process: run the jobs one after another in this process (debugging, tests).
        dry_run: only report what would run.
        progress_every: seconds between progress lines when stderr is not a terminal (see
            :class:`SweepProgress`).

    Raises:
        ConfigError: a run directory holds a run of a different configuration.
    """
    sweeps = [sweep] if isinstance(sweep, Sweep) else list(sweep)
    statuses = [(job, job.status()) for sw in sweeps for job in sw.jobs]
    result = SweepResult(statuses)
    for job, status in statuses:
        conflicts = config_conflicts(job) if status != "new" else []
        if conflicts:
            raise ConfigError(
                f"{job.run_dir} holds a run of a different configuration ({'; '.join(conflicts)}); "
                "delete it or sweep into another --out"
            )
    if dry_run:
        return result
    with contextlib.ExitStack() as locks:
        for sw in sweeps:  # a second sweep over these outputs refuses instead of rerunning
            locks.enter_context(rundir.lock_dir(sw.out, "sweep"))
        return _run_jobs(sweeps, result, jobs, devices, in_process, progress_every)


def _run_jobs(
    sweeps: Sequence[Sweep],
    result: SweepResult,
    jobs: int | None,
    devices: Sequence[str] | None,
    in_process: bool,
    progress_every: float,
) -> SweepResult:
    statuses = result.statuses
    for sweep in sweeps:
        write_manifest(sweep)
    todo = [(job, status) for job, status in statuses if status != "done"]
    where = ", ".join(f"{sw.out} ({sw.protocol})" for sw in sweeps)
    log.info("sweep %s: %d runs, %d to do", where, len(statuses), len(todo))
    with SweepProgress(todo, every=progress_every) as shown:
        result.seconds = shown.took
        if in_process:
            for job, status in todo:
                shown.started(job, status)
                execute_job(job)
                shown.finished(job, True)
            return result
        status_of = dict((job.run_dir, status) for job, status in todo)
        slots = device_slots(jobs, devices)
        launcher = _Launcher(
            slots, lambda job: shown.started(job, status_of[job.run_dir]), threads=cpu_threads(slots)
        )
        pool = ThreadPoolExecutor(max_workers=launcher.slots.qsize())
        try:
            futures = {pool.submit(launcher, job): job for job, _ in todo}
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    rc = fut.result()
                except OSError as e:  # the job could not even start (disk full, permissions)
                    log.error("cannot start %s: %s", job.run_dir, e)
                    rc = -1
                ok = rc == 0 and job.status() == "done"
                shown.finished(job, ok, "" if ok else f" (exit {rc}; see {Path(job.run_dir) / JOB_LOG})")
                if not ok:
                    result.failed.append(job)
        except KeyboardInterrupt:
            log.warning("interrupted: stopping the running jobs; run the same command again to resume")
            launcher.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    order = {job.run_dir: i for i, (job, _) in enumerate(todo)}
    result.failed.sort(key=lambda job: order[job.run_dir])  # plan order, whichever finished first
    return result


def format_plan(result: SweepResult) -> str:
    """The dry-run listing: one line per run with its status, epochs and directory."""
    lines = [f"{'status':9} {'dataset':16} {'shots':>5} {'seed':>4} {'epochs':>6}  run directory"]
    for job, status in result.statuses:
        lines.append(
            f"{status:9} {job.dataset:16} {job.shots:5d} {job.seed:4d} {job.epochs:6d}  {job.run_dir}"
        )
    counts = {
        s: sum(1 for _, st in result.statuses if st == s) for s in ("new", "resume", "evaluate", "done")
    }
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def profile_table(
    jobs: Sequence[Job], seconds: dict[str, float], extra: dict[str, float] | None = None
) -> str:
    """Where the jobs' time went, per recipe and phase (``--profile``), from what each run recorded.

    Each run's ``metrics.json`` and evaluation files hold exclusive seconds per phase (``timing_s``,
    :mod:`promptlab.timing`): ``data`` (generation, few-shot draws), ``setup`` (backbone, method),
    ``features`` (image features: encoded on a cache miss, read on a hit), ``train``, ``eval``. A job's
    wall time (``seconds``, measured by the sweep) beyond them is ``startup`` (the job process, imports,
    writing results). ``extra``: phases outside the jobs (the comparison report), listed after the table.
    """
    from promptlab.timing import PHASES

    cols = ("startup", *PHASES)
    rows: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for job in jobs:
        d = Path(job.run_dir)
        records = [d / "metrics.json", *(d / e.result_file(job.split) for e in job.evaluations)]
        phases: dict[str, float] = {}
        for path in records:
            try:
                for k, v in json.loads(path.read_text()).get("timing_s", {}).items():
                    phases[k] = phases.get(k, 0.0) + float(v)
            except (OSError, ValueError):
                continue
        wall = seconds.get(job.run_dir)
        if wall is None:  # not run by this invocation: its phases only
            wall = sum(phases.values())
        phases["startup"] = max(0.0, wall - sum(phases.values()))
        name = Path(job.recipe).stem
        row = rows.setdefault(name, dict.fromkeys(cols, 0.0))
        for k, v in phases.items():
            row[k if k in row else "startup"] += v
        counts[name] = counts.get(name, 0) + 1
    total = {c: sum(r[c] for r in rows.values()) for c in cols}
    width = max([len(n) for n in rows] + [6])
    head = f"{'recipe':{width}} {'runs':>4} " + " ".join(f"{c:>8}" for c in cols) + f" {'total':>8}"
    lines = [
        "seconds per phase, summed over each recipe's runs (job wall time; parallel jobs overlap):",
        head,
    ]
    for name, row in [*rows.items(), ("all", total)]:
        n = counts.get(name, sum(counts.values()))
        cells = " ".join(f"{row[c]:8.1f}" for c in cols)
        lines.append(f"{name:{width}} {n:4d} {cells} {sum(row.values()):8.1f}")
    all_s = sum(total.values()) or 1.0
    lines.append("share: " + ", ".join(f"{c} {100 * total[c] / all_s:.0f}%" for c in cols))
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v:.1f} s")
    return "\n".join(lines)


def _job_main(argv: Sequence[str]) -> int:
    """Entry point of a job process: ``python -m promptlab.sweep RUN_DIR/sweep_job.json``."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    job = Job.from_json(json.loads(Path(argv[0]).read_text()))
    execute_job(job)
    return 0


if __name__ == "__main__":
    sys.exit(_job_main(sys.argv[1:]))
