"""The sandbox's anomaly variant: object categories with scratches, holes and stains, and their masks.

Each category is one object type of the sandbox world (a shape, a colour, a pattern, a background),
drawn large and centred with small variations of size, position, rotation and colour, as the
objects of MVTec AD are photographed. A defective image is the same render with one defect painted
inside the object:

* ``scratch``: a thin bent line, lighter or darker than the object's surface;
* ``hole``: a background-coloured blob (the object is missing there);
* ``stain``: a blotch of dark or odd-coloured paint, partly transparent.

The defect is clipped to the object, so its mask is exactly what changed. Datasets are written in
MVTec AD's on-disk layout (``<category>/train/good``, ``<category>/test/<defect or good>``,
``<category>/ground_truth/<defect>/<stem>_mask.png``), so :func:`promptlab.anomaly.data.read_mvtec`
reads them unchanged. Two disjoint sets of categories (:data:`SET_A`, :data:`SET_B`) give the
zero-shot protocol of AnomalyCLIP: learn the prompts on one, evaluate on objects never seen.
Every pixel comes from ``Random(f"{seed}/{category}/{split}/{defect}/{index}")``: the same
arguments write the same files on any machine, in a few seconds.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from promptlab import trust
from promptlab.data.generated import begin, commit, recorded_params, up_to_date
from promptlab.sandbox.world import BACKGROUNDS, COLOURS, _jitter, fill_object

log = logging.getLogger(__name__)

DEFECTS = ("scratch", "hole", "stain")
_SCALE = 4  # drawn at 4x and downsampled, as world.render does: anti-aliased edges


@dataclass(frozen=True)
class ObjectType:
    """What every image of one category shows (a "product" on a production line)."""

    shape: str
    colour: str
    pattern: str = "plain"
    background: str = "grey"


#: Object categories by name. Fat shapes only: a defect must fit inside the object.
CATEGORIES: dict[str, ObjectType] = {
    # set A (the auxiliary set the prompts are trained on)
    "blue_hexagon": ObjectType("hexagon", "blue", "plain", "beige"),
    "orange_circle": ObjectType("circle", "orange", "striped", "dark blue"),
    "green_square": ObjectType("square", "green", "plain", "white"),
    "pink_heart": ObjectType("heart", "pink", "checkered", "grey"),
    # set B (never seen in training: the zero-shot target)
    # a dark background, not white: holes would hide among the white stripes
    "red_square": ObjectType("square", "red", "striped", "dark blue"),
    "yellow_circle": ObjectType("circle", "yellow", "plain", "grey"),
    "cyan_heart": ObjectType("heart", "cyan", "plain", "black"),
    "purple_hexagon": ObjectType("hexagon", "purple", "dotted", "beige"),
}
SET_A = ("blue_hexagon", "orange_circle", "green_square", "pink_heart")
SET_B = ("red_square", "yellow_circle", "cyan_heart", "purple_hexagon")
_ODD = ("brown", "black", "purple", "green", "orange")  # stain colours


def _luma(rgb: Sequence[int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _draw_object(
    obj: ObjectType, rng: random.Random, s: int
) -> tuple[Image.Image, Image.Image, tuple, tuple, float]:
    """The good object at the supersampled side ``s``: (image, object mask "L", surface colour, background, radius)."""
    bg = _jitter(BACKGROUNDS[obj.background], 8, rng)
    img = Image.new("RGB", (s, s), bg)
    r = rng.uniform(0.31, 0.36) * s
    cx, cy = s / 2 + rng.uniform(-0.03, 0.03) * s, s / 2 + rng.uniform(-0.03, 0.03) * s
    fg = _jitter(COLOURS[obj.colour], 12, rng)
    obj_mask = fill_object(
        img, obj.shape, obj.colour, obj.pattern, fg, (cx, cy, r, rng.uniform(-0.2, 0.2)), rng
    )
    return img, obj_mask, fg, bg, r


def _blob(draw: ImageDraw.ImageDraw, cx: float, cy: float, radius: float, rng: random.Random) -> None:
    """An irregular blob: a few overlapping ellipses around (cx, cy)."""
    for _ in range(rng.randint(3, 5)):
        ox, oy = rng.uniform(-0.6, 0.6) * radius, rng.uniform(-0.6, 0.6) * radius
        rx, ry = rng.uniform(0.45, 0.85) * radius, rng.uniform(0.45, 0.85) * radius
        draw.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=255)


def _defect_shape(
    defect: str, rng: random.Random, s: int, r: float, centre: tuple[float, float], scale: float
) -> Image.Image:
    """The defect's own mask (before clipping to the object) at side ``s``; ``scale`` multiplies its size."""
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    cx, cy = centre
    if defect == "scratch":
        length, angle = rng.uniform(1.0, 1.6) * r, rng.uniform(0, math.pi)
        pts = [(cx - 0.5 * length * math.cos(angle), cy - 0.5 * length * math.sin(angle))]
        for _ in range(rng.randint(2, 3)):  # a bent line: each segment turns a little
            angle += rng.uniform(-0.5, 0.5)
            step = length / 2.5
            pts.append((pts[-1][0] + step * math.cos(angle), pts[-1][1] + step * math.sin(angle)))
        d.line(pts, fill=255, width=max(2, round(rng.uniform(0.06, 0.09) * s * scale)), joint="curve")
    elif defect in ("hole", "stain"):
        _blob(d, cx, cy, rng.uniform(0.4, 0.6) * r * scale, rng)
    else:
        raise ValueError(f"unknown defect {defect!r}; known: {DEFECTS}")
    return m


