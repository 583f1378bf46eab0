"""Surface-distance metrics of hard masks: HD95, HD, ASSD and the normalised surface Dice (NSD).

For a pair of hard masks ``A`` (prediction) and ``B`` (reference) of one image and class, ``∂A`` and ``∂B`` are
their boundary voxels and ``d(a, ∂B)`` the Euclidean distance in physical units (mm with ``spacing``, the voxel
size per spatial axis) from the centre of voxel ``a`` to the nearest voxel centre of ``∂B``. With the directed
distance sets ``D_AB = {d(a, ∂B) : a ∈ ∂A}`` and ``D_BA = {d(b, ∂A) : b ∈ ∂B}``:

* ``hd``   = ``max(max D_AB, max D_BA)`` (Hausdorff distance);
* ``hd95`` = ``max(q95(D_AB), q95(D_BA))``, ``q95`` the 95th percentile with linear interpolation;
* ``assd`` = ``(Σ D_AB + Σ D_BA) / (|∂A| + |∂B|)`` (average symmetric surface distance);
* ``nsd``  = ``(|{d ∈ D_AB : d ≤ τ}| + |{d ∈ D_BA : d ≤ τ}|) / (|∂A| + |∂B|)`` at the tolerance ``τ`` in mm
  (normalised surface Dice, Nikolov et al., JMIR 2021, docs/references.md, §"Surface DSC").

These are the definitions of MONAI's ``HausdorffDistanceMetric(percentile=95)``, ``HausdorffDistanceMetric()``,
``SurfaceDistanceMetric(symmetric=True)`` and ``SurfaceDiceMetric(class_thresholds=[τ], use_subvoxels=False)``
with ``distance_metric="euclidean"``, and the values agree with them (tests/test_surface.py). Boundary
convention (MONAI's with ``use_subvoxels=False``): ``∂M = M ∧ ¬erode(M)``, the erosion with the face-connected
(cross) structuring element and everything outside the image counted as background, so a mask touching the
image border has its border voxels on its boundary. A boundary is a set of voxels, each counted once: NSD
counts boundary voxels, not the surface areas (surfels) of Nikolov et al.'s reference code, so it differs from
theirs on oblique surfaces; so does MONAI's default.

Empty masks (MONAI's conventions):

* both empty: every value is NaN (nothing to measure);
* exactly one empty: ``hd`` and ``assd`` are ``+inf``, ``hd95`` is NaN (MONAI's percentile of infinite
  distances), ``nsd`` is 0.0.

:func:`surface_metrics` can instead score a structure absent from both masks as correctly absent
(``both_empty="absent"``: distances 0.0, NSD 1.0), segcal's overlap convention (Dice 1.0 for both empty;
:mod:`segcal.functional.overlap`) used by the metric schema (:mod:`segcal.functional.scoring`).

Computation, on the crop: every quantity above only involves the voxels of ``A ∪ B``, so each pair is cropped
to the bounding box of ``A ∪ B`` grown by one voxel (clipped to the image) before anything is computed. This
changes no value: (1) the boundary of ``M`` inside the crop equals its boundary in the image, because a voxel of
``M`` lies inside the box and its face neighbours outside the box are background either way (outside the image,
by the convention; inside the image, because the box holds all of ``A ∪ B``); (2) every voxel of ``∂A`` and
``∂B`` lies inside the box, so the distance transform of the crop, which takes the nearest voxel of ``∂B``
among the crop's voxels, takes it among all of ``∂B``: the nearest surface voxel of ``B`` to a surface voxel of
``A`` is always realised inside the box. The distances are exact (``scipy.ndimage.distance_transform_edt`` with
``sampling=spacing``, an exact Euclidean transform for anisotropic voxels): its feature transform gives, for
each voxel of the crop, the index of the nearest ``∂B`` voxel, and only the distances at ``∂A`` are computed
from those indices in float64. Memory is bounded by the crop (a boolean crop of each mask and one ``int32``
index array per spatial axis), never by the image. A crop of at least :data:`KDTREE_MIN_VOXELS` voxels whose
boundaries are sparse in it (fewer than one boundary voxel per :data:`KDTREE_SPARSITY` voxels: scattered false
positives far apart make the box large and the boundaries sparse) instead takes the nearest boundary voxels
from a k-d tree over the boundary voxels' centres in mm (``scipy.spatial.cKDTree``, an exact nearest-neighbour
search, as MONAI's CPU path): the same distances (tested against the transform), faster there, with memory
proportional to the boundaries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch

__all__ = [
    "SURFACE_METRICS",
    "BothEmpty",
    "SurfaceMetric",
    "check_surface_metrics",
    "check_tolerances",
    "class_surface_metrics",
    "mask_boundary",
    "surface_distances",
    "surface_metrics",
]

SurfaceMetric = Literal["hd95", "hd", "assd", "nsd"]
BothEmpty = Literal["nan", "absent"]

#: every surface metric, in the metric schema's order
SURFACE_METRICS: tuple[SurfaceMetric, ...] = ("hd95", "hd", "assd", "nsd")

#: crops of at least this many voxels whose boundaries are sparse (fewer than one boundary voxel of either mask
#: per ``KDTREE_SPARSITY`` voxels of the crop: scattered false positives) take the k-d tree path: there it is
#: faster (2.7x on a 4 x 96 x 96 x 64 case with 5% scattered errors) and its memory is proportional to the
#: boundaries, not to a large crop (module docstring)
KDTREE_MIN_VOXELS = 1 << 18
KDTREE_SPARSITY = 10
#: the values of a structure absent from both masks under ``both_empty="absent"``
_ABSENT: dict[str, float] = {"hd95": 0.0, "hd": 0.0, "assd": 0.0, "nsd": 1.0}


def check_surface_metrics(names: Iterable[str]) -> tuple[SurfaceMetric, ...]:
    """The surface metrics ``names`` in schema order, without repeats; ``ValueError`` naming an unknown one."""
    wanted = [str(n).strip().lower() for n in names]
    unknown = [n for n in wanted if n not in SURFACE_METRICS]
    if unknown:
        raise ValueError(f"unknown surface metric(s) {unknown}: choose from {', '.join(SURFACE_METRICS)}")
    return tuple(m for m in SURFACE_METRICS if m in wanted)


def check_tolerances(tolerance: float | Sequence[float], n_classes: int) -> tuple[float, ...]:
    """NSD tolerances in mm, one per scored class: a number for every class, or one per class; each finite and
    ``>= 0`` (``ValueError`` naming the problem)."""
    if isinstance(tolerance, int | float):
        values = [float(tolerance)] * n_classes
    else:
        values = [float(t) for t in tolerance]
        if len(values) != n_classes:
            raise ValueError(
                f"nsd tolerance: got {len(values)} per-class tolerances for {n_classes} scored classes"
            )
    bad = [t for t in values if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise ValueError(f"nsd tolerance must be finite and >= 0 mm, got {bad}")
    return tuple(values)


def _check_spacing(spacing: Sequence[float] | None, n_sp: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * n_sp
    sp = tuple(float(s) for s in spacing)
    if len(sp) != n_sp:
        raise ValueError(f"spacing has {len(sp)} values but the images have {n_sp} spatial dims")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be positive and finite (mm per axis), got {sp}")
    return sp


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels ``M ∧ ¬erode(M)`` of a boolean mask ``(*spatial)`` (face-connected erosion, outside the
    image is background: MONAI's edge convention without sub-voxels); equal to ``scipy.ndimage.binary_erosion``
    with ``border_value=0`` (tested), by one AND per face neighbour."""
    mask = np.asarray(mask, dtype=bool)
    inner = mask.copy()
    for ax in range(mask.ndim):
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        inner[tuple(hi)] &= mask[tuple(lo)]  # the neighbour before
        inner[tuple(lo)] &= mask[tuple(hi)]  # the neighbour after
        edge = [slice(None)] * mask.ndim
        for end in (0, -1):  # outside the image is background
            edge[ax] = end  # type: ignore[call-overload]
            inner[tuple(edge)] = False
    return mask & ~inner


