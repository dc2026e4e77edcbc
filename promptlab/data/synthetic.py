"""A tiny rendered dataset of coloured shapes, in CoOp's split-file layout, for demos and tests.

Each class is a colour and a shape ("red circle"); every image is a render of the sandbox world
(:mod:`promptlab.sandbox.world`, clean style) with a random size, position, pattern and background,
so a model has something to learn and CLIP has words to match. Written as
`<root>/synthetic/images/<class>/<split>_<i>.png` plus `<root>/synthetic/split_synthetic.json`, it is
read by the ordinary split-file reader (`load_dataset("synthetic", root)`), so demos exercise the
same path as the real benchmarks. The sandbox datasets (`datasets/sandbox_*.yaml`) are the same
world at benchmark size, in a shifted style.
"""

from __future__ import annotations

import random
from itertools import product
from pathlib import Path

from promptlab import trust
from promptlab.data.generated import write_split_dataset
from promptlab.sandbox.world import class_scene, render

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
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
    return [f"{COLOURS[c]} {SHAPES[s]}" for c, s in pairs[:n_classes]]


@trust.register("generator")
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

    def draw(classname: str, rel: str):
        rng = random.Random(f"{seed}/{rel}")
        return render(class_scene(classname, rng), rng, size=image_size)

    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    params = {"generator": "synthetic", "seed": seed, "image_size": image_size}
    return write_split_dataset(
        Path(root) / "synthetic", SPLIT_FILE, synthetic_classnames(n_classes), counts, params, draw
    )
