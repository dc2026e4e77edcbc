"""Anomaly-detection metrics in torch: image AUROC / AP, pixel AUROC and AUPRO.

Everything is vectorized (one sort or one histogram per call, no Python loop over thresholds or
regions), so a full VisA evaluation (tens of millions of pixels per category) is not the
bottleneck, and it runs on whatever device the maps are on.

AUROC and AP follow scikit-learn's definitions exactly (``roc_auc_score``: trapezoids between the
distinct score values, ties counted once; ``average_precision_score``: sum over distinct thresholds
of (R_n - R_{n-1}) P_n, no interpolation).

AUPRO (per-region overlap) comes in two named conventions:

* ``"published"``: what AnomalyCLIP's tables (and the cflow-ad code they borrow) report.
  ``steps`` = 200 thresholds evenly spaced from the maps' minimum (``min + k * (max - min) / 200``),
  a pixel is positive when its score is *above* the threshold; at each threshold PRO is the mean,
  over every connected ground-truth region of every image (8-connectivity, skimage's default), of
  the fraction of the region that is positive, and FPR is the fraction of normal pixels that are
  positive. The points with FPR < 0.3 are kept, their FPRs rescaled to [0, 1] by *their own* min
  and max, and the PRO curve integrated over that with trapezoids.
* ``"fpr_limit"``: the MVTec AD paper's normalisation on the same threshold grid: the curve is
  closed at (0, 0) (threshold = max), interpolated at FPR = 0.3, integrated over [0, 0.3] and
  divided by 0.3. It is not comparable with the published AnomalyCLIP numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["AUPRO_CONVENTIONS", "aupro", "auroc", "average_precision", "connected_components"]

AUPRO_CONVENTIONS = ("published", "fpr_limit")


def _distinct_counts(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative true / false positives at each distinct score, from the highest score down: [T], [T]."""
    s = scores.reshape(-1).double()
    y = labels.reshape(-1).to(s.device).bool()
    s, order = torch.sort(s, descending=True, stable=True)
    y = y[order].double()
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # the last index of each run of equal scores
    tps = torch.cumsum(y, 0)[last]
    fps = torch.cumsum(1.0 - y, 0)[last]
    return tps, fps


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve, equal to ``sklearn.metrics.roc_auc_score(labels, scores)``.

    Args:
        scores: any shape, higher means more anomalous.
        labels: same number of elements, 1 (or True) for anomalous.
    """
    tps, fps = _distinct_counts(scores, labels)
    if tps[-1] == 0 or fps[-1] == 0:
        raise ValueError("AUROC needs both normal and anomalous samples")
    tpr = torch.cat([tps.new_zeros(1), tps / tps[-1]])
    fpr = torch.cat([fps.new_zeros(1), fps / fps[-1]])
    return float(torch.trapezoid(tpr, fpr))


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Average precision, equal to ``sklearn.metrics.average_precision_score(labels, scores)``."""
    tps, fps = _distinct_counts(scores, labels)
    if tps[-1] == 0:
        raise ValueError("average precision needs at least one anomalous sample")
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    steps = torch.diff(torch.cat([recall.new_zeros(1), recall]))
    return float((steps * precision).sum())


def connected_components(masks: torch.Tensor, max_iter: int | None = None) -> torch.Tensor:
    """Label the 8-connected foreground regions of binary masks: [N, H, W] bool -> [N, H, W] long.

    Background is 0; regions get labels 1..R numbered over the whole batch (so one label is one
    region of one image). Label propagation by 3x3 max-pooling plus pointer jumping until nothing changes;
    each step is a few vectorized ops on the whole batch.
    """
    m = masks.bool()
    N, H, W = m.shape
    has = m.flatten(1).any(1)
    if not bool(has.all()):  # propagate only where there is foreground (most test images have none)
        out = torch.zeros(N, H, W, dtype=torch.long, device=m.device)
        if bool(has.any()):
            out[has] = connected_components(m[has], max_iter)
        return out
    ids = torch.arange(1, N * H * W + 1, device=m.device, dtype=torch.float64).reshape(N, 1, H, W)
    lab = torch.where(m.unsqueeze(1), ids, torch.zeros_like(ids))
    fg = m.unsqueeze(1)
    for _ in range(max_iter or H * W):
        new = torch.where(fg, F.max_pool2d(lab, 3, stride=1, padding=1), lab)
        # pointer jumping: a label is a pixel id of the same region; take that pixel's label too
        flat = new.reshape(-1)
        new = torch.where(fg, torch.maximum(new, flat[(new.long() - 1).clamp(min=0)].reshape(new.shape)), new)
        if torch.equal(new, lab):
            break
        lab = new
    lab = lab.reshape(N, H, W).long()
    _, dense = torch.unique(lab, return_inverse=True)  # 0 stays 0 (smallest), regions 1..R
    return dense.reshape(N, H, W) if bool((lab == 0).any()) else dense.reshape(N, H, W) + 1


