"""Overlap and boundary metrics vs MONAI, scikit-learn and an independent scipy HD95."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from segcal.functional.inputs import target_to_onehot
from segcal.functional.overlap import (
    confusion_counts,
    dice_from_counts,
    hard_prediction,
    hausdorff_distance_95,
    iou_from_counts,
    overlap_scores,
)

monai_metrics = pytest.importorskip("monai.metrics")
sk = pytest.importorskip("sklearn.metrics")


def _blobs(b: int, c: int, spatial: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random probabilities (blob-like argmax regions) and a perturbed label map."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, *spatial, generator=g)
    k = 5
    pool = torch.nn.functional.avg_pool3d if len(spatial) == 3 else torch.nn.functional.avg_pool2d
    logits = pool(logits, k, stride=1, padding=k // 2, count_include_pad=False) * 6
    probs = torch.softmax(logits, 1)
    lab = probs.argmax(1)
    flip = torch.rand(lab.shape, generator=g) < 0.15
    lab = torch.where(flip, torch.randint(0, c, lab.shape, generator=g), lab)
    return probs, lab


def _monai(metric_cls, pred_oh, y_oh, **kw):
    m = metric_cls(reduction="none", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(pred_oh, y_oh)
        return m.aggregate().double()


@pytest.mark.parametrize("spatial", [(24, 20), (12, 11, 9)], ids=["2d", "3d"])
@pytest.mark.parametrize("include_background", [True, False])
def test_dice_iou_match_monai(spatial, include_background):
    probs, lab = _blobs(3, 4, spatial, 0)
    counts = confusion_counts(probs, lab, include_background=include_background)
    pred_oh = hard_prediction(probs, "exclusive").float()
    y_oh = target_to_onehot(lab, 4, spatial_shape=spatial)
    ref_dice = _monai(monai_metrics.DiceMetric, pred_oh, y_oh, include_background=include_background)
    ref_iou = _monai(monai_metrics.MeanIoU, pred_oh, y_oh, include_background=include_background)
    assert torch.allclose(dice_from_counts(counts), ref_dice, atol=1e-6)
    assert torch.allclose(iou_from_counts(counts), ref_iou, atol=1e-6)


@pytest.mark.parametrize("spatial", [(24, 20), (12, 11, 9)], ids=["2d", "3d"])
def test_overlap_scores_match_sklearn(spatial):
    probs, lab = _blobs(2, 3, spatial, 1)
    scores = overlap_scores(confusion_counts(probs, lab))
    hard = probs.argmax(1)
    for b in range(2):
        for c in range(3):
            y = (lab[b] == c).reshape(-1).numpy()
            p = (hard[b] == c).reshape(-1).numpy()
            assert scores["dice"][b, c] == pytest.approx(sk.f1_score(y, p), abs=1e-12)
            assert scores["iou"][b, c] == pytest.approx(sk.jaccard_score(y, p), abs=1e-12)
            prec = sk.precision_score(y, p, zero_division=0)
            assert scores["precision"][b, c] == pytest.approx(prec, abs=1e-12)
            assert scores["recall"][b, c] == pytest.approx(sk.recall_score(y, p, zero_division=0), abs=1e-12)


def test_multilabel_threshold_and_mask_counts():
    g = torch.Generator().manual_seed(2)
    p = torch.rand(2, 3, 10, 9, generator=g)
    y = (torch.rand(2, 3, 10, 9, generator=g) > 0.6).float()
    mask = torch.rand(2, 10, 9, generator=g) > 0.3
    counts = confusion_counts(p, y, mode="multilabel", threshold=0.7, mask=mask)
    hard = (p >= 0.7) & mask[:, None]
    yy = (y > 0.5) & mask[:, None]
    ref = torch.stack([(hard & yy).sum((2, 3)), (hard & ~yy).sum((2, 3)), (~hard & yy).sum((2, 3))], -1)
    assert torch.equal(counts, ref.double())


def test_empty_conventions():
    """Both empty → 1.0 (HD95 0.0); one empty → 0.0 for ratios with a zero denominator (HD95 NaN)."""
    z = torch.zeros(1, 1, 8, 8)
    one = z.clone()
    one[0, 0, 2:5, 3:6] = 1
    # multilabel, one channel; predictions are probabilities in {0, 1}
    def scores(p: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return {k: float(v) for k, v in overlap_scores(confusion_counts(p, y, mode="multilabel")).items()}

    assert scores(z, z) == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    assert scores(z, one) == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}  # missed
    assert scores(one, z) == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}  # spurious
    assert float(hausdorff_distance_95(z, z, mode="multilabel")) == 0.0
    assert np.isnan(float(hausdorff_distance_95(z, one, mode="multilabel")))
    assert np.isnan(float(hausdorff_distance_95(one, z, mode="multilabel")))
    assert float(hausdorff_distance_95(one, one, mode="multilabel")) == 0.0


def _scipy_hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Independent HD95: surface voxels (mask minus its erosion, zero outside the image), Euclidean distance
    transform with anisotropic sampling, 95th percentile of each directed distance set, max of the two."""
    pad = [(1, 1)] * pred.ndim
    pred, gt = np.pad(pred, pad), np.pad(gt, pad)
    e_p = pred ^ ndimage.binary_erosion(pred)
    e_g = gt ^ ndimage.binary_erosion(gt)
    d_to_g = ndimage.distance_transform_edt(~e_g, sampling=spacing)[e_p]
    d_to_p = ndimage.distance_transform_edt(~e_p, sampling=spacing)[e_g]
    return float(max(np.percentile(d_to_g, 95), np.percentile(d_to_p, 95)))


