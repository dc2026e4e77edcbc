"""Readers for the on-disk layouts of CoOp's DATASETS.md, selected by a dataset YAML's `reader`.

Every reader has the signature `reader(spec, dataset_dir, check_files) -> (splits, classnames)`
where `splits` maps "train" / "val" / "test" to lists of `Item` and `classnames[label]` is the
class name. Readers never write anything.

Deviation from Dassl, on purpose: Dassl lists image files (and Caltech/DTD-style class folders)
with an unsorted `os.listdir`, so a few-shot draw over folder datasets (ImageNet) depends on the
file system. Here every directory listing is sorted, so the same seed gives the same images on
every machine. For the split-file datasets (ten of the eleven) nothing is listed and the draw is
identical to Dassl's.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

from promptlab import trust
from promptlab.data.items import SPLITS, Item

if TYPE_CHECKING:
    from promptlab.data.spec import DatasetSpec

Splits = dict[str, list[Item]]


def where(spec: DatasetSpec) -> str:
    """How error messages name a dataset: its name and the YAML that defines it."""
    return f"dataset '{spec.name}' ({spec.yaml_path})"


def fix_hint(spec: DatasetSpec, rel: str) -> str:
    """The YAML's `download` instruction for a missing file or folder, or CoOp's DATASETS.md."""
    hint = spec.download.get(rel) or spec.download.get("*")
    return f" Fix: {hint}" if hint else " See CoOp's DATASETS.md for the expected layout."


def require(path: Path, spec: DatasetSpec, what: str, dataset_dir: Path) -> None:
    """Raise FileNotFoundError naming `path`, the dataset and the fix when `path` is missing."""
    if not path.exists():
        rel = Path(os.path.relpath(path, dataset_dir)).as_posix()
        raise FileNotFoundError(f"{where(spec)}: {what} not found: {path}.{fix_hint(spec, rel)}")


def list_visible(path: Path, dirs: bool) -> list[str]:
    """Sorted names of the non-hidden sub-folders (dirs=True) or files (dirs=False) of `path`."""
    with os.scandir(path) as it:
        names = [e.name for e in it if not e.name.startswith(".") and e.is_dir() == dirs]
    return sorted(names)


def check_images_exist(splits: Splits, spec: DatasetSpec, source: Path | str) -> None:
    """Raise FileNotFoundError listing the split entries whose image file is missing."""
    missing = [(s, it.path) for s in SPLITS for it in splits.get(s, []) if not os.path.isfile(it.path)]
    if missing:
        shown = "; ".join(f"{s}: {p}" for s, p in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"{where(spec)}: {len(missing)} image(s) listed in {source} are missing: {shown}{more}."
            f"{fix_hint(spec, spec.image_dir)}"
        )


def classnames_from_labels(names: dict[int, str], spec: DatasetSpec, source: Path) -> list[str]:
    """Turn a label -> name map into a list, refusing gaps (a class with no entries at all)."""
    if not names:
        raise ValueError(f"{where(spec)}: {source} has no entries.")
    n = max(names) + 1
    empty = [y for y in range(n) if y not in names]
    if empty:
        raise ValueError(f"{where(spec)}: {source}: label(s) {empty[:10]} have no entries in any split.")
    return [names[y] for y in range(n)]


def is_split_row(row: object) -> bool:
    """Whether `row` is a split-file entry: ``[relpath, label, classname]`` (label an int)."""
    return (
        isinstance(row, list)
        and len(row) == 3
        and isinstance(row[0], str)
        and isinstance(row[1], int)
        and not isinstance(row[1], bool)
        and isinstance(row[2], str)
    )


def read_split_file(spec: DatasetSpec, dataset_dir: Path, check_files: bool) -> tuple[Splits, list[str]]:
    """Read a CoOp split file `{"train": [[relpath, label, classname], ...], "val": ..., "test": ...}`.

    Paths are relative to the image folder (`image_dir`; "." for StanfordCars, whose paths start
    at `stanford_cars/`). The entry order is kept: the few-shot draw depends on it.
    """
    path = dataset_dir / spec.split_file
    image_dir = dataset_dir / spec.image_dir
    require(path, spec, "split file", dataset_dir)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where(spec)}: split file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{where(spec)}: split file {path} must hold a JSON object with train/val/test.")
    needed = ("test",) if spec.test_only else ("train", "test")
    for key in needed:
        if key not in data:
            raise ValueError(f"{where(spec)}: split file {path} has no '{key}' list.")

    names: dict[int, str] = {}
    first_seen: dict[int, str] = {}
    splits: Splits = {}
    for split in SPLITS:
        items = []
        for i, row in enumerate(data.get(split) or []):
            entry = f"{path} {split}[{i}] = {row!r}"
            if not is_split_row(row):
                raise ValueError(
                    f"{where(spec)}: malformed entry {entry}; expected [relpath, label, classname]."
                )
            rel, label, name = row
            if label < 0 or (spec.num_classes is not None and label >= spec.num_classes):
                raise ValueError(
                    f"{where(spec)}: label out of range in {entry}; num_classes is {spec.num_classes}."
                )
            if names.setdefault(label, name) != name:
                raise ValueError(
                    f"{where(spec)}: class name mismatch for label {label}: {entry} says {name!r} "
                    f"but {first_seen[label]} says {names[label]!r}."
                )
            first_seen.setdefault(label, f"{split}[{i}]")
            items.append(Item(os.path.join(str(image_dir), rel), label, name))
        splits[split] = items
    if check_files:
        require(image_dir, spec, "image folder", dataset_dir)
        check_images_exist(splits, spec, path)
    return splits, classnames_from_labels(names, spec, path)


def read_fgvc_aircraft(spec: DatasetSpec, dataset_dir: Path, check_files: bool) -> tuple[Splits, list[str]]:
    """Read FGVCAircraft's official files: `variants.txt` and `images_variant_<split>.txt`.

    Labels are line numbers in `variants.txt`; each list line is `<image id> <variant name>`.
    """
    cls_path = dataset_dir / spec.classnames_file
    require(cls_path, spec, "class list", dataset_dir)
    classnames = [ln.strip() for ln in cls_path.read_text().splitlines() if ln.strip()]
    label_of = {c: i for i, c in enumerate(classnames)}
    image_dir = dataset_dir / spec.image_dir
    splits: Splits = {s: [] for s in SPLITS}
    for split, fname in spec.splits.items():
        path = dataset_dir / fname
        require(path, spec, f"{split} list", dataset_dir)
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            image_id, _, name = line.strip().partition(" ")
            if name not in label_of:
                raise ValueError(
                    f"{where(spec)}: {path}:{n}: class {name!r} is not in the class list {cls_path}."
                )
            img = os.path.join(str(image_dir), image_id + spec.image_ext)
            splits[split].append(Item(img, label_of[name], name))
    if check_files:
        require(image_dir, spec, "image folder", dataset_dir)
        check_images_exist(splits, spec, ", ".join(str(dataset_dir / f) for f in spec.splits.values()))
    return splits, classnames


def read_wnid_classnames(path: Path) -> dict[str, str]:
    """Read an ImageNet `classnames.txt`: lines `<folder> <class name words>`, in file order."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            folder, _, name = line.strip().partition(" ")
            out[folder] = name
    return out


