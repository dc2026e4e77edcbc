"""promptlab.metrics against scikit-learn (AUROC, AP) and a plain loop reference of AUPRO."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, roc_auc_score

from promptlab.metrics import aupro, auroc, average_precision, connected_components


def _random(seed: int, n: int = 400, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 10, (n,), generator=g).float() if ties else torch.rand(n, generator=g)
    y = torch.rand(n, generator=g) < 0.3
    return s + 0.3 * y, y


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_auroc_ap_match_sklearn(seed: int, ties: bool) -> None:
    s, y = _random(seed, ties=ties)
    assert auroc(s, y) == pytest.approx(roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)
    assert average_precision(s, y) == pytest.approx(average_precision_score(y.numpy(), s.numpy()), abs=1e-12)


def test_auroc_hand_made() -> None:
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == 0.5
    with pytest.raises(ValueError):
        auroc(torch.rand(4), torch.zeros(4))


def _reference_curve(maps: np.ndarray, masks: np.ndarray, steps: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """PRO and FPR per threshold, written as plainly as possible (loops over thresholds and regions)."""
    lo, hi = maps.min(), maps.max()
    delta = (hi - lo) / steps
    pros, fprs = [], []
    for th in np.arange(lo, hi, delta):
        binary = maps > th
        overlaps = []
        for b, m in zip(binary, masks):
            lab, n = ndimage.label(m, structure=np.ones((3, 3)))
            for r in range(1, n + 1):
                region = lab == r
                overlaps.append(b[region].sum() / region.sum())
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(binary, ~masks).sum() / (~masks).sum())
    return np.array(pros), np.array(fprs)


def _reference_aupro(maps: np.ndarray, masks: np.ndarray, steps: int = 200, limit: float = 0.3) -> float:
    """The published definition: FPRs below the limit rescaled by their own min and max."""
    pros, fprs = _reference_curve(maps, masks, steps)
    keep = fprs < limit
    f = fprs[keep]
    return auc((f - f.min()) / (f.max() - f.min()), pros[keep])


def _masks() -> np.ndarray:
    m = np.zeros((3, 24, 24), bool)
    m[0, 2:6, 2:6] = True
    m[0, 6, 6] = True  # touches the square diagonally: same region under 8-connectivity
    m[0, 15:20, 10:22] = True
    m[1, 0:3, 20:24] = True
    return m  # image 2 is normal


@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_matches_plain_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = _masks()
    maps = (rng.random(masks.shape) + 0.6 * masks).astype(np.float32)
    ours = aupro(torch.from_numpy(maps), torch.from_numpy(masks))
    assert ours == pytest.approx(_reference_aupro(maps, masks), abs=1e-6)


def test_aupro_random_masks_match_reference() -> None:
    rng = np.random.default_rng(3)
    masks = ndimage.binary_opening(rng.random((2, 20, 20)) < 0.35, structure=np.ones((1, 2, 2)))
    maps = (rng.random(masks.shape) + 0.4 * masks).astype(np.float32)
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(
        _reference_aupro(maps, masks), abs=1e-6
    )


def _reference_aupro_fpr_limit(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """The MVTec AD normalisation: curve closed at (0, 0), cut at the limit, area divided by it."""
    pros, fprs = _reference_curve(maps, masks)
    f, p = np.r_[0.0, fprs[::-1]], np.r_[0.0, pros[::-1]]
    inside = f <= limit
    f, p = np.r_[f[inside], limit], np.r_[p[inside], np.interp(limit, f, p)]
    return auc(f, p) / limit


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_aupro_larger_random_batch_matches_reference(seed: int) -> None:
    # blobs of every size (many regions, some touching only diagonally), half the images normal, noisy maps
    rng = np.random.default_rng(seed)
    seeds = rng.random((10, 48, 40)) < 0.004
    masks = ndimage.binary_dilation(seeds, structure=np.ones((1, 3, 3)), iterations=2)
    masks |= rng.random(masks.shape) < 0.01  # single pixels: regions of area 1
    masks[1::2] = False
    # float64 maps, so the reference's thresholds are float64 like promptlab's: agreement to 1e-12
    maps = ndimage.gaussian_filter(rng.random(masks.shape), (0, 1, 1)) + 0.05 * masks
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    assert int(connected_components(torch.from_numpy(masks)).max()) == n_regions > 50
    m, k = torch.from_numpy(maps), torch.from_numpy(masks)
    assert aupro(m, k) == pytest.approx(_reference_aupro(maps, masks), abs=1e-12)
    ref = _reference_aupro_fpr_limit(maps, masks)
    assert aupro(m, k, convention="fpr_limit") == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64])
def test_auroc_ap_signs_zeros_and_dtypes(dtype: torch.dtype) -> None:
    # scores are sorted as integer keys: negatives, -0.0 == +0.0, extremes and ties must order like floats
    g = torch.Generator().manual_seed(7)
    s = torch.randint(-6, 6, (500,), generator=g).double() / (1 if dtype == torch.int64 else 2)
    s[:6] = torch.tensor([-0.0, 0.0, 6e4, -6e4, -0.0, 0.0])
    y = torch.rand(500, generator=g) < 0.4 + 0.05 * s.clamp(-4, 4)
    s = s.to(dtype)
    ref = s.double().numpy()
    assert (y & (s == 0)).any() and (~y & (s == 0)).any()  # the tie across -0.0 / +0.0 is exercised
    assert auroc(s, y) == pytest.approx(roc_auc_score(y.numpy(), ref), abs=1e-12)
    assert average_precision(s, y) == pytest.approx(average_precision_score(y.numpy(), ref), abs=1e-12)


def test_aupro_hand_made_values() -> None:
    masks = torch.from_numpy(_masks())
    perfect = masks.float() + 0.01 * torch.rand(masks.shape, generator=torch.Generator().manual_seed(0))
    # published convention: every kept FPR is 0, so the rescaling divides by zero (as the reference does)
    assert math.isnan(aupro(perfect, masks))
    assert aupro(perfect, masks, convention="fpr_limit") == pytest.approx(1.0, abs=1e-9)
    inverted = -perfect
    assert aupro(inverted, masks, convention="fpr_limit") == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        aupro(perfect, masks, convention="other")


def test_connected_components_8_connectivity() -> None:
    masks = torch.from_numpy(_masks())
    lab = connected_components(masks)
    ref = [ndimage.label(m, structure=np.ones((3, 3)))[1] for m in _masks()]
    assert int(lab.max()) == sum(ref) == 3
    assert lab[0, 2, 2] == lab[0, 6, 6] != lab[0, 16, 12]
    assert bool((lab[2] == 0).all())


# ---------------------------------------------------------------------- edge cases (mutation survivors)
def test_auroc_ap_resolve_tiny_and_float64_differences() -> None:
    """Scores that differ only below float32's resolution, or by 1e-9 near zero, are not ties."""
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    near_zero = torch.tensor([1e-9, 2e-9, 3e-9, 4e-9, 5e-9, 6e-9])  # lost if anything adds 1.0 first
    fine = 1.0 + torch.tensor([1, 2, 3, 4, 5, 6], dtype=torch.float64) * 1e-12  # lost in float32
    for s in (near_zero, fine):
        assert auroc(s, y) == pytest.approx(roc_auc_score(y.numpy(), s.double().numpy()), abs=1e-12)
        ap = average_precision_score(y.numpy(), s.double().numpy())
        assert average_precision(s, y) == pytest.approx(ap, abs=1e-12)
    assert auroc(fine, y) != auroc(fine.float(), y)  # float32 would have made them one tie


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_auroc_ap_on_negative_and_large_scores(dtype: torch.dtype) -> None:
    """Logit-like scores: both signs, wide magnitudes (the integer keys' sign handling)."""
    g = torch.Generator().manual_seed(11)
    s = (torch.randn(300, generator=g) * torch.logspace(-3, 3, 300)).to(dtype)
    y = torch.rand(300, generator=g) < torch.sigmoid(s.double().clamp(-3, 3))
    ref = s.double().numpy()
    assert auroc(s, y) == pytest.approx(roc_auc_score(y.numpy(), ref), abs=1e-12)
    assert average_precision(s, y) == pytest.approx(average_precision_score(y.numpy(), ref), abs=1e-12)


