"""Shared files never run code: hostile recipes, run folders, dataset YAMLs and checkpoints.

Each hostile file here names a shell command that would create ``marker``; the test asserts the
refusal *and* that the marker does not exist (nothing ran), and that a module nobody trusted was
not even imported (importing runs a module's top-level code).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from promptlab.config import ConfigError, instantiate, load_recipe, resolve_component
from promptlab.engine import load_checkpoint
from promptlab.export import import_coop_checkpoint

TRUST_ENV = "PROMPTLAB_TRUSTED_MODULES"  # promptlab.trust.TRUST_ENV

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo" / "coop_tiny.yaml"


@pytest.fixture(autouse=True)
def _nobody_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRUST_ENV, raising=False)


def _touch(marker: Path) -> dict:
    return {"_component_": "os.system", "command": f"touch {marker}"}


def _hostile_recipe(tmp_path: Path, marker: Path) -> Path:
    raw = yaml.safe_load(DEMO.read_text())
    raw["cache_dir"] = str(tmp_path / "cache")
    raw["method"]["ctx_init"] = _touch(marker)  # nested, where a string is expected
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------------- 1. recipes and run folders
def test_nested_os_system_in_a_recipe_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError, match=r"method\.ctx_init\._component_: 'os\.system' is not imported"):
        load_recipe(_hostile_recipe(tmp_path, marker), check_paths=False)
    with pytest.raises(ConfigError, match="os.system"):  # building it directly refuses just the same
        instantiate({"_component_": "promptlab.methods.CoOp", "ctx_init": _touch(marker)}, None, ["a"])
    with pytest.raises(ConfigError, match="os.system"):
        instantiate(_touch(marker))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        ("${oc.env:AWS_SECRET_ACCESS_KEY}", "only PROMPTLAB_"),
        ("${oc.env:HOME,'x'}/runs", "only PROMPTLAB_"),
        ("${oc.env:${cache_dir}}", "only PROMPTLAB_"),  # the variable's name must be written out
        ("${ oc.decode:'{a: 1}'}", "resolver ${oc.decode"),
        ("${oc.create:{}}", "resolver ${oc.create"),
        ("${oc.env:PROMPTLAB_CACHE,'~/.cache/promptlab'}/runs", None),
        ("${cache_dir}/runs/${seed}", None),
        ("${oc.env:DATA,data}/runs", None),
        ("${oc.env:DATASET}/runs", "only PROMPTLAB_"),
    ],
)
def test_a_recipe_reads_no_environment_variable_but_promptlabs(tmp_path: Path, value: str, refused) -> None:
    """A shared recipe (or run folder's config.yaml) cannot copy a secret from the environment into the
    resolved config that runs write and share; ${other.key} and ${oc.env:PROMPTLAB_*} stay allowed."""
    raw = yaml.safe_load(DEMO.read_text())
    raw["output_dir"] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    if refused is None:
        assert "/runs" in load_recipe(path, check_paths=False).output_dir
        return
    with pytest.raises(ConfigError, match=r"recipe\.yaml: output_dir: .*" + re.escape(refused)):
        load_recipe(path, check_paths=False)
    os.environ["AWS_SECRET_ACCESS_KEY"] = "s3cr3t"  # the user's own command line may still read it
    try:
        cfg = load_recipe(DEMO, ["output_dir=${oc.env:AWS_SECRET_ACCESS_KEY}"], check_paths=False)
        assert cfg.output_dir == "s3cr3t"
    finally:
        del os.environ["AWS_SECRET_ACCESS_KEY"]


def test_export_of_a_hostile_run_folder_runs_nothing(tmp_path: Path) -> None:
    """`promptlab export RUN` reads RUN/config.yaml: a component planted there is refused."""
    from promptlab.cli import main
    from promptlab.data import make_synthetic_dataset

    marker, run = tmp_path / "pwned", tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(_hostile_recipe(tmp_path, marker).read_text())
    make_synthetic_dataset(tmp_path / "cache" / "data")  # everything else in the run folder is in order
    torch.save({"epoch": 1, "prompt_state": {}}, run / "checkpoints" / "last.pt")
    assert main(["export", str(run)]) == 2
    assert not marker.exists()


@pytest.mark.parametrize(
    ("dotted", "kind", "why"),
    [
        ("promptlab.config.os.system", "method", "not a PromptModule subclass"),  # reached via promptlab
        ("promptlab.methods.CoOp", "optimizer", "not a torch optimizer class"),
        ("torch.nn.Linear", "optimizer", "is not imported"),
        ("torch.optim.SGD", "method", "is not imported"),
        ("promptlab.__main__.main", "method", "private names"),
        ("builtins.eval", None, "is not imported"),
    ],
)
def test_component_must_fit_its_role(dotted: str, kind: str | None, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        resolve_component(dotted, kind)


def test_roles_that_recipes_use_resolve() -> None:
    from promptlab.methods import CoOp

    assert resolve_component("promptlab.methods.CoOp", "method") is CoOp
    assert resolve_component("torch.optim.AdamW", "optimizer") is torch.optim.AdamW
    sched = resolve_component("torch.optim.lr_scheduler.CosineAnnealingLR", "scheduler")
    assert sched is torch.optim.lr_scheduler.CosineAnnealingLR


USER_MODULE = """
import os
import re
from pathlib import Path
Path({marker!r}).touch()  # top-level code: runs on import
from promptlab.methods import CoOp

class MyCoOp(CoOp):
    pass

def my_generator(root):
    return root
"""


def test_own_module_is_not_imported_without_an_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "usermod_a.py").write_text(USER_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"--trust-module usermod_a .*PROMPTLAB_TRUSTED_MODULES=usermod_a"):
        resolve_component("usermod_a.MyCoOp", "method")
    assert not marker.exists() and "usermod_a" not in sys.modules


def test_own_module_with_the_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trusted: what the module defines resolves; what it merely imports (`os.system`) still must fit."""
    marker = tmp_path / "imported"
    (tmp_path / "usermod_b.py").write_text(USER_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    monkeypatch.setenv(TRUST_ENV, "usermod_b")
    assert resolve_component("usermod_b.MyCoOp", "method").__name__ == "MyCoOp"
    assert resolve_component("usermod_b.my_generator", "generator").__name__ == "my_generator"
    with pytest.raises(ConfigError, match="builtin_function_or_method, not a PromptModule subclass"):
        resolve_component("usermod_b.os.system", "method")


def test_trust_module_flag_sets_the_environment(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from promptlab.cli import main

    monkeypatch.setenv(TRUST_ENV, "first")
    assert main(["--trust-module", "mymethods", "--trust-module", "other", "ls"]) == 0
    assert os.environ[TRUST_ENV] == "first,mymethods,other"  # inherited by sweep jobs and torchrun ranks


# ---------------------------------------------------------------------- 2. dataset YAMLs
def _hostile_dataset(tmp_path: Path, **keys: object) -> Path:
    spec = {"name": "evil", "reader": "split_file", "folder": ".", "split_file": "s.json", "template": "{}"}
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump({**spec, **keys}))
    return path


def test_dataset_generator_must_be_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`promptlab eval RUN` -> ensure_data -> the YAML's generator, called with data.root."""
    from promptlab.runner import ensure_data

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    yaml_path = _hostile_dataset(tmp_path, generator={"_component_": "os.system"})
    cfg = OmegaConf.create({"data": {"name": str(yaml_path), "root": f"touch {marker}"}})
    with pytest.raises(
        ConfigError, match=r"evil\.yaml: generator: _component_: 'os\.system' is not imported"
    ):
        ensure_data(cfg)
    assert not marker.exists()


def test_dataset_reader_must_be_registered(tmp_path: Path) -> None:
    from promptlab.data.registry import parse_spec, reader_for

    with pytest.raises(ConfigError, match="not a registered promptlab dataset reader"):
        reader_for(parse_spec(_hostile_dataset(tmp_path, reader="promptlab.config.os.system")))
    video = parse_spec(REPO / "datasets" / "ucf101_video.yaml")
    assert reader_for(video).__name__ == "read_ucf101"


# ---------------------------------------------------------------------- 3. checkpoints
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_training_checkpoint_is_refused(tmp_path: Path) -> None:
    """`resume=true` and `promptlab export` read checkpoints/last.pt through load_checkpoint."""
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    torch.save({"epoch": 1, "prompt_state": {}, "x": _Evil(marker)}, path)
    with pytest.raises(RuntimeError, match=r"not unpickled in full"):
        load_checkpoint(path)
    assert not marker.exists()


def test_hostile_legacy_coop_checkpoint_is_refused(tmp_path: Path, tiny_clip) -> None:
    """A legacy (non-zip) Dassl file cannot be inspected for globals; it used to be unpickled in full."""
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth.tar-1"
    torch.save(
        {"state_dict": {"ctx": torch.zeros(4, tiny_clip.width)}, "x": _Evil(marker)},
        path,
        _use_new_zipfile_serialization=False,
    )
    with pytest.raises(ValueError, match="never unpickles a checkpoint in full"):
        import_coop_checkpoint(path, tiny_clip, ["a", "b"])
    assert not marker.exists()