def render_sample(
    obj: ObjectType,
    defect: str | None,
    rng: random.Random,
    *,
    size: int = 48,
    noise: float = 3.0,
    defect_scale: float = 1.0,
) -> tuple[Image.Image, np.ndarray, Image.Image]:
    """One image of ``obj``, with ``defect`` (one of :data:`DEFECTS`) or without (``None``).

    Returns:
        (image, mask [size, size] bool, the same image without the defect). The mask is the defect
        clipped to the object, downsampled and thresholded at half coverage; it is empty exactly when
        ``defect`` is None. Both images share their pixel noise, so they differ only at the defect.
    """
    s = size * _SCALE
    img, obj_mask, fg, bg, r = _draw_object(obj, rng, s)
    good = img.copy()
    mask = np.zeros((size, size), dtype=bool)
    if defect is not None:
        inside = np.argwhere(np.asarray(obj_mask) > 0)  # [n, 2] (y, x) pixels of the object
        for _ in range(20):  # a defect that barely touches the object is redrawn elsewhere
            y, x = inside[rng.randrange(len(inside))]
            shape = np.asarray(_defect_shape(defect, rng, s, r, (float(x), float(y)), defect_scale))
            dm = Image.fromarray(np.minimum(shape, np.asarray(obj_mask)))
            coverage = np.asarray(dm.resize((size, size), Image.Resampling.BOX))  # [size, size] 0-255
            mask = coverage >= 128
            if mask.sum() >= max(3, size * size // 400):
                break
        if not mask.any():  # a tiny defect (small defect_scale): every pixel it touches
            mask = coverage > 0
        if defect == "scratch":  # scraped paint shows a lighter (or, on light objects, darker) layer
            tone = (235, 235, 225) if _luma(fg) < 150 else (70, 60, 55)
            colour = tuple(round(0.25 * a + 0.75 * b) for a, b in zip(fg, tone))
            img.paste(_jitter(colour, 8, rng), mask=dm)
        elif defect == "hole":
            img.paste(bg, mask=dm)
        else:
            odd = rng.choice([c for c in _ODD if c != obj.colour])
            alpha = rng.uniform(0.65, 0.9)
            img.paste(
                _jitter(COLOURS[odd], 15, rng),
                mask=Image.fromarray((np.asarray(dm) * alpha).astype(np.uint8)),
            )
    noise_rng = np.random.default_rng(rng.getrandbits(63))
    grain = noise_rng.normal(0, noise, (size, size, 3)) if noise > 0 else 0.0

    def finish(im: Image.Image) -> Image.Image:
        arr = np.asarray(im.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32) + grain
        return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))

    return finish(img), mask, finish(good)


