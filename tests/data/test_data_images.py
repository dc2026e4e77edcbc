"""ImageDataset, the loader settings, and the synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from promptlab.data import (
    ImageDataset,
    ImageReadError,
    Item,
    fewshot_split,
    load_dataset,
    make_loader,
    make_synthetic_dataset,
    subsample_classes,
)
from promptlab.sandbox.world import COLOURS


def test_image_dataset_returns_tensor_label_index(tmp_path, helpers):
    helpers.write_image(tmp_path / "a.png", (255, 0, 0), size=5)
    helpers.write_image(tmp_path / "b.png", (0, 0, 255), size=5)
    items = [Item(str(tmp_path / "a.png"), 3, "red"), Item(str(tmp_path / "b.png"), 1, "blue")]
    x, y, i = ImageDataset(items)[1]
    assert x.shape == (3, 5, 5) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert (y, i) == (1, 1)
    x, _, _ = ImageDataset(items, transform=lambda im: torch.tensor(im.size))[0]
    assert x.tolist() == [5, 5]


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00"])
def test_corrupt_image_error_names_path(tmp_path, content):
    bad = tmp_path / "broken.png"
    bad.write_bytes(content)
    ds = ImageDataset([Item(str(bad), 0, "x")])
    with pytest.raises(ImageReadError, match=f"cannot read image {bad}"):
        ds[0]


def test_truncated_image_error_names_path(tmp_path, helpers):
    path = tmp_path / "cut.png"
    helpers.write_image(path, size=64)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ImageReadError, match="cut.png"):
        ImageDataset([Item(str(path), 0, "x")])[0]


def test_missing_image_error_names_path(tmp_path):
    with pytest.raises(ImageReadError, match="gone.jpg"):
        ImageDataset([Item(str(tmp_path / "gone.jpg"), 0, "x")])[0]


def test_loader_drops_last_only_with_a_full_batch(tmp_path, helpers):
    items = []
    for i in range(5):
        helpers.write_image(tmp_path / f"{i}.png")
        items.append(Item(str(tmp_path / f"{i}.png"), i, str(i)))
    ds = ImageDataset(items)
    assert len(make_loader(ds, 2, train=True, num_workers=0)) == 2  # 5 // 2, last dropped
    assert len(make_loader(ds, 8, train=True, num_workers=0)) == 1  # smaller than a batch: kept
    batch = next(iter(make_loader(ds, 4, train=False, num_workers=0)))
    assert batch[2].tolist() == [0, 1, 2, 3]  # eval keeps order; index maps rows to items


def test_synthetic_layout_and_load(tmp_path):
    folder = make_synthetic_dataset(
        tmp_path, n_classes=5, train_per_class=4, val_per_class=1, test_per_class=2
    )
    assert folder == tmp_path / "synthetic"
    split = json.loads((folder / "split_synthetic.json").read_text())
    assert set(split) == {"train", "val", "test"}
    assert split["train"][0] == ["red_circle/train_000.png", 0, "red circle"]
    ds = load_dataset("synthetic", tmp_path)  # through the normal split-file reader
    assert ds.classnames == ["red circle", "green square", "blue triangle", "yellow diamond", "purple circle"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (20, 5, 10)
    assert all(Path(it.path).parent.parent == folder / "images" for it in ds.test)
    base = subsample_classes(fewshot_split(ds, 2, 1), "base")
    assert base.classnames == ds.classnames[:3] and len(base.train) == 6


def test_synthetic_images_are_renders_of_their_class(tmp_path):
    make_synthetic_dataset(tmp_path, n_classes=3, image_size=32)
    ds = load_dataset("synthetic", tmp_path)
    for it in ds.test:
        img, _, _ = ImageDataset([it])[0]
        pix = (img.permute(1, 2, 0).reshape(-1, 3) * 255).numpy()
        target = np.array(COLOURS[it.classname.split()[0]])
        near = (np.abs(pix - target).max(axis=1) < 40).mean()
        assert 0.01 < near < 0.9, it  # a shape of the class colour on a distinct background
        assert len(np.unique(pix.round(), axis=0)) > 2  # anti-aliased render, not a flat fill


def test_synthetic_deterministic_and_idempotent(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", seed=3)
    b = make_synthetic_dataset(tmp_path / "b", seed=3)
    c = make_synthetic_dataset(tmp_path / "c", seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 6 * (8 + 2 + 6)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    mtimes = {f: (a / f).stat().st_mtime_ns for f in files}
    make_synthetic_dataset(tmp_path / "a", seed=3)  # complete: nothing rewritten
    assert {f: (a / f).stat().st_mtime_ns for f in files} == mtimes
    (a / files[0]).unlink()  # incomplete: redone
    make_synthetic_dataset(tmp_path / "a", seed=3)
    assert (a / files[0]).read_bytes() == (b / files[0]).read_bytes()


def test_synthetic_rejects_too_many_classes(tmp_path):
    with pytest.raises(ValueError, match="n_classes"):
        make_synthetic_dataset(tmp_path, n_classes=25)
