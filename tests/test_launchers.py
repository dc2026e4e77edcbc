"""``promptlab sweep --launcher slurm`` without a cluster: the launcher section, the plan, the states.

The sweep on a real Slurm is tests/test_slurm.py (marked ``slurm``, run by CI after this suite).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import promptlab.launchers as launchers
from promptlab.cli import find_recipe, main
from promptlab.config import ConfigError, load_recipe
from promptlab.launchers import job_command, sbatch_parameters, sweep_states
from promptlab.rundir import config_conflicts
from promptlab.sweep import plan_sweep, write_manifest

RECIPE = "sandbox/coop_base2new"


def _plan(tmp_path: Path, *args: str):
    return plan_sweep(find_recipe(RECIPE), ["seeds=1,2", *args], tmp_path / "sweep")


def test_launcher_section_is_validated_like_the_recipe():
    path = find_recipe(RECIPE)
    with pytest.raises(ConfigError, match=r"launcher\.partitoin.*did you mean 'partition'"):
        load_recipe(path, ["launcher.partitoin=gpu"], check_paths=False)
    with pytest.raises(ConfigError, match=r"launcher\.mem.*a size such as"):
        load_recipe(path, ["launcher.mem=lots"], check_paths=False)
    with pytest.raises(ConfigError, match=r"launcher\.gpus_per_job"):
        load_recipe(path, ["launcher.gpus_per_job=-1"], check_paths=False)
    cfg = load_recipe(path, ["launcher.sbatch.qos=high", "launcher.mem=32G"], check_paths=False)
    assert cfg.launcher.sbatch == {"qos": "high"} and cfg.launcher.time == 60


def test_a_recipe_launcher_block_is_rejected_naming_the_unknown_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(find_recipe(RECIPE).read_text() + "launcher:\n  partition: gpu\n  gpu: 2\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: launcher\.gpu: unknown key 'gpu'"):
        load_recipe(recipe, check_paths=False)


def test_sbatch_parameters_from_the_recipe_per_dataset_and_the_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        find_recipe(RECIPE).read_text()
        + "launcher: {partition: gpu, time: 120, gpus_per_job: 1, cpus_per_job: 8, mem: 32G}\n"
        + "per_dataset:\n  sandbox_clean: {launcher: {time: 600, gpus_per_job: 4}}\n"
    )
    sweep = plan_sweep(recipe, ["datasets=sandbox_shapes,sandbox_clean", "seeds=1"], tmp_path / "s")
    params = {j.dataset: sbatch_parameters(j) for j in sweep.jobs}
    assert params["sandbox_shapes"] == {
        "job_name": "promptlab-sandbox_shapes-shots16-seed1",
        "time": 120,
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": 8,
        "partition": "gpu",
        "gpus_per_node": 1,
        "mem": "32G",
    }
    assert (params["sandbox_clean"]["time"], params["sandbox_clean"]["gpus_per_node"]) == (600, 4)
    # the command line wins over the recipe, extra sbatch options pass through
    args = ["--partition", "a100", "--time", "5", "--sbatch", "qos=high", "--sbatch", "exclusive"]
    ns = type("Args", (), {"partition": "a100", "time": 5, "gpus_per_job": None, "cpus_per_job": None})
    ns.mem, ns.sbatch = None, ["qos=high", "exclusive"]
    over = launchers.launcher_overrides(ns)
    assert over == [
        "launcher.partition=a100",
        "launcher.time=5",
        "launcher.sbatch.qos=high",
        "launcher.sbatch.exclusive=true",
    ]
    job = plan_sweep(recipe, ["datasets=sandbox_shapes", "seeds=1", *over], tmp_path / "s").jobs[0]
    flags = launchers.sbatch_flags(sbatch_parameters(job))
    assert "--partition=a100" in flags and "--time=5" in flags and "--qos=high" in flags
    assert flags.endswith("--exclusive")
    assert args  # the same options through the CLI: test_dry_run_shows_what_would_be_submitted


def test_dry_run_shows_what_would_be_submitted(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["sweep", RECIPE, "seeds=1", "--out", str(out), "--launcher", "slurm", "--dry-run"]
    assert main([*argv, "--time", "30", "--sbatch", "qos=high", "--mem", "8G"]) == 0
    text = capsys.readouterr().out
    assert "submit  sandbox_lamp" in text and "1 to submit, 0 still queued, 0 done" in text
    assert "--time=30" in text and "--mem=8G" in text and "--qos=high" in text
    assert not out.exists()  # nothing written, nothing submitted
    assert main([*argv, "--mem", "8 gigabytes"]) == 2  # validated like the recipe's launcher: section
    assert "launcher.mem" in capsys.readouterr().err


def test_launcher_dry_run_and_help_import_no_model_library_nor_submitit(tmp_path):
    probe = (
        "import sys, contextlib, io\nfrom promptlab.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['sweep', '{RECIPE}', 'seeds=1', '--launcher', 'slurm', '--dry-run', '--out', 's']) == 0\n"
        "print(sorted(m for m in ('submitit', 'torch', 'open_clip', 'torchvision') if m in sys.modules))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_a_launcher_change_is_not_another_configuration(tmp_path):
    path = find_recipe(RECIPE)
    saved = tmp_path / "config.yaml"
    from omegaconf import OmegaConf

    saved.write_text(OmegaConf.to_yaml(load_recipe(path, ["launcher.time=10"], check_paths=False)))
    assert (
        config_conflicts(
            saved, load_recipe(path, ["launcher.time=600", "launcher.partition=big"], check_paths=False)
        )
        == []
    )
    assert config_conflicts(saved, load_recipe(path, ["seed=2"], check_paths=False)) == ["seed: 1 -> 2"]


def test_gpus_per_job_above_one_runs_torchrun():
    assert job_command("j.json", 0) == [sys.executable, "-m", "promptlab.sweep", "j.json"]
    assert job_command("j.json", 1) == [sys.executable, "-m", "promptlab.sweep", "j.json"]
    assert job_command("j.json", 4) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        "-m",
        "promptlab.sweep",
        "j.json",
    ]


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")


def test_states_from_run_folders_and_slurm(tmp_path, monkeypatch, capsys):
    """done from the folder; pending / running / failed from the last job's Slurm state; never submitted."""
    sweep = _plan(tmp_path, "datasets=sandbox_shapes,sandbox_clean", "seeds=1,2,3")
    write_manifest(sweep)
    runs = [Path(j.run_dir) for j in sweep.jobs]  # 6 runs
    rel = [r.relative_to(sweep.out).as_posix() for r in runs]
    for f in ("metrics.json", "eval_sandbox_shapes_new_test.json"):
        _touch(runs[0] / f)  # done, whatever Slurm says about its job
    _touch(runs[1] / "metrics.json")  # trained, evaluation missing, its job gone: failed
    _touch(runs[5] / "checkpoints" / "last.pt")  # interrupted, never submitted
    manifest = json.loads((sweep.out / "sweep.json").read_text())
    ids = {0: ["7"], 1: ["8"], 2: ["3", "9"], 3: ["10"]}
    for r in manifest["runs"]:
        r["slurm_jobs"] = ids.get(rel.index(r["dir"]), [])
    (sweep.out / "sweep.json").write_text(json.dumps(manifest))
    seen = []
    fake = {"7": "COMPLETED", "9": "RUNNING", "10": "PENDING", "3": "CANCELLED"}
    monkeypatch.setattr(launchers, "slurm_states", lambda jobs: seen.append(sorted(jobs)) or fake)
    states = {r.dir: (r.state, r.job_id, r.slurm_state) for r in sweep_states(sweep.out)}
    assert seen == [["10", "7", "8", "9"]]  # the last job of each run, asked once
    assert [states[d] for d in rel] == [
        ("done", "7", "COMPLETED"),
        ("failed", "8", None),
        ("running", "9", "RUNNING"),
        ("pending", "10", "PENDING"),
        ("not submitted", None, None),
        ("interrupted", None, None),
    ]
    # write_manifest (a re-run of the sweep) keeps the job ids
    write_manifest(sweep)
    assert [r.get("slurm_jobs") for r in json.loads((sweep.out / "sweep.json").read_text())["runs"]] == [
        r["slurm_jobs"] for r in manifest["runs"]
    ]
    # the CLI table and the re-run plan: the running and pending runs are left alone
    assert main(["sweep", "--status", str(sweep.out)]) == 0
    text = capsys.readouterr().out
    assert "1 done, 1 running, 1 pending, 1 failed, 1 interrupted, 1 not submitted" in text
    plan = {
        Path(j.run_dir).relative_to(sweep.out).as_posix(): a for j, a, _ in launchers.plan_submissions(sweep)
    }
    assert [plan[d] for d in rel] == ["skip", "submit", "queued", "queued", "submit", "submit"]


def test_sweep_needs_a_recipe_or_status_and_slurm_needs_sbatch(tmp_path, monkeypatch, capsys):
    assert main(["sweep"]) == 2 and "give a RECIPE" in capsys.readouterr().err
    assert (
        main(["sweep", "--status", str(tmp_path)]) == 2 and "not a sweep directory" in capsys.readouterr().err
    )
    monkeypatch.setattr(launchers.shutil, "which", lambda name: None)
    argv = ["sweep", RECIPE, "seeds=1", "--out", str(tmp_path / "s"), "--launcher", "slurm"]
    assert main(argv) == 2 and "sbatch not found" in capsys.readouterr().err


def test_submitit_requeues_the_same_job_on_its_preemption_signal():
    """submitit calls ``checkpoint`` on SIGUSR2 (pre-emption / time limit) and requeues what it returns."""
    from submitit.helpers import DelayedSubmission

    from promptlab.launchers import SlurmRun

    again = SlurmRun("/runs/x/seed1", 4).checkpoint()
    assert isinstance(again, DelayedSubmission) and isinstance(again.function, SlurmRun)
    assert (again.function.run_dir, again.function.gpus, again.args, again.kwargs) == (
        "/runs/x/seed1",
        4,
        (),
        {},
    )
