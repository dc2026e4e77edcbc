"""The 2023-24 baselines (ProGrad, TCP, PromptSRC) run their base-to-new recipes end to end, through
``promptlab run`` + ``promptlab eval`` and through ``promptlab sweep``, on fake copies of the 11 datasets'
on-disk layouts (tiny CLIP, one epoch). The default suite covers one dataset per method (each with a
``per_dataset`` entry of its recipe); the full 11 x 3 grid is marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptlab.cli import main
from promptlab.sweep import BENCHMARK_DATASETS, plan_sweep, run_sweep

#: recipe -> overrides that fit the tiny CLIP's 2-block towers (the recipes' depths are for 12 blocks)
RECIPES = {
    "base2new/prograd_vit_b16": [],
    "base2new/tcp_vit_b16": ["method.insert_layer=1"],
    "base2new/promptsrc_vit_b16": [
        "method.prompt_depth_text=2",
        "method.prompt_depth_vision=2",
        "train.batch_size=2",
    ],
}
FAST = {
    "base2new/prograd_vit_b16": "dtd",
    "base2new/tcp_vit_b16": "imagenet",
    "base2new/promptsrc_vit_b16": "fgvc_aircraft",
}


def _overrides(recipe: str, root: Path, tmp_path: Path) -> list[str]:
    return [
        f"data.root={root}",
        "shots=2",
        "model.arch=tiny",
        "model.pretrained=null",
        "train.epochs=1",
        "data.num_workers=0",
        f"cache_dir={tmp_path / 'cache'}",
        *RECIPES[recipe],
    ]


def _run_and_eval_new(recipe: str, name: str, tmp_path: Path, helpers) -> None:
    root = tmp_path / "data"
    root.mkdir()
    helpers.build_layout(root, name)
    out = tmp_path / "run"
    args = [*_overrides(recipe, root, tmp_path), f"data.name={name}", "seed=1", f"output_dir={out}"]
    assert main(["run", recipe, *args]) == 0
    base = json.loads((out / "metrics.json").read_text())
    assert base["dataset"] == name and base["n"] > 0 and base["subsample"] == "base"
    assert main(["eval", str(out), "subsample=new"]) == 0
    new = json.loads((out / f"eval_{name}_new_test.json").read_text())
    assert new["n"] > 0 and new["subsample"] == "new"


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_baseline_runs_and_evaluates_new_classes(recipe, tmp_path, helpers):
    _run_and_eval_new(recipe, FAST[recipe], tmp_path, helpers)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BENCHMARK_DATASETS))
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_baseline_on_every_layout(recipe, name, tmp_path, helpers):
    _run_and_eval_new(recipe, name, tmp_path, helpers)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_baseline_base2new_sweep(recipe, tmp_path, helpers):
    root = tmp_path / "data"
    root.mkdir()
    name = FAST[recipe]
    helpers.build_layout(root, name)
    args = ["protocol=base2new", f"datasets={name}", "seeds=1", *_overrides(recipe, root, tmp_path)]
    recipe_path = Path(__file__).resolve().parents[2] / "recipes" / f"{recipe}.yaml"
    sweep = plan_sweep(recipe_path, args, tmp_path / "sweep")
    result = run_sweep(sweep, in_process=True)
    assert [s for _, s in result.statuses] == ["new"]
    assert all(j.status() == "done" for j in sweep.jobs)
