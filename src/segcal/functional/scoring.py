"""Every metric of a case, in one place: the metric schema and the mergeable per-image statistics.

One function, :func:`case_statistics`, computes for each image of a batch ``(B, C, *spatial)`` the sums every
segcal metric derives from (a :class:`CaseStatistics`); :func:`image_metrics` and :func:`pooled_metrics` turn
them into per-image and dataset-level (micro) values. The stateful metric
(:class:`segcal.metrics.SegmentationCalibrationMetric`), the dataset runner (``segcal evaluate``) and the reports
all go through these three functions, so a metric is defined once. :data:`METRICS` is the one schema (name,
per class or per case, how it pools) from which ``MetricResult``, the ``cases.csv`` columns and ``summary.json``
are derived.

For the common case (exclusive classes, a hard label map, no region channels, no soft reference) the
confusion counts, Brier and NLL sums and the top-label bins come from one fused pass over the voxels: on CPU
the numba pass of :mod:`segcal.functional._case_kernel` (sharing the binning kernels of
:mod:`segcal.functional._kernels`), on a CUDA device the Triton kernels of :mod:`segcal.functional._triton`;
their results equal the separate functions' (tested at 1e-12 relative).

Bins: ``M`` equal-width bins, bin ``k`` = ``(k/M, (k+1)/M]`` (``closed="right"``, see
:mod:`segcal.functional.binning`). Metric definitions: marginal ECE/ACE/MCE and their L2 forms from
:func:`~segcal.functional.calibration.calibration_errors` (Naeini et al. 2015; Nixon et al. 2019; the marginal
class-wise form of Barfoot et al. 2024, docs/references.md), NLL and Brier as in Mehrtash et al. 2020
(eqs. 3-4), overlap scores from the confusion counts, the surface metrics HD95, HD, ASSD and NSD of
:mod:`segcal.functional.surface` (equal to MONAI's; a structure absent from both masks scores 0.0 / NSD 1.0, see
:func:`segcal.functional.overlap.surface_scores`).

Metrics of the peers (the schema's ``"peers"`` group, computed when :func:`case_statistics` gets ``fine_bins``):
class-wise ECE and the root Brier score (MetricsReloaded's ``cwECE`` / ``rbs``;
:func:`~segcal.functional.calibration.classwise_calibration_error`,
:func:`~segcal.functional.calibration.root_brier_score`), the equal-mass (adaptive) ECE with ``M`` equal-mass bins
formed from a fine mergeable histogram of ``K`` bins and its error bound
(:func:`~segcal.functional.adaptive.equal_mass_calibration_error`), the smooth ECE from the same fine histogram
(:func:`~segcal.functional.smooth.smooth_calibration_error`), and the case-level uncertainty scores of
failure detection (mean voxel entropy, mean top-label confidence; :mod:`segcal.functional.failure`). Every one of
them pools from summed statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch

from segcal.functional import _triton
from segcal.functional.adaptive import equal_mass_calibration_error
from segcal.functional.binning import BinStats, Closed, _prepare_mask, bin_edges, bin_statistics
from segcal.functional.calibration import (
    EPS,
    brier_score,
    calibration_errors,
    classwise_calibration_error,
    mean_absolute_error,
    negative_log_likelihood,
    root_brier_score,
    top_label_statistics,
)
from segcal.functional.inputs import (
    PROB_ATOL,
    Mode,
    as_label_map,
    as_tensor,
    check_mode,
    check_probabilities,
    check_target,
    region_probabilities,
    region_targets,
)
from segcal.functional.overlap import confusion_counts, overlap_scores, surface_scores
from segcal.functional.smooth import smooth_calibration_error
from segcal.functional.surface import SURFACE_METRICS, check_surface_metrics

__all__ = [
    "CASE_METRICS",
    "CLASS_METRICS",
    "METRICS",
    "PEER_CASE_METRICS",
    "PEER_CLASS_METRICS",
    "SURFACE_FIELDS",
    "CaseStatistics",
    "MetricSpec",
    "TargetError",
    "case_statistics",
    "image_metrics",
    "pooled_metrics",
]


@dataclass(frozen=True)
class MetricSpec:
    """One metric of the schema.

    ``per``: ``"class"`` (one value per kept channel) or ``"case"`` (one value per image). ``source``: the
    statistic it derives from. ``pooled``: whether a dataset-level (micro) value exists, computed from the
    summed statistics of all images (the surface metrics have none: a distance is not a sum). ``group``:
    ``"core"`` (always computed) or ``"peers"`` (the metrics of other toolkits, computed when the statistics hold
    the fine histogram).
    """

    name: str
    per: Literal["class", "case"]
    source: Literal["counts", "bins", "top", "brier", "mae", "nll", "hd95", "surface", "fine", "entropy"]
    pooled: bool
    description: str
    group: Literal["core", "peers"] = "core"


_CE = {
    "ece": "expected calibration error (L1, bins weighted by their voxel count)",
    "ace": "average calibration error (L1, non-empty bins weighted equally)",
    "mce": "maximum calibration error over non-empty bins",
    "ece_l2": "expected calibration error, L2 (root of the count-weighted mean squared gap)",
    "ace_l2": "average calibration error, L2",
}

#: the metric schema, in ``cases.csv`` column order
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("dice", "class", "counts", True, "Dice similarity coefficient of the argmax segmentation"),
    MetricSpec("iou", "class", "counts", True, "intersection over union (Jaccard)"),
    MetricSpec("precision", "class", "counts", True, "positive predictive value"),
    MetricSpec("recall", "class", "counts", True, "sensitivity"),
    MetricSpec("hd95", "class", "hd95", False, "95th-percentile Hausdorff distance (mm with the spacing)"),
    MetricSpec("hd", "class", "surface", False, "Hausdorff distance, the maximum surface distance (mm)"),
    MetricSpec("assd", "class", "surface", False, "average symmetric surface distance (mm)"),
    MetricSpec("nsd", "class", "surface", False, "normalised surface Dice at the run's tolerance in mm"),
    *(MetricSpec(k, "class", "bins", True, f"marginal {v}") for k, v in _CE.items()),
    MetricSpec("brier", "class", "brier", True, "mean squared error of the class probability"),
    MetricSpec("mae", "class", "mae", True, "mean absolute error against a soft reference"),
    MetricSpec("nll", "case", "nll", True, "mean negative log-likelihood of the target"),
    *(MetricSpec(f"top_label_{k}", "case", "top", True, f"top-label {v}") for k, v in _CE.items()),
    MetricSpec(
        "adaptive_ece", "class", "fine", True,
        "equal-mass (adaptive) ECE: M bins at the quantiles, formed from the fine histogram", "peers",
    ),
    MetricSpec(
        "adaptive_ece_bound", "class", "fine", True,
        "bound on the distance of adaptive_ece to the exact per-voxel equal-mass ECE", "peers",
    ),
    MetricSpec(
        "smooth_ece", "class", "fine", True, "smooth ECE (reflected Gaussian kernel, automatic bandwidth)", "peers"
    ),
    MetricSpec("cw_ece", "case", "bins", True, "class-wise ECE: mean marginal ECE over the scored channels", "peers"),
    MetricSpec("rbs", "case", "brier", True, "root Brier score: root of the summed Brier scores", "peers"),
    MetricSpec("mean_entropy", "case", "entropy", True, "mean voxel entropy (a case-level uncertainty)", "peers"),
    MetricSpec("mean_confidence", "case", "top", True, "mean top-label confidence (max probability)", "peers"),
)
#: per-class metric names of the core group (in schema order)
CLASS_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.per == "class" and m.group == "core")
#: per-case metric names of the core group (in schema order)
CASE_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.per == "case" and m.group == "core")
#: per-class metric names of the peers group (in schema order)
PEER_CLASS_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.per == "class" and m.group == "peers")
#: per-case metric names of the peers group (in schema order)
PEER_CASE_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.per == "case" and m.group == "peers")
#: the :class:`CaseStatistics` fields holding surface metrics (one per metric of the same name; not sums)
SURFACE_FIELDS: tuple[str, ...] = SURFACE_METRICS


class TargetError(ValueError):
    """The target (label map or reference), not the prediction, is invalid."""


@dataclass(frozen=True)
class CaseStatistics:
    """Per-image statistics that every metric derives from; all float64 tensors with images on axis 0.

    ``bins`` ``(B, C, 3, M)`` marginal bin sums (count, Σp, Σy) of the kept channels; ``top`` ``(B, 1, 3, M)``
    top-label bin sums; ``counts`` ``(B, C, 3)`` tp / fp / fn; ``brier_sum`` / ``mae_sum`` ``(B, C)`` sums of the
    per-voxel squared / absolute errors (``mae_sum`` NaN without a soft reference); ``nll_sum`` ``(B,)``;
    ``n_voxels`` ``(B,)`` voxels scored (inside the mask); ``hd95``, ``hd``, ``assd``, ``nsd`` ``(B, C)`` the
    surface metrics (NaN when not computed; statistics stored before ``hd`` / ``assd`` / ``nsd`` existed read
    back with NaN there). Optional (the peers group, ``None`` unless :func:`case_statistics` got ``fine_bins``):
    ``fine`` ``(B, C, 3, K)`` fine equal-width bin sums of the kept channels, ``entropy_sum`` ``(B,)`` the sum of
    the voxel entropies. Images merge by concatenation (:meth:`cat`); the pooled values sum over images.
    """

    bins: torch.Tensor
    top: torch.Tensor
    counts: torch.Tensor
    brier_sum: torch.Tensor
    mae_sum: torch.Tensor
    nll_sum: torch.Tensor
    n_voxels: torch.Tensor
    hd95: torch.Tensor
    hd: torch.Tensor
    assd: torch.Tensor
    nsd: torch.Tensor
    fine: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.bins.shape[0])

    @property
    def bin_stats(self) -> BinStats:
        return BinStats(self.bins[:, :, 0], self.bins[:, :, 1], self.bins[:, :, 2])

    @property
    def top_label_stats(self) -> BinStats:
        return BinStats(self.top[:, :, 0], self.top[:, :, 1], self.top[:, :, 2])

    @property
    def fine_stats(self) -> BinStats | None:
        """The fine bin sums (peers group), or None when they were not computed."""
        if self.fine is None:
            return None
        return BinStats(self.fine[:, :, 0], self.fine[:, :, 1], self.fine[:, :, 2])

    @staticmethod
    def cat(parts: Sequence[CaseStatistics]) -> CaseStatistics:
        """Stack the images of several statistics (the merge of per-image records)."""
        if not parts:
            raise ValueError("no statistics to concatenate")
        out = {}
        for f in _FIELDS:
            vals = [getattr(p, f.name) for p in parts]
            if f.name in _OPTIONAL and any(v is None for v in vals):
                if not all(v is None for v in vals):
                    raise ValueError(f"cannot concatenate statistics with and without {f.name!r} (fine_bins)")
                out[f.name] = None
                continue
            out[f.name] = torch.cat(vals)
        return CaseStatistics(**out)

    def select(self, i: int) -> CaseStatistics:
        """Image ``i`` as a one-image statistics."""
        return CaseStatistics(
            **{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[i : i + 1] for f in _FIELDS}
        )

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Plain float64 arrays by field name (for storage; optional fields that were not computed are left
        out, so storage without the peers group is unchanged)."""
        return {f.name: getattr(self, f.name).cpu().numpy() for f in _FIELDS if getattr(self, f.name) is not None}

    @staticmethod
    def from_numpy(arrays: dict[str, np.ndarray]) -> CaseStatistics:
        """From :meth:`to_numpy`'s arrays; a surface metric other than HD95 that is missing (statistics stored
        before it existed) is NaN, and the optional peers-group statistics stay None when absent."""
        arrays = dict(arrays)
        for name in SURFACE_FIELDS:
            if name not in arrays and "hd95" in arrays:
                arrays[name] = np.full(np.shape(arrays["hd95"]), np.nan)
        return CaseStatistics(
            **{
                f.name: as_tensor(np.asarray(arrays[f.name], np.float64))
                for f in _FIELDS
                if f.name in arrays or f.name not in _OPTIONAL
            }
        )


