"""The adapter and training-free methods run end to end through ``promptlab run`` and ``promptlab sweep
protocol=fewshot`` on fake copies of the 11 datasets' layouts, with their published recipes
(recipes/fewshot/<method>_vit_b16.yaml) cut down to the tiny CLIP."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from promptlab.backbones import load_clip
from promptlab.cli import main
from promptlab.export import load_prompts
from promptlab.resources import find_recipe
from promptlab.sweep import BENCHMARK_DATASETS, plan_sweep, run_sweep

ELEVEN = list(BENCHMARK_DATASETS)
#: recipe -> overrides that shrink it to a seconds-long run on the tiny CLIP
METHODS = {
    "linear_probe": ["method.search_steps=1", "method.max_iter=50"],
    "tip_adapter": ["method.views=2", "method.search_steps=[5,4]"],
    "tip_adapter_f": ["method.views=2", "method.search_steps=[5,4]", "train.epochs=2", "train.batch_size=4"],
    "gda": ["method.views=2"],
    "clip_adapter": ["train.epochs=2", "train.epochs_by_shots={}", "train.batch_size=4"],
    "clip_lora": ["train.steps_per_shot=2", "train.batch_size=4", "train.amp=fp32"],
}
TINY = ["model.arch=tiny", "model.pretrained=null", "model.precision=fp32", "data.num_workers=0"]


def _run(tmp_path: Path, method: str, name: str, helpers) -> dict:
    root = tmp_path / "data"
    root.mkdir()
    helpers.build_layout(root, name)
    out = tmp_path / "run"
    args = [f"data.root={root}", f"data.name={name}", "shots=2", "seed=1", f"output_dir={out}"]
    code = main(
        [
            "run",
            f"fewshot/{method}_vit_b16",
            *args,
            *TINY,
            *METHODS[method],
            f"cache_dir={tmp_path / 'cache'}",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == name and metrics["n"] > 0
    return metrics


# each layout runs one method, each method one or two layouts (the full product is marked slow)
PAIRS = [(m, d) for d, m in zip(ELEVEN, itertools.cycle(METHODS))]


@pytest.mark.parametrize(("method", "name"), PAIRS)
def test_method_runs_on_fake_layout(method, name, tmp_path, helpers):
    metrics = _run(tmp_path, method, name, helpers)
    fit = metrics["train"].get("fit")
    if method == "clip_lora":  # the step budget: 2 x shots iterations, not epochs
        assert metrics["train"]["max_steps"] == 4
    elif method != "clip_adapter":  # the training-free fit ran and recorded its search
        assert fit["val_split"] == ("train" if name == "imagenet" else "val")
    # the export loads back (fitted state included), onto a backbone of its own (CLIP-LoRA attaches to it)
    module = load_prompts(tmp_path / "run" / "prompts", load_clip("tiny"))
    assert type(module).__name__ == metrics["method"]
    assert main(["eval", str(tmp_path / "run")]) == 0  # and evaluates to the run's own accuracy
    again = json.loads((tmp_path / "run" / f"eval_{name}_all_test.json").read_text())
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "name"), [p for p in itertools.product(METHODS, ELEVEN) if p not in PAIRS]
)
def test_method_runs_on_every_fake_layout(method, name, tmp_path, helpers):
    _run(tmp_path, method, name, helpers)


@pytest.mark.parametrize("method", list(METHODS))
def test_fewshot_sweep_of_each_method(method, tmp_path, helpers):
    root = tmp_path / "data"
    root.mkdir()
    helpers.build_layout(root, "dtd")
    args = ["datasets=dtd", "shots=1,2", "seeds=1", f"data.root={root}", f"cache_dir={tmp_path / 'cache'}"]
    recipe = find_recipe(f"fewshot/{method}_vit_b16")
    sweep = plan_sweep(recipe, [*args, *TINY, *METHODS[method]], tmp_path / "sweep")
    assert [j.shots for j in sweep.jobs] == [1, 2]
    result = run_sweep(sweep, in_process=True)
    assert len(result.ran) == 2
    for job in sweep.jobs:
        assert json.loads((Path(job.run_dir) / "metrics.json").read_text())["shots"] == job.shots


def test_gda_base2new_sweep_on_fake_layout(tmp_path, helpers):
    """recipes/base2new/gda_vit_b16 through ``promptlab sweep`` (protocol base2new): fitted on the base half,
    then ``promptlab eval subsample=new`` serves the new half from the exported, synthesised rows. The fake
    layout's 3 base classes x 2 shots x 2 views are fewer samples than the 64 neighbours: knn shrinks to 12."""
    root = tmp_path / "data"
    root.mkdir()
    helpers.build_layout(root, "dtd")
    args = ["protocol=base2new", "datasets=dtd", "seeds=1", f"data.root={root}", "shots=2"]
    args += [*TINY, "method.views=2", f"cache_dir={tmp_path / 'cache'}"]
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "base2new" / "gda_vit_b16.yaml"
    sweep = plan_sweep(recipe, args, tmp_path / "sweep")
    assert [s for _, s in run_sweep(sweep, in_process=True).statuses] == ["new"]
    run_dir = Path(sweep.jobs[0].run_dir)
    fit = json.loads((run_dir / "metrics.json").read_text())["train"]["fit"]
    assert fit["new_classes"] == {"n": 2, "knn": 12, "text_copies": 16, "center": "text"}
    new = json.loads((run_dir / "eval_dtd_new_test.json").read_text())
    assert new["subsample"] == "new" and new["n"] == 6  # classes 3 and 4, 3 test images each
