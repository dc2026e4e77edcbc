"""Every shipped recipe validates against the schema and its components' signatures, without building them.

Parametrized over a glob of ``recipes/``, so a new recipe is tested for free (torchtune's recipe test).
No data, weights or models are needed: ``check_paths=False`` and nothing is instantiated.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from promptlab.config import ConfigError, epochs_for, load_recipe

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
# Files with a top-level `kind: pretrain` (recipes/sandbox/pretrain.yaml) pretrain the sandbox CLIP
# itself (not a prompt-learning run) with their own schema, validated in tests/test_sandbox.py. Every
# other recipe, whatever its task (classification, video, anomaly), goes through the one schema.
OTHER_KINDS = ("pretrain",)
RECIPES = sorted(
    p
    for p in RECIPES_DIR.rglob("*.yaml")
    if (yaml.safe_load(p.read_text()) or {}).get("kind") not in OTHER_KINDS
)


def test_recipes_exist() -> None:
    """Guard against the glob silently matching nothing (a moved folder would make every test vanish)."""
    assert RECIPES, f"no recipes found under {RECIPES_DIR}"


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(RECIPES_DIR)) for p in RECIPES])
def test_recipe_validates(path: Path) -> None:
    """A recipe must load and validate; a component that cannot be imported is reported by name."""
    try:
        cfg = load_recipe(path, check_paths=False)
    except ConfigError as e:
        pytest.fail(f"invalid recipe {path.relative_to(RECIPES_DIR)}:\n{e}", pytrace=False)
    assert "${" not in cfg.output_dir, "output_dir must be fully resolved"
    assert epochs_for(cfg) >= 0
    if epochs_for(cfg) > 0:
        assert cfg.optimizer is not None, "a recipe that trains needs an optimizer"


def test_coop_imagenet_trains_50_epochs_in_both_protocols() -> None:
    """CoOp: vit_b16_ep50 for ImageNet in base-to-new (scripts/cocoop/base2new_train.sh) and at every
    shot count in few-shot (COOP.md); 200 / per-shot epochs elsewhere. Planned as the sweep plans it."""
    from promptlab.sweep import plan_sweep

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    for name in ("coop_vit_b16", "coop_rn50"):
        sweep = plan_sweep(recipes / "fewshot" / f"{name}.yaml", ["datasets=imagenet,caltech101", "seeds=1"])
        epochs = {(j.dataset, j.shots): j.epochs for j in sweep.jobs}
        assert epochs == {
            **{("imagenet", k): 50 for k in (1, 2, 4, 8, 16)},
            **{("caltech101", k): e for k, e in {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}.items()},
        }
    b2n = plan_sweep(recipes / "base2new" / "coop_vit_b16.yaml", ["datasets=imagenet,dtd", "seeds=1"])
    assert {j.dataset: j.epochs for j in b2n.jobs} == {"imagenet": 50, "dtd": 200}


def test_published_recipes_use_the_reference_arithmetic_and_augmentation() -> None:
    """Recipes that claim a published number run as the reference did: PREC=fp16 arithmetic for the
    CoOp family (their default), and a fresh augmentation every epoch (Dassl's loader), not cached views."""
    from promptlab.config import resolve_component

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    fp16 = ["base2new/" + m for m in ("coop", "cocoop", "kgcoop", "ivlp", "maple")]
    for name in [f"{r}_vit_b16" for r in fp16] + [
        "fewshot/coop_vit_b16",
        "fewshot/coop_rn50",
        "zeroshot/clip_vit_b16",
    ]:
        cfg = load_recipe(recipes / f"{name}.yaml", check_paths=False)
        assert cfg.model.precision == "reference_fp16" and cfg.train.amp == "fp32", name
    for name in (
        "base2new/coop_vit_b16",
        "base2new/kgcoop_vit_b16",
        "fewshot/coop_vit_b16",
        "fewshot/coop_rn50",
        "base2new/mocoop_vit_b16",
        "fewshot/mocoop_vit_b16",
    ):
        cfg = load_recipe(recipes / f"{name}.yaml", check_paths=False)
        assert resolve_component(cfg.method._component_).image_side_frozen, name
        assert cfg.train.feature_cache is False, name