_FIELDS = fields(CaseStatistics)
#: the fields of the peers group (None unless computed)
_OPTIONAL = ("fine", "entropy_sum")


def _fused(
    probs: torch.Tensor,
    lab: torch.Tensor,
    mask: torch.Tensor | None,
    num_bins: int,
    closed: Closed,
    check: bool,
) -> tuple[torch.Tensor, ...] | None:
    """The fused pass: ``(counts (B, C, 3), sq (B, C), top (B, 1, 3, M), nll_sum (B,), n (B,))`` float64 over all
    classes, or None where the kernels do not apply (the caller uses the separate functions). ``mask``:
    ``(B, *spatial)`` bool or None.

    Where the Triton kernels serve (a CUDA device): :func:`segcal.functional._triton.case_sums` over the whole
    batch, then the top-label confidences binned by :func:`segcal.functional._triton.label_bin_sums` (the bins of
    the CPU pass, bitwise on float32); with ``check``, one read back to the host (the flagged voxels and the label
    range). On CPU: the numba pass, one image at a time."""
    if _triton.available(probs, num_bins):
        r = _triton.case_sums(probs, lab, mask, EPS, _sum_tol(probs.shape[1]))
        if check:
            read = torch.stack([r.n_flagged.sum(), r.label_range[:, 0].min(), r.label_range[:, 1].max()]).tolist()
            _raise_invalid(*read, probs)
        top = _triton.label_bin_sums(r.confidence, r.wrong, 0, mask, bin_edges(num_bins, probs.dtype), closed)
        return r.counts, r.sq, top, r.nll_sum, r.n_in_mask
    from segcal.functional._case_kernel import fused_case_pass

    c = probs.shape[1]
    out: list[tuple[np.ndarray, ...]] = []
    for b in range(probs.shape[0]):
        m = None if mask is None else mask[b].numpy()
        res = fused_case_pass(probs[b].numpy(), lab[b].numpy(), m, EPS, num_bins, closed, sum_tol=_sum_tol(c))
        if res is None:
            return None
        counts, sq, top, info = res
        if check:
            _raise_invalid(info["n_flagged"], info["label_min"], info["label_max"], probs[b : b + 1])
        out.append((counts, sq, top[None], np.array(info["nll_sum"]), np.array(info["n_in_mask"])))
    return tuple(torch.from_numpy(np.stack(col)).to(torch.float64) for col in zip(*out, strict=True))


