"""The sandbox's anomaly variant: renders, masks, the MVTec layout, first-use generation, the recipe."""

from __future__ import annotations

import hashlib
import inspect
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from promptlab.anomaly.data import AnomalyDataset, load_items
from promptlab.anomaly.method import resolve_feature_layers
from promptlab.cli import main
from promptlab.config import load_recipe
from promptlab.data.generated import PARAMS_FILE
from promptlab.sandbox.anomaly import (
    CATEGORIES,
    DEFECTS,
    SET_A,
    SET_B,
    make_anomaly_dataset,
    render_sample,
)
from promptlab.sandbox.world import BACKGROUNDS

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sandbox" / "anomalyclip.yaml"
TINY = dict(train_good=1, test_good=2, test_defect=2)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


# ------------------------------------------------------------------------------------------ renders
def test_render_is_deterministic_per_key() -> None:
    def draw(key: str, defect: str | None) -> bytes:
        img, mask, good = render_sample(CATEGORIES["blue_hexagon"], defect, random.Random(key))
        return img.tobytes() + mask.tobytes() + good.tobytes()

    for defect in (None, *DEFECTS):
        assert draw("k/1", defect) == draw("k/1", defect)
        assert draw("k/1", defect) != draw("k/2", defect)


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_masks_mark_exactly_what_the_defect_changed(category: str) -> None:
    """Mask empty exactly for good images; defect pixels differ from the defect-free twin; far pixels do not."""
    obj = CATEGORIES[category]
    for i in range(4):
        img, mask, good = render_sample(obj, None, random.Random(f"{category}/good/{i}"))
        assert mask.shape == (48, 48) and not mask.any() and img.tobytes() == good.tobytes()
        for defect in DEFECTS:
            img, mask, good = render_sample(obj, defect, random.Random(f"{category}/{defect}/{i}"))
            a, g = np.asarray(img, dtype=float), np.asarray(good, dtype=float)
            diff = np.abs(a - g).max(-1)  # [48, 48]
            assert mask.sum() >= 6
            assert diff[mask].mean() > 25, (category, defect, i)
            near = (
                np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(9))) > 0
            )
            assert diff[~near].max() == 0  # the anti-aliasing filter reaches < 4 px beyond the defect
            if defect == "hole":  # the background shows through
                bg = np.array(BACKGROUNDS[obj.background], dtype=float)
                assert np.abs(a[mask].mean(0) - bg).max() < 30


def test_defects_stay_marked_at_any_scale() -> None:
    """Labelled defective means a non-empty mask, even for defects smaller than half a pixel's coverage."""
    for scale in (0.1, 0.5, 2.0):
        sizes = []
        for defect in DEFECTS:
            img, mask, good = render_sample(
                CATEGORIES["green_square"], defect, random.Random(f"{scale}/{defect}"), defect_scale=scale
            )
            assert mask.any() and (np.asarray(img) != np.asarray(good))[mask].any()
            sizes.append(mask.sum())
        assert scale < 1 or min(sizes) >= 10


# ------------------------------------------------------------------------------------------ layout
def test_dataset_loads_through_the_mvtec_reader(tmp_path: Path) -> None:
    root = make_anomaly_dataset(tmp_path / "a", categories=SET_A[:2], **TINY)
    items = load_items("mvtec", root)
    assert sorted({it.category for it in items}) == sorted(SET_A[:2])
    assert len(items) == 2 * (2 + 2 * len(DEFECTS))
    assert {it.defect for it in items} == {"good", *DEFECTS}
    assert all((it.mask is not None) == bool(it.label) == (it.defect != "good") for it in items)
    ds = AnomalyDataset(items, 48)
    for i, it in enumerate(items):
        img, mask, label, _ = ds[i]
        assert img.shape == (3, 48, 48) and label == it.label
        assert (mask.sum() > 0) == bool(it.label)
    train = load_items("mvtec", root, split="train")
    assert len(train) == 2 and all(it.label == 0 for it in train)