@pytest.mark.parametrize(
    ("spatial", "spacing"),
    [((30, 26), None), ((30, 26), (0.7, 1.9)), ((14, 13, 10), None), ((14, 13, 10), (1.0, 0.8, 3.0))],
    ids=["2d", "2d-aniso", "3d", "3d-aniso"],
)
def test_hd95_matches_monai_and_scipy(spatial, spacing):
    probs, lab = _blobs(2, 3, spatial, 3)
    lab[1, ..., 0] = 0  # make sure images differ
    ours = hausdorff_distance_95(probs, lab, spacing=spacing)  # include_background=False by default
    pred_oh = hard_prediction(probs, "exclusive").float()
    y_oh = target_to_onehot(lab, 3, spatial_shape=spatial)
    m = monai_metrics.HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(pred_oh, y_oh, spacing=list(spacing) if spacing else None)
        ref = m.aggregate().double()
    assert ours.shape == (2, 2)
    assert torch.allclose(ours, ref, atol=1e-5)
    sp = spacing or (1.0,) * len(spatial)
    hard = probs.argmax(1)
    for b in range(2):
        for c in (1, 2):
            expected = _scipy_hd95((hard[b] == c).numpy(), (lab[b] == c).numpy(), sp)
            assert float(ours[b, c - 1]) == pytest.approx(expected, abs=1e-5)


def test_hd95_single_voxel_and_known_distance():
    """A single voxel vs a single voxel 3 voxels away along an axis with spacing 2 mm: 6 mm."""
    p = torch.zeros(1, 1, 9, 9, 9)
    y = torch.zeros(1, 1, 9, 9, 9)
    p[0, 0, 4, 4, 1] = 1
    y[0, 0, 4, 4, 4] = 1
    out = hausdorff_distance_95(p, y, mode="multilabel", spacing=(1.0, 1.0, 2.0))
    assert float(out) == pytest.approx(6.0)


def test_regions_overlap():
    probs, lab = _blobs(2, 4, (16, 16), 4)
    counts = confusion_counts(probs, lab, regions=[[3], [1, 3], [1, 2, 3]])
    ref = []
    for cls in ([3], [1, 3], [1, 2, 3]):
        hy = torch.isin(lab, torch.tensor(cls))
        hp = probs[:, cls].sum(1) >= 0.5  # region probabilities are thresholded at 0.5 (multilabel)
        ref.append(torch.stack([(hp & hy).sum((1, 2)), (hp & ~hy).sum((1, 2)), (~hp & hy).sum((1, 2))], -1))
    assert torch.equal(counts, torch.stack(ref, 1).double())
