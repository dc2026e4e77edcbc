"""Tiny fake copies of the on-disk dataset layouts of CoOp's DATASETS.md, built in tmp_path."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from promptlab.data import get_spec
from promptlab.sweep import BENCHMARK_DATASETS

SPLIT_FILE_DATASETS = [n for n in BENCHMARK_DATASETS if get_spec(n).reader == "split_file"]
# (train, val, test) images per class; class 2 is short, to exercise "fewer than K".
COUNTS = {0: (7, 5, 3), 1: (6, 4, 3), 2: (2, 1, 2), 3: (9, 6, 3), 4: (5, 3, 3)}
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331"]
WNID_NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray"]


def write_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> None:
    """Write a tiny real image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def build_split_dataset(root: Path, name: str, counts: dict = COUNTS, seed: int = 0) -> dict:
    """Write a split-file dataset in `name`'s exact layout; return the split dict written.

    Entries are shuffled, so labels first appear out of order, as in the real split files.
    """
    spec = get_spec(name)
    folder = root / spec.folder
    image_dir = folder / spec.image_dir
    rng = random.Random(seed)
    split = {}
    for s_idx, s in enumerate(("train", "val", "test")):
        rows = []
        for label, n in counts.items():
            cname = f"class {label}" if name != "caltech101" else f"thing_{label}"
            sub = f"cars_{s}" if name == "stanford_cars" else f"c{label}"
            for i in range(n[s_idx]):
                rel = f"{sub}/{s}_{label}_{i}.jpg"
                write_image(image_dir / rel, (label * 40, i * 10, 90))
                rows.append([rel, label, cname])
        rng.shuffle(rows)
        split[s] = rows
    (folder / spec.split_file).write_text(json.dumps(split))
    return split


def build_fgvc(root: Path) -> list[str]:
    """Write FGVCAircraft's official layout: variants.txt, images_variant_*.txt, images/."""
    folder = root / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "F/A-18", "Boeing 737-200"]
    folder.mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    n = 0
    for split in ("train", "val", "test"):
        lines = []
        for v in variants:
            for _ in range(3):
                image_id = f"{1000000 + n:07d}"
                n += 1
                write_image(folder / "images" / f"{image_id}.jpg")
                lines.append(f"{image_id} {v}")
        (folder / f"images_variant_{split}.txt").write_text("\n".join(reversed(lines)) + "\n")
    return variants


def build_imagenet_like(root: Path, name: str, wnids: list[str] = WNIDS, per_class: int = 3) -> Path:
    """Write an ImageNet-style layout for `name`: classnames.txt and class folders per split.

    Folders are created in reverse order, and a README.txt sits beside them (as in ImageNet-R),
    to show the reader sorts and skips non-folders.
    """
    spec = get_spec(name)
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {c}\n" for w, c in zip(WNIDS, WNID_NAMES)))
    for sub in spec.splits.values():
        d = folder / spec.image_dir / sub
        d.mkdir(parents=True, exist_ok=True)
        (d / "README.txt").write_text("not a class")
        for w in reversed(wnids):
            cls = str(WNIDS.index(w)) if spec.folder_names == "index" else w
            for i in reversed(range(per_class)):
                write_image(d / cls / f"img_{i}.jpeg")
    return folder


def build_layout(root: Path, name: str) -> None:
    """A fake copy of any of the 11 benchmark datasets' on-disk layouts under ``root``."""
    if name == "fgvc_aircraft":
        build_fgvc(root)
    elif name == "imagenet":
        build_imagenet_like(root, name)
    else:
        build_split_dataset(root, name)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def pets_root(data_root: Path) -> Path:
    """A data root holding a fake oxford_pets (5 classes, shuffled split file)."""
    build_split_dataset(data_root, "oxford_pets")
    return data_root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under root, to prove nothing was written there."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def helpers():
    """The builders above, for tests (conftest modules are not importable by name)."""

    class H:
        pass

    for f in (write_image, build_split_dataset, build_fgvc, build_imagenet_like, build_layout, snapshot):
        setattr(H, f.__name__, staticmethod(f))
    H.SPLIT_FILE_DATASETS = SPLIT_FILE_DATASETS
    H.COUNTS = COUNTS
    H.WNIDS = WNIDS
    H.WNID_NAMES = WNID_NAMES
    return H
