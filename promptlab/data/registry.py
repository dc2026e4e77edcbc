"""Dataset definitions (`datasets/*.yaml`) and `load_dataset`.

A dataset is declared, not coded: one YAML names its folder under `$DATA`, the reader for its
layout, its split or class-list files, its prompt template and its expected sizes. Adding a
dataset with an existing layout is adding a YAML file. The YAML folder is the repository's
`datasets/` unless the environment variable `PROMPTLAB_DATASETS_DIR` points elsewhere; any YAML
file can also be passed by path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import yaml

from promptlab.data.items import SPLITS, DatasetSplits, hash_splits
from promptlab.data.readers import READERS, fix_hint, where
from promptlab.data.spec import DatasetSpec
from promptlab.resources import resource_dir
from promptlab.suggest import did_you_mean

log = logging.getLogger(__name__)

DATASETS_ENV = "PROMPTLAB_DATASETS_DIR"


_REQUIRED_BY_READER = {
    "split_file": ("split_file",),
    "fgvc_aircraft": ("classnames_file", "splits"),
    "imagenet_folders": ("classnames_file", "splits"),
    "custom": (),
}


class UnknownDataset(KeyError):
    """No dataset YAML of that name. A KeyError (a missing key of the registry) whose message prints
    as written: ``str(KeyError("x"))`` would wrap it in quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def datasets_dir() -> Path:
    """The folder holding the dataset YAMLs ($PROMPTLAB_DATASETS_DIR, else promptlab's `datasets/`)."""
    env = os.environ.get(DATASETS_ENV)
    return Path(env) if env else resource_dir("datasets")


def dataset_names() -> list[str]:
    """Names of the known datasets: the stems of `datasets/*.yaml`, sorted."""
    d = datasets_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def parse_spec(path: Path) -> DatasetSpec:
    """Read and validate one dataset YAML; errors name the file and the offending key."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"dataset YAML {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"dataset YAML {path} must be a mapping of keys to values.")
    known = {f.name for f in dataclasses.fields(DatasetSpec)} - {"yaml_path"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"dataset YAML {path}: unknown key(s) {unknown}; known keys: {sorted(known)}.")
    missing = [k for k in ("name", "reader", "folder", "template") if k not in raw]
    if missing:
        raise ValueError(f"dataset YAML {path}: missing key(s) {missing}.")
    if raw["reader"] not in READERS and "." not in str(raw["reader"]):  # dotted: a reader function
        raise ValueError(f"dataset YAML {path}: reader {raw['reader']!r} is not one of {sorted(READERS)}.")
    for key in _REQUIRED_BY_READER.get(raw["reader"], ()):
        if not raw.get(key):
            raise ValueError(f"dataset YAML {path}: reader {raw['reader']!r} needs key '{key}'.")
    if "{}" not in str(raw["template"]):
        raise ValueError(
            f"dataset YAML {path}: template {raw['template']!r} has no '{{}}' for the class name."
        )
    bad = sorted(set(raw.get("splits") or {}) - set(SPLITS)) + sorted(
        set(raw.get("expected") or {}) - set(SPLITS)
    )
    if bad:
        raise ValueError(f"dataset YAML {path}: unknown split name(s) {bad}; use {list(SPLITS)}.")
    if raw.get("modality", "image") not in ("image", "video"):
        raise ValueError(f"dataset YAML {path}: modality must be 'image' or 'video'.")
    if raw.get("folder_names", "wnid") not in ("wnid", "index"):
        raise ValueError(f"dataset YAML {path}: folder_names must be 'wnid' or 'index'.")
    spec = DatasetSpec(**raw, yaml_path=path)
    spec.split_ratio = tuple(spec.split_ratio)
    spec.splits = {str(k): str(v) for k, v in (spec.splits or {}).items()}
    spec.download = {str(k): str(v) for k, v in (spec.download or {}).items()}
    spec.urls = {str(k): str(v) for k, v in (spec.urls or {}).items()}
    spec.expected = dict(spec.expected or {})
    return spec


def get_spec(name_or_yaml_path: str | Path) -> DatasetSpec:
    """Find a dataset's spec by name (`datasets/<name>.yaml`) or by the path of a YAML file."""
    s = str(name_or_yaml_path)
    if s.endswith((".yaml", ".yml")) or os.sep in s:
        path = Path(s).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"dataset YAML {path} not found.")
        return parse_spec(path)
    path = datasets_dir() / f"{s}.yaml"
    if not path.is_file():
        names = dataset_names()
        raise UnknownDataset(
            f"unknown dataset {s!r}{did_you_mean(s, names)}; known: {', '.join(names)} "
            f"(YAMLs in {datasets_dir()}, or give a YAML file's path)"
        )
    return parse_spec(path)


