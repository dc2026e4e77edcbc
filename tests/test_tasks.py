"""One runner and one engine for every task (issue 22): classification, video and anomaly detection run
through ``promptlab run`` and ``engine.train``, so anomaly runs get resume, the run-directory lock and
overwrite refusal like any run.

The sandbox video recipes run end to end in tests/test_sandbox_video.py, the sandbox anomaly recipe
in tests/test_sandbox_anomaly.py (both through ``promptlab run``); the classification one runs here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import promptlab.engine as engine
from promptlab.cli import main
from promptlab.config import ConfigError, load_recipe
from promptlab.resources import RECIPES_DIR
from promptlab.tasks import TASKS

SANDBOX = RECIPES_DIR / "sandbox"
TINY_ANOMALY = dict(train_good=1, test_good=2, test_defect=2)


def _anomaly_args(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    small = [
        f"anomaly.{d}.generator.{k}={v}" for d in ("train_data", "eval_data") for k, v in TINY_ANOMALY.items()
    ]
    return [
        str(SANDBOX / "anomalyclip.yaml"),
        f"anomaly.data_root={tmp_path / 'data'}",
        f"output_dir={out}",
        "device=cpu",
        "train.epochs=2",
        "eval.batch_size=64",
        *small,
        *extra,
    ]


def test_every_task_has_a_sandbox_recipe() -> None:
    tasks = {
        (yaml.safe_load(p.read_text()) or {}).get("task", "classification")
        for p in SANDBOX.glob("*.yaml")
        if (yaml.safe_load(p.read_text()) or {}).get("kind") != "pretrain"
    }
    assert tasks == set(TASKS)


def test_a_recipe_has_its_tasks_section_and_no_other(tmp_path: Path) -> None:
    base = yaml.safe_load((SANDBOX / "anomalyclip.yaml").read_text())
    cases = {
        "needs the 'anomaly' section": {k: v for k, v in base.items() if k != "anomaly"},
        "'data' section belongs to task 'classification'": {
            **base,
            "data": {"root": "x", "name": "synthetic"},
        },
    }
    for message, recipe in cases.items():
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        with pytest.raises(ConfigError, match=message):
            load_recipe(path, check_paths=False)


def test_a_classification_sandbox_recipe_runs_a_step(tmp_path: Path, one_thread) -> None:
    out = tmp_path / "run"
    args = [
        "run",
        str(SANDBOX / "coop_base2new.yaml"),
        "data.name=synthetic",
        f"cache_dir={tmp_path}",
        f"output_dir={out}",
        "device=cpu",
        "shots=2",
        "train.epochs=1",
        "train.aug_views=1",
    ]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "CoOp" and m["train"]["epochs"] == 1 and 0 <= m["accuracy"] <= 100


def test_an_anomaly_run_resumes_to_the_uninterrupted_result(tmp_path: Path, monkeypatch, one_thread) -> None:
    """Killed after its first checkpoint, an anomaly run resumes (``resume=true``) to the numbers of an
    uninterrupted run: the engine's checkpoints and RNG state, as for classification."""
    assert main(["run", *_anomaly_args(tmp_path, tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())

    real_save = engine.save_training_state

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # as a kill right after the first checkpoint

    monkeypatch.setattr(engine, "save_training_state", save_then_die)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        main(["run", *_anomaly_args(tmp_path, cut)])
    assert (cut / "checkpoints" / "last.pt").is_file() and not (cut / "metrics.json").exists()
    monkeypatch.setattr(engine, "save_training_state", real_save)

    assert main(["run", *_anomaly_args(tmp_path, cut)]) == 2  # a run is there: refused, kept
    assert main(["anomaly", "train", *_anomaly_args(tmp_path, cut), "--resume"]) == 0
    resumed = json.loads((cut / "metrics.json").read_text())
    assert resumed["train"]["resumed_from_epoch"] == 1 and full["train"]["resumed_from_epoch"] == 0
    assert resumed["mean"] == full["mean"] and resumed["categories"] == full["categories"]
    assert resumed["train"]["last_loss"] == full["train"]["last_loss"]
    prompts = json.loads((cut / "prompts" / "prompt_config.json").read_text())  # the one export format
    assert prompts["component"] == "promptlab.anomaly.method.AnomalyCLIP" and prompts["image_size"] == 48
    assert main(["export", str(cut), "--out", str(tmp_path / "again")]) == 0  # from the last checkpoint
    again = json.loads((tmp_path / "again" / "prompt_config.json").read_text())
    assert again["files"] == prompts["files"] and again["epoch"] == 2  # the same learned tensors
    assert main(["eval", str(cut)]) == 2  # classification's eval refuses it, naming `anomaly eval`


def test_the_constant_schedule_is_the_lr_after_its_warm_up() -> None:
    from promptlab.engine import make_schedule

    s = make_schedule("constant", base_lr=0.1, epochs=3, batches_per_epoch=4, warmup_epochs=1, warmup_lr=0.01)
    assert [s(k) for k in range(12)] == [0.01] * 4 + [0.1] * 8
    assert make_schedule("constant", base_lr=1e-3, epochs=15, batches_per_epoch=7)(100) == 1e-3


def test_a_sweep_of_an_anomaly_recipe_is_refused_clearly(capsys) -> None:
    assert main(["sweep", str(SANDBOX / "anomalyclip.yaml"), "--dry-run"]) == 2
    assert "task: anomaly" in capsys.readouterr().err
