"""``promptlab anomaly predict PROMPTS_DIR IMAGES...``: heat-map overlays and a score table.

For each image: ``<out>/<stem>_anomaly.png`` (the image with the anomaly map blended in, jet colour
map, normalised over *all* predicted images so that colours compare across images) and one row of
``<out>/scores.csv`` (image score, the map's maximum, overlay path, error). Inputs that share a stem
(``a/x.png``, ``b/x.jpg``) get ``x_anomaly.png``, ``x_2_anomaly.png``, ...: no overlay overwrites
another. An unreadable image is skipped, logged and kept in ``scores.csv`` with its error and no
score, so that the table has one row per input, in input order.
"""

from __future__ import annotations

import csv
import io as _io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from promptlab import io
from promptlab.anomaly.data import image_transform
from promptlab.data.images import ImageReadError, read_image

log = logging.getLogger(__name__)
FIELDS = ["image", "score", "map_max", "overlay", "error"]


def overlay(image: Image.Image, amap: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend a [H, W] map in [0, 1] (jet colours) over ``image`` resized to the map."""
    from matplotlib import colormaps

    heat = (colormaps["jet"](np.clip(amap, 0, 1))[..., :3] * 255).astype(np.float32)  # [H, W, 3]
    base = np.asarray(image.convert("RGB").resize(amap.shape[::-1], Image.BILINEAR), dtype=np.float32)
    return Image.fromarray((alpha * heat + (1 - alpha) * base).astype(np.uint8))


@torch.no_grad()
def predict(
    prompts_dir: str | Path,
    images: Sequence[str | Path],
    out_dir: str | Path,
    *,
    image_size: int | None = None,
    sigma: float | None = None,
    device: str = "cpu",
) -> list[dict]:
    """Score images with exported prompts, write overlays and ``scores.csv``; returns the table rows.

    One row per input, in order; a skipped image's row has its ``error`` and empty score fields.
    Raises ``ValueError`` when no image at all could be read.
    """
    import json

    meta = (
        json.loads((Path(prompts_dir) / "prompt_config.json").read_text())
        if (Path(prompts_dir) / "prompt_config.json").exists()
        else {}
    )
    from promptlab.runner import load_prompts_dir

    module = load_prompts_dir(Path(prompts_dir), device=device).eval()
    size = int(image_size or meta.get("image_size") or module.clip.image_size)
    sigma = float(meta.get("sigma", 4.0) if sigma is None else sigma)
    tf = image_transform(size, module.clip.image_mean, module.clip.image_std)
    out_dir = Path(out_dir)
    rows: list[dict] = []
    done = []  # (row, picture, map) of the images that could be read
    with module.cached_text_features():
        for path, name in zip(images, overlay_names(images)):
            row = {"image": str(path), "score": "", "map_max": "", "overlay": "", "error": ""}
            rows.append(row)
            try:
                pic = read_image(str(path))
            except (ImageReadError, Image.DecompressionBombError) as e:
                log.warning("skipped %s: %s", path, e)
                row["error"] = str(e)
                continue
            s, a = module.scores(module.outputs(tf(pic).unsqueeze(0).to(device)), sigma)
            amap = a[0].float().cpu().numpy()
            row.update(score=float(s[0]), map_max=float(amap.max()), overlay=str(out_dir / name))
            done.append((row, pic, amap))
    if not done:
        raise ValueError(f"none of the {len(rows)} images could be read (first: {rows[0]['error']})")
    lo, hi = min(m.min() for _, _, m in done), max(m.max() for _, _, m in done)
    for row, pic, amap in done:
        buf = _io.BytesIO()
        overlay(pic, (amap - lo) / max(hi - lo, 1e-12)).save(buf, format="PNG")
        io.atomic_write_bytes(Path(row["overlay"]), buf.getvalue())
    text = _io.StringIO()
    w = csv.DictWriter(text, fieldnames=FIELDS)
    w.writeheader()
    w.writerows(rows)
    io.atomic_write_bytes(out_dir / "scores.csv", text.getvalue().encode())
    log.info("wrote %d overlays and scores.csv to %s (%d skipped)", len(done), out_dir, len(rows) - len(done))
    return rows


def overlay_names(images: Sequence[str | Path]) -> list[str]:
    """``<stem>_anomaly.png`` per input, made unique (``<stem>_2_anomaly.png``, ...) ignoring case."""
    used: set[str] = set()
    names = []
    for path in images:
        stem, k = Path(path).stem, 1
        name = f"{stem}_anomaly.png"
        while name.lower() in used:
            k += 1
            name = f"{stem}_{k}_anomaly.png"
        used.add(name.lower())
        names.append(name)
    return names
