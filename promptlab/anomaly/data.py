"""Anomaly-detection datasets as plain items: MVTec AD, VisA and a generic folder layout.

Layouts (folders as the datasets ship them; nothing to convert, no ``meta.json`` to generate):

* ``mvtec``: ``ROOT/<category>/train/good/*``, ``ROOT/<category>/test/<defect or good>/*`` and
  ``ROOT/<category>/ground_truth/<defect>/<image stem>_mask.png``.
* ``visa``: ``ROOT/split_csv/1cls.csv`` with columns ``object,split,label,image,mask`` (label
  ``normal`` / ``anomaly``; paths relative to ROOT), the file the VisA release provides.
* ``folder``: ``ROOT/<category>/{good,defect,masks}/`` (or those three folders directly in ROOT,
  one category named after ROOT), mask ``masks/<image stem>.<any image ext>``; a category without
  ``masks/`` is evaluated at the image level only. For the other industrial and medical sets.

Zero-shot protocol (AnomalyCLIP): prompts are trained on the *test* split of an auxiliary dataset,
the one with pixel masks (VisA to evaluate on MVTec AD, MVTec AD to evaluate on everything else).
Listings are sorted, so item order never depends on the file system.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from promptlab.data.images import read_image
from promptlab.transforms import OPENAI_MEAN, OPENAI_STD

LAYOUTS = ("mvtec", "visa", "folder")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class AnomalyItem:
    """One test image: ``label`` 1 = anomalous; ``mask`` None for normal images (all zeros) or no mask."""

    path: str
    label: int
    category: str
    mask: str | None = None
    defect: str = "good"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS) if folder.is_dir() else []


def read_mvtec(
    root: str | Path, split: str = "test", categories: Sequence[str] | None = None
) -> list[AnomalyItem]:
    """MVTec AD's official layout; ``split="train"`` lists the normal training images."""
    root = Path(root)
    cats = list(categories) if categories else sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    if not cats:
        raise FileNotFoundError(f"{root}: no MVTec AD categories (expected <category>/test/ folders)")
    items = []
    for cat in cats:
        for defect_dir in sorted(p for p in (root / cat / split).iterdir() if p.is_dir()):
            defect = defect_dir.name
            for img in _images(defect_dir):
                if defect == "good":
                    items.append(AnomalyItem(str(img), 0, cat))
                    continue
                mask = root / cat / "ground_truth" / defect / f"{img.stem}_mask.png"
                if not mask.is_file():
                    raise FileNotFoundError(f"{img}: its mask {mask} is missing")
                items.append(AnomalyItem(str(img), 1, cat, str(mask), defect))
    return items


def read_visa(
    root: str | Path, split: str = "test", categories: Sequence[str] | None = None
) -> list[AnomalyItem]:
    """VisA's official layout through ``split_csv/1cls.csv``."""
    root = Path(root)
    table = root / "split_csv" / "1cls.csv"
    if not table.is_file():
        raise FileNotFoundError(f"{table}: VisA's split file is missing")
    items = []
    with table.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] != split or (categories and row["object"] not in categories):
                continue
            bad = row["label"] == "anomaly"
            mask = str(root / row["mask"]) if bad and row.get("mask") else None
            items.append(
                AnomalyItem(
                    str(root / row["image"]), int(bad), row["object"], mask, "anomaly" if bad else "good"
                )
            )
    if not items:
        raise FileNotFoundError(f"{table}: no rows with split={split!r}")
    return sorted(items, key=lambda it: (it.category, it.path))


def read_folder(
    root: str | Path, split: str = "test", categories: Sequence[str] | None = None
) -> list[AnomalyItem]:
    """The generic ``good/ defect/ masks/`` layout (``split`` is ignored: everything is test data)."""
    root = Path(root)
    dirs = [root] if (root / "good").is_dir() else sorted(p for p in root.iterdir() if (p / "good").is_dir())
    dirs = [d for d in dirs if not categories or d.name in categories]
    if not dirs:
        raise FileNotFoundError(f"{root}: expected good/ and defect/ folders (directly or per category)")
    items = []
    for d in dirs:
        items += [AnomalyItem(str(p), 0, d.name) for p in _images(d / "good")]
        masks = {p.stem: p for p in _images(d / "masks")}
        for p in _images(d / "defect"):
            m = masks.get(p.stem) or masks.get(f"{p.stem}_mask")
            if masks and m is None:
                raise FileNotFoundError(f"{p}: no mask named {p.stem}.* in {d / 'masks'}")
            items.append(AnomalyItem(str(p), 1, d.name, str(m) if m else None, "defect"))
    return items


