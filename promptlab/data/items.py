"""Plain data types for datasets: an image item and a dataset's three splits.

Datasets are data, not classes with behaviour: readers return lists of `Item`, and few-shot
sampling and base/new subsampling are functions over `DatasetSplits` (see `fewshot.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    """One labelled image.

    Attributes:
        path: Absolute path of the image, resolved when the dataset is read, so an item can be
            opened without knowing the data root.
        label: Class index; `DatasetSplits.classnames[label]` is its class name.
        classname: Human-readable class name, as the prompt will spell it.
    """

    path: str
    label: int
    classname: str


@dataclass
class DatasetSplits:
    """A dataset's train / val / test items plus what a prompt method needs to know about it.

    Attributes:
        name: Dataset name (the YAML's `name`).
        train: Training items (after `fewshot_split`, the K-shot draw).
        val: Validation items; empty for ImageNet (CoOp evaluates on val == test) and for the
            test-only ImageNet shifts.
        test: Test items.
        classnames: Class names; index == label.
        template: Hand-crafted prompt template with one `{}` for the class name.
        root: The data root (`$DATA`); few-shot caches store paths relative to it.
        image_dir: The folder split-file paths are relative to (for `data fewshot --out`).
        split_hash: SHA-256 over all items (paths relative to `root`, labels, class names), so a
            changed split file invalidates cached few-shot draws.
        shots: K of the few-shot draw, 0 when all data is used.
        seed: Seed of the few-shot draw, None when no draw was made.
        subsample: "all", "base" or "new".
        all_classnames: Every class name of the dataset before the base/new split (None: the same as
            `classnames`). A method that trains with class names it has no images of (MoCoOp's
            text-to-text loss over base *and* new names) asks for it as an `__init__` keyword.
    """

    name: str
    train: list[Item]
    val: list[Item]
    test: list[Item]
    classnames: list[str]
    template: str
    root: Path | None = None
    image_dir: Path | None = None
    split_hash: str = ""
    shots: int = 0
    seed: int | None = None
    subsample: str = "all"
    all_classnames: list[str] | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (length of `classnames`)."""
        return len(self.classnames)

    def split(self, name: str) -> list[Item]:
        """Return the items of split `name` ("train", "val" or "test")."""
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)


def relpath(path: str, base: Path | str) -> str:
    """Path of `path` relative to `base`, with forward slashes so JSON files are portable."""
    prefix = os.path.join(str(base), "")
    if path.startswith(prefix) and os.sep == "/":  # fast path: ImageNet hashes 1.3M of these
        return path[len(prefix) :]
    return Path(os.path.relpath(path, base)).as_posix()


def items_to_rows(items: list[Item], base: Path | str) -> list[list]:
    """Convert items to split-file rows `[relpath, label, classname]` relative to `base`."""
    return [[relpath(it.path, base), it.label, it.classname] for it in items]


def rows_to_items(rows: list, base: Path | str) -> list[Item]:
    """Convert split-file rows `[relpath, label, classname]` back to items under `base`."""
    base = str(base)
    return [Item(os.path.join(base, p), int(y), str(c)) for p, y, c in rows]


def hash_splits(train: list[Item], val: list[Item], test: list[Item], root: Path | str | None) -> str:
    """SHA-256 of the items of all splits, paths relative to `root` (absolute if None).

    Hashing the items rather than the split file's bytes covers every reader (split files,
    official list files, folder listings) with one definition, and stays valid when the data
    root moves, since paths are taken relative to it.
    """
    h = hashlib.sha256()
    for split, items in zip(SPLITS, (train, val, test)):
        for it in items:
            p = relpath(it.path, root) if root is not None else it.path
            h.update(f"{split}\t{p}\t{it.label}\t{it.classname}\n".encode())
    return h.hexdigest()


def dump_split_json(split: dict[str, list[list]]) -> str:
    """Split-file JSON with one `[relpath, label, classname]` row per line: diffable and readable."""
    parts = []
    for name, rows in split.items():
        body = ",\n".join("    " + json.dumps(r) for r in rows)
        parts.append(f'  "{name}": [\n{body}\n  ]' if rows else f'  "{name}": []')
    return "{\n" + ",\n".join(parts) + "\n}\n"