def test_ap_with_the_positives_last_or_alone() -> None:
    """The lowest score a positive (recall reaches 1 only at the last threshold), one single positive,
    and the highest scores negatives: all valid inputs."""
    s = torch.tensor([0.9, 0.8, 0.7, 0.1])
    for y in ([0, 0, 1, 1], [0, 0, 0, 1], [0, 1, 0, 0]):
        y = torch.tensor(y)
        assert average_precision(s, y) == pytest.approx(
            average_precision_score(y.numpy(), s.numpy()), abs=1e-12
        )
        assert auroc(s, y) == pytest.approx(roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)


def test_metric_errors_say_what_is_missing() -> None:
    with pytest.raises(ValueError, match="^AUROC needs both normal and anomalous samples$"):
        auroc(torch.rand(4), torch.ones(4))
    with pytest.raises(ValueError, match="^AUROC needs both normal and anomalous samples$"):
        auroc(torch.rand(4), torch.zeros(4))
    with pytest.raises(ValueError, match="^average precision needs at least one anomalous sample$"):
        average_precision(torch.rand(4), torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adjacent_floats_are_ordered(dtype: torch.dtype) -> None:
    """Neighbouring floats (one unit in the last place apart), of both signs and magnitudes, keep their order."""
    finfo = np.float32 if dtype == torch.float32 else np.float64
    base = np.array([-3.0, -0.5, 0.25, 3.0, 1e6], dtype=finfo)
    up = np.nextafter(base, np.array(np.inf, dtype=finfo))
    s = torch.from_numpy(np.concatenate([base, up]))
    y = torch.tensor([0] * 5 + [1] * 5)  # the upper neighbour is always the positive one
    assert auroc(s, y) == pytest.approx(roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)
    assert average_precision(s, y) == pytest.approx(average_precision_score(y.numpy(), s.numpy()), abs=1e-12)
    pairs = torch.stack([s[:5], s[5:]], 1)  # each pair alone: the positive ranks first
    for p in pairs:
        assert auroc(p, torch.tensor([0, 1])) == 1.0


def test_aupro_scores_on_the_thresholds_and_one_region() -> None:
    """Integer maps put pixels exactly on the thresholds (a pixel is positive only *above* one); one
    defect region in the whole batch is enough."""
    from promptlab.metrics import _pro_fpr_curve

    rng = np.random.default_rng(8)
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 4:9, 3:7] = True  # one region
    maps = rng.integers(0, 8, masks.shape).astype(np.float64) + 3.0 * masks
    m, k = torch.from_numpy(maps), torch.from_numpy(masks)
    assert int(connected_components(k).max()) == 1
    assert aupro(m, k, steps=10) == pytest.approx(_reference_aupro(maps, masks, steps=10), abs=1e-12)
    pros, fprs = _reference_curve(maps, masks, steps=10)
    lo, hi = maps.min(), maps.max()
    th = torch.from_numpy(np.arange(lo, hi, (hi - lo) / 10))
    pro, fpr = _pro_fpr_curve(m, k, th)
    np.testing.assert_allclose(pro.numpy(), pros, atol=1e-12)
    np.testing.assert_allclose(fpr.numpy(), fprs, atol=1e-12)
    # pixels go through in chunks; any chunk size gives the same curve
    small = _pro_fpr_curve(m, k, th, chunk=37)
    assert torch.equal(small[0], pro) and torch.equal(small[1], fpr)


