"""Decoded images kept in memory across epochs: the same batches, draws and features as decoding every time."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from promptlab.data import ImageDataset, Item
from promptlab.data.images import DecodedImages, ImageReadError
from promptlab.engine import ImageBatches
from promptlab.features import encode_items
from promptlab.transforms import train_transform


def _jpegs(root: Path, n: int = 6) -> list[Item]:
    """JPEG files of different sizes (so that a budget can hold some of them), each with its own content."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        h, w = 40 + 8 * i, 56 - 4 * i
        p = root / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p, quality=85)
        items.append(Item(str(p), i % 3, f"c{i % 3}"))
    return items


def _epochs(items: list[Item], decoded_mb: float, workers: int, epochs: int = 2) -> list[torch.Tensor]:
    """Every batch of ``epochs`` epochs of the exact protocol's training loader (fresh crop + flip)."""
    ds = ImageDataset(items, train_transform(24), decoded_mb=decoded_mb, threads=2)
    batches = ImageBatches(ds, 4, torch.Generator().manual_seed(5), shuffle=True, num_workers=workers)
    torch.manual_seed(0)  # workers=0: the transforms draw from the global RNG
    return [torch.cat([x["images"].flatten(), y.float()]) for _ in range(epochs) for x, y in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_training_batches_equal_decoding_every_epoch(tmp_path, workers):
    items = _jpegs(tmp_path)
    held = ImageDataset(items, None, decoded_mb=64)
    assert held.decoded is not None and len(held.decoded) == len(items)  # every image held in memory
    plain, cached = _epochs(items, 0, workers), _epochs(items, 64, workers)
    assert len(plain) == 2 and not torch.equal(plain[0], plain[1])  # two epochs, other crops each time
    for a, b in zip(plain, cached):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same shuffles, crops and flips, same pixels


def test_memory_budget_holds_some_and_reads_the_rest(tmp_path, caplog):
    items = _jpegs(tmp_path)
    sizes = [Image.open(it.path).width * Image.open(it.path).height * 3 for it in items]
    budget_mb = (sizes[0] + sizes[1] + sizes[2] // 2) / 2**20  # room for the first two images only
    with caplog.at_level(logging.INFO, logger="promptlab.data.images"):
        d = DecodedImages([it.path for it in items], budget_mb)
    assert len(d) == 2 and d.missed == len(items) - 2 and d.bytes == sizes[0] + sizes[1]
    assert "2 of 6" in caplog.text and "decoded from their files on every read" in caplog.text
    for it in items:  # held or not, the same pixels as a fresh decode
        assert np.array_equal(np.asarray(d.read(it.path)), np.asarray(Image.open(it.path).convert("RGB")))
    assert all(torch.equal(a, b) for a, b in zip(_epochs(items, budget_mb, 0), _epochs(items, 0, 0)))


def test_unreadable_file_is_named_when_read(tmp_path):
    items = _jpegs(tmp_path, 2)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    d = DecodedImages([items[0].path, str(bad)], 64)
    assert len(d) == 1 and d.missed == 1
    with pytest.raises(ImageReadError, match="bad.jpg"):
        d.read(str(bad))


def test_augmented_views_decode_once_and_encode_the_same(tmp_path, monkeypatch):
    import promptlab.data.images as images

    items = _jpegs(tmp_path, 4)
    decodes = []
    real = images.read_image
    monkeypatch.setattr(images, "read_image", lambda p: decodes.append(p) or real(p))

    def encode(x):
        return x.flatten(1)[:, :50]

    plain = encode_items(encode, items, train_transform(24), views=3, seed=1)
    assert len(decodes) == 3 * len(items)
    decodes.clear()
    held = encode_items(encode, items, train_transform(24), views=3, seed=1, decoded_mb=64)
    assert len(decodes) == len(items)  # one decode per file for three views
    torch.testing.assert_close(held, plain, rtol=0, atol=0)


def test_the_exact_protocol_training_batches_hold_decoded_images(tmp_path, tiny_clip):
    """The task's training batches (feature_cache off) keep the images decoded; evaluation batches and
    data.decoded_cache_mb=0 do not."""
    from promptlab.config import load_recipe
    from promptlab.methods import CoOp
    from promptlab.tasks import Classification

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "demo" / "coop_tiny.yaml"
    base = [f"cache_dir={tmp_path}", "train.feature_cache=false", f"output_dir={tmp_path / 'run'}"]
    task = Classification()
    for budget, held in ((64, True), (0, False)):
        cfg = load_recipe(recipe, [*base, f"data.decoded_cache_mb={budget}"], check_paths=False)
        task.ensure_data(cfg)
        data = task.prepare(cfg)
        module = CoOp(tiny_clip, data.classnames, n_ctx=2)
        kw = dict(generator=torch.Generator(), device=torch.device("cpu"))
        train = task.batches(cfg, data, module, train=True, **kw).loader.dataset
        assert (train.decoded is not None and len(train.decoded) == len(data.train)) == held
        test = task.batches(cfg, data, module, train=False, **kw)
        assert not hasattr(test, "loader")  # evaluation reads cached features: no image decoding kept
