"""Time promptlab's pixel metrics against plain numpy / scipy / scikit-learn on one category's maps.

Plain python, CPU: `python benchmarks/bench_aupro.py [N] [SIZE]` (default 100 maps of 256x256; a VisA
category is ~100-200 test images). Prints, measured in this one run:

* AUPRO: promptlab.metrics.aupro vs a plain loop over the 200 thresholds (regions labelled once with
  scipy, then one numpy comparison per threshold and per region: the published definition);
* pixel AUROC: promptlab.metrics.auroc vs sklearn.metrics.roc_auc_score;
* the two together, which is what an evaluation pays per category;

with each pair of values (they must agree: AUPRO to ~1e-12, AUROC exactly up to rounding).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from promptlab.metrics import aupro, auroc


def plain_aupro(maps: np.ndarray, masks: np.ndarray, steps: int = 200, limit: float = 0.3) -> float:
    lo, hi = float(maps.min()), float(maps.max())  # float64 thresholds, as promptlab uses
    labels = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    regions = [(i, lab == r) for i, lab in enumerate(labels) for r in range(1, lab.max() + 1)]
    normal = ~masks
    pros, fprs = [], []
    for th in np.arange(lo, hi, (hi - lo) / steps):
        b = maps > th
        pros.append(np.mean([b[i][region].mean() for i, region in regions]))
        fprs.append(np.logical_and(b, normal).sum() / normal.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    k = fprs < limit
    f = (fprs[k] - fprs[k].min()) / (fprs[k].max() - fprs[k].min())
    return float(abs(np.trapezoid(pros[k], f)))


def synthetic(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Half the images anomalous with 1-4 defects of varied size; smooth noisy maps (pixel AUROC ~0.9)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(0, n, 2):
        for _ in range(rng.integers(1, 5)):
            h, w = rng.integers(size // 40 + 1, size // 6, 2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            masks[i, y : y + h, x : x + w] = True
    maps = ndimage.gaussian_filter(rng.random(masks.shape) + 0.08 * masks, (0, 4, 4)).astype(np.float32)
    return maps, masks


def timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def main() -> None:
    n, size = (int(a) for a in (sys.argv[1:] + ["100", "256"])[:2])
    maps, masks = synthetic(n, size)
    m, k = torch.from_numpy(maps), torch.from_numpy(masks)
    ours_pro, t_pro = timed(lambda: aupro(m, k))
    ours_roc, t_roc = timed(lambda: auroc(m, k))
    ref_pro, r_pro = timed(lambda: plain_aupro(maps, masks))
    ref_roc, r_roc = timed(lambda: roc_auc_score(masks.reshape(-1), maps.reshape(-1)))
    pixels = n * size * size / 1e6
    print(f"{n} maps of {size}x{size} ({pixels:.1f} M pixels, torch threads {torch.get_num_threads()})")
    rows = [
        ("AUPRO      ", "plain loop  ", t_pro, r_pro, f"{ours_pro:.10f} vs {ref_pro:.10f}"),
        ("pixel AUROC", "scikit-learn", t_roc, r_roc, f"{ours_roc:.10f} vs {ref_roc:.10f}"),
        ("together   ", "plain       ", t_pro + t_roc, r_pro + r_roc, ""),
    ]
    for name, other, t, r, values in rows:
        print(f"  {name} promptlab {t:6.2f} s | {other} {r:6.2f} s | {r / t:5.1f}x | {values}")


if __name__ == "__main__":
    main()