def read_imagenet_folders(
    spec: DatasetSpec, dataset_dir: Path, check_files: bool
) -> tuple[Splits, list[str]]:
    """Read ImageNet-style class folders named by `classnames.txt`.

    `folder_names: wnid` (ImageNet, -Sketch, -A, -R): the classes are the class folders found on
    disk, sorted, each named through `classnames.txt`. For ImageNet-A / -R (200 folders) this maps
    the subset onto ImageNet's class order and names exactly as CoOp does (label = rank among the
    sorted wnids, the order of ImageNet's 1000 classes). `folder_names: index` (ImageNetV2):
    folders are named 0..N-1 after the line numbers of `classnames.txt`.
    """
    cls_path = dataset_dir / spec.classnames_file
    require(cls_path, spec, "class names file", dataset_dir)
    wnid_names = read_wnid_classnames(cls_path)
    image_dir = dataset_dir / spec.image_dir
    split_dirs = {s: image_dir / d for s, d in spec.splits.items()}
    folders = {}
    for split, d in split_dirs.items():
        require(d, spec, f"{split} image folder", dataset_dir)
        folders[split] = list_visible(d, dirs=True)

    if spec.folder_names == "index":
        wnids = list(wnid_names)
        classes = [str(i) for i in range(len(wnids))]
        classnames = [wnid_names[w] for w in wnids]
        for split, found in folders.items():
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise ValueError(
                    f"{where(spec)}: folders {unknown[:5]} in {split_dirs[split]} are not class indices "
                    f"0..{len(classes) - 1} of {cls_path}."
                )
    else:
        classes = sorted(set().union(*folders.values()))
        unknown = [f for f in classes if f not in wnid_names]
        if unknown:
            raise ValueError(
                f"{where(spec)}: class folder(s) {unknown[:5]} under {image_dir} are not listed in {cls_path}."
            )
        classnames = [wnid_names[f] for f in classes]

    splits: Splits = {s: [] for s in SPLITS}
    for split, d in split_dirs.items():
        for label, folder in enumerate(classes):
            cdir = d / folder
            files = list_visible(cdir, dirs=False) if cdir.is_dir() else []
            if not files:
                raise ValueError(
                    f"{where(spec)}: empty class: no images in {cdir} (class {label} {classnames[label]!r})."
                )
            splits[split].extend(Item(str(cdir / f), label, classnames[label]) for f in files)
    return splits, classnames


