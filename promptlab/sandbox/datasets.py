"""Sandbox datasets written to disk in CoOp's split-file layout, so they load like any benchmark.

A dataset YAML names this generator and its arguments (``generator:`` in ``datasets/sandbox_*.yaml``);
``promptlab.runner.ensure_data`` calls it on first use. Classes are colour x shape combinations,
ordered so that the base half (the first ``ceil(n/2)`` labels) and the new half form the two colours of
a checkerboard over the colour x shape grid: every colour and every shape occurs in both halves, so
"new" classes are new *combinations* of known words, the compositional generalisation that
base-to-new evaluation measures. Images are rendered in a shifted :class:`~promptlab.sandbox.world.Style`
(``sandbox_shapes``: outlines instead of filled objects, plus noise) unlike the clean pretraining
renders: zero-shot CLIP is far above chance but below the ceiling, and prompt learning has a real
shift to adapt to.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from promptlab import trust
from promptlab.data.generated import write_split_dataset
from promptlab.sandbox.world import (
    COLOURS,
    SHAPES,
    Style,
    checkerboard,
    class_scene,
    recorded_style,
    render,
)


def checkerboard_classnames(colours: Sequence[str], shapes: Sequence[str]) -> list[str]:
    """``"<colour> <shape>"`` for the grid, in label order: cells with even ``i + j`` first, then the rest.

    With both lists of even length the two halves are equal and each holds every colour and every
    shape exactly half as often as the grid does.
    """
    unknown = sorted(set(colours) - set(COLOURS)) + sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise ValueError(f"unknown colours or shapes {unknown}; known: {list(COLOURS)} and {list(SHAPES)}")
    return [f"{colours[i]} {shapes[j]}" for i, j in checkerboard(len(colours), len(shapes))]


def listed_classnames(classes: Sequence[str]) -> list[str]:
    """Explicit ``"<colour> <shape>"`` class names, in label order, checked against the world's words.

    For splits other than the checkerboard: the first ``ceil(n/2)`` names are the base classes, so
    base and new can differ in the words, or the attributes, they exercise.
    """
    bad = [
        c
        for c in classes
        if len(c.split(" ", 1)) != 2 or c.split(" ", 1)[0] not in COLOURS or c.split(" ", 1)[1] not in SHAPES
    ]
    if bad:
        raise ValueError(
            f"classes {bad}: each must be '<colour> <shape>' with a colour of {list(COLOURS)} and a shape of {list(SHAPES)}"
        )
    if len(set(classes)) != len(classes):
        raise ValueError(
            f"classes: {sorted(c for c in set(classes) if list(classes).count(c) > 1)} listed twice"
        )
    return list(classes)


def render_item(classname: str, key: str, *, seed: int, image_size: int, style: Style):
    """The image of one dataset item; every bit of randomness comes from ``Random(f"{seed}/{key}")``."""
    rng = random.Random(f"{seed}/{key}")
    return render(class_scene(classname, rng), rng, size=image_size, style=style)


@trust.register("generator")
def make_sandbox_dataset(
    root: str | Path,
    *,
    name: str,
    colours: Sequence[str] = (),
    shapes: Sequence[str] = (),
    classes: Sequence[str] | None = None,
    style: dict[str, Any] | None = None,
    train_per_class: int = 32,
    val_per_class: int = 8,
    test_per_class: int = 30,
    image_size: int = 48,
    seed: int = 0,
) -> Path:
    """Write a sandbox dataset to ``root/name/`` (skipped when already complete with these arguments).

    Layout: ``images/<colour>_<shape>/<split>_<i>.png`` and ``split_<name>.json`` (CoOp's split-file
    format), plus the recorded arguments (:mod:`promptlab.data.generated`). The split file is written last
    and atomically, so an interrupted run is redone on the next call.

    Args:
        root: The data root.
        name: The dataset's folder (and split-file stem), e.g. ``"sandbox_shapes"``.
        colours: Colour words (see ``world.COLOURS``); classes are colours x shapes in checkerboard order.
        shapes: Shape words (see ``world.SHAPES``).
        classes: Instead of ``colours`` x ``shapes``: the class names in label order (the first half are
            the base classes), for base and new halves that differ in the words they use.
        style: Fields of :class:`~promptlab.sandbox.world.Style` for the renders (the shift).
        train_per_class: Training images per class (few-shot draws take K of them).
        val_per_class: Validation images per class.
        test_per_class: Test images per class.
        image_size: Side of the square images; the sandbox CLIP's input size.
        seed: Seed of the renders.

    Returns:
        The dataset folder ``root/name``.
    """
    if bool(classes) == bool(colours or shapes):
        raise ValueError(
            f"sandbox dataset {name!r}: give either colours and shapes (a checkerboard grid) or classes, "
            f"not {'both' if classes else 'neither'}"
        )
    classnames = listed_classnames(classes) if classes else checkerboard_classnames(colours, shapes)
    st = Style(**(style or {}))
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    params = dict(
        generator="sandbox",
        name=name,
        colours=list(colours),
        shapes=list(shapes),
        style=recorded_style(st),
        image_size=image_size,
        seed=seed,
    )

    def draw(classname: str, rel: str):
        return render_item(classname, rel, seed=seed, image_size=image_size, style=st)

    return write_split_dataset(
        Path(root).expanduser() / name, f"split_{name}.json", classnames, counts, params, draw
    )


def check_set(dataset: str = "sandbox_shapes", per_class: int = 5) -> tuple[list, list[int], list[str], str]:
    """A small in-memory set drawn like ``dataset``'s images (same classes, style, size; other keys).

    Returns:
        (PIL images, labels, class names, the dataset's template). Deterministic: the shipped weights'
        metadata records the zero-shot accuracy on it, and a fast test checks that it is reproduced.
    """
    from promptlab.data import get_spec

    spec = get_spec(dataset)
    if not spec.generator:
        raise ValueError(f"{dataset}: not a generated dataset (its YAML has no generator)")
    args = {k: v for k, v in spec.generator.items() if k != "_component_"}
    names = (
        listed_classnames(args["classes"])
        if args.get("classes")
        else checkerboard_classnames(args["colours"], args["shapes"])
    )
    st = Style(**(args.get("style") or {}))
    images, labels = [], []
    for y, c in enumerate(names):
        for i in range(per_class):
            images.append(
                render_item(
                    c,
                    f"check/{c}/{i}",
                    seed=args.get("seed", 0),
                    image_size=args.get("image_size", 48),
                    style=st,
                )
            )
            labels.append(y)
    return images, labels, names, spec.template


def zeroshot_accuracy(
    clip, images: Sequence, labels: Sequence[int], classnames: Sequence[str], template: str
) -> float:
    """Top-1 accuracy of zero-shot ``clip`` (a FrozenCLIP) with one template, as ZeroShotCLIP computes it."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        text = F.normalize(
            clip.encode_text(clip.tokenize([template.format(c) for c in classnames])).float(), dim=-1
        )
        x = torch.stack([clip.eval_transform(im) for im in images])  # [N, 3, H, W]
        feats = torch.cat([F.normalize(clip.encode_image(b).float(), dim=-1) for b in x.split(256)])  # [N, D]
        pred = (feats @ text.T).argmax(-1)
    return float((pred == torch.tensor(list(labels))).float().mean())