def _sum_tol(c: int) -> float:
    """The fused passes' threshold on a voxel's channel sum (below 7: see ``_kernels._mark_sums_off``)."""
    return min(PROB_ATOL * max(1, c), 6.0)


def _raise_invalid(n_flagged: float, label_min: float, label_max: float, probs: torch.Tensor) -> None:
    """The core's validation after a fused pass: where the pass flagged voxels, the precise checks of
    :func:`~segcal.functional.inputs.check_probabilities` name the problem (a borderline flag they clear raises
    nothing); then the label range against the ``C`` classes of ``probs``."""
    c = probs.shape[1]
    if n_flagged > 0:
        check_probabilities(probs, "exclusive")
    if label_min < 0 or label_max >= c:
        raise TargetError(
            f"label: labels must lie in [0, {c - 1}] for {c} classes, found values in [{int(label_min)}, "
            f"{int(label_max)}]"
        )


def _fast_label_map(
    probs: torch.Tensor, target: torch.Tensor, mode: Mode, regions: object, reference: object, num_bins: int
) -> torch.Tensor | None:
    """The label map ``(B, *S)`` when a fused pass applies (the numba one on CPU, the Triton one where
    :func:`segcal.functional._triton.available`), else None."""
    if mode != "exclusive" or regions is not None or reference is not None or probs.shape[1] < 2:
        return None
    if probs.dtype not in (torch.float32, torch.float64):
        return None
    if probs.device.type != "cpu" and not _triton.available(probs, num_bins):
        return None
    if target.is_floating_point() or target.dtype == torch.bool or target.device != probs.device:
        return None
    lab = as_label_map(target, probs.shape[2:])
    if lab is None or lab.shape[0] != probs.shape[0] or lab.numel() == 0:
        return None
    return lab.contiguous()