def _files(categories: Sequence[str], counts: dict[str, int]) -> list[tuple[str, str, str | None, int]]:
    """(category, split, defect or None, index) of every image, in writing order."""
    out = []
    for cat in categories:
        out += [(cat, "train", None, i) for i in range(counts["train_good"])]
        out += [(cat, "test", None, i) for i in range(counts["test_good"])]
        out += [(cat, "test", d, i) for d in DEFECTS for i in range(counts["test_defect"])]
    return out


@trust.register("generator")
def make_anomaly_dataset(
    root: str | Path,
    *,
    categories: Sequence[str] = SET_A,
    train_good: int = 10,
    test_good: int = 24,
    test_defect: int = 8,
    image_size: int = 48,
    noise: float = 3.0,
    defect_scale: float = 1.0,
    seed: int = 0,
) -> Path:
    """Write an anomaly dataset in MVTec AD's layout at ``root`` (skipped when already complete).

    Args:
        root: The dataset folder (MVTec AD's root: one sub-folder per category).
        categories: Names from :data:`CATEGORIES`.
        train_good: Defect-free training images per category (AnomalyCLIP does not use them; the
            layout has them, and one-class methods would).
        test_good: Defect-free test images per category.
        test_defect: Test images per category and defect type.
        image_size: Side of the square images (the sandbox CLIP's input is 48 px).
        noise: Standard deviation of the pixel noise, in 0-255 units (the same on good images).
        defect_scale: Multiplies the size of holes and stains and the width of scratches
            (the difficulty: at 1, a hole is 10-15 px across in a 48 px image, 1.5-2 of the sandbox
            CLIP's 8 px patches, and a scratch 3-4 px wide).
        seed: Seed of the renders.

    Returns:
        ``root``. The arguments are recorded last (:mod:`promptlab.data.generated`), so an
        interrupted run is redone on the next call. Before writing, the folders of ``categories``
        and of the categories the params file names are deleted, so no stale image is listed.
    """
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown categories {unknown}; known: {list(CATEGORIES)}")
    root = Path(root).expanduser()
    counts = {"train_good": train_good, "test_good": test_good, "test_defect": test_defect}
    params = {
        "categories": {c: asdict(CATEGORIES[c]) for c in categories},
        "counts": counts,
        "image_size": image_size,
        "noise": noise,
        "defect_scale": defect_scale,
        "seed": seed,
    }
    files = _files(categories, counts)

    def paths(cat: str, split: str, defect: str | None, i: int) -> list[Path]:
        image = root / cat / split / (defect or "good") / f"{i:03d}.png"
        return (
            [image] if defect is None else [image, root / cat / "ground_truth" / defect / f"{i:03d}_mask.png"]
        )

    all_files = [q for f in files for q in paths(*f)]
    if up_to_date(root, params, [], all_files):
        return root
    old = recorded_params(root)
    begin(root, [])
    for cat in sorted(
        {*(old or {}).get("categories", {}), *categories}
    ):  # no stale image beside the new ones
        shutil.rmtree(root / cat, ignore_errors=True)
    for cat, split, defect, i in files:
        rng = random.Random(f"{seed}/{cat}/{split}/{defect or 'good'}/{i}")
        img, mask, _ = render_sample(
            CATEGORIES[cat], defect, rng, size=image_size, noise=noise, defect_scale=defect_scale
        )
        for path, pic in zip(
            paths(cat, split, defect, i), (img, Image.fromarray(mask.astype(np.uint8) * 255))
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            pic.save(path)
    commit(root, params, {})
    log.info(
        "wrote sandbox anomaly dataset (%d categories, %d images) to %s", len(categories), len(files), root
    )
    return root