def test_generation_is_deterministic_and_skipped_when_complete(tmp_path: Path) -> None:
    a = make_anomaly_dataset(tmp_path / "x", categories=SET_B[:2], **TINY)
    b = make_anomaly_dataset(tmp_path / "y", categories=SET_B[:2], **TINY)
    assert _digest(a) == _digest(b) and len(_digest(a)) == 2 * (1 + 2 + 2 * 2 * len(DEFECTS))
    params = (a / PARAMS_FILE).stat().st_mtime_ns
    make_anomaly_dataset(a, categories=SET_B[:2], **TINY)
    assert (a / PARAMS_FILE).stat().st_mtime_ns == params  # complete: nothing rewritten
    victim = next(a.rglob("*_mask.png"))
    victim.unlink()
    make_anomaly_dataset(a, categories=SET_B[:2], **TINY)
    assert victim.is_file() and _digest(a) == _digest(b)  # incomplete: written again, identically
    make_anomaly_dataset(a, categories=SET_B[:2], **{**TINY, "seed": 1})
    assert _digest(a) != _digest(b)  # other arguments: regenerated
    make_anomaly_dataset(a, categories=SET_B[:1], **TINY)
    assert sorted(it.category for it in load_items("mvtec", a)) == [SET_B[0]] * (
        2 + 2 * len(DEFECTS)
    )  # no stale files
    with pytest.raises(ValueError, match="unknown categories"):
        make_anomaly_dataset(tmp_path / "z", categories=["green_dodecahedron"])


# ------------------------------------------------------------------------------------------ recipe
def test_recipe_is_zero_shot_on_the_sandbox_clip() -> None:
    cfg = load_recipe(RECIPE, ["anomaly.data_root=/data"], check_paths=False)
    assert cfg.task == "anomaly" and cfg.model.arch == "sandbox" and cfg.anomaly.image_size == 48
    assert set(SET_A).isdisjoint(SET_B) and set(SET_A) | set(SET_B) == set(CATEGORIES)
    a = cfg.anomaly
    assert list(a.train_data.generator.categories) == list(SET_A)
    assert list(a.eval_data.generator.categories) == list(SET_B)  # evaluated on objects never trained on
    assert a.train_data.split == "test" and a.train_data.root != a.eval_data.root
    assert cfg.method.dpam_layers < 3 and cfg.method.deep_depth <= 2
    # the published recipes' configuration: the last block's map, map loss x 4
    assert resolve_feature_layers(cfg.method.feature_layers, 3) == [3] and cfg.method.map_loss_weight == 4
    allowed = set(inspect.signature(make_anomaly_dataset).parameters) - {"root"}
    for spec in (a.train_data, a.eval_data):  # a misspelt generator key would only fail at run time
        assert spec.generator._component_ == "promptlab.sandbox.anomaly.make_anomaly_dataset"
        assert set(spec.generator) - {"_component_"} <= allowed


@pytest.mark.parametrize(
    "command", [["anomaly", "train"], ["run"]]
)  # `promptlab anomaly train` is `promptlab run` of a `task: anomaly` recipe
def test_recipe_runs_end_to_end_and_generates_its_data(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: list[str]
) -> None:
    small = [f"anomaly.{d}.generator.{k}={v}" for d in ("train_data", "eval_data") for k, v in TINY.items()]
    out = tmp_path / "run"
    args = [
        *command,
        str(RECIPE),
        f"anomaly.data_root={tmp_path / 'data'}",
        f"output_dir={out}",
        "train.epochs=1",
        *small,
    ]
    assert main(args) == 0
    for name in ("sandbox_anomaly_a", "sandbox_anomaly_b"):
        assert (tmp_path / "data" / name / PARAMS_FILE).is_file()
    printed = capsys.readouterr().out
    assert all(cat in printed for cat in SET_B) and "mean" in printed
    assert (out / "prompts" / "prompt_config.json").is_file() and (out / "checkpoints" / "last.pt").is_file()
    # followable like any run: log.txt and TensorBoard scalars
    assert "epoch 1/1" in (out / "log.txt").read_text() and any((out / "tb").iterdir())
    m = json.loads((out / "metrics.json").read_text())
    assert sorted(m["categories"]) == sorted(SET_B) and m["n"] == len(SET_B) * (2 + 2 * len(DEFECTS))
    assert all(0 <= m["mean"][k] <= 100 for k in ("pixel_auroc", "image_auroc", "image_ap"))