def reader_for(spec: DatasetSpec):
    """The reader function of a spec: a name in `READERS` or a dotted path (video readers)."""
    if spec.reader in READERS:
        return READERS[spec.reader]
    from promptlab.components import resolve_component

    return resolve_component(spec.reader, "reader")  # only registered readers (or trusted modules)


def fill_list_names(spec: DatasetSpec, params: dict | None) -> DatasetSpec:
    """Fill `{fold}` / `{seed}` / `{shots}` in the split and list file names (official video splits
    1..3, ViFi-CLIP's per-seed and per-K lists); other names pass unchanged."""
    if not params:
        return spec
    fill = lambda v: v.format_map(params) if v and "{" in v else v  # noqa: E731
    return dataclasses.replace(
        spec,
        split_file=fill(spec.split_file),
        classnames_file=fill(spec.classnames_file),
        splits={k: fill(v) for k, v in spec.splits.items()},
    )


def load_dataset(
    name_or_yaml_path: str | Path, root: str | Path, *, check_files: bool = True, params: dict | None = None
) -> DatasetSplits:
    """Read a dataset's full train / val / test splits from the user's data root.

    Args:
        name_or_yaml_path: A name from `dataset_names()` or the path of a dataset YAML.
        root: The data root (`$DATA`) holding the dataset folders in CoOp's DATASETS.md layout.
        check_files: Check that every image listed by a split or list file exists, so a missing
            image fails here, naming itself, instead of deep inside a training epoch.
        params: values of the `{fold}`, `{seed}`, `{shots}` placeholders in list file names.

    Returns:
        All items (no few-shot draw yet; see `fewshot_split`), class names and prompt template.

    Raises:
        FileNotFoundError: The root, dataset folder, a split/list file or an image is missing; the
            message names the path, the dataset YAML and how to obtain the file.
        ValueError: A malformed split file, label out of range, class-name mismatch or empty class.
    """
    spec = fill_list_names(get_spec(name_or_yaml_path), params)
    root = Path(os.path.abspath(os.path.expanduser(str(root))))
    if not root.is_dir():
        raise FileNotFoundError(f"{where(spec)}: data root {root} does not exist.")
    dataset_dir = root / spec.folder
    if not dataset_dir.is_dir():
        raise FileNotFoundError(
            f"{where(spec)}: dataset folder {dataset_dir} not found under the data root.{fix_hint(spec, '*')}"
        )
    splits, classnames = reader_for(spec)(spec, dataset_dir, check_files)
    if spec.num_classes is not None and len(classnames) != spec.num_classes:
        if len(classnames) > spec.num_classes:
            raise ValueError(
                f"{where(spec)}: found {len(classnames)} classes but num_classes is {spec.num_classes}."
            )
        log.warning("%s: found %d classes, expected %d", where(spec), len(classnames), spec.num_classes)
    if spec.test_only:
        splits["train"], splits["val"] = [], []
    train, val, test = (splits.get(s, []) for s in SPLITS)
    log.info(
        "%s: %d classes, %d train / %d val / %d test",
        spec.name,
        len(classnames),
        len(train),
        len(val),
        len(test),
    )
    return DatasetSplits(
        name=spec.name,
        train=train,
        val=val,
        test=test,
        classnames=classnames,
        template=spec.template,
        root=root,
        image_dir=(dataset_dir / spec.image_dir),
        split_hash=hash_splits(train, val, test, root),
    )
