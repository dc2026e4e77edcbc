"""A run directory always describes one run: locks, refusals before anything is written, leftovers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promptlab.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo" / "coop_tiny.yaml"
OUTPUTS = ("config.yaml", "metrics.json", "log.txt", "checkpoints/last.pt", "prompts/prompts.safetensors")


def _args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["run", str(DEMO), f"output_dir={out}", f"cache_dir={cache}", "train.epochs=2", *extra]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in OUTPUTS}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A finished demo run (2 epochs); tests copy it before changing anything."""
    tmp = tmp_path_factory.mktemp("rundir")
    assert main(_args(tmp / "run", tmp / "cache")) == 0
    return tmp / "run", tmp / "cache"


@pytest.fixture()
def run_copy(finished, tmp_path) -> tuple[Path, Path]:
    run, cache = finished
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", cache


class _Holder:
    """Another process holding a directory's lock, as a second `promptlab run` or `sweep` would."""

    def __init__(self, directory: Path) -> None:
        code = (
            "import sys, time; from pathlib import Path; from promptlab.rundir import lock_dir; "
            "c = lock_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)"
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.proc.stdout.readline().strip() == "locked"

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def test_second_run_into_a_busy_directory_refuses(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    holder = _Holder(out)
    try:
        assert main(_args(out, tmp_path / "cache")) == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {holder.proc.pid}" in err
        assert not (out / "config.yaml").exists() and not (out / "log.txt").exists()
    finally:
        holder.kill9()
    # The killed holder's lock file is still there, with its pid: a stale lock, which must not block.
    assert str(holder.proc.pid) in (out / ".promptlab.lock").read_text()
    assert main(_args(out, tmp_path / "cache")) == 0


def test_second_sweep_over_one_output_refuses(tmp_path: Path) -> None:
    from promptlab.rundir import RunDirError
    from promptlab.sweep import plan_sweep, run_sweep

    out = tmp_path / "sweep"
    sweep = plan_sweep(
        DEMO,
        ["protocol=fewshot", "shots=1", "seeds=1", f"cache_dir={tmp_path / 'cache'}", "train.epochs=1"],
        out,
    )
    holder = _Holder(out)
    try:
        with pytest.raises(RunDirError, match="in use by another sweep"):
            run_sweep(sweep, in_process=True)
        assert not any(out.rglob("metrics.json"))
    finally:
        holder.kill9()


def test_finished_run_is_not_replaced_by_another_config(run_copy, capsys) -> None:
    """Issue 16: `run` refused nothing; a finished run's files were replaced and log.txt appended."""
    run, cache = run_copy
    before = _snapshot(run)
    assert main(_args(run, cache, "method.n_ctx=2")) == 2
    assert "already holds a finished run; pass --overwrite" in capsys.readouterr().err
    assert _snapshot(run) == before
    (run / "eval_synthetic_new_test.json").write_text("{}")  # an evaluation of the old prompts
    assert main([*_args(run, cache, "method.n_ctx=2", "method.ctx_init=null"), "--overwrite"]) == 0
    assert "n_ctx: 2" in (run / "config.yaml").read_text()
    assert not (run / "eval_synthetic_new_test.json").exists()  # it described the replaced run
    assert (run / "log.txt").read_text().count("epoch 2/2") == 1


def test_rejected_resume_keeps_the_run_consistent(run_copy, capsys) -> None:
    """Item 5: a resume with another n_ctx rewrote config.yaml first; `export` failed from then on."""
    run, cache = run_copy
    before = _snapshot(run)
    assert main(_args(run, cache, "resume=true", "method.n_ctx=2", "method.ctx_init=null")) == 2
    err = capsys.readouterr().err
    assert (
        "holds a finished run of a different configuration (method.ctx_init" in err and "method.n_ctx" in err
    )
    assert _snapshot(run) == before
    assert main(["export", str(run), "--out", str(run / "reexport")]) == 0


def test_resume_cleans_leftover_temporaries(run_copy) -> None:
    """Item 10: a kill mid-checkpoint leaves `.last.pt.<hex>.tmp`; the next start removes it."""
    run, cache = run_copy
    leftover = run / "checkpoints" / ".last.pt.0badc0de.tmp"
    leftover.write_bytes(b"half a checkpoint")
    unrelated = run / "checkpoints" / "notes.tmp"
    unrelated.write_text("mine")
    assert main(_args(run, cache, "resume=true")) == 0
    assert not leftover.exists() and unrelated.exists()


@pytest.mark.slow  # three runs and a fresh interpreter
def test_kill_9_then_resume_gives_the_uninterrupted_result(finished, tmp_path: Path) -> None:
    """A run killed with SIGKILL after its first checkpoint resumes (stale lock, leftovers and all) to the
    same accuracy and the same learned tensors as the uninterrupted run."""
    import json
    import time

    from safetensors.torch import load_file

    ref, cache = finished
    out = tmp_path / "run"
    args = _args(out, cache)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "promptlab.cli", *args, "train.feature_cache=false"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = out / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (out / "metrics.json").exists(), "killed too late to test a resume"
    (out / "checkpoints" / ".last.pt.0123abcd.tmp").write_bytes(b"torn write")  # as a kill mid-save leaves
    assert main([*_args(out, cache, "resume=true"), "train.feature_cache=false"]) == 0
    got = json.loads((out / "metrics.json").read_text())
    assert got["train"]["resumed_from_epoch"] >= 1
    # The reference trained on cached features; compare with an uninterrupted image-pipeline run instead.
    assert main([*_args(tmp_path / "whole", cache), "train.feature_cache=false"]) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert got["accuracy"] == whole["accuracy"]
    a = load_file(out / "prompts" / "prompts.safetensors")
    b = load_file(tmp_path / "whole" / "prompts" / "prompts.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.rglob("*.tmp")) and ref.exists()


def test_a_key_added_to_the_schema_since_is_the_same_run_at_its_default(tmp_path: Path) -> None:
    """A run directory written before ``train.steps_per_shot`` existed lacks it: at the default (0) it is
    the same run (a sweep may add seeds beside it); at another value it is a different one."""
    from omegaconf import OmegaConf

    from promptlab.config import load_recipe
    from promptlab.resources import find_recipe
    from promptlab.rundir import config_conflicts

    cfg = load_recipe(find_recipe("demo/coop_tiny"), check_paths=False)
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["train"]["steps_per_shot"]
    saved = tmp_path / "config.yaml"
    saved.write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    assert config_conflicts(saved, cfg) == []
    cfg.train.steps_per_shot = 5
    assert config_conflicts(saved, cfg) == ["train.steps_per_shot: None -> 5"]
