"""Config system: every error names the key path and the recipe file; overrides, interpolation, instantiate.

The components here are small dummies with the same shape as real methods (``Cls(clip, classnames,
**hparams)``), so these tests do not depend on the method implementations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import yaml

from promptlab.config import (
    ConfigError,
    component_kwargs,
    epochs_for,
    instantiate,
    load_recipe,
    resolve_component,
    validate_recipe,
)


class DummyMethod:
    """Shaped like a PromptModule subclass: runtime args first, hyperparameters as keywords."""

    def __init__(
        self,
        clip: Any,
        classnames: list[str],
        n_ctx: int = 16,
        ctx_init: str = "",
        scale: float = 1.0,
        position: Literal["end", "front"] = "end",
        head: Any = None,
    ) -> None:
        self.clip, self.classnames = clip, classnames
        self.n_ctx, self.ctx_init, self.scale = n_ctx, ctx_init, scale
        self.position, self.head = position, head


class DummyHead:
    """A nested component with a required argument."""

    def __init__(self, dim: int, bias: bool = True) -> None:
        self.dim, self.bias = dim, bias


class AnyKwargs:
    """A target taking **kwargs: any key is accepted."""

    def __init__(self, clip: Any, classnames: list[str], **hparams: Any) -> None:
        self.hparams = hparams


DUMMY = f"{__name__}.DummyMethod"


@pytest.fixture(autouse=True)
def _trust_this_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dummies live in this test module: trust it, as a user trusts their own (promptlab.trust)."""
    monkeypatch.setenv("PROMPTLAB_TRUSTED_MODULES", __name__)


def base_recipe() -> dict[str, Any]:
    """A minimal complete recipe using the dummy method and a real torch optimizer."""
    return {
        "seed": 1,
        "shots": 16,
        "output_dir": "runs/${data.name}/shots${shots}/seed${seed}",
        "cache_dir": "cache",
        "model": {"arch": "tiny", "pretrained": None},
        "method": {"_component_": DUMMY, "n_ctx": 4, "ctx_init": "a photo of a"},
        "data": {"root": "${cache_dir}/data", "name": "pets"},
        "optimizer": {"_component_": "torch.optim.SGD", "lr": 0.002, "momentum": 0.9},
        "train": {"epochs": 200, "epochs_by_shots": {1: 50, 2: 100}, "batch_size": 32},
    }


