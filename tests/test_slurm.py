"""``promptlab sweep --launcher slurm`` against a real one-node Slurm (``.ci/slurm-up.sh``), not a mock.

Marked ``slurm``: out of the default run; CI runs ``pytest -m slurm`` after the default suite. When
Slurm cannot be installed or started the tests fail with the script's reason (never skipped).

A 2-dataset x 2-seed sandbox sweep (4 shots, 30 short epochs) runs locally and on Slurm. On Slurm all
four jobs are first submitted held (``--sbatch hold``: pending, deterministically), then released;
each of two jobs is suspended as soon as its log passes epoch 2; then one is cancelled with
``scancel``, the other requeued by Slurm (as a pre-emption with PreemptMode=REQUEUE does) and resumed
by the engine. (submitit's own requeue on its pre-emption signal, SIGUSR2, runs the same callable
again: tests/test_launchers.py pins the hook; a signal to a 2-second CPU run cannot be timed reliably.) The next ``sweep`` call resubmits the
cancelled one only, which resumes; every result equals the local sweep's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from promptlab.cli import main
from promptlab.launchers import SlurmRun, sweep_states
from promptlab.sweep import logged_epoch

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "sandbox/coop_base2new"
GRID = [
    "datasets=sandbox_shapes,sandbox_clean",
    "seeds=1,2",
    "shots=4",
    "train.epochs=30",
    "train.aug_views=1",
]
DEADLINE = 300.0  # seconds any one wait may take before the test fails with what Slurm says


@pytest.fixture(scope="module")
def slurm():
    """Install (if missing) and start the one-node cluster; SLURM_CONF for this module's commands and jobs."""
    try:
        res = subprocess.run(
            [str(ROOT / ".ci" / "slurm-up.sh")], capture_output=True, text=True, timeout=1200
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"Slurm could not start: .ci/slurm-up.sh: {e}", pytrace=False)
    found = re.search(r"export SLURM_CONF=(\S+)", res.stdout)
    if res.returncode != 0 or not found:
        pytest.fail(
            f"Slurm could not start (.ci/slurm-up.sh exit {res.returncode}): {res.stderr.strip()[-3000:]}",
            pytrace=False,
        )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", found.group(1))
        mp.setenv("OMP_NUM_THREADS", "1")  # local and Slurm job processes alike (sbatch exports the env)
        yield found.group(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache_dir for the module: the sandbox data are generated once."""
    return tmp_path_factory.mktemp("cache")


def _slurm(*cmd: str) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=True, timeout=60).stdout


def _wait(what: str, ok, out: Path) -> None:
    t0 = time.monotonic()
    while not ok():
        if time.monotonic() - t0 > DEADLINE:
            states = "\n".join(
                f"{r.dir} {r.state} {r.slurm_state} epoch {r.epoch}" for r in sweep_states(out)
            )
            pytest.fail(f"timed out waiting for {what}; squeue:\n{_slurm('squeue', '-t', 'all')}\n{states}")
        time.sleep(0.1)


@pytest.fixture
def cancel_at_end():
    """Sweep dirs whose Slurm jobs are cancelled when the test ends (a failed test leaves none running)."""
    dirs: list[Path] = []
    yield dirs
    for out in dirs:
        if (out / "sweep.json").is_file():
            ids = [i for ids in _jobs(out).values() for i in ids]
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


def _jobs(out: Path) -> dict[str, list[str]]:
    return {r["dir"]: r.get("slurm_jobs", []) for r in json.loads((out / "sweep.json").read_text())["runs"]}


def _status(out: Path, capsys) -> dict[str, str]:
    """``promptlab sweep --status``: run dir -> its line."""
    capsys.readouterr()
    assert main(["sweep", "--status", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split()[-1]: line for line in lines[1:-1]}


def _results(run_dir: Path) -> tuple:
    m = json.loads((run_dir / "metrics.json").read_text())
    new = (
        json.loads((run_dir / "eval_sandbox_shapes_new_test.json").read_text())
        if "shapes" in str(run_dir)
        else json.loads((run_dir / "eval_sandbox_clean_new_test.json").read_text())
    )
    ctx = load_file(run_dir / "prompts" / "prompts.safetensors")["ctx"]
    return m["accuracy"], m["n"], new["accuracy"], ctx.tolist()


def test_slurm_sweep_equals_local_resumes_cancelled_and_preempted_jobs(
    slurm, tmp_path, capsys, cancel_at_end
):
    common = [*GRID, f"cache_dir={tmp_path / 'cache'}"]
    local, out = tmp_path / "local", tmp_path / "slurm"
    cancel_at_end.append(out)
    assert main(["sweep", RECIPE, *common, "--out", str(local), "--jobs", "2"]) == 0  # also makes the data
    capsys.readouterr()

    # 1. submitted held: pending, job ids in the manifest, the options in the sbatch files
    args = ["sweep", RECIPE, *common, "--out", str(out), "--launcher", "slurm", "--time", "30"]
    assert main([*args, "--sbatch", "hold"]) == 0
    jobs = _jobs(out)
    assert sorted(jobs) == sorted(p.relative_to(local).parent.as_posix() for p in local.rglob("metrics.json"))
    assert all(len(ids) == 1 for ids in jobs.values())
    ids = {d: i[0] for d, i in jobs.items()}
    script = (out / ".slurm" / ids[min(ids)] / f"{ids[min(ids)]}_submission.sh").read_text()
    assert (
        "#SBATCH --hold" in script and "#SBATCH --time=30" in script and "#SBATCH --cpus-per-task=1" in script
    )
    status = _status(out, capsys)
    assert all(status[d].split()[:3] == ["pending", ids[d], "PENDING"] for d in ids), status
    assert main([*args, "--dry-run"]) == 0  # a second call leaves queued jobs alone
    assert "0 to submit, 4 still queued, 0 done" in capsys.readouterr().out

    # 2. released; one job cancelled mid-run, another pre-empted mid-run (submitit requeues it)
    cancelled, preempted = sorted(ids)[:2]
    _slurm("scontrol", "release", ",".join(ids.values()))

    # Epochs take ~0.1 s here: each victim is suspended (SIGSTOP) as soon as its log passes epoch 2,
    # so that what follows happens mid-run whatever the machine's speed.
    victims = {cancelled, preempted}
    while victims:
        t0 = time.monotonic()
        for d in sorted(victims):
            if logged_epoch(out / d) >= 2 and (out / d / "checkpoints" / "last.pt").is_file():
                _slurm("scontrol", "suspend", ids[d])
                victims.discard(d)
        assert time.monotonic() - t0 < DEADLINE, f"{victims} never reached epoch 2"
        time.sleep(0.05)
    assert not any((out / d / "metrics.json").exists() for d in (cancelled, preempted))
    status = _status(out, capsys)
    assert status[cancelled].split()[:3] == ["pending", ids[cancelled], "SUSPENDED"], status
    _slurm("scancel", ids[cancelled])
    # pre-empted: Slurm requeues it (PreemptMode=REQUEUE does this); an admin requeue of a suspended job
    # comes back held, and Slurm delays any requeued job by 2 minutes: release it, start it now
    _slurm("scontrol", "requeue", ids[preempted])

    def requeued() -> bool:
        show = _slurm("scontrol", "show", "job", ids[preempted])
        return "Restarts=1" in show and "JobState=PENDING" in show

    _wait("the pre-empted job's requeue", requeued, out)
    _slurm("scontrol", "release", ids[preempted])
    _slurm("scontrol", "update", f"JobId={ids[preempted]}", "StartTime=now")
    # running: the requeued job's process takes seconds to start before it resumes
    _wait(
        "the requeued job to start",
        lambda: _slurm("squeue", "-h", "-o", "%T", "-j", ids[preempted]).strip() == "RUNNING",
        out,
    )
    assert _status(out, capsys)[preempted].split()[:3] == ["running", ids[preempted], "RUNNING"]
    _wait(
        "the jobs to end", lambda: not any(r.state in ("pending", "running") for r in sweep_states(out)), out
    )
    status = _status(out, capsys)
    assert status[cancelled].split()[:3] == ["failed", ids[cancelled], "CANCELLED"], status
    assert not (out / cancelled / "metrics.json").exists(), "the job ended before scancel"
    assert all(status[d].split()[0] == "done" for d in ids if d != cancelled), status
    assert _jobs(out)[preempted] == [ids[preempted]]  # requeued: the same job, run twice
    assert (out / preempted / "sweep_job.log").read_text().count(
        f"--- slurm job {ids[preempted]} starts"
    ) == 2

    # 3. the next call resubmits the cancelled run only; it resumes from its checkpoint
    assert main([*args, "--wait", "--progress-every", "1"]) == 0
    jobs = _jobs(out)
    assert len(jobs[cancelled]) == 2 and all(jobs[d] == [ids[d]] for d in ids if d != cancelled)
    assert all(line.split()[0] == "done" for line in _status(out, capsys).values())
    for d in (cancelled, preempted):
        resumed = json.loads((out / d / "metrics.json").read_text())["train"]["resumed_from_epoch"]
        assert resumed >= 2, (d, resumed)

    # 4. the same numbers as the local sweep, and the same report
    for d in ids:
        assert _results(out / d) == _results(local / d), d
    assert main(["report", str(out)]) == 0 and main(["report", str(local)]) == 0
    assert (out / "base2new.csv").read_text() == (local / "base2new.csv").read_text()


def test_more_than_one_gpu_per_job_trains_under_torchrun(slurm, cache, tmp_path, capsys):
    """``gpus_per_job=2``: what the Slurm job runs is torchrun with 2 processes (gloo on this CPU).

    Run here by the job's own callable (:class:`SlurmRun`): this Slurm node has no GPUs to request.
    """
    out = tmp_path / "ddp"
    args = [
        "datasets=sandbox_clean",
        "seeds=1",
        "shots=4",
        "train.epochs=2",
        "train.aug_views=1",
        "device=cpu",
    ]
    args += [f"cache_dir={cache}", "launcher.gpus_per_job=2"]
    assert main(["sweep", RECIPE, *args, "--out", str(out), "--launcher", "slurm", "--dry-run"]) == 0
    assert "--gpus-per-node=2" in capsys.readouterr().out
    from promptlab.cli import find_recipe
    from promptlab.sweep import JOB_FILE, plan_sweep

    job = plan_sweep(find_recipe(RECIPE), args, out).jobs[0]
    Path(job.run_dir).mkdir(parents=True)
    (Path(job.run_dir) / JOB_FILE).write_text(json.dumps(job.to_json()))
    SlurmRun(job.run_dir, 2)()
    m = json.loads((Path(job.run_dir) / "metrics.json").read_text())
    assert m["world_size"] == 2 and (Path(job.run_dir) / "eval_sandbox_clean_new_test.json").is_file()
    assert os.environ.get("RANK") is None
