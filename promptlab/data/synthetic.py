"""A tiny rendered dataset of coloured shapes, in CoOp's split-file layout, for demos and tests.

Each class is a colour and a shape ("red circle"); every image is a real render with a jittered
position, size, shape colour and background, so a model has something to learn and CLIP has
words to match. Written as `<root>/synthetic/images/<class>/<split>_<i>.png` plus
`<root>/synthetic/split_synthetic.json`, it is read by the ordinary split-file reader
(`load_dataset("synthetic", root)`), so demos exercise the same path as the real benchmarks.
"""

from __future__ import annotations

import json
import logging
import random
from itertools import product
from pathlib import Path

from PIL import Image, ImageDraw

from promptlab.data.items import dump_split_json

log = logging.getLogger(__name__)

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 205, 40),
    "purple": (135, 55, 175),
    "orange": (240, 135, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SPLIT_FILE = "split_synthetic.json"


def synthetic_classnames(n_classes: int) -> list[str]:
    """Class names in label order, walking colour x shape diagonally.

    Diagonal order makes consecutive classes differ in both colour and shape, so the base and
    the new half share colours and shapes and "new" classes are new combinations.
    """
    nc, ns = len(COLOURS), len(SHAPES)
    if not 1 <= n_classes <= nc * ns:
        raise ValueError(f"n_classes must be between 1 and {nc * ns}, got {n_classes}")
    pairs = sorted(product(range(nc), range(ns)), key=lambda p: ((p[1] - p[0]) % ns, p[0]))
    colours = list(COLOURS)
    return [f"{colours[c]} {SHAPES[s]}" for c, s in pairs[:n_classes]]


def render_shape(classname: str, size: int, rng: random.Random) -> Image.Image:
    """Render one image of `classname` with random position, size, colour and background jitter."""
    colour_name, shape = classname.split(" ")
    scale = 4  # draw large and downsample: anti-aliased edges like a real photo's
    s = size * scale
    grey = rng.randint(0, 255)
    bg = tuple(min(255, max(0, grey + rng.randint(-20, 20))) for _ in range(3))
    fg = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in COLOURS[colour_name])
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.2, 0.38) * s
    cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fg)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)], fill=fg)
    else:
        draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=fg)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def make_synthetic_dataset(
    root: str | Path,
    n_classes: int = 6,
    train_per_class: int = 8,
    val_per_class: int = 2,
    test_per_class: int = 6,
    image_size: int = 32,
    seed: int = 0,
) -> Path:
    """Write the synthetic dataset under `root` (skipped when already complete).

    Deterministic: every image's randomness comes from `random.Random(f"{seed}/{relative path}")`,
    so the same arguments give the same files on any machine. The split file is written last,
    so an interrupted run is redone on the next call.

    Args:
        root: The data root; the dataset goes to `root/synthetic/`.
        n_classes: Number of colour-shape classes (at most 24).
        train_per_class: Training images per class.
        val_per_class: Validation images per class.
        test_per_class: Test images per class.
        image_size: Side of the square images, in pixels.
        seed: Seed of the renders.

    Returns:
        The dataset folder `root/synthetic`.
    """
    folder = Path(root) / "synthetic"
    image_dir = folder / "images"
    classnames = synthetic_classnames(n_classes)
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    split = {
        s: [
            [f"{c.replace(' ', '_')}/{s}_{i:03d}.png", y, c]
            for y, c in enumerate(classnames)
            for i in range(n)
        ]
        for s, n in counts.items()
    }
    split_path = folder / SPLIT_FILE
    meta = {"seed": seed, "image_size": image_size}
    meta_path = folder / "synthetic_params.json"
    if (
        split_path.is_file()
        and meta_path.is_file()
        and json.loads(split_path.read_text()) == split
        and json.loads(meta_path.read_text()) == meta
        and all((image_dir / row[0]).is_file() for rows in split.values() for row in rows)
    ):
        log.info("synthetic dataset already complete at %s", folder)
        return folder

    for rows in split.values():
        for rel, _, classname in rows:
            rng = random.Random(f"{seed}/{rel}")
            (image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            render_shape(classname, image_size, rng).save(image_dir / rel)
    meta_path.write_text(json.dumps(meta))
    tmp = split_path.with_suffix(".tmp")
    tmp.write_text(dump_split_json(split))
    tmp.replace(split_path)
    log.info("wrote synthetic dataset (%d classes) to %s", n_classes, folder)
    return folder
