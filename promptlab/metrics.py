"""Anomaly-detection metrics in torch: image AUROC / AP, pixel AUROC and AUPRO.

Everything is vectorized (one sort or one histogram per call, no Python loop over thresholds or
regions), so a full VisA evaluation (tens of millions of pixels per category) is not the
bottleneck, and it runs on whatever device the maps are on. Two choices carry the speed on the CPU:
scores are sorted as integers that order like the floats (torch sorts integers with a radix sort,
several times faster than its float sort), and ground-truth regions are labelled by
``scipy.ndimage.label`` (one C pass over the whole batch) rather than by iterated max-pooling.

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

import numpy as np
import torch
from scipy import ndimage

__all__ = ["AUPRO_CONVENTIONS", "aupro", "auroc", "average_precision", "connected_components"]

AUPRO_CONVENTIONS = ("published", "fpr_limit")


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Integers in the same order as the scores, equal exactly where the scores are equal: [P].

    The IEEE bit pattern read as a signed integer orders non-negative floats correctly; flipping the
    magnitude bits of negative ones reverses their order into place. -0.0 is first turned into +0.0
    (they compare equal). float16 / bfloat16 widen to float32 and integers to float64, both exactly.
    """
    x = scores.reshape(-1)
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else x.double()
    bits = (x + 0.0).view(torch.int32 if x.dtype == torch.float32 else torch.int64)
    magnitude = 0x7FFFFFFF if bits.dtype == torch.int32 else 0x7FFFFFFFFFFFFFFF
    return torch.where(bits < 0, bits ^ magnitude, bits)


def _distinct_counts(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative true / false positives at each distinct score, from the highest score down: [T], [T]."""
    y = scores.new_empty(scores.numel(), dtype=torch.bool).copy_(labels.reshape(-1))  # [P], nonzero = True
    # ~key reverses the order without overflow; the order inside a run of ties does not matter (so the
    # sort need not be stable), since only the counts at the end of each run are kept.
    keys, order = torch.sort(~_order_keys(scores))  # [P], highest score first
    _, run_lengths = torch.unique_consecutive(keys, return_counts=True)  # [T]: one run per distinct score
    ends = torch.cumsum(run_lengths, 0) - 1  # [T]: the last index of each run
    tps = torch.cumsum(y[order], 0)[ends]  # int64, exact
    fps = ends + 1 - tps
    return tps.double(), fps.double()


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


def connected_components(masks: torch.Tensor) -> torch.Tensor:
    """Label the 8-connected foreground regions of binary masks: [N, H, W] bool -> [N, H, W] long.

    Background is 0; regions get labels 1..R numbered over the whole batch in raster order (so one
    label is one region of one image). One ``scipy.ndimage.label`` call on the CPU with a 3x3x3
    structure whose only nonzero plane is the middle one: full 8-connectivity inside an image (the
    reference code's skimage default), none across images.
    """
    structure = np.stack([np.zeros((3, 3)), np.ones((3, 3)), np.zeros((3, 3))])  # only the middle plane
    lab, _ = ndimage.label(masks.detach().bool().cpu().numpy(), structure=structure)
    return masks.new_tensor(lab, dtype=torch.long)  # on the masks' device


def _pro_fpr_curve(
    maps: torch.Tensor, masks: torch.Tensor, thresholds: torch.Tensor, chunk: int = 1 << 23
) -> tuple[torch.Tensor, torch.Tensor]:
    """PRO and FPR at each threshold (pixel positive when score > threshold): [K], [K].

    All thresholds at once: each pixel falls in a bucket b (the number of thresholds strictly below
    its score, so it is positive exactly for thresholds k < b); a histogram of (region, bucket) then
    gives every region's positive count at every threshold by a reversed cumulative sum. Pixels go
    through in chunks of ``chunk`` to bound the int64 temporaries (a VisA category is ~10^8 pixels).
    """
    K = thresholds.numel()
    s = maps.reshape(-1)
    regions = connected_components(masks).reshape(-1)  # [P], 0 = normal pixel
    R = int(regions.max())
    if R == 0:
        raise ValueError("AUPRO needs at least one anomalous region in the masks")
    th = thresholds.double().contiguous()
    hist = regions.new_zeros((R + 1) * (K + 1))  # int64
    for i in range(0, s.numel(), chunk):
        b = torch.searchsorted(th, s[i : i + chunk].double())  # [c] in 0..K: thresholds strictly below
        hist += torch.bincount(regions[i : i + chunk] * (K + 1) + b, minlength=(R + 1) * (K + 1))
    hist = hist.reshape(R + 1, K + 1).double()  # row 0: normal pixels
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
        (the reference code divides by zero there too). Under ``"fpr_limit"`` a curve whose FPR never
        reaches the limit (e.g. binary maps) is integrated up to its last point, not extended.
    """
    if convention not in AUPRO_CONVENTIONS:
        raise ValueError(f"convention={convention!r}: expected one of {AUPRO_CONVENTIONS}")
    if maps.shape != masks.shape or maps.dim() != 3:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be [N, H, W]")
    lo, hi = float(maps.min()), float(maps.max())
    delta = (hi - lo) / steps
    if delta == 0:
        return math.nan
    n = math.ceil((hi - lo) / delta)  # numpy.arange(lo, hi, delta)'s length: `steps`, rarely one more
    k = torch.arange(n, device=maps.device)  # pragma: no mutate (device placement: one device in tests)
    thresholds = lo + delta * k.double()  # float64 whatever the maps' dtype
    pro, fpr = _pro_fpr_curve(maps, masks.bool(), thresholds)
    if convention == "published":
        keep = fpr < fpr_limit
        f, p = fpr[keep], pro[keep]
        if f.numel() < 2 or f.max() == f.min():
            return math.nan
        f = (f - f.min()) / (f.max() - f.min())
        return float(abs(torch.trapezoid(p, f)))
    # fpr_limit: ascending FPR, closed at (0, 0), cut at the limit by linear interpolation.
    f = torch.cat(
        [fpr.new_zeros(1), fpr.flip(0)]
    )  # thresholds ascending -> FPR descending; flipped: ascending
    p = torch.cat([pro.new_zeros(1), pro.flip(0)])
    inside = f <= fpr_limit
    fi, pi = f[inside], p[inside]
    j = int(inside.sum())
    if j < f.numel():  # interpolate the curve at exactly fpr_limit (else it stops short: not extended)
        f0, f1, p0, p1 = f[j - 1], f[j], p[j - 1], p[j]  # f0 <= fpr_limit < f1
        pl = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0)
        fi = torch.cat([fi, fi.new_tensor([fpr_limit])])
        pi = torch.cat([pi, pl.reshape(1)])
    return float(torch.trapezoid(pi, fi) / fpr_limit)
