"""The sandbox's video variant: one object moving over a still background, classes = motion x shape.

A clip is T frames of the sandbox world (:mod:`promptlab.sandbox.world`): a shape of a random colour
that moves up or down, grows, shrinks, spins or bounces over a static background with the world's
clutter and texture, plus fresh pixel noise per frame. Every pixel comes from
``Random(f"{seed}/{key}")``, so a seed fixes the dataset on any machine.

Why the motion *trail*: ViFi-CLIP averages frame features over time, which is blind to frame order.
Without a per-frame cue, "moving up" and "moving down" (or growing and shrinking) show the very same
set of frames, only reversed, and no order-blind model could tell them apart. Each frame therefore
also shows fading copies of the object where it just was (like a long exposure or motion blur in
real footage), which makes the direction visible frame by frame; ``trail=0`` turns it off.

Why no "moving left" / "moving right" or colour classes: ViFi-CLIP's training pipeline flips clips
horizontally and jitters hue / converts to grey, which would silently swap left and right or hide
colours; the motions here are flip-invariant and the class objects are shapes (colour is a nuisance).

Classes are ordered as a checkerboard over the motion x shape grid (as
:func:`promptlab.sandbox.datasets.checkerboard_classnames` does for colour x shape): the base half
(first ``ceil(n/2)`` labels) and the new half each hold every motion and every shape, so "new"
classes are new combinations of motions and shapes seen in training. The sandbox CLIP was
pretrained on captions of still images: of the motion words it knows only "up" (from "close-up"),
the others have zero token embeddings. Zero-shot it recognises the shape but hardly the motion;
the bridge stage has to learn the motions, in both towers.

The dataset is written in ViFi-CLIP's list layout (``labels.csv`` + ``lists/<split>.txt``) with one
frame folder per clip, read by :func:`promptlab.video.datasets.read_vifi_lists`.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from promptlab import trust
from promptlab.data import generated
from promptlab.data.items import SPLITS
from promptlab.sandbox.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    Style,
    _draw_shape,
    _jitter,
    backdrop,
    checkerboard,
    recorded_style,
)

log = logging.getLogger(__name__)

MOTIONS = ("moving up", "moving down", "growing", "shrinking", "spinning", "bouncing")
# Frames are drawn at 2x and box-downsampled for anti-aliased edges (world.render draws at 4x; 16
# frames per clip make that cost too much here).
_SCALE = 2
_TRAIL_SPAN = 0.4  # how far back the trail reaches, as a fraction of the clip (not of a frame)


def video_classnames(motions: Sequence[str], shapes: Sequence[str]) -> list[str]:
    """``"<shape> <motion>"`` for the grid, in label order: cells with even ``i + j`` first, then the rest.

    With at least two motions and two shapes, the base half (first ``ceil(n/2)`` labels) and the new
    half each hold every motion and every shape; the halves are equal when the grid has an even size.
    """
    unknown = sorted(set(motions) - set(MOTIONS)) + sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise ValueError(f"unknown motions or shapes {unknown}; known: {list(MOTIONS)} and {list(SHAPES)}")
    if "circle" in shapes and "spinning" in motions:
        raise ValueError("a spinning circle looks like a still one: leave 'circle' out of the shapes")
    return [f"{shapes[j]} {motions[i]}" for i, j in checkerboard(len(motions), len(shapes))]


def split_classname(classname: str) -> tuple[str, str]:
    """``"star moving up"`` -> ``("star", "moving up")``."""
    shape, motion = classname.split(" ", 1)
    return shape, motion


def _clip_params(motion: str, rng: random.Random) -> dict[str, float]:
    """Per-clip trajectory parameters, in units of the image side; the object stays in the central 80 %."""
    p = dict(
        x=rng.uniform(0.35, 0.65),
        y=rng.uniform(0.4, 0.6),
        r=rng.uniform(0.14, 0.19),
        rot=rng.uniform(-0.25, 0.25),
        spin=rng.choice((-1.0, 1.0)) * rng.uniform(3.0, 4.5),
    )
    if motion in ("moving up", "moving down"):
        p.update(y0=rng.uniform(0.72, 0.78), dist=rng.uniform(0.42, 0.52))
    elif motion in ("growing", "shrinking"):
        p.update(r0=rng.uniform(0.07, 0.09), r1=rng.uniform(0.27, 0.31))
    elif motion == "bouncing":
        p.update(
            floor=rng.uniform(0.7, 0.76),
            height=rng.uniform(0.36, 0.44),
            bounces=rng.choice((1.5, 2.0)),
            phase=rng.uniform(0, 0.2),
        )
    return p


def trajectory(motion: str, t: float, p: dict[str, float]) -> tuple[float, float, float, float]:
    """(centre x, centre y, radius, rotation) at time ``t`` in [0, 1] (a little before 0 for the trail).

    Positions and radius are fractions of the image side; y grows downwards as in image coordinates.
    """
    x, y, r, rot = p["x"], p["y"], p["r"], p["rot"]
    if motion == "moving up":
        y = p["y0"] - p["dist"] * t
    elif motion == "moving down":
        y = (1 - p["y0"]) + p["dist"] * t
    elif motion == "growing":
        r = p["r0"] + (p["r1"] - p["r0"]) * t
    elif motion == "shrinking":
        r = p["r1"] - (p["r1"] - p["r0"]) * t
    elif motion == "spinning":
        rot = p["rot"] + p["spin"] * t
    elif motion == "bouncing":  # |sin|: slow at the top, fast at the floor, like a ball
        y = p["floor"] - p["height"] * abs(math.sin(math.pi * (p["bounces"] * t + p["phase"])))
    else:
        raise ValueError(f"unknown motion {motion!r}; known: {MOTIONS}")
    return x, y, max(r, 0.03), rot


def _background(colour: str, s: int, style: Style, rng: random.Random) -> Image.Image:
    """The still backdrop of one clip at ``s`` px: jittered colour, optional texture, static clutter."""
    bg_name = rng.choice([b for b in BACKGROUNDS if b != colour])
    return backdrop(bg_name, colour, s, style, rng, clutter_size=(0.05, 0.09))


def render_clip(
    classname: str,
    key: str,
    *,
    seed: int = 0,
    num_frames: int = 16,
    image_size: int = 48,
    style: Style | None = None,
    trail: int = 6,
) -> list[Image.Image]:
    """The ``num_frames`` frames of one clip of ``classname`` (``"<shape> <motion>"``), as RGB images.

    Args:
        classname: Shape and motion, e.g. ``"star moving up"``.
        key: Names the clip; with ``seed`` it fixes every random choice (``Random(f"{seed}/{key}")``).
            The dataset uses the clip's folder path, unique per class and split.
        seed: Dataset seed.
        num_frames: T.
        image_size: Side of the square frames.
        style: How the world is drawn (noise, clutter, texture, colour cast, outline, blur); clean by default.
        trail: Fading copies of the object along the last 0.4 clip-lengths of its path (0: none).
    """
    shape, motion = split_classname(classname)
    style = style or Style()
    rng = random.Random(f"{seed}/{key}")
    colour = rng.choice(tuple(COLOURS))
    s = image_size * _SCALE
    backdrop = _background(colour, s, style, rng)
    fg = _jitter(COLOURS[colour], style.jitter, rng)
    outline = max(2, int(s * 0.04)) if rng.random() < style.outline else 0
    p = _clip_params(motion, rng)
    tint = np.array([rng.uniform(1 - style.cast, 1 + style.cast) for _ in range(3)], dtype=np.float32)
    blur = rng.uniform(0, style.blur) if style.blur > 0 else 0.0
    noise_rng = np.random.default_rng(rng.getrandbits(63))
    step = 1.0 / max(1, num_frames - 1)
    ghosts = [
        (k, 0.7 * (1 - k / (trail + 1))) for k in range(trail, 0, -1)
    ]  # (steps back, opacity), oldest first
    frames = []
    for f in range(num_frames):
        img = backdrop.copy()
        for k, alpha in ghosts + [(0, 1.0)]:
            cx, cy, r, rot = (
                v * s if i < 3 else v
                for i, v in enumerate(trajectory(motion, f * step - k * _TRAIL_SPAN / max(trail, 1), p))
            )
            # draw on a mask of the object's bounding box only: pasting full frames is most of the cost
            x0, y0 = max(0, int(cx - 1.25 * r) - outline - 2), max(0, int(cy - 1.25 * r) - outline - 2)
            x1, y1 = min(s, int(cx + 1.25 * r) + outline + 3), min(s, int(cy + 1.25 * r) + outline + 3)
            if x1 <= x0 or y1 <= y0:
                continue
            mask = Image.new("L", (x1 - x0, y1 - y0), 0)
            _draw_shape(
                ImageDraw.Draw(mask), shape, cx - x0, cy - y0, r, round(255 * alpha), width=outline, rot=rot
            )
            img.paste(fg, (x0, y0, x1, y1), mask)
        img = img.reduce(_SCALE)
        if blur > 0:
            img = img.filter(ImageFilter.GaussianBlur(blur))
        if style.cast > 0 or style.noise > 0 or style.tint:
            arr = np.asarray(img, dtype=np.float32) * tint
            if style.tint:
                arr = arr * np.asarray(style.tint, dtype=np.float32)
            if style.noise > 0:
                arr = arr + noise_rng.normal(0, style.noise, arr.shape)
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        frames.append(img)
    return frames


@trust.register("generator")
def make_sandbox_video_dataset(
    root: str | Path,
    *,
    name: str,
    motions: Sequence[str],
    shapes: Sequence[str],
    style: dict[str, Any] | None = None,
    trail: int = 6,
    train_per_class: int = 16,
    val_per_class: int = 0,
    test_per_class: int = 8,
    num_frames: int = 16,
    image_size: int = 48,
    seed: int = 0,
) -> Path:
    """Write a sandbox video dataset to ``root/name/`` (skipped when already complete with these arguments).

    Layout (ViFi-CLIP's split lists, read by ``promptlab.video.datasets.read_vifi_lists``):
    ``videos/<shape>_<motion>/<split>_<i>/<frame>.png`` (one frame folder per clip), ``labels.csv``
    (``id,name``) and ``lists/<split>.txt`` (``<clip folder> <label>`` per line; splits with clips), plus
    the recorded arguments (:mod:`promptlab.data.generated`). The label file and the lists are written
    last and atomically, so an interrupted run is redone on the next call.

    Args:
        root: The data root.
        name: The dataset's folder, e.g. ``"sandbox_video"``.
        motions: Motion phrases (see ``MOTIONS``); classes are shapes x motions.
        shapes: Shape words (see ``world.SHAPES``; not "circle" with "spinning").
        style: Fields of :class:`~promptlab.sandbox.world.Style` for the frames.
        trail: Fading copies of the object along its recent path (0: none; see the module docstring).
        train_per_class: Training clips per class (few-shot draws take K of them).
        val_per_class: Validation clips per class (ViFi-CLIP's protocol has none; 0 writes no val list).
        test_per_class: Test clips per class.
        num_frames: Frames per clip.
        image_size: Side of the square frames; the sandbox CLIP's input size.
        seed: Seed of the renders.

    Returns:
        The dataset folder ``root/name``.
    """
    folder = Path(root).expanduser() / name
    video_dir = folder / "videos"
    classnames = video_classnames(motions, shapes)
    st = Style(**(style or {}))
    counts = {
        s: n
        for s, n in (("train", train_per_class), ("val", val_per_class), ("test", test_per_class))
        if n > 0
    }
    lists = {
        s: [(f"{c.replace(' ', '_')}/{s}_{i:03d}", y, c) for y, c in enumerate(classnames) for i in range(n)]
        for s, n in counts.items()
    }
    params = dict(
        generator="sandbox_video",
        name=name,
        motions=list(motions),
        shapes=list(shapes),
        style=recorded_style(st),
        trail=trail,
        counts=counts,
        num_frames=num_frames,
        image_size=image_size,
        seed=seed,
    )
    index = {folder / "labels.csv": "id,name\n" + "".join(f"{y},{c}\n" for y, c in enumerate(classnames))}
    index.update(
        {
            folder / "lists" / f"{s}.txt": "".join(f"{rel} {y}\n" for rel, y, _ in rows)
            for s, rows in lists.items()
        }
    )
    frames = [
        video_dir / rel / f"{f:03d}.png"
        for rows in lists.values()
        for rel, _, _ in rows
        for f in range(num_frames)
    ]
    if generated.up_to_date(folder, params, index, frames):
        return folder
    generated.begin(folder, [folder / "labels.csv"] + [folder / "lists" / f"{s}.txt" for s in SPLITS])
    for rows in lists.values():
        for rel, _, classname in rows:
            clip_dir = video_dir / rel
            clip_dir.mkdir(parents=True, exist_ok=True)
            for stale in clip_dir.glob("*.png"):  # from a run with other arguments (e.g. more frames)
                stale.unlink()
            for f, img in enumerate(
                render_clip(
                    classname,
                    rel,
                    seed=seed,
                    num_frames=num_frames,
                    image_size=image_size,
                    style=st,
                    trail=trail,
                )
            ):
                img.save(clip_dir / f"{f:03d}.png", compress_level=1)
    (folder / "lists").mkdir(parents=True, exist_ok=True)
    generated.commit(folder, params, index)
    log.info(
        "wrote sandbox video dataset %s (%d classes, %d clips) to %s",
        name,
        len(classnames),
        sum(len(r) for r in lists.values()),
        folder,
    )
    return folder
