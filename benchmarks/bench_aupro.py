"""Time promptlab.metrics.aupro against a plain per-threshold / per-region loop (the published definition).

Plain python, CPU: `python benchmarks/bench_aupro.py [N] [SIZE]`. Prints both times, their ratio and
the two values (they must agree).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from scipy import ndimage

from promptlab.metrics import aupro, auroc


def plain_aupro(maps: np.ndarray, masks: np.ndarray, steps: int = 200, limit: float = 0.3) -> float:
    lo, hi = maps.min(), maps.max()
    labels = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    pros, fprs = [], []
    for th in np.arange(lo, hi, (hi - lo) / steps):
        b = maps > th
        ov = [b[i][lab == r].mean() for i, lab in enumerate(labels) for r in range(1, lab.max() + 1)]
        pros.append(np.mean(ov))
        fprs.append(np.logical_and(b, ~masks).sum() / (~masks).sum())
    pros, fprs = np.array(pros), np.array(fprs)
    k = fprs < limit
    f = (fprs[k] - fprs[k].min()) / (fprs[k].max() - fprs[k].min())
    return float(abs(np.trapezoid(pros[k], f)))


def main() -> None:
    n, size = (int(a) for a in (sys.argv[1:] + ["20", "256"])[:2])
    rng = np.random.default_rng(0)
    masks = np.zeros((n, size, size), bool)
    for i in range(0, n, 2):  # half the images anomalous, two blobs each
        for _ in range(2):
            y, x = rng.integers(0, size - size // 6, 2)
            masks[i, y : y + size // 8, x : x + size // 6] = True
    maps = ndimage.gaussian_filter(rng.random(masks.shape) + 0.5 * masks, (0, 4, 4)).astype(np.float32)
    t = time.perf_counter()
    ours = aupro(torch.from_numpy(maps), torch.from_numpy(masks))
    px = auroc(torch.from_numpy(maps), torch.from_numpy(masks))
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = plain_aupro(maps, masks)
    t_ref = time.perf_counter() - t
    print(f"{n} maps of {size}x{size}: promptlab aupro+pixel auroc {t_ours:.2f} s, plain aupro loop {t_ref:.2f} s, "
          f"ratio {t_ref / t_ours:.1f}x; aupro {ours:.6f} vs {ref:.6f}; pixel auroc {px:.4f}")


if __name__ == "__main__":
    main()