READERS = {"mvtec": read_mvtec, "visa": read_visa, "folder": read_folder}


def load_items(
    layout: str, root: str | Path, split: str = "test", categories: Sequence[str] | None = None
) -> list[AnomalyItem]:
    """Items of one dataset in one of ``LAYOUTS``."""
    if layout not in READERS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    return READERS[layout](root, split, categories)


def image_transform(
    size: int, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD
) -> T.Compose:
    """AnomalyCLIP's test transform: resize to ``size`` x ``size`` (bicubic, no crop), CLIP normalisation."""
    return T.Compose(
        [
            T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def read_mask(path: str | None, size: int) -> torch.Tensor:
    """[1, size, size] float mask in {0, 1}: nonzero pixels, bilinear resize, then > 0.5 (as the reference)."""
    if path is None:
        return torch.zeros(1, size, size)
    with Image.open(path) as m:
        arr = (np.asarray(m.convert("L")) > 0).astype(np.uint8) * 255
    m = Image.fromarray(arr, mode="L").resize((size, size), Image.BILINEAR)
    return (torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0) > 0.5).float().unsqueeze(0)


class AnomalyDataset(Dataset):
    """Items as ``(image [3, S, S], mask [1, S, S], label, index)`` samples."""

    def __init__(
        self,
        items: Sequence[AnomalyItem],
        image_size: int,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
    ):
        self.items = list(items)
        self.size = image_size
        self.transform = image_transform(image_size, mean, std)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        it = self.items[i]
        img = read_image(it.path)
        return self.transform(img), read_mask(it.mask, self.size), it.label, i


def write_synthetic(
    root: str | Path,
    layout: str,
    categories: Sequence[str] = ("widget",),
    n_good: int = 3,
    n_defect: int = 3,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Tiny images with known square defects, in the ``mvtec``, ``visa`` or ``folder`` layout (tests, demos).

    Normal images are smooth noise around a per-category colour; a defect is a bright square whose
    mask is exactly the square.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    rows = []
    for ci, cat in enumerate(categories):
        for k in range(n_good + n_defect):
            bad = k >= n_good
            img = np.clip(rng.normal(80 + 40 * ci, 10, (size, size, 3)), 0, 255)
            mask = np.zeros((size, size), np.uint8)
            if bad:
                s = size // 4
                y, x = rng.integers(0, size - s, 2)
                img[y : y + s, x : x + s] = 250
                mask[y : y + s, x : x + s] = 255
            name = f"{k:03d}.png"
            if layout == "mvtec":
                d = "broken" if bad else "good"
                ip = root / cat / "test" / d / name
                mp = root / cat / "ground_truth" / d / f"{k:03d}_mask.png"
            elif layout == "visa":
                d = "Anomaly" if bad else "Normal"
                ip = root / cat / "Data" / "Images" / d / name
                mp = root / cat / "Data" / "Masks" / "Anomaly" / name
                rows.append(
                    [
                        cat,
                        "test",
                        "anomaly" if bad else "normal",
                        str(ip.relative_to(root)),
                        str(mp.relative_to(root)) if bad else "",
                    ]
                )
            elif layout == "folder":
                ip = root / cat / ("defect" if bad else "good") / name
                mp = root / cat / "masks" / name
            else:
                raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
            ip.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.astype(np.uint8)).save(ip)
            if bad:
                mp.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(mp)
        if layout == "mvtec":  # the training split holds normal images only
            (root / cat / "train" / "good").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((size, size, 3), 80 + 40 * ci, np.uint8)).save(
                root / cat / "train" / "good" / "000.png"
            )
    if layout == "visa":
        (root / "split_csv").mkdir(parents=True, exist_ok=True)
        with (root / "split_csv" / "1cls.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["object", "split", "label", "image", "mask"], *rows])
    return root