def _top_label(
    probs: torch.Tensor, target: torch.Tensor, num_bins: int, mode: Mode, mask: torch.Tensor | None, closed: Closed
) -> torch.Tensor:
    """Top-label bin sums ``(B, 1, 3, M)`` of the model's own classes; in multilabel mode the per-channel
    binary curves (confidence ``max(p, 1 - p)``) are summed into one."""
    top = top_label_statistics(probs, target, num_bins, mode=mode, mask=mask, closed=closed, check=False)
    stacked = torch.stack([top.count, top.sum_p, top.sum_y], 2)
    return stacked.sum(1, keepdim=True)


def case_statistics(
    probs: torch.Tensor,
    target: torch.Tensor,
    num_bins: int = 20,
    *,
    mode: Mode = "exclusive",
    include_background: bool = False,
    regions: Sequence[Sequence[int]] | None = None,
    mask: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    hd95: bool = False,
    spacing: Sequence[float] | None = None,
    closed: Closed = "right",
    check: bool = True,
    fine_bins: int | None = None,
    surface: Sequence[str] = (),
    nsd_tolerance_mm: float | Sequence[float] = 1.0,
) -> CaseStatistics:
    """The statistics of every metric of each image of ``probs`` ``(B, C, *spatial)`` (probabilities).

    Args:
        target: label map ``(B, *spatial)`` / ``(B, 1, *spatial)`` or one-hot / multi-hot ``(B, C, *spatial)``;
            the reference of the overlap counts, the top-label accuracy and HD95, and of the calibration
            statistics unless ``reference`` is given.
        num_bins: ``M`` equal-width bins, bin ``k`` = ``(k/M, (k+1)/M]`` (``closed="right"``).
        mode: ``"exclusive"`` (softmax classes) or ``"multilabel"`` (independent channels).
        include_background: keep channel 0 in exclusive mode.
        regions: region channels summed from exclusive classes (e.g. BraTS ``[[3], [1, 3], [1, 2, 3]]``): the
            class-wise metrics are computed on the region channels (multilabel); the top-label metrics stay on
            the model's classes.
        mask: ``(B, *spatial)`` (or ``(B, 1, *spatial)``) region of interest, bool or 0 / 1 values of any dtype
            (moved to ``probs``' device); every statistic but HD95 is restricted to it.
        reference: optional soft reference ``(B, C, *spatial)`` in [0, 1] (e.g. the mean of several
            annotators): bins, Brier and NLL are computed against it, and the MAE is filled.
        hd95: compute the 95th-percentile Hausdorff distance (whole image, ``spacing`` in mm).
        surface: surface metrics to compute besides (``"hd95"``, ``"hd"``, ``"assd"``, ``"nsd"``; whole image,
            mm; :func:`segcal.functional.overlap.surface_scores`), all from one set of distances per class.
        nsd_tolerance_mm: the NSD tolerance in mm, one for every kept channel or one per kept channel.
        check: validate the inputs (a bad target raises :class:`TargetError`, a bad prediction ``ValueError``).
        fine_bins: also compute the peers group's statistics: ``K`` fine equal-width bins ``(k/K, (k+1)/K]`` of
            the kept channels (the equal-mass ECE is formed from them) and the voxel entropy sum.

    Returns:
        :class:`CaseStatistics` with ``B`` images.
    """
    mode = check_mode(mode)
    eff: Mode = "exclusive" if regions is not None else mode
    mask = _prepare_mask(mask, probs.shape[0], probs.shape[2:], probs.device)
    lab = _fast_label_map(probs, target, mode, regions, reference, num_bins)
    if check and lab is None:  # (the fused pass validates the label range itself)
        _check_targets(probs, target, reference, eff)
    ib = include_background
    calib_target = reference if reference is not None else target
    kw = {"mode": mode, "regions": regions, "mask": mask}
    fused = _fused(probs.detach(), lab, mask, num_bins, closed, check) if lab is not None else None
    if check and lab is not None and fused is None:
        _check_targets(probs, target, reference, eff)
    bins = bin_statistics(
        probs, calib_target, num_bins, include_background=ib, closed=closed, check=check and fused is None, **kw
    )
    n_vox = bins.count[:, 0].sum(-1)
    first = 0 if (ib or eff != "exclusive" or regions is not None) else 1
    if fused is not None:
        counts, sq, top, nll_sum, n_vox = fused
        counts, brier_sum = counts[:, first:], sq[:, first:]
    else:
        counts = confusion_counts(probs, target, include_background=ib, check=False, **kw)
        brier_sum = brier_score(probs, calib_target, include_background=ib, check=False, **kw) * n_vox[:, None]
        nll_sum = negative_log_likelihood(probs, calib_target, check=False, **kw) * n_vox
        top = _top_label(probs, target, num_bins, eff, mask, closed)
    nan = torch.full(counts.shape[:2], float("nan"), dtype=torch.float64, device=counts.device)
    mae_sum = nan
    if reference is not None:
        mae = _mae(probs, reference, ib, mode, regions, mask)
        mae_sum = mae * n_vox[:, None]
    wanted = check_surface_metrics([*(["hd95"] if hd95 else []), *surface])
    dist: dict[str, torch.Tensor] = {}
    if wanted:
        dist = surface_scores(
            probs, target, include_background=ib, mode=mode, spacing=spacing, regions=regions, metrics=wanted,
            nsd_tolerance_mm=nsd_tolerance_mm, check=False,
        )
    fine = entropy_sum = None
    if fine_bins is not None:
        fs = bin_statistics(probs, calib_target, fine_bins, include_background=ib, closed=closed, check=False, **kw)
        fine = torch.stack([fs.count, fs.sum_p, fs.sum_y], 2).cpu()
        entropy_sum = _entropy_sum(probs, eff, mask)
    return CaseStatistics(
        bins=torch.stack([bins.count, bins.sum_p, bins.sum_y], 2).cpu(),
        top=top.cpu(),
        counts=counts.cpu(),
        brier_sum=brier_sum.cpu(),
        mae_sum=mae_sum.cpu(),
        nll_sum=nll_sum.reshape(-1).cpu(),
        n_voxels=n_vox.to(torch.float64).reshape(-1).cpu(),
        **{name: dist.get(name, nan).cpu() for name in SURFACE_FIELDS},
        fine=fine,
        entropy_sum=entropy_sum,
    )


