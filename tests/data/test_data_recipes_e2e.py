"""A recipe runs end to end with data.name=<any of the 11> on a fake copy of its on-disk layout."""

from __future__ import annotations

import json

import pytest

from promptlab.cli import main
from promptlab.sweep import BENCHMARK_DATASETS

ELEVEN = list(BENCHMARK_DATASETS)  # the 11 datasets of the few-shot and base-to-new protocols


@pytest.mark.parametrize("name", ELEVEN)
def test_fewshot_recipe_runs_on_fake_layout(name, tmp_path, helpers):
    root = tmp_path / "data"
    root.mkdir()
    helpers.build_layout(root, name)
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "fewshot/coop_vit_b16",
            f"data.root={root}",
            f"data.name={name}",
            "shots=2",
            "seed=1",
            "model.arch=tiny",
            "model.pretrained=null",
            "method.n_ctx=2",
            "train.epochs=1",
            "train.epochs_by_shots={}",
            "train.aug_views=1",
            "data.num_workers=0",
            f"output_dir={out}",
            f"cache_dir={tmp_path / 'cache'}",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == name and metrics["n"] > 0 and metrics["split_hash"]