def read_custom(spec: DatasetSpec, dataset_dir: Path, check_files: bool) -> tuple[Splits, list[str]]:
    """Read a user's own dataset: a split file if the YAML names one, else a CSV or class folders.

    Without a split (no split file, no `split` column), each class is shuffled with
    `random.Random(split_seed)` and cut into train / val / test by `split_ratio`, the rule of
    CoOp's `read_and_split_data`; the result lives in memory only (nothing is written into the
    data folder; `promptlab data fewshot --shots 0 --out` exports it).
    """
    if spec.split_file:
        return read_split_file(spec, dataset_dir, check_files)
    image_dir = dataset_dir / spec.image_dir
    require(image_dir, spec, "image folder", dataset_dir)
    given = None
    if spec.classnames_file:
        cls_path = dataset_dir / spec.classnames_file
        require(cls_path, spec, "class names file", dataset_dir)
        given = [ln.strip() for ln in cls_path.read_text().splitlines() if ln.strip()]

    rows: list[tuple[str, str, str | None]] = []  # (path, label or class name, split or None)
    if spec.csv:
        source = dataset_dir / spec.csv
        require(source, spec, "CSV file", dataset_dir)
        with open(source, newline="") as f:
            for n, rec in enumerate(csv.reader(f), start=1):
                if not rec or (n == 1 and rec[0].strip().lower() == "path"):
                    continue
                if len(rec) not in (2, 3):
                    raise ValueError(
                        f"{where(spec)}: {source}:{n}: expected path,label[,split], got {rec!r}."
                    )
                split = rec[2].strip() if len(rec) == 3 else None
                if split is not None and split not in SPLITS:
                    raise ValueError(f"{where(spec)}: {source}:{n}: unknown split {split!r}.")
                rows.append((str(image_dir / rec[0].strip()), rec[1].strip(), split))
        keys = sorted({lab for _, lab, _ in rows})
        if given is None and any(k.isdigit() for k in keys):
            raise ValueError(
                f"{where(spec)}: {source} uses integer labels; name the classes with `classnames_file`."
            )
        classnames = given if given is not None else keys
    else:  # one folder per class; the folder name, "_" read as " ", is the class name
        source = image_dir
        keys = list_visible(image_dir, dirs=True)
        for folder in keys:
            files = list_visible(image_dir / folder, dirs=False)
            if not files:
                raise ValueError(f"{where(spec)}: empty class: no images in {image_dir / folder}.")
            rows.extend((str(image_dir / folder / f), folder, None) for f in files)
        classnames = given if given is not None else [k.replace("_", " ") for k in keys]
        if len(classnames) != len(keys):
            raise ValueError(
                f"{where(spec)}: {len(keys)} class folders in {image_dir} but "
                f"{len(classnames)} names in {spec.classnames_file}."
            )
    label_of = {k: i for i, k in enumerate(keys if not spec.csv else classnames)}

    splits: Splits = {s: [] for s in SPLITS}
    unsplit = []
    for path, lab, split in rows:
        y = int(lab) if lab.isdigit() else label_of.get(lab, -1)
        if not 0 <= y < len(classnames):
            raise ValueError(
                f"{where(spec)}: label {lab!r} of {path} in {source} is not one of the "
                f"{len(classnames)} classes."
            )
        item = Item(path, y, classnames[y])
        (splits[split] if split else unsplit).append(item)
    if unsplit and any(splits.values()):
        raise ValueError(f"{where(spec)}: {source}: give a split for every row or for none.")
    if unsplit:
        splits = split_per_class(unsplit, spec)
    if check_files:
        check_images_exist(splits, spec, source)
    seen = {it.label for s in SPLITS for it in splits[s]}
    empty = [classnames[y] for y in range(len(classnames)) if y not in seen]
    if empty:
        raise ValueError(f"{where(spec)}: empty class(es) {empty[:5]}: no items in {source}.")
    return splits, classnames


def split_per_class(items: list[Item], spec: DatasetSpec) -> Splits:
    """Cut each class into train / val / test by `spec.split_ratio` after a seeded shuffle."""
    p_trn, p_val = spec.split_ratio
    rng = random.Random(spec.split_seed)
    by_label: dict[int, list[Item]] = {}
    for it in items:
        by_label.setdefault(it.label, []).append(it)
    out: Splits = {s: [] for s in SPLITS}
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        n_trn, n_val = round(len(group) * p_trn), round(len(group) * p_val)
        if n_trn < 1 or n_val < 1 or len(group) - n_trn - n_val < 1:
            raise ValueError(
                f"{where(spec)}: class {group[0].classname!r} has {len(group)} images, too few to split "
                f"{p_trn:.0%}/{p_val:.0%}/{1 - p_trn - p_val:.0%}; add a split file or more images."
            )
        out["train"] += group[:n_trn]
        out["val"] += group[n_trn : n_trn + n_val]
        out["test"] += group[n_trn + n_val :]
    return out


READERS = {
    "split_file": read_split_file,
    "fgvc_aircraft": read_fgvc_aircraft,
    "imagenet_folders": read_imagenet_folders,
    "custom": read_custom,
}
for _reader in READERS.values():  # also nameable by dotted path in a dataset YAML
    trust.register("reader")(_reader)