def _crop(pred: np.ndarray, target: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of ``pred ∪ target`` grown by one voxel and clipped to the image (None when both are
    empty); computed from per-axis projections, without a full-size union array."""
    box = []
    for ax in range(pred.ndim):
        others = tuple(i for i in range(pred.ndim) if i != ax)
        hit = np.flatnonzero(pred.any(axis=others) | target.any(axis=others))
        if hit.size == 0:
            return None
        box.append(slice(max(0, int(hit[0]) - 1), min(pred.shape[ax], int(hit[-1]) + 2)))
    return tuple(box)


def _directed(from_edges: np.ndarray, to_edges: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distances (float64, mm) from each voxel of ``from_edges`` to the nearest voxel of ``to_edges`` (both
    non-empty, same crop): exact, from the feature transform of the crop."""
    from scipy.ndimage import distance_transform_edt

    nearest = distance_transform_edt(~to_edges, sampling=spacing, return_distances=False, return_indices=True)
    idx = np.nonzero(from_edges)
    sq = np.zeros(idx[0].shape, np.float64)
    for ax, s in enumerate(spacing):
        delta = (nearest[ax][idx] - idx[ax]).astype(np.float64) * s
        sq += delta * delta
    return np.sqrt(sq)


def _directed_kdtree(
    ea: np.ndarray, eb: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """``(D_AB, D_BA)`` by exact nearest-neighbour queries between the boundary voxels' centres in mm (a k-d
    tree over each boundary): the same distances as :func:`_directed`, memory proportional to the boundaries."""
    from scipy.spatial import cKDTree

    sp = np.asarray(spacing, dtype=np.float64)
    ca = np.argwhere(ea) * sp
    cb = np.argwhere(eb) * sp
    return cKDTree(cb).query(ca)[0], cKDTree(ca).query(cb)[0]


def surface_distances(
    pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The directed surface distances ``(D_AB, D_BA)`` (float64, mm) of two boolean masks ``(*spatial)``.

    ``D_AB`` holds, for each boundary voxel of ``pred`` (in C order), the distance to the nearest boundary voxel
    of ``target``; ``D_BA`` the reverse. Computed on the crop around both masks (module docstring). When one mask
    is empty the other's boundary voxels have no partner: both arrays then hold ``+inf`` for each boundary voxel
    of the non-empty mask (MONAI's convention); both empty gives two empty arrays.
    """
    a = _as_mask(pred, "pred")
    b = _as_mask(target, "target")
    if a.shape != b.shape:
        raise ValueError(f"pred and target masks differ in shape: {a.shape} vs {b.shape}")
    sp = _check_spacing(spacing, a.ndim)
    box = _crop(a, b)
    if box is None:
        return np.zeros(0), np.zeros(0)
    ea, eb = mask_boundary(a[box]), mask_boundary(b[box])
    if not ea.any() or not eb.any():
        n = int(ea.sum() + eb.sum())
        return np.full(n, np.inf), np.full(n, np.inf)
    n_edges = int(np.count_nonzero(ea)) + int(np.count_nonzero(eb))
    if ea.size >= KDTREE_MIN_VOXELS and n_edges * KDTREE_SPARSITY < ea.size:
        return _directed_kdtree(ea, eb, sp)
    return _directed(ea, eb, sp), _directed(eb, ea, sp)


def _as_mask(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype != np.bool_:
        raise TypeError(f"{name}: a surface metric needs a boolean mask, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2, 3):
        raise ValueError(f"{name}: a mask has 1 to 3 spatial dims, got shape {arr.shape}")
    return arr


def _values(
    d_ab: np.ndarray, d_ba: np.ndarray, metrics: Sequence[str], tolerance: float, both_empty: BothEmpty
) -> dict[str, float]:
    n = d_ab.size + d_ba.size
    if n == 0:
        return {m: (_ABSENT[m] if both_empty == "absent" else math.nan) for m in metrics}
    if not (np.isfinite(d_ab).all() and np.isfinite(d_ba).all()):  # exactly one mask empty
        return {m: {"hd95": math.nan, "hd": math.inf, "assd": math.inf, "nsd": 0.0}[m] for m in metrics}
    out: dict[str, float] = {}
    for m in metrics:
        if m == "hd95":
            out[m] = float(max(np.quantile(d_ab, 0.95), np.quantile(d_ba, 0.95)))
        elif m == "hd":
            out[m] = float(max(d_ab.max(), d_ba.max()))
        elif m == "assd":
            out[m] = float((d_ab.sum() + d_ba.sum()) / n)
        else:
            out[m] = float((np.count_nonzero(d_ab <= tolerance) + np.count_nonzero(d_ba <= tolerance)) / n)
    return out


def class_surface_metrics(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    *,
    spacing: Sequence[float] | None = None,
    metrics: Sequence[str] = SURFACE_METRICS,
    nsd_tolerance_mm: float = 1.0,
    both_empty: BothEmpty = "nan",
) -> dict[str, float]:
    """The surface metrics of one image and class: boolean masks ``(*spatial)`` → ``{name: value}`` (mm;
    definitions, empty-mask conventions and the crop in the module docstring)."""
    names = check_surface_metrics(metrics)
    (tol,) = check_tolerances(nsd_tolerance_mm, 1)
    if both_empty not in ("nan", "absent"):
        raise ValueError(f"both_empty must be 'nan' or 'absent', got {both_empty!r}")
    d_ab, d_ba = surface_distances(pred, target, spacing)
    return _values(d_ab, d_ba, names, tol, both_empty)


def surface_metrics(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    spacing: Sequence[float] | None = None,
    metrics: Sequence[str] = SURFACE_METRICS,
    nsd_tolerance_mm: float | Sequence[float] = 1.0,
    both_empty: BothEmpty = "nan",
) -> dict[str, torch.Tensor]:
    """Surface metrics per image and class of hard masks ``pred`` / ``target`` ``(B, C, *spatial)`` (bool).

    Returns ``{name: (B, C) float64}`` for each of ``metrics`` (schema order), in mm with ``spacing`` (per
    spatial axis; default 1). ``nsd_tolerance_mm``: one tolerance ``τ`` for every class or one per channel.
    MONAI's conventions for empty masks unless ``both_empty="absent"`` (module docstring).
    """
    if pred.shape != target.shape or pred.ndim < 3:
        raise ValueError(f"pred and target must be (B, C, *spatial) masks of one shape, got {pred.shape} and "
                         f"{target.shape}")
    b, c = pred.shape[:2]
    names = check_surface_metrics(metrics)
    tols = check_tolerances(nsd_tolerance_mm, c)
    _check_spacing(spacing, pred.ndim - 2)
    out = {m: torch.full((b, c), math.nan, dtype=torch.float64, device="cpu") for m in names}  # host: from scipy
    for i in range(b):
        for k in range(c):
            vals = class_surface_metrics(
                pred[i, k], target[i, k], spacing=spacing, metrics=names, nsd_tolerance_mm=tols[k],
                both_empty=both_empty,
            )
            for m in names:
                out[m][i, k] = vals[m]
    return out