def write(tmp_path: Path, recipe: dict[str, Any], name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def set_key(recipe: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    node = recipe
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return recipe


def load_error(tmp_path: Path, recipe: dict[str, Any], overrides: tuple[str, ...] = (), **kw: Any) -> str:
    path = write(tmp_path, recipe)
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides, **{"check_paths": False, **kw})
    message = str(info.value)
    assert str(path) in message, "every error names the recipe file"
    return message


def test_load_resolves_interpolations_and_fills_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interpolations (incl. oc.env) resolve on load; omitted optional keys get the schema default."""
    monkeypatch.setenv("PROMPTLAB_TEST_CACHE", str(tmp_path / "cache"))
    recipe = base_recipe()
    recipe["cache_dir"] = "${oc.env:PROMPTLAB_TEST_CACHE,'~/.cache/promptlab'}"
    cfg = load_recipe(write(tmp_path, recipe), check_paths=False)
    assert cfg.output_dir == "runs/pets/shots16/seed1"
    assert cfg.data.root == f"{tmp_path}/cache/data"
    assert cfg.train.warmup_type == "constant" and cfg.eval.split == "test" and cfg.device == "auto"
    assert cfg.data.num_workers == 4 and cfg.train.grad_clip is None


def test_overrides_change_values(tmp_path: Path) -> None:
    """key=value overrides are YAML-typed, reach interpolations, may add component args and map entries."""
    overrides = [
        "shots=2",
        "data.name=cars",
        "method.scale=2",
        "optimizer.nesterov=true",
        "train.epochs_by_shots.4=7",
    ]
    cfg = load_recipe(write(tmp_path, base_recipe()), overrides, check_paths=False)
    assert cfg.shots == 2 and cfg.output_dir == "runs/cars/shots2/seed1"
    assert cfg.method.scale == 2 and cfg.optimizer.nesterov is True
    assert epochs_for(cfg) == 100
    cfg = load_recipe(
        write(tmp_path, base_recipe()), ["shots=4", "train.epochs_by_shots.4=7"], check_paths=False
    )
    assert epochs_for(cfg) == 7
    cfg = load_recipe(
        write(tmp_path, base_recipe()), ["train.epochs_by_shots={}", "train.epochs=9"], check_paths=False
    )
    assert epochs_for(cfg) == 9


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        # unknown key, with a suggestion and the valid keys
        ("train.epoch", 3, ["train.epoch", "'epochs'", "valid keys", "batch_size"]),
        ("modle", {"arch": "x"}, ["modle", "'model'"]),
        ("train.batch_size", "32", ["train.batch_size", "expected int", "str"]),  # wrong type
        ("train.epochs", None, ["train.epochs", "expected int"]),  # None only where Optional
        ("resume", 1, ["resume", "expected bool"]),
        ("train.amp", "fp8", ["train.amp", "'fp32', 'fp16', 'bf16'"]),  # Literal choices listed
        ("device", "gpu", ["device", "cuda:N"]),
        ("method.nctx", 4, ["method.nctx", "'n_ctx'", "valid arguments"]),  # unknown kwarg
        ("method.n_ctx", "four", ["method.n_ctx", "expected int"]),  # kwarg type from the annotation
        ("method.position", "middle", ["method.position", "'end', 'front'"]),
        ("method.clip", 1, ["method.clip", "run time"]),  # runtime args cannot come from a recipe
        # a nested component missing a required argument
        ("method.head", {"_component_": f"{__name__}.DummyHead"}, ["method.head", "dim"]),
        ("optimizer.lrr", 0.1, ["optimizer.lrr", "'lr'"]),
        (
            "method._component_",
            "promptlab.no_such_module.Thing",
            ["method._component_", "promptlab.no_such_module"],
        ),
        ("method._component_", f"{__name__}.DummyMethd", ["method._component_", "'DummyMethod'"]),
        ("method._component_", "not a path", ["method._component_", "dotted path"]),
        ("method", {"n_ctx": 4}, ["method", "_component_"]),
        ("data.name", None, ["data.name", "expected str"]),
    ],
)
def test_invalid_recipe_names_key(tmp_path: Path, key: str, value: Any, expected: list[str]) -> None:
    """Each kind of mistake fails at load time with the key path, and the valid choices where there are some."""
    message = load_error(tmp_path, set_key(base_recipe(), key, value))
    for text in expected:
        assert text in message, message


def test_valid_variants_are_accepted(tmp_path: Path) -> None:
    """int is accepted for float, None where Optional, any key where the target takes **kwargs."""
    recipe = base_recipe()
    recipe["method"] = {"_component_": f"{__name__}.AnyKwargs", "anything": [1, 2]}
    recipe["train"].update(warmup_lr=0, grad_clip=None)
    recipe["optimizer"] = None
    load_recipe(write(tmp_path, recipe), check_paths=False)


def test_missing_required_key(tmp_path: Path) -> None:
    """Required schema fields (no default) must be present."""
    recipe = base_recipe()
    del recipe["model"]["arch"]
    assert "model.arch" in load_error(tmp_path, recipe)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epoch=3", ["train.epoch", "'epochs'", "valid keys at train"]),
        ("modle.arch=x", ["modle", "'model'", "valid keys at the top level"]),
        ("shots", ["shots", "key=value"]),
        ("train.batch_size=abc", ["train.batch_size", "expected int"]),
        ("method.ctx_init=[a, b", ["method.ctx_init", "cannot parse"]),
    ],
)
def test_bad_override(tmp_path: Path, override: str, expected: list[str]) -> None:
    """Overriding a key that does not exist is an error listing the valid keys at that level."""
    message = load_error(tmp_path, base_recipe(), (override,))
    for text in expected:
        assert text in message, message


def test_missing_paths(tmp_path: Path) -> None:
    """check_paths: data.root and a path-like model.pretrained must exist; off, neither is checked."""
    recipe = set_key(base_recipe(), "data.root", str(tmp_path / "nope"))
    message = load_error(tmp_path, recipe, check_paths=True)
    assert "data.root" in message and "nope" in message
    recipe = set_key(base_recipe(), "data.root", str(tmp_path))
    recipe["model"]["pretrained"] = str(tmp_path / "weights.pt")
    assert "model.pretrained" in load_error(tmp_path, recipe, check_paths=True)
    load_recipe(write(tmp_path, recipe), check_paths=False)
    recipe["model"] = {"arch": "ViT-B-16", "pretrained": "openai"}  # a tag, not a path
    load_recipe(write(tmp_path, recipe), check_paths=True)
    # a dataset whose YAML names a generator is written under data.root on first use: no root needed yet
    own = tmp_path / "mine.yaml"  # a user's generated dataset, named by its YAML's path
    lamp = Path(__file__).resolve().parents[1] / "datasets" / "sandbox_lamp.yaml"
    own.write_text(lamp.read_text().replace("sandbox_lamp", "mine"))
    set_key(recipe, "data.root", str(tmp_path / "not_yet"))
    for name in ("sandbox_lamp", "synthetic", str(own)):
        load_recipe(write(tmp_path, set_key(recipe, "data.name", name)), check_paths=True)
    message = load_error(tmp_path, set_key(recipe, "data.name", "dtd"), check_paths=True)
    assert "data.root" in message and "not_yet" in message  # a dataset read from disk needs its root
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_validate_recipe_names_source(tmp_path: Path) -> None:
    """validate_recipe works on an in-memory config and names the given source."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(set_key(base_recipe(), "train.epochs", "x"))
    with pytest.raises(ConfigError, match=r"^my\.yaml: train\.epochs: "):
        validate_recipe(cfg, "my.yaml", check_paths=False)


def test_instantiate_nested_and_runtime_args() -> None:
    """Runtime args are passed positionally, kwargs override the recipe, nested components are built."""
    node = {
        "_component_": DUMMY,
        "n_ctx": 2,
        "scale": 3,
        "head": {"_component_": f"{__name__}.DummyHead", "dim": 8},
    }
    obj = instantiate(node, "clip", ["cat", "dog"], scale=5.0)
    assert isinstance(obj, DummyMethod) and obj.clip == "clip" and obj.classnames == ["cat", "dog"]
    assert obj.n_ctx == 2 and obj.scale == 5.0
    assert isinstance(obj.head, DummyHead) and obj.head.dim == 8
    assert component_kwargs(node)["n_ctx"] == 2 and "_component_" not in component_kwargs(node)


def test_instantiate_from_loaded_recipe(tmp_path: Path) -> None:
    """The engine's path: a loaded DictConfig builds a module and a torch optimizer over its params."""
    cfg = load_recipe(write(tmp_path, base_recipe()), check_paths=False)
    method = instantiate(cfg.method, None, ["a", "b"])
    assert method.ctx_init == "a photo of a"
    optim = instantiate(cfg.optimizer, [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optim, torch.optim.SGD) and optim.defaults["lr"] == 0.002


def test_resolve_component() -> None:
    """Dotted paths import with importlib; failures name the path."""
    assert resolve_component("torch.optim.SGD") is torch.optim.SGD
    with pytest.raises(ConfigError, match="torch.optim.NoSuchOptim"):
        resolve_component("torch.optim.NoSuchOptim")


@pytest.mark.parametrize(
    "recipe", ["recipes/sandbox/coop_base2new.yaml", "recipes/base2new/cocoop_vit_b16.yaml"]
)
def test_ctx_init_null_override_means_random_context(recipe: str, tiny_clip) -> None:
    """`method.ctx_init=null` (and `method.ctx_init=`, which YAML also reads as null) selects N(0, 0.02) context."""
    repo = Path(__file__).resolve().parents[1]
    for override in ("method.ctx_init=null", "method.ctx_init="):
        cfg = load_recipe(repo / recipe, [override, "method.n_ctx=3"], check_paths=False)
        assert cfg.method.ctx_init is None
        module = instantiate(cfg.method, clip=tiny_clip, classnames=["cat", "dog"])
        assert module.ctx.shape == (3, tiny_clip.width) and 0.005 < float(module.ctx.detach().std()) < 0.05


def test_per_dataset_section_applies_to_its_dataset_only(tmp_path: Path) -> None:
    """``per_dataset[<data.name>]`` is merged over the recipe; the command line still wins."""
    recipe = base_recipe()
    recipe["per_dataset"] = {
        "imagenet": {"train": {"epochs": 50, "epochs_by_shots": {1: 50, 2: 50}}},
        "dtd": {"method": {"ctx_init": "a texture of"}},
    }
    path = write(tmp_path, recipe)
    inet = load_recipe(path, ["data.name=imagenet", "shots=2"], check_paths=False)
    assert epochs_for(inet) == 50 and inet.train.epochs == 50 and inet.method.ctx_init == "a photo of a"
    assert inet.per_dataset == {}  # applied: the resolved config (a run's config.yaml) holds the values
    dtd = load_recipe(path, ["data.name=dtd", "shots=2"], check_paths=False)
    assert dtd.method.ctx_init == "a texture of" and epochs_for(dtd) == 100
    other = load_recipe(path, ["data.name=caltech101", "shots=2"], check_paths=False)
    assert epochs_for(other) == 100 and other.method.ctx_init == "a photo of a"
    cli = load_recipe(path, ["data.name=imagenet", "shots=2", "train.epochs_by_shots.2=7"], check_paths=False)
    assert (
        epochs_for(cli) == 7
        and epochs_for(load_recipe(path, ["data.name=imagenet", "train.epochs=9"], check_paths=False)) == 9
    )


@pytest.mark.parametrize(
    "per_dataset,expected",
    [
        ({"imagnet": {"train": {"epochs": 50}}}, ["per_dataset.imagnet", "unknown dataset"]),
        (
            {"imagenet": {"train": {"epochz": 50}}},
            ["per_dataset.imagenet.train.epochz", "did you mean 'epochs'"],
        ),
        ({"imagenet": {"train": {"epochs": "many"}}}, ["per_dataset.imagenet.train.epochs", "expected int"]),
        ({"imagenet": {"data": {"name": "dtd"}}}, ["per_dataset.imagenet", "data.name"]),
        ({"imagenet": 50}, ["per_dataset.imagenet", "mapping"]),
    ],
)
def test_per_dataset_errors_name_the_block(tmp_path: Path, per_dataset: dict, expected: list[str]) -> None:
    """Every block is checked whichever dataset runs, so a typo cannot wait for the ImageNet run."""
    message = load_error(tmp_path, {**base_recipe(), "per_dataset": per_dataset}, ("data.name=caltech101",))
    for part in expected:
        assert part in message


@pytest.mark.parametrize(
    "model, key, words",
    [
        (
            {"arch": "sandbx"},
            "model.arch",
            ["'sandbx' is not a known architecture", "did you mean 'sandbox'"],
        ),
        ({"arch": "vit-b-16", "pretrained": "openai"}, "model.arch", ["did you mean 'ViT-B-16'"]),
        ({"arch": "ViT-B-16", "pretrained": "opnai"}, "model.pretrained", ["did you mean 'openai'"]),
        ({"arch": "tiny", "pretrained": "openai"}, "model.pretrained", ["random tiny CLIP"]),
    ],
)
def test_backbone_names_are_checked_with_the_recipe(
    tmp_path: Path, model: dict, key: str, words: list
) -> None:
    """Architecture and weights tag fail at load time, naming the key, with the closest names."""
    message = load_error(tmp_path, {**base_recipe(), "model": model})
    assert f": {key}: " in message and all(w in message for w in words)
