"""Readers for the video datasets' official layouts and for ViFi-CLIP's split lists.

Each reader has the signature of ``promptlab.data.readers`` (``reader(spec, dataset_dir, check_files)
-> (splits, classnames)``) and is named in a dataset YAML by its dotted path, e.g.
``reader: promptlab.video.datasets.read_ucf101``, with ``modality: video``. List-file names may hold
``{fold}`` (official split 1..3, ``data.fold``), ``{seed}`` and ``{shots}`` placeholders, filled from
the run by ``load_dataset``.

A listed video resolves to the file itself or, when that is absent, to a folder of extracted
frames at the same path without its extension (``v_ApplyEyeMakeup_g08_c01/``): both layouts work
unchanged.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from promptlab import trust
from promptlab.data.items import SPLITS, Item
from promptlab.data.readers import check_images_exist, fix_hint, require, where

if TYPE_CHECKING:
    from promptlab.data.registry import DatasetSpec

log = logging.getLogger(__name__)
Splits = dict[str, list[Item]]


def resolve_video(video_dir: Path, rel: str) -> str:
    """The video file ``video_dir/rel``, or its frame folder (same path without the extension)."""
    path = os.path.join(str(video_dir), rel)
    if os.path.exists(path):
        return path
    frames = os.path.splitext(path)[0]
    return frames if os.path.isdir(frames) else path


@trust.register("reader")
def read_ucf101(spec: DatasetSpec, dataset_dir: Path, check_files: bool) -> tuple[Splits, list[str]]:
    """UCF101's ``ucfTrainTestList``: ``classInd.txt`` ("1 ApplyEyeMakeup"), ``trainlist0N.txt``
    ("ApplyEyeMakeup/v_..._c01.avi 1") and ``testlist0N.txt`` (path only; the class is its folder).

    Class names are those of ``classInd.txt`` as written (ViFi-CLIP's label file uses them so).
    """
    cls_path = dataset_dir / spec.classnames_file
    require(cls_path, spec, "class index", dataset_dir)
    classnames = []
    for n, line in enumerate(cls_path.read_text().splitlines(), start=1):
        if line.strip():
            idx, _, name = line.strip().partition(" ")
            if int(idx) != len(classnames) + 1:
                raise ValueError(
                    f"{where(spec)}: {cls_path}:{n}: expected class index {len(classnames) + 1}, got {idx}."
                )
            classnames.append(name.strip())
    label_of = {c: i for i, c in enumerate(classnames)}
    video_dir = dataset_dir / spec.image_dir
    splits: Splits = {}
    for split, fname in spec.splits.items():
        path = dataset_dir / fname
        require(path, spec, f"{split} list", dataset_dir)
        items = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            rel = line.split()[0]
            folder = rel.split("/")[0]
            if folder not in label_of:
                raise ValueError(f"{where(spec)}: {path}:{n}: class folder {folder!r} is not in {cls_path}.")
            y = label_of[folder]
            items.append(Item(resolve_video(video_dir, rel), y, classnames[y]))
        splits[split] = items
    if check_files:
        require(video_dir, spec, "video folder", dataset_dir)
        check_images_exist_or_frames(
            splits, spec, ", ".join(str(dataset_dir / f) for f in spec.splits.values())
        )
    return {s: splits.get(s, []) for s in SPLITS}, classnames


@trust.register("reader")
def read_hmdb51(spec: DatasetSpec, dataset_dir: Path, check_files: bool) -> tuple[Splits, list[str]]:
    """HMDB51's per-class split files ``<class>_test_split<N>.txt`` ("<video>.avi 1|2|0": 1 train,
    2 test, 0 unused), matched by the glob ``split_file``; videos under ``image_dir/<class>/``.

    Classes are the split files' class names, sorted (ViFi-CLIP's label order), "_" read as " ".
    """
    pattern = str(dataset_dir / spec.split_file)
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(
            f"{where(spec)}: no split files match {pattern}.{fix_hint(spec, spec.split_file)}"
        )
    suffix = Path(spec.split_file).name.split("*", 1)[1]
    video_dir = dataset_dir / spec.image_dir
    classnames, splits = [], {"train": [], "val": [], "test": []}
    for y, f in enumerate(files):
        cls = Path(f).name[: -len(suffix)]
        classnames.append(cls.replace("_", " "))
        for n, line in enumerate(Path(f).read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in "012":
                raise ValueError(f"{where(spec)}: {f}:{n}: expected '<video> 0|1|2', got {line!r}.")
            if parts[1] != "0":
                split = "train" if parts[1] == "1" else "test"
                splits[split].append(Item(resolve_video(video_dir / cls, parts[0]), y, classnames[y]))
    if check_files:
        require(video_dir, spec, "video folder", dataset_dir)
        check_images_exist_or_frames(splits, spec, pattern)
    return splits, classnames


@trust.register("reader")
def read_kinetics(spec: DatasetSpec, dataset_dir: Path, check_files: bool) -> tuple[Splits, list[str]]:
    """Kinetics CSV annotations (``label,youtube_id,time_start,time_end,split[,is_cc]``) and clip folders.

    A clip is ``image_dir/<csv split>/<youtube_id>_<start:06d>_<end:06d>.mp4`` (CVDF / ViFi-CLIP
    layout) or the same file inside a ``<label>/`` sub-folder (mmaction2 layout). Classes are the
    training CSV's labels, sorted (the standard Kinetics class index). Kinetics videos disappear
    from YouTube, so with ``check_files`` missing clips are dropped with a logged count, not an error.
    """
    video_dir = dataset_dir / spec.image_dir
    rows: dict[str, list[tuple[str, str]]] = {}
    for split, fname in spec.splits.items():
        path = dataset_dir / fname
        require(path, spec, f"{split} annotations", dataset_dir)
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            need = {"label", "youtube_id", "time_start", "time_end"}
            if not need <= set(reader.fieldnames or ()):
                raise ValueError(
                    f"{where(spec)}: {path} needs columns {sorted(need)}, has {reader.fieldnames}."
                )
            rows[split] = []
            for r in reader:
                name = (
                    f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}.mp4"
                )
                sub = r.get("split") or ("train" if split == "train" else "val")
                flat = os.path.join(sub, name)
                nested = os.path.join(sub, r["label"], name)
                rel = (
                    nested
                    if not os.path.exists(video_dir / flat) and os.path.exists(video_dir / nested)
                    else flat
                )
                rows[split].append((rel, r["label"].strip()))
    source = "train" if "train" in rows else next(iter(rows))
    classnames = sorted({lab for _, lab in rows[source]})
    label_of = {c: i for i, c in enumerate(classnames)}
    splits: Splits = {s: [] for s in SPLITS}
    for split, entries in rows.items():
        for rel, lab in entries:
            if lab not in label_of:
                raise ValueError(
                    f"{where(spec)}: {split} label {lab!r} is not a class of the {source} annotations."
                )
            splits[split].append(Item(resolve_video(video_dir, rel), label_of[lab], lab))
    if check_files:
        for split in SPLITS:
            kept = [it for it in splits[split] if os.path.exists(it.path)]
            if len(kept) < len(splits[split]):
                log.warning(
                    "%s: %d of %d %s clips missing on disk, left out",
                    spec.name,
                    len(splits[split]) - len(kept),
                    len(splits[split]),
                    split,
                )
            splits[split] = kept
    return splits, classnames


@trust.register("reader")
def read_vifi_lists(spec: DatasetSpec, dataset_dir: Path, check_files: bool) -> tuple[Splits, list[str]]:
    """ViFi-CLIP's split lists (``datasets_splits/``: "<video> <label>" per line) and label CSVs
    (``labels/``: ``id,name``), copied from muzairkhattak/ViFi-CLIP into the dataset folder.

    A listed name is looked up under ``image_dir`` as written, else by file name anywhere below it
    (the UCF101 lists name bare files while UCF-101 keeps class folders).
    """
    cls_path = dataset_dir / spec.classnames_file
    require(cls_path, spec, "label CSV", dataset_dir)
    with open(cls_path, newline="") as fh:
        names = {int(r["id"]): r["name"].strip() for r in csv.DictReader(fh)}
    classnames = [names[i] for i in range(len(names))]
    video_dir = dataset_dir / spec.image_dir
    index: dict[str, str] | None = None
    splits: Splits = {s: [] for s in SPLITS}
    for split, fname in spec.splits.items():
        path = dataset_dir / fname
        require(path, spec, f"{split} list", dataset_dir)
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            rel, y = parts[0], int(parts[1])
            if not 0 <= y < len(classnames):
                raise ValueError(
                    f"{where(spec)}: {path}:{n}: label {y} is not in {cls_path} ({len(classnames)} classes)."
                )
            p = resolve_video(video_dir, rel)
            if not os.path.exists(p):
                if index is None:
                    index = _index_by_name(video_dir)
                p = index.get(Path(rel).name) or index.get(Path(rel).stem) or p
            splits[split].append(Item(p, y, classnames[y]))
    if check_files:
        require(video_dir, spec, "video folder", dataset_dir)
        check_images_exist_or_frames(
            splits, spec, ", ".join(str(dataset_dir / f) for f in spec.splits.values())
        )
    return splits, classnames


def _index_by_name(video_dir: Path) -> dict[str, str]:
    """File name (and frame-folder name) -> path for everything below ``video_dir``."""
    out: dict[str, str] = {}
    for root, dirs, files in os.walk(video_dir):
        dirs.sort()
        for f in sorted(files):
            out.setdefault(f, os.path.join(root, f))
        for d in dirs:
            out.setdefault(d, os.path.join(root, d))
    return out


def check_images_exist_or_frames(splits: Splits, spec: DatasetSpec, source: str) -> None:
    """Raise FileNotFoundError naming the listed videos that are neither a file nor a frame folder."""
    if any(not os.path.exists(it.path) for s in SPLITS for it in splits.get(s, [])):
        missing = {s: [it for it in splits.get(s, []) if not os.path.exists(it.path)] for s in SPLITS}
        check_images_exist(missing, spec, source)  # raises, naming the files and the fix