def _entropy_sum(probs: torch.Tensor, mode: Mode, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum over the scored voxels of the voxel entropy ``(B,)`` (exclusive: ``−Σ_c p_c ln p_c`` over the model's
    classes; multilabel: the mean over channels of the binary entropy)."""
    from segcal.functional.uncertainty import entropy_map

    h = entropy_map(probs.detach(), mode).mean(1)  # in the input's dtype, summed in float64
    if mask is not None:
        h = torch.where(mask.reshape(h.shape).bool(), h, torch.zeros((), dtype=h.dtype, device=h.device))
    return h.reshape(h.shape[0], -1).sum(-1, dtype=torch.float64).cpu()


def _check_targets(probs: torch.Tensor, target: torch.Tensor, reference: torch.Tensor | None, mode: Mode) -> None:
    try:
        check_target(target, probs.shape, mode, name="label")
        if reference is not None:
            check_target(reference, probs.shape, mode, name="reference")
    except ValueError as exc:
        raise TargetError(str(exc)) from None


def _mae(
    probs: torch.Tensor,
    reference: torch.Tensor,
    ib: bool,
    mode: Mode,
    regions: Sequence[Sequence[int]] | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    if regions is not None:
        return mean_absolute_error(
            region_probabilities(probs, regions),
            region_targets(reference, regions, probs.shape[1]),
            mode="multilabel",
            mask=mask,
            check=False,
        )
    return mean_absolute_error(probs, reference, mode=mode, include_background=ib, mask=mask, check=False)


def _per_voxel(total: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``total / n`` with NaN where no voxel was scored (``n`` broadcast over trailing axes)."""
    n = n.reshape(n.shape + (1,) * (total.ndim - n.ndim))
    return torch.where(n > 0, total / n.clamp_min(1), torch.nan)


def _metric_values(
    counts: torch.Tensor,
    bins: BinStats,
    top: BinStats,
    sums: dict[str, torch.Tensor],
    n: torch.Tensor,
) -> dict[str, torch.Tensor]:
    values = {**overlap_scores(counts), **calibration_errors(bins)}
    values.update({f"top_label_{k}": v for k, v in calibration_errors(top).items()})
    values["brier"] = _per_voxel(sums["brier_sum"], n)
    values["mae"] = _per_voxel(sums["mae_sum"], n)
    values["nll"] = _per_voxel(sums["nll_sum"], n)[:, None]
    return values


def _peer_values(
    bins: BinStats, top: BinStats, fine: BinStats, brier: torch.Tensor, entropy_sum: torch.Tensor, n: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The peers group's values, ``(B, C)`` per class and ``(B, 1)`` per case; ``M`` equal-mass bins, ``M`` the
    number of the (equal-width) bins."""
    ece, bound = equal_mass_calibration_error(fine, bins.num_bins)
    conf = top.sum_p.sum((1, 2)) / top.count.sum((1, 2)).clamp_min(1)
    return {
        "adaptive_ece": ece,
        "adaptive_ece_bound": bound,
        "smooth_ece": smooth_calibration_error(fine),
        "cw_ece": classwise_calibration_error(bins)[:, None],
        "rbs": root_brier_score(brier)[:, None],
        "mean_entropy": _per_voxel(entropy_sum, n)[:, None],
        "mean_confidence": torch.where(top.count.sum((1, 2)) > 0, conf, torch.nan)[:, None],
    }


def image_metrics(stats: CaseStatistics) -> dict[str, torch.Tensor]:
    """Per-image values of every metric of :data:`METRICS`: ``(B, C)`` per class, ``(B, 1)`` per case (the
    peers group only when the statistics hold it)."""
    sums = {"brier_sum": stats.brier_sum, "mae_sum": stats.mae_sum, "nll_sum": stats.nll_sum}
    values = _metric_values(stats.counts, stats.bin_stats, stats.top_label_stats, sums, stats.n_voxels)
    values.update({name: getattr(stats, name) for name in SURFACE_FIELDS})
    fine = stats.fine_stats
    if fine is not None and stats.entropy_sum is not None:
        values.update(
            _peer_values(stats.bin_stats, stats.top_label_stats, fine, values["brier"], stats.entropy_sum,
                         stats.n_voxels)
        )
    return {m.name: values[m.name] for m in METRICS if m.name in values}


def pooled_metrics(stats: CaseStatistics) -> dict[str, torch.Tensor]:
    """Dataset-level (micro) values from the statistics summed over images: ``(C,)`` per class, ``(1,)`` per
    case; metrics without a pooled form (the surface metrics) are left out."""
    sums = {
        "brier_sum": stats.brier_sum.sum(0, keepdim=True),
        "mae_sum": stats.mae_sum.sum(0, keepdim=True),
        "nll_sum": stats.nll_sum.sum(0, keepdim=True),
    }
    n = stats.n_voxels.sum(0, keepdim=True)
    bins, top = stats.bin_stats.pooled(), stats.top_label_stats.pooled()
    values = _metric_values(stats.counts.sum(0, keepdim=True), bins, top, sums, n)
    fine = stats.fine_stats
    if fine is not None and stats.entropy_sum is not None:
        values.update(
            _peer_values(bins, top, fine.pooled(), values["brier"], stats.entropy_sum.sum(0, keepdim=True), n)
        )
    return {m.name: values[m.name][0] for m in METRICS if m.pooled and m.name in values}