def test_aupro_input_errors() -> None:
    maps = torch.rand(2, 8, 8)
    with pytest.raises(ValueError, match="^AUPRO needs at least one anomalous region in the masks$"):
        aupro(maps, torch.zeros(2, 8, 8, dtype=torch.bool))
    with pytest.raises(
        ValueError, match=r"^maps \(2, 8, 8\) and masks \(2, 8, 7\) must both be \[N, H, W\]$"
    ):
        aupro(maps, torch.zeros(2, 8, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^convention='x': expected one of \('published', 'fpr_limit'\)$"):
        aupro(maps, maps > 0.5, convention="x")


def test_aupro_published_edge_curves_match_reference() -> None:
    """Curves at the edges of the published convention, against the plain loop reference: a normal pixel
    holding the top score (the kept FPRs do not reach 0), exactly two kept points, an FPR of exactly
    0.3 (not kept: strictly below the limit), and constant maps (NaN)."""
    masks = np.zeros((1, 1, 20), bool)
    masks[0, 0, :10] = True  # one region of 10 pixels, 10 normal pixels
    normal = np.array([25.0, 1, 2, 3, 4, 5, 6, 7, 8, 0], dtype=np.float64)  # 25: a normal pixel on top
    two_kept = np.array([25.0, 13, 7, 7, 1, 1, 1, 0, 0, 0])  # steps=4: FPR 0.9, 0.4, 0.2, 0.1
    for anomalous, normals in (
        (np.arange(10.0, 20.0), normal),
        (np.linspace(2.5, 10.0, 10), normal),
        (np.arange(10.0, 20.0), two_kept),
    ):
        maps = np.concatenate([anomalous, normals])[None, None]
        for steps in (4, 5, 10, 20):
            pros, fprs = _reference_curve(maps, masks, steps)
            kept = fprs < 0.3
            ref = (
                _reference_aupro(maps, masks, steps=steps)
                if kept.sum() > 1 and np.ptp(fprs[kept]) > 0
                else math.nan
            )
            ours = aupro(torch.from_numpy(maps), torch.from_numpy(masks), steps=steps)
            assert ours == pytest.approx(ref, abs=1e-12, nan_ok=True), (steps, anomalous[0])
    _, fprs = _reference_curve(np.concatenate([np.arange(10.0, 20.0), normal])[None, None], masks, steps=20)
    assert np.isclose(fprs, 0.3).any() and (fprs > 0).all() and ((fprs < 0.3).sum() >= 2)
    flat = torch.ones(1, 1, 20, dtype=torch.float64)
    assert math.isnan(aupro(flat, torch.from_numpy(masks)))
    assert math.isnan(aupro(flat, torch.from_numpy(masks), convention="fpr_limit"))


def test_pro_fpr_curve_with_a_single_normal_pixel() -> None:
    from promptlab.metrics import _pro_fpr_curve

    masks = torch.ones(1, 3, 3, dtype=torch.bool)
    masks[0, 1, 1] = False  # one normal pixel, with the top score
    maps = torch.arange(9, dtype=torch.float64).reshape(1, 3, 3)
    maps[0, 1, 1] = 100.0
    pro, fpr = _pro_fpr_curve(maps, masks, torch.tensor([0.5, 50.0], dtype=torch.float64))
    assert fpr.tolist() == [1.0, 1.0] and pro.tolist() == [7 / 8, 0.0]
    assert connected_components(masks).dtype == torch.long


# ---------------------------------------------------------------------- mutation-testing survivors (#24)
def test_32_bit_scores_sort_as_32_bit_keys() -> None:
    """Half and single precision sort as int32 keys (half the memory of a VisA category's 10^8 pixels),
    everything else as int64."""
    from promptlab.metrics import _order_keys

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert _order_keys(torch.zeros(3, dtype=dtype)).dtype == torch.int32, dtype
    for dtype in (torch.float64, torch.int64, torch.int32):
        assert _order_keys(torch.zeros(3, dtype=dtype)).dtype == torch.int64, dtype


@pytest.mark.parametrize("score_dtype", [torch.float32, torch.int64])
def test_labels_count_as_binary_whatever_their_dtype(score_dtype: torch.dtype) -> None:
    """Labels are anomalous where nonzero: 0/255 masks read from PNGs, float and bool labels agree."""
    g = torch.Generator().manual_seed(12)
    s = torch.randint(0, 20, (200,), generator=g).to(score_dtype)
    y = torch.rand(200, generator=g) < 0.3
    ref_auroc, ref_ap = roc_auc_score(y.numpy(), s.numpy()), average_precision_score(y.numpy(), s.numpy())
    for labels in (y, y.to(torch.uint8) * 255, y.double(), y.long() * 3):
        assert auroc(s, labels) == pytest.approx(ref_auroc, abs=1e-12), labels.dtype
        assert average_precision(s, labels) == pytest.approx(ref_ap, abs=1e-12), labels.dtype


def _one_row(anomalous: list[float], normal: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One 1 x P image: one defect region (the first pixels), then the normal pixels."""
    maps = torch.tensor([anomalous + normal], dtype=torch.float64)[None]
    masks = torch.zeros_like(maps, dtype=torch.bool)
    masks[..., : len(anomalous)] = True
    return maps, masks


def test_aupro_published_is_nan_when_no_threshold_is_below_the_limit() -> None:
    """Every normal pixel on the top score: each threshold's FPR is 1, none is kept (NaN, as the
    reference's division by zero; not an error)."""
    maps, masks = _one_row([0.0, 1.0, 2.0, 3.0], [3.0] * 4)
    assert math.isnan(aupro(maps, masks, steps=4))


def test_aupro_fpr_limit_stops_at_a_curve_that_never_reaches_the_limit() -> None:
    """Binary maps: half the defect and one normal pixel in ten are 1. At every threshold PRO = 0.5 and
    FPR = 0.1, so the curve is (0, 0) -> (0.1, 0.5) and stops there: area 0.025, / 0.3."""
    maps, masks = _one_row([1.0] * 5 + [0.0] * 5, [1.0] + [0.0] * 9)
    assert aupro(maps, masks, convention="fpr_limit") == pytest.approx(0.025 / 0.3, abs=1e-12)
    assert math.isnan(aupro(maps, masks))  # published: one distinct kept FPR, no width to rescale


def test_aupro_thresholds_are_float64() -> None:
    """Float64 maps get float64 thresholds, like numpy.arange in the reference: a pixel just above 1/3
    is above the threshold 1/3 (it would not be above float32's 1/3, 0.33333334327)."""
    maps, masks = _one_row([0.33333334, 0.33333334, 1.0], [0.0, 0.2, 0.33333334, 0.5, 0.9])
    m, k = maps.numpy(), masks.numpy()
    pros, fprs = _reference_curve(m, k, steps=3)  # thresholds 0, 1/3, 2/3
    assert pros == pytest.approx([1.0, 1.0, 1 / 3]) and fprs == pytest.approx([0.8, 0.6, 0.2])
    assert math.isnan(aupro(maps, masks, steps=3))  # published: a single FPR below 0.3
    # fpr_limit by hand: (0, 0) -> (0.2, 1/3) -> cut at 0.3, a quarter of the way to (0.6, 1): PRO 1/2
    by_hand = (0.2 * (1 / 3) / 2 + 0.1 * (1 / 3 + 1 / 2) / 2) / 0.3
    assert aupro(maps, masks, steps=3, convention="fpr_limit") == pytest.approx(by_hand, abs=1e-12)
