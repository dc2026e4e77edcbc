"""``promptlab anomaly predict PROMPTS_DIR IMAGES...``: heat-map overlays and a score table.

For each image: ``<out>/<stem>_anomaly.png`` (the image with the anomaly map blended in, jet colour
map, normalised over *all* predicted images so that colours compare across images) and one row of
``<out>/scores.csv`` (image score, the map's maximum, overlay path).
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
from promptlab.anomaly.loop import load_anomaly_prompts
from promptlab.data.images import read_image

log = logging.getLogger(__name__)


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
    """Score images with exported prompts, write overlays and ``scores.csv``; returns the table rows."""
    import json

    meta = (
        json.loads((Path(prompts_dir) / "prompt_config.json").read_text())
        if (Path(prompts_dir) / "prompt_config.json").exists()
        else {}
    )
    module = load_anomaly_prompts(prompts_dir, device=device).eval()
    size = int(image_size or meta.get("image_size") or module.clip.image_size)
    sigma = float(meta.get("sigma", 4.0) if sigma is None else sigma)
    tf = image_transform(size, module.clip.image_mean, module.clip.image_std)
    out_dir = Path(out_dir)
    pics = [read_image(str(p)) for p in images]
    scores, maps = [], []
    with module.cached_text_features():
        for pic in pics:
            s, a = module.scores(module.outputs(tf(pic).unsqueeze(0).to(device)), sigma)
            scores.append(float(s[0]))
            maps.append(a[0].float().cpu().numpy())
    lo, hi = min(m.min() for m in maps), max(m.max() for m in maps)
    rows = []
    for path, pic, score, amap in zip(images, pics, scores, maps):
        dest = out_dir / f"{Path(path).stem}_anomaly.png"
        buf = _io.BytesIO()
        overlay(pic, (amap - lo) / max(hi - lo, 1e-12)).save(buf, format="PNG")
        io.atomic_write_bytes(dest, buf.getvalue())
        rows.append({"image": str(path), "score": score, "map_max": float(amap.max()), "overlay": str(dest)})
    text = _io.StringIO()
    w = csv.DictWriter(text, fieldnames=["image", "score", "map_max", "overlay"])
    w.writeheader()
    w.writerows(rows)
    io.atomic_write_bytes(out_dir / "scores.csv", text.getvalue().encode())
    log.info("wrote %d overlays and scores.csv to %s", len(rows), out_dir)
    return rows