def _pro_fpr_curve(maps: torch.Tensor, masks: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PRO and FPR at each threshold (pixel positive when score > threshold): [K], [K]."""
    K = thresholds.numel()
    s = maps.reshape(-1).double()
    regions = connected_components(masks).reshape(-1)
    # bucket b = number of thresholds strictly below the score: positive exactly for thresholds k < b.
    b = torch.searchsorted(thresholds.double().contiguous(), s, right=False)
    R = int(regions.max())
    if R == 0:
        raise ValueError("AUPRO needs at least one anomalous region in the masks")
    hist = torch.zeros((R + 1) * (K + 1), dtype=torch.float64, device=s.device)
    hist.index_add_(0, regions * (K + 1) + b, torch.ones_like(s))
    hist = hist.reshape(R + 1, K + 1)  # row 0: normal pixels
    above = torch.flip(torch.cumsum(torch.flip(hist, [1]), 1), [1])[:, 1:]  # [R + 1, K]: count with b > k
    area = hist.sum(1, keepdim=True)  # [R + 1, 1]
    pro = (above[1:] / area[1:]).mean(0)
    fpr = above[0] / area[0].clamp(min=1)
    return pro, fpr


def aupro(
    maps: torch.Tensor,
    masks: torch.Tensor,
    *,
    fpr_limit: float = 0.3,
    steps: int = 200,
    convention: str = "published",
) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalized to [0, 1].

    Args:
        maps: [N, H, W] anomaly maps (higher = more anomalous).
        masks: [N, H, W] ground truth, nonzero inside defects.
        fpr_limit: integration limit on the false-positive rate (0.3 in every published table).
        steps: number of thresholds evenly spaced over the maps' range.
        convention: ``"published"`` or ``"fpr_limit"`` (see the module docstring).

    Returns:
        AUPRO in [0, 1]; NaN under ``"published"`` when fewer than two thresholds give FPR < limit
        (the reference code divides by zero there too).
    """
    if convention not in AUPRO_CONVENTIONS:
        raise ValueError(f"convention={convention!r}: expected one of {AUPRO_CONVENTIONS}")
    if maps.shape != masks.shape or maps.dim() != 3:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be [N, H, W]")
    lo, hi = float(maps.min()), float(maps.max())
    delta = (hi - lo) / steps
    if delta == 0:
        return float("nan")
    n = math.ceil((hi - lo) / delta)  # numpy.arange(lo, hi, delta)'s length: `steps`, rarely one more
    thresholds = lo + delta * torch.arange(n, dtype=torch.float64, device=maps.device)
    pro, fpr = _pro_fpr_curve(maps, masks.bool(), thresholds)
    if convention == "published":
        keep = fpr < fpr_limit
        f, p = fpr[keep], pro[keep]
        if f.numel() < 2 or f.max() == f.min():
            return float("nan")
        f = (f - f.min()) / (f.max() - f.min())
        return float(abs(torch.trapezoid(p, f)))
    # fpr_limit: ascending FPR, closed at (0, 0), cut at the limit by linear interpolation.
    f = torch.cat([fpr.new_zeros(1), fpr.flip(0)])  # thresholds ascending -> FPR descending; flipped: ascending
    p = torch.cat([pro.new_zeros(1), pro.flip(0)])
    inside = f <= fpr_limit
    fi, pi = f[inside], p[inside]
    j = int(inside.sum())
    if j < f.numel():  # interpolate the curve at exactly fpr_limit
        f0, f1, p0, p1 = f[j - 1], f[j], p[j - 1], p[j]
        pl = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0) if f1 > f0 else p1
        fi = torch.cat([fi, fi.new_tensor([fpr_limit])])
        pi = torch.cat([pi, pl.reshape(1)])
    return float(torch.trapezoid(pi, fi) / fpr_limit)
