"""Sweeps of the tiny CLIP over two generated datasets x two seeds: plan, interrupt, resume, report."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import promptlab.engine
import promptlab.runner
from promptlab.cli import main
from promptlab.config import ConfigError, load_recipe
from promptlab.data import make_synthetic_dataset
from promptlab.report import harmonic_mean, write_report
from promptlab.sweep import Job, device_slots, execute_job, logged_epoch, plan_sweep, run_sweep

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo" / "coop_tiny.yaml"
DATASETS = {"shapes_a": (6, 0), "shapes_b": (4, 1)}  # name -> (classes, render seed)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two small generated datasets, declared by YAMLs in a private datasets folder."""
    tmp = tmp_path_factory.mktemp("sweep")
    yamls = tmp / "datasets"
    yamls.mkdir()
    for name, (n, seed) in DATASETS.items():
        make_synthetic_dataset(
            tmp / "data" / name, n_classes=n, train_per_class=4, val_per_class=1, test_per_class=3, seed=seed
        )
        (yamls / f"{name}.yaml").write_text(
            f"name: {name}\nreader: split_file\nfolder: {name}/synthetic\nimage_dir: images\n"
            "split_file: split_synthetic.json\ntemplate: 'a photo of a {}.'\n"
        )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROMPTLAB_DATASETS_DIR", str(yamls))  # child processes inherit it
        yield tmp


def _common(world: Path) -> list[str]:
    return [
        f"data.root={world / 'data'}",
        f"cache_dir={world / 'cache'}",
        "train.epochs=3",
        "train.aug_views=1",
    ]


def _acc(path: Path) -> float:
    return json.loads(path.read_text())["accuracy"]


def test_plan_grid_protocols_and_dirs(world, tmp_path):
    sweep = plan_sweep(
        RECIPE, ["protocol=base2new", "datasets=shapes_a,shapes_b", "seeds=1,2", *_common(world)], tmp_path
    )
    assert [(j.dataset, j.seed) for j in sweep.jobs] == [
        ("shapes_a", 1),
        ("shapes_a", 2),
        ("shapes_b", 1),
        ("shapes_b", 2),
    ]
    assert {j.run_dir for j in sweep.jobs} == {
        str(tmp_path / d / "shots4" / f"seed{s}") for d in DATASETS for s in (1, 2)
    }
    assert all(
        "subsample=base" in j.overrides and [e.subsample for e in j.evaluations] == ["new"]
        for j in sweep.jobs
    )
    # few-shot is the default for a recipe without subsample=base, with the per-shot epochs of the recipe
    fs = plan_sweep(
        RECIPE,
        ["datasets=shapes_b", "seeds=1", "shots=1,2", "train.epochs_by_shots={1: 2, 2: 5}", *_common(world)],
        tmp_path / "fs",
    )
    assert (
        fs.protocol == "fewshot"
        and [(j.shots, j.epochs) for j in fs.jobs] == [(1, 2), (2, 5)]
        and not fs.jobs[0].evaluations
    )
    xd = plan_sweep(
        RECIPE,
        [
            "protocol=crossdataset",
            "datasets=shapes_a",
            "targets=shapes_a,shapes_b",
            "seeds=1",
            *_common(world),
        ],
        tmp_path / "x",
    )
    assert [(e.name, e.subsample) for e in xd.jobs[0].evaluations] == [
        ("shapes_b", "all")
    ]  # the source is not a target
    with pytest.raises(KeyError, match="nope"):
        plan_sweep(RECIPE, ["datasets=nope", *_common(world)], tmp_path)
    with pytest.raises(ConfigError, match="protocol"):
        plan_sweep(RECIPE, ["protocol=zeroshot", *_common(world)], tmp_path)


def test_sweep_honours_the_recipes_per_dataset_section(world, tmp_path):
    """Each job of a sweep runs with its dataset's per-dataset values (planned and actually trained)."""
    recipe = OmegaConf.load(RECIPE)
    recipe.per_dataset = {"shapes_b": {"train": {"epochs": 2}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(OmegaConf.to_yaml(recipe))
    common = [c for c in _common(world) if not c.startswith("train.epochs=")]
    args = ["protocol=base2new", "datasets=shapes_a,shapes_b", "seeds=1", *common]
    sweep = plan_sweep(path, args, tmp_path / "sw")
    assert {j.dataset: j.epochs for j in sweep.jobs} == {"shapes_a": 5, "shapes_b": 2}
    job = next(j for j in sweep.jobs if j.dataset == "shapes_b")
    execute_job(job)
    assert json.loads((Path(job.run_dir) / "metrics.json").read_text())["train"]["epochs"] == 2


def test_base2new_sweep_interrupted_resumed_and_reported(world, tmp_path, monkeypatch):
    args = ["protocol=base2new", "datasets=shapes_a,shapes_b", "seeds=1,2", *_common(world)]
    out = tmp_path / "b2n"
    sweep = plan_sweep(RECIPE, args, out)
    victim = sweep.jobs[2]  # shapes_b seed 1: interrupted right after its epoch-2 checkpoint
    real_save = promptlab.engine.atomic_save_torch

    def save_then_interrupt(obj, path):
        real_save(obj, path)
        if str(path).startswith(victim.run_dir) and obj["epoch"] == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(promptlab.engine, "atomic_save_torch", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(sweep, in_process=True)
    assert [j.status() for j in plan_sweep(RECIPE, args, out).jobs] == ["done", "done", "resume", "new"]
    finished = {j.run_dir: (Path(j.run_dir) / "metrics.json").stat().st_mtime_ns for j in sweep.jobs[:2]}

    calls = []
    real_run = promptlab.runner.run
    monkeypatch.setattr(promptlab.runner, "run", lambda cfg: calls.append(cfg.output_dir) or real_run(cfg))
    result = run_sweep(plan_sweep(RECIPE, args, out), in_process=True)
    assert calls == [victim.run_dir, sweep.jobs[3].run_dir]  # finished runs skipped
    assert [s for _, s in result.statuses] == ["done", "done", "resume", "new"]
    assert {d: (Path(d) / "metrics.json").stat().st_mtime_ns for d in finished} == finished
    resumed = json.loads((Path(victim.run_dir) / "metrics.json").read_text())
    assert resumed["train"]["resumed_from_epoch"] == 2 and resumed["train"]["epochs"] == 3
    assert resumed["git_commit"] is None or len(resumed["git_commit"]) == 40
    assert all(j.status() == "done" for j in sweep.jobs)
    calls.clear()
    run_sweep(plan_sweep(RECIPE, args, out), in_process=True)
    assert calls == []  # everything done: nothing runs

    # the interrupted-and-resumed run ends exactly where an uninterrupted one does
    ref = plan_sweep(
        RECIPE, [*args[:1], "datasets=shapes_b", "seeds=1", *_common(world)], tmp_path / "ref"
    ).jobs[0]
    execute_job(ref)
    ctx = [
        load_file(Path(d) / "prompts" / "prompts.safetensors")["ctx"] for d in (victim.run_dir, ref.run_dir)
    ]
    assert torch.equal(ctx[0], ctx[1])
    for name in ("metrics.json", "eval_shapes_b_new_test.json"):
        assert _acc(Path(victim.run_dir) / name) == _acc(Path(ref.run_dir) / name)

    # the report: per-dataset mean ± std over seeds, HM of the averaged Base and New
    rep = write_report(out)
    rows = {r["dataset"]: r for r in rep.rows}
    bases, news = {}, {}
    for name in DATASETS:
        b = [_acc(out / name / "shots4" / f"seed{s}" / "metrics.json") for s in (1, 2)]
        n = [_acc(out / name / "shots4" / f"seed{s}" / f"eval_{name}_new_test.json") for s in (1, 2)]
        bases[name], news[name] = sum(b) / 2, sum(n) / 2
        assert rows[name]["base"] == pytest.approx(bases[name]) and rows[name]["new"] == pytest.approx(
            news[name]
        )
        assert rows[name]["base_std"] == pytest.approx(abs(b[0] - b[1]) / 2)  # population std of two values
        assert rows[name]["hm"] == pytest.approx(harmonic_mean(bases[name], news[name]))
    avg_b, avg_n = sum(bases.values()) / 2, sum(news.values()) / 2
    avg = rows["Average (2 datasets)"]
    assert (avg["base"], avg["new"]) == pytest.approx((avg_b, avg_n))
    assert avg["hm"] == pytest.approx(2 * avg_b * avg_n / (avg_b + avg_n))
    assert rep.plot.stat().st_size > 1000 and "| shapes_a | 1,2 |" in rep.markdown.read_text()
    assert "Published" not in rep.markdown.read_text()  # tiny CLIP: no published entry matches


def test_crossdataset_evaluates_the_source_prompts_on_each_target(world, tmp_path):
    out = tmp_path / "xd"
    sweep = plan_sweep(
        RECIPE,
        ["protocol=crossdataset", "datasets=shapes_a", "targets=shapes_b", "seeds=1", *_common(world)],
        out,
    )
    run_sweep(sweep, in_process=True)
    run_dir = Path(sweep.jobs[0].run_dir)
    target = json.loads((run_dir / "eval_shapes_b_all_test.json").read_text())
    assert target["n"] == 4 * 3 and target["subsample"] == "all"  # every test image of the 4 target classes
    rows = write_report(out).rows
    assert [r["role"] for r in rows] == ["source", "target", "average"]
    assert rows[1]["accuracy"] == pytest.approx(target["accuracy"]) == pytest.approx(rows[2]["accuracy"])
    assert rows[0]["accuracy"] == pytest.approx(_acc(run_dir / "metrics.json"))


def _fake_run(
    job: Job, *, metrics: bool, evals: bool = False, checkpoint: bool = False, **cfg_overrides
) -> None:
    d = Path(job.run_dir)
    d.mkdir(parents=True)
    cfg = load_recipe(
        job.recipe, [*job.overrides, *(f"{k}={v}" for k, v in cfg_overrides.items())], check_paths=False
    )
    OmegaConf.save(cfg, d / "config.yaml")
    if metrics:
        (d / "metrics.json").write_text("{}")
    for e in job.evaluations if evals else []:
        (d / e.result_file()).write_text("{}")
    if checkpoint:
        (d / "checkpoints").mkdir()
        (d / "checkpoints" / "last.pt").write_bytes(b"")


def test_dry_run_lists_statuses_and_runs_nothing(world, tmp_path, capsys):
    args = ["protocol=base2new", "datasets=shapes_a,shapes_b", "seeds=1,2", *_common(world)]
    jobs = plan_sweep(RECIPE, args, tmp_path).jobs
    _fake_run(jobs[0], metrics=True, evals=True)
    _fake_run(jobs[1], metrics=True)
    _fake_run(jobs[2], metrics=False, checkpoint=True)
    assert main(["sweep", str(RECIPE), *args, "--out", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[2:6]] == ["done", "evaluate", "resume", "new"]
    assert lines[-1] == "1 new, 1 resume, 1 evaluate, 1 done"
    assert not (Path(jobs[3].run_dir)).exists() and not (tmp_path / "sweep.json").exists()


def test_a_run_dir_of_another_config_is_never_resumed_into(world, tmp_path):
    args = ["datasets=shapes_a", "seeds=1", "shots=4", *_common(world)]
    job = plan_sweep(RECIPE, args, tmp_path).jobs[0]
    _fake_run(job, metrics=False, checkpoint=True, **{"train.epochs": 7})
    with pytest.raises(ConfigError, match=r"train\.epochs: 7 -> 3"):
        run_sweep(plan_sweep(RECIPE, args, tmp_path), dry_run=True)


def test_devices_and_jobs_give_parallel_processes_their_gpu(world, tmp_path, monkeypatch):
    """--jobs 2 --devices 0,1: two job processes at once, each with its own CUDA_VISIBLE_DEVICES."""
    assert device_slots(None, ["0", "1"]) == ["0", "1"] and device_slots(4, ["0", "1"]) == [
        "0",
        "1",
        "0",
        "1",
    ]
    assert device_slots(None, None) == [None] and device_slots(3, None) == [None] * 3
    together = threading.Barrier(2, timeout=30)
    seen = []

    class FakeProcess:  # stands in for a job process (start_job)
        def __init__(self, job_file, log_file, env):
            self.job = Job.from_json(json.loads(Path(job_file).read_text()))
            seen.append((self.job.seed, env.get("CUDA_VISIBLE_DEVICES")))

        def wait(self):
            together.wait()  # fails unless both jobs run at the same time
            (Path(self.job.run_dir) / "metrics.json").write_text("{}")
            for e in self.job.evaluations:
                (Path(self.job.run_dir) / e.result_file()).write_text("{}")
            return 0

    monkeypatch.setattr("promptlab.sweep.start_job", FakeProcess)
    sweep = plan_sweep(RECIPE, ["datasets=shapes_a", "seeds=1,2", "shots=4", *_common(world)], tmp_path)
    result = run_sweep(sweep, jobs=2, devices=["0", "1"])
    assert not result.failed and sorted(d for _, d in seen) == ["0", "1"]
    assert json.loads((tmp_path / "sweep.json").read_text())["protocol"] == "fewshot"


@pytest.mark.slow
def test_fewshot_sweep_in_job_processes_then_report(world, tmp_path, capsys):
    """The real thing through the CLI: each run in its own `python -m promptlab.sweep` process.

    Slow (each process imports torch and open_clip); the scheduling itself is tested above with
    stand-in processes.
    """
    out = tmp_path / "fs"
    args = [
        "sweep",
        str(RECIPE),
        "datasets=shapes_b",
        "seeds=1",
        "shots=1,2",
        "train.epochs_by_shots={1: 1, 2: 2}",
        *_common(world),
        "--out",
        str(out),
        "--jobs",
        "2",
    ]
    assert main(args) == 0, capsys.readouterr().err
    for k, epochs in ((1, 1), (2, 2)):
        m = json.loads((out / "shapes_b" / f"shots{k}" / "seed1" / "metrics.json").read_text())
        assert (m["shots"], m["train"]["epochs"], m["subsample"]) == (k, epochs, "all")
    assert main(["report", str(out)]) == 0
    report = capsys.readouterr().out
    assert "| shapes_b |" in report and "| Average |" in report
    assert (out / "fewshot.png").stat().st_size > 1000


@pytest.mark.slow  # 17-26 s on the shared 2-core CPU (two backbone loads); the fake-layout sweep covers it fast
def test_gda_sandbox_base2new_recipe_sweeps_and_reports(world, tmp_path, capsys):
    """``promptlab sweep sandbox/gda_base2new seeds=1``, the shipped recipe on the sandbox CLIP, with a generated
    dataset standing in for sandbox_shapes: fitted on the base half (no epochs), the new half served by the
    classifier synthesised from its text features, both halves in the report."""
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "sandbox" / "gda_base2new.yaml"
    out = tmp_path / "gda"
    args = ["datasets=shapes_a", "seeds=1", f"data.root={world / 'data'}", f"cache_dir={world / 'cache'}"]
    sweep = plan_sweep(recipe, args, out)
    assert [s for _, s in run_sweep(sweep, in_process=True).statuses] == ["new"]
    run_dir = out / "shapes_a" / "shots16" / "seed1"
    fit = json.loads((run_dir / "metrics.json").read_text())["train"]["fit"]
    assert fit["estimator"] == "class_mean" and fit["new_classes"]["n"] == 3  # 6 classes: 3 base, 3 new
    new = json.loads((run_dir / "eval_shapes_a_new_test.json").read_text())
    assert new["subsample"] == "new" and new["n"] == 9  # 3 new classes x 3 test images
    assert main(["report", str(out)]) == 0
    assert "| shapes_a | 1 |" in capsys.readouterr().out


def test_job_json_round_trip(world, tmp_path):
    job = plan_sweep(
        RECIPE, ["protocol=base2new", "datasets=shapes_a", "seeds=1", *_common(world)], tmp_path
    ).jobs[0]
    assert Job.from_json(json.loads(json.dumps(job.to_json()))) == job
    assert dataclasses.replace(job, seed=2) != job


def test_crossdataset_zero_shot_uses_the_target_template(world, tmp_path, monkeypatch):
    """Zero-shot prompts evaluated on another dataset take that dataset's template, not the source's."""
    yamls = tmp_path / "datasets"
    yamls.mkdir()
    for name, template in (
        ("shapes_a", "a photo of a {}."),
        ("shapes_d", "a blurry drawing of the {}, a shape."),
    ):
        (yamls / f"{name}.yaml").write_text(
            f"name: {name}\nreader: split_file\nfolder: shapes_a/synthetic\nimage_dir: images\n"
            f"split_file: split_synthetic.json\ntemplate: '{template}'\n"
        )
    monkeypatch.setenv("PROMPTLAB_DATASETS_DIR", str(yamls))
    zs = Path(__file__).resolve().parent.parent / "recipes" / "zeroshot" / "clip_vit_b16.yaml"
    common = [
        "model.arch=tiny",
        "model.pretrained=null",
        f"data.root={world / 'data'}",
        f"cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
    ]
    acc = {}
    for name in ("shapes_a", "shapes_d"):
        cfg = load_recipe(
            zs, [*common, f"data.name={name}", f"output_dir={tmp_path / name}"], check_paths=False
        )
        acc[name] = promptlab.runner.run(cfg)["accuracy"]
    assert acc["shapes_a"] != acc["shapes_d"], (
        "the two templates must give different classifiers for this test to bite"
    )
    cross = promptlab.runner.eval_prompts(tmp_path / "shapes_a", ["data.name=shapes_d"])
    assert cross["accuracy"] == pytest.approx(acc["shapes_d"])
    same = promptlab.runner.eval_prompts(tmp_path / "shapes_a", [])
    assert same["accuracy"] == pytest.approx(acc["shapes_a"])


def test_sweep_shows_job_lines_and_progress_without_escapes(world, tmp_path, monkeypatch, capsys):
    """To a pipe or file: `job i/N` start/done lines and plain progress lines (epoch, ETA), no escapes."""

    class FakeProcess:  # a job process that logs one epoch, as the engine does, then finishes
        def __init__(self, job_file, log_file, env):
            self.job = Job.from_json(json.loads(Path(job_file).read_text()))

        def wait(self):
            run_dir = Path(self.job.run_dir)
            (run_dir / "log.txt").write_text(
                "2026-01-01 INFO promptlab.engine: epoch 1/3  lr 0.002  loss 1\n"
            )
            time.sleep(0.5)  # the progress line (every 0.05 s) sees epoch 1/3
            (run_dir / "metrics.json").write_text("{}")
            for e in self.job.evaluations:
                (run_dir / e.result_file()).write_text("{}")
            return 0

    monkeypatch.setattr("promptlab.sweep.start_job", FakeProcess)
    sweep = plan_sweep(RECIPE, ["datasets=shapes_a", "seeds=1,2", "shots=4", *_common(world)], tmp_path)
    assert not run_sweep(sweep, progress_every=0.05).failed
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err
    for i, seed in ((1, 1), (2, 2)):
        label = f"job {i}/2 shapes_a shots=4 seed={seed}"
        assert f"{label}: start (new, 3 epochs)" in err and f"{label}: done in " in err
    assert "job 1/2 shapes_a shots=4 seed=1 epoch 1/3" in err and "ETA " in err
    assert "sweep 2/2 done" not in err.splitlines()[0]


def test_logged_epoch_reads_the_last_epoch_of_a_run_log(tmp_path):
    assert logged_epoch(tmp_path) == 0
    (tmp_path / "log.txt").write_text(
        "x INFO promptlab.engine: resumed from ck at epoch 4/10\nx INFO promptlab.engine: epoch 5/10  lr 1\n"
    )
    assert logged_epoch(tmp_path) == 5


def test_loops_off_a_terminal_draw_no_bars_and_log_plain_lines(monkeypatch, capsys, caplog):
    """tqdm written to a pipe leaves `\\r` and `ESC[A`; off a terminal a loop logs `desc: i/N` lines instead."""
    import logging

    from promptlab import runlog

    monkeypatch.setattr(runlog, "PLAIN_EVERY", 0.0)
    with caplog.at_level(logging.INFO, logger="promptlab.runlog"):
        assert list(runlog.progress(range(3), "epoch 1", leave=False)) == [0, 1, 2]
        assert list(runlog.progress(range(2), "epochs", plain_lines=False)) == [0, 1]
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err and "epoch 1" not in err
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "epoch 1: 1/3",
        "epoch 1: 2/3",
        "epoch 1: 3/3",
    ]


@pytest.mark.slow
def test_sweep_output_to_a_pipe_has_job_lines_and_no_escapes(world, tmp_path):
    """The real CLI, its output a pipe: job lines and progress lines, no escape sequences anywhere."""
    import subprocess
    import sys

    out = tmp_path / "piped"
    argv = [sys.executable, "-m", "promptlab.cli", "sweep", str(RECIPE), "datasets=shapes_b", "seeds=1,2"]
    argv += [
        "shots=1",
        "train.epochs_by_shots={1: 2}",
        *_common(world),
        "--out",
        str(out),
        "--progress-every",
        "1",
    ]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    text = res.stdout + res.stderr
    assert "\x1b" not in text and "\r" not in text
    assert "job 1/2 shapes_b shots=1 seed=1: start (new, 2 epochs)" in text and "job 2/2 " in text
    for seed in (1, 2):
        job_log = (out / "shapes_b" / "shots1" / f"seed{seed}" / "sweep_job.log").read_text()
        assert "\x1b" not in job_log and "\r" not in job_log and "epoch 2/2" in job_log


def test_recipe_patterns_name_the_sandbox_battery():
    from promptlab.resources import find_recipes

    names = [p.stem for p in find_recipes("sandbox/*_base2new")]
    assert {"coop_base2new", "cocoop_base2new", "kgcoop_base2new", "maple_base2new"} <= set(names)
    assert names == sorted(names) and not any("vificlip" in n or "anomaly" in n for n in names)
    assert [p.resolve() for p in find_recipes("demo/coop_tiny")] == [RECIPE.resolve()]
    with pytest.raises(FileNotFoundError, match="matches"):
        find_recipes("sandbox/*_nothing_like_this")


@pytest.mark.slow
def test_several_recipes_one_sweep_then_comparison_and_profile(world, tmp_path, capsys):
    """The battery's shape on the tiny CLIP: two recipes' jobs in one sweep, the comparison table, the profile."""
    zs = OmegaConf.load(RECIPE)
    zs.method = {"_component_": "promptlab.methods.ZeroShotCLIP", "templates": "dataset"}
    zs.train.epochs = 0
    zs_path = tmp_path / "zs_tiny.yaml"
    zs_path.write_text(OmegaConf.to_yaml(zs))
    out = tmp_path / "battery"
    args = ["sweep", str(RECIPE), str(zs_path), "protocol=base2new", "datasets=shapes_a", "seeds=1"]
    args += [*_common(world), "train.epochs=1", "--out", str(out), "--in-process", "--profile"]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    for name in ("coop_tiny-base2new", "zs_tiny-base2new"):
        run = out / name / "shapes_a" / "shots4" / "seed1"
        timing = json.loads((run / "metrics.json").read_text())["timing_s"]
        assert {"data", "setup", "features", "train", "eval"} == set(timing) and min(timing.values()) >= 0
        assert (timing["train"] > 0) == name.startswith("coop")  # zero-shot trains nothing
        assert "timing_s" in json.loads((run / "eval_shapes_a_new_test.json").read_text())
    comparison = (out / "comparison" / "comparison.md").read_text()
    assert "coop_tiny" in comparison and "zs_tiny" in comparison and comparison in printed
    profile = printed[printed.index("seconds per phase") :]
    rows = {line.split()[0]: line.split() for line in profile.splitlines()[2:5]}
    assert set(rows) == {"coop_tiny", "zs_tiny", "all"} and rows["all"][1] == "2"
    cols = profile.splitlines()[1].split()
    assert cols[2:] == ["startup", "data", "setup", "features", "train", "eval", "total"]
    assert float(rows["coop_tiny"][cols.index("train")]) > 0 == float(rows["zs_tiny"][cols.index("train")])
    assert "report:" in profile and "sweep wall time:" in profile


def test_a_forked_job_process_runs_exactly_the_in_process_run(world, tmp_path, monkeypatch, one_thread):
    """Job processes fork from a forkserver that imported torch and promptlab once: the job still gets its
    own environment (OMP_NUM_THREADS applied as torch threads), its log, and the numbers of a run in this
    process, bit for bit."""
    from safetensors.torch import load_file

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["protocol=base2new", "datasets=shapes_b", "seeds=1", *_common(world)]
    forked = plan_sweep(RECIPE, args, tmp_path / "forked")
    assert not run_sweep(forked, jobs=1).failed
    here = plan_sweep(RECIPE, args, tmp_path / "here")
    run_sweep(here, in_process=True)
    a, b = (Path(sw.jobs[0].run_dir) for sw in (forked, here))
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["torch_threads"] == mb["torch_threads"] == 1
    assert ma["accuracy"] == mb["accuracy"] and ma["train"]["last_loss"] == mb["train"]["last_loss"]
    new = forked.jobs[0].evaluations[0].result_file()
    assert json.loads((a / new).read_text())["accuracy"] == json.loads((b / new).read_text())["accuracy"]
    ta, tb = (load_file(str(next((d / "prompts").glob("*.safetensors")))) for d in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert "epoch 3/3" in (a / "sweep_job.log").read_text()  # the job's own output went to its log
