"""Offline MNI152 brain-tissue task with soft reference labels, pseudo-subjects and shifted sets.

Reference: the ICBM152 2009 template shipped inside nilearn (no network): T1 image, grey-matter (GM) and
white-matter (WM) probability maps and a brain mask, resampled by nilearn to 2 mm (99 × 117 × 95). Template:
Fonov et al., NeuroImage 2009 and 2011; nilearn: Abraham et al. 2014 (docs/references.md).

* 4 classes ``[background, CSF, GM, WM]``: ``CSF = clip(mask − GM − WM, 0, 1)``,
  ``background = clip(1 − CSF − GM − WM, 0, 1)``; the stack, normalised to sum to one, is the
  **soft reference** ``soft``; its argmax is the hard label map ``labels``. In the template 69 % of brain-mask
  voxels have a reference max-probability below 0.9 (78 % of the non-background voxels of the default 2D
  pseudo-subjects, 56 % below 0.8), so a model's calibration can be scored against known probabilities.
* **Pseudo-subjects**: subject ``s`` of seed ``q`` draws (``numpy.random.default_rng((q, s))``) a small affine
  (axial rotation ±5°, scaling ±5 %, shift ±2 mm) plus a smooth cubic-B-spline displacement field (control
  points every ~24 mm, ``deform_mm`` RMS, default 3 mm), applied to the T1 and the four maps together
  (linear interpolation, so the maps still sum to one). The image then gets a random gamma (0.8-1.25), a
  smooth multiplicative bias field (~±15 %), normalisation by its 99.5th percentile and Gaussian noise
  (σ 0.01-0.03). ``labels = argmax(soft)`` of the *deformed* maps, so labels are exact for every subject.
* Arrays are cropped around the brain to ``H × W = 112 × 96`` (rows run anterior → posterior, so anterior
  is at the top; columns = the template's x axis), 2 mm isotropic. 2D data: ``slices_per_subject`` axial
  slices evenly spaced over template z ∈ [12, 70] (all contain brain). 3D data: template z ∈ [0, 80).
* Split by subject: subjects ``0 … n_train−1`` train, then val, then test (no subject in two splits).
* Shifted sets (:func:`make_shifted`): stronger noise, blur, thick-slice resampling, contrast (gamma)
  change, bias field; each at severity 1-5, changing the image only, so the labels stay exact.

Generated arrays are cached as ``.npz`` (``allow_pickle=False``) in :func:`default_cache_dir`, keyed by
:data:`VERSION`, the nilearn version, the seed and every parameter; a mismatching or unreadable cache file is
regenerated.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

from segcal.io.numpy import read_npz, write_npz

#: bump when the generator changes: old cache files are then ignored and rebuilt.
VERSION = "mni152-tissue-1"
CLASS_NAMES = ("background", "CSF", "GM", "WM")
SPACING_MM = 2.0
#: crop of the 99 × 117 × 95 template grid (x, y, z start/stop), brain is x 13-85, y 14-103, z 0-77.
_X0, _W = 1, 96
_Y0, _H = 3, 112
_Z0, _D = 0, 80
_Z_SLICES = (12, 70)

ShiftKind = Literal["noise", "blur", "thick_slice", "contrast", "bias_field"]
SHIFT_KINDS: tuple[str, ...] = ("noise", "blur", "thick_slice", "contrast", "bias_field")
#: per-kind parameter at severity 1..5
#: (noise σ, blur σ in voxels, slice thickness in mm, gamma, bias-field amplitude)
SHIFT_LEVELS: dict[str, tuple[float, ...]] = {
    "noise": (0.04, 0.07, 0.10, 0.15, 0.20),
    "blur": (0.6, 0.9, 1.2, 1.6, 2.0),
    "thick_slice": (4.0, 5.0, 6.5, 8.0, 10.0),
    "contrast": (0.8, 0.65, 0.5, 0.4, 0.3),
    "bias_field": (0.15, 0.25, 0.35, 0.45, 0.6),
}

__all__ = [
    "CLASS_NAMES",
    "SHIFT_KINDS",
    "SHIFT_LEVELS",
    "VERSION",
    "TissueDataset",
    "TissueSplit",
    "build_count",
    "default_cache_dir",
    "load_tissue_dataset",
    "load_tissue_volumes",
    "make_shifted",
    "reference_maps",
    "shift_images",
]

_BUILDS = 0


def build_count() -> int:
    """How many datasets this process has generated (not loaded from cache); for tests and diagnostics."""
    return _BUILDS


@dataclass(frozen=True, eq=False)
class TissueSplit:
    """One split of the tissue task.

    Attributes:
        name: ``"train"``, ``"val"``, ``"test"`` (shifted sets append ``"/<kind><severity>"``).
        images: ``(N, 1, *S)`` float32 T1 intensities (≈ [0, 1]).
        labels: ``(N, *S)`` int64 in ``0..3`` (``CLASS_NAMES``), argmax of ``soft``.
        soft: ``(N, 4, *S)`` float32 reference probabilities, summing to one over the channel axis.
        subjects: ``(N,)`` int64 pseudo-subject id of each item.
        slices: ``(N,)`` int64 template z index of each 2D slice (``-1`` for volumes).
        spacing: voxel size in mm per spatial axis.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    soft: np.ndarray
    subjects: np.ndarray
    slices: np.ndarray
    spacing: tuple[float, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def mask(self) -> np.ndarray:
        """``(N, *S)`` bool, voxels whose reference background probability is below 0.5 (the brain)."""
        return self.soft[:, 0] < 0.5

    def tensors(self) -> dict[str, object]:
        """The arrays as torch tensors (no copy): ``images``, ``labels``, ``soft``."""
        import torch

        return {
            "images": torch.from_numpy(self.images),
            "labels": torch.from_numpy(self.labels),
            "soft": torch.from_numpy(self.soft),
        }


@dataclass(frozen=True, eq=False)
class TissueDataset:
    """Train / val / test splits of the MNI152 tissue task (2D slices or 3D volumes)."""

    train: TissueSplit
    val: TissueSplit
    test: TissueSplit
    seed: int
    params: dict[str, object] = field(default_factory=dict)
    cache_path: Path | None = None
    from_cache: bool = False
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def spacing(self) -> tuple[float, ...]:
        return self.train.spacing

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __getitem__(self, name: str) -> TissueSplit:
        if name not in ("train", "val", "test"):
            raise KeyError(f"split must be 'train', 'val' or 'test', got {name!r}")
        return getattr(self, name)


# --------------------------------------------------------------------------------------------- reference maps


@functools.lru_cache(maxsize=1)
def reference_maps() -> tuple[np.ndarray, np.ndarray]:
    """Template T1 ``(99, 117, 95)`` float32 and soft reference ``(4, 99, 117, 95)`` float32 at 2 mm.

    Loaded from the files inside the nilearn package (no network access) once per process; the returned
    arrays are read-only.
    """
    from nilearn import datasets  # slow import (~3 s): only when data must be generated

    t1 = np.asarray(datasets.load_mni152_template(resolution=2).dataobj, dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=2).dataobj, dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=2).dataobj, dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=2).dataobj, dtype=np.float32)
    gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
    csf = np.clip(mask - gm - wm, 0, 1)
    bg = np.clip(1 - csf - gm - wm, 0, 1)
    soft = np.stack([bg, csf, gm, wm])
    soft /= np.maximum(soft.sum(0, keepdims=True), 1e-6)
    soft = soft.astype(np.float32)
    t1.flags.writeable = False
    soft.flags.writeable = False
    return t1, soft


# ------------------------------------------------------------------------------------------------ simulation


def _spline_weights(n_ctrl: int, n_grid: int, coords: np.ndarray) -> np.ndarray:
    """``(len(coords), n_ctrl)`` weights of a 1D cubic B-spline through ``n_ctrl`` control points spanning
    a grid of ``n_grid`` voxels, evaluated at voxel ``coords`` (``map_coordinates(order=3)`` per axis)."""
    pos = (coords * ((n_ctrl - 1) / (n_grid - 1)))[None]
    eye = np.eye(n_ctrl)
    return np.stack([ndimage.map_coordinates(e, pos, order=3, mode="nearest") for e in eye], axis=1)


def _spline_field(
    rng: np.random.Generator, ctrl: Sequence[int], axes: Sequence[np.ndarray], grid: Sequence[int]
) -> np.ndarray:
    """Smooth random field on the tensor grid ``axes = (xs, ys, zs)`` (template voxels) → ``(Z, Y, X)``.

    Cubic B-spline through iid N(0, 1) control values (``ctrl`` points spanning the template ``grid``),
    rescaled to unit RMS on the control grid, so the field does not depend on which points are evaluated.
    Evaluated as a tensor product of 1D weight matrices (cheap), equal to ``map_coordinates(order=3)``.
    """
    values = rng.standard_normal(tuple(ctrl))
    values /= max(float(np.sqrt(np.mean(values**2))), 1e-6)
    wx, wy, wz = (_spline_weights(c, g, a) for c, g, a in zip(ctrl, grid, axes, strict=True))
    return np.einsum("abc,xa,yb,zc->zyx", values, wx, wy, wz, optimize=True).astype(np.float32)


def _output_axes(zs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template voxel coordinates (xs, ys, zs) of the output grid; rows run anterior → posterior."""
    ys = (_Y0 + _H - 1 - np.arange(_H)).astype(np.float64)
    xs = (_X0 + np.arange(_W)).astype(np.float64)
    return xs, ys, zs.astype(np.float64)


def _simulate_subject(
    t1: np.ndarray, soft: np.ndarray, seed: int, subject: int, zs: np.ndarray, deform_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """One pseudo-subject sampled at slices ``zs``: image ``(Z, H, W)`` and soft maps ``(Z, 4, H, W)``."""
    rng = np.random.default_rng((int(seed), int(subject)))
    grid = t1.shape
    axes = _output_axes(zs)
    zz, yy, xx = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    p = np.stack([xx, yy, zz]).astype(np.float32)  # (3, Z, H, W) template voxel coordinates
    centre = np.array([49.0, 58.0, 40.0], dtype=np.float32).reshape(3, 1, 1, 1)
    angle = np.deg2rad(rng.uniform(-5, 5))
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    a = (rot * rng.uniform(0.95, 1.05, size=3)).astype(np.float32)
    shift = rng.uniform(-1, 1, size=3).astype(np.float32).reshape(3, 1, 1, 1)
    src = np.einsum("ij,j...->i...", a, p - centre) + centre + shift
    ctrl = (9, 10, 9)  # ~24 mm between control points
    disp = np.stack([_spline_field(rng, ctrl, axes, grid) for _ in range(3)])
    src += disp * (deform_mm / SPACING_MM / np.sqrt(3))  # vector RMS = deform_mm
    img = ndimage.map_coordinates(t1, src, order=1, mode="constant", cval=0.0)
    maps = np.stack(
        [
            ndimage.map_coordinates(soft[c], src, order=1, mode="constant", cval=1.0 if c == 0 else 0.0)
            for c in range(4)
        ],
        axis=1,
    )
    maps = np.clip(maps, 0, 1)
    maps /= np.maximum(maps.sum(1, keepdims=True), 1e-6)
    gamma = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    bias = np.exp(0.15 * _spline_field(rng, (4, 4, 4), axes, grid))
    img = np.clip(img, 0, None) ** gamma * bias
    img /= max(float(np.percentile(img, 99.5)), 1e-6)
    img += rng.normal(0.0, rng.uniform(0.01, 0.03), size=img.shape)
    return np.clip(img, 0, None).astype(np.float32), maps.astype(np.float32)


def _split_sizes(n_subjects: int, split: Sequence[int]) -> tuple[int, int, int]:
    if len(split) != 3 or any(int(s) < 0 for s in split):
        raise ValueError(f"split must be three non-negative subject counts (train, val, test), got {split!r}")
    if sum(int(s) for s in split) != n_subjects:
        raise ValueError(f"split {tuple(split)} must add up to n_subjects={n_subjects}")
    if min(int(s) for s in split) < 1:
        raise ValueError(f"every split needs at least one subject, got {tuple(split)}")
    return int(split[0]), int(split[1]), int(split[2])


def _default_split(n_subjects: int) -> tuple[int, int, int]:
    if n_subjects < 3:
        raise ValueError(f"n_subjects must be >= 3 (one per split), got {n_subjects}")
    n_val = max(1, round(n_subjects * 0.2))
    n_test = max(1, round(n_subjects * 0.2))
    return n_subjects - n_val - n_test, n_val, n_test


def _generate(
    kind: str, n_subjects: int, sizes: tuple[int, int, int], seed: int, slices: int, deform_mm: float
) -> dict[str, np.ndarray]:
    global _BUILDS
    t1, soft = reference_maps()
    if kind == "2d":
        zs = np.round(np.linspace(_Z_SLICES[0], _Z_SLICES[1], slices)).astype(np.int64)
    else:
        zs = np.arange(_Z0, _Z0 + _D, dtype=np.int64)
    imgs, maps = [], []
    for s in range(n_subjects):
        img, m = _simulate_subject(t1, soft, seed, s, zs, deform_mm)
        if kind == "3d":  # (Z, H, W) → (H, W, Z)
            img, m = np.moveaxis(img, 0, -1)[None], np.moveaxis(m, 0, -1)[None]
        imgs.append(img)
        maps.append(m)
    images = np.concatenate(imgs)[:, None]
    soft_all = np.concatenate(maps)
    per = len(zs) if kind == "2d" else 1
    subjects = np.repeat(np.arange(n_subjects, dtype=np.int64), per)
    slice_ids = np.tile(zs, n_subjects) if kind == "2d" else np.full(n_subjects, -1, dtype=np.int64)
    bounds = np.cumsum([0, *sizes])
    out: dict[str, np.ndarray] = {}
    for name, lo, hi in zip(("train", "val", "test"), bounds[:-1], bounds[1:], strict=True):
        sel = (subjects >= lo) & (subjects < hi)
        # compact storage: float16 images (step << noise), soft maps quantised to 1/65535; fresh and cached
        # data go through the same decoding in _decode, so they are identical
        out[f"{name}_images"] = images[sel].astype(np.float16)
        out[f"{name}_soft"] = np.round(soft_all[sel] * 65535).astype(np.uint16)
        out[f"{name}_subjects"] = subjects[sel]
        out[f"{name}_slices"] = slice_ids[sel]
    _BUILDS += 1
    return out


# ---------------------------------------------------------------------------------------------------- caching


def default_cache_dir() -> Path:
    """``$SEGCAL_CACHE``, else ``$XDG_CACHE_HOME/segcal``, else ``~/.cache/segcal``."""
    if os.environ.get("SEGCAL_CACHE"):
        return Path(os.environ["SEGCAL_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "segcal"
    return Path.home() / ".cache" / "segcal"


def _nilearn_version() -> str:
    return metadata.version("nilearn")


_KEYS = ("images", "soft", "subjects", "slices")


def _read_cache(path: Path, meta: str) -> dict[str, np.ndarray] | None:
    """The cached arrays if ``path`` is a readable cache file written with ``meta``; else ``None``."""
    if not path.is_file():
        return None
    try:
        if str(read_npz(path, ("meta",))["meta"]) != meta:
            return None
        arrays = read_npz(path, [f"{s}_{k}" for s in ("train", "val", "test") for k in _KEYS])
    except ValueError:  # CaseError: unreadable, truncated or missing arrays
        return None
    for s in ("train", "val", "test"):
        n = arrays[f"{s}_images"].shape[0]
        if any(arrays[f"{s}_{k}"].shape[0] != n for k in _KEYS) or n == 0:
            return None
    return arrays


def _write_cache(path: Path, meta: str, arrays: dict[str, np.ndarray]) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_npz(path, {"meta": np.array(meta), **arrays}, compressed=True)  # atomic: never half-written
    except OSError:
        return False
    return True


def _decode(name: str, arrays: dict[str, np.ndarray], spacing: tuple[float, ...]) -> TissueSplit:
    """Stored (float16 / uint16) arrays → a :class:`TissueSplit`; labels = argmax of the decoded soft maps."""
    soft = arrays[f"{name}_soft"].astype(np.float32) / np.float32(65535)
    soft /= np.maximum(soft.sum(1, keepdims=True), np.float32(1e-6))
    return TissueSplit(
        name=name,
        images=arrays[f"{name}_images"].astype(np.float32),
        labels=soft.argmax(1).astype(np.int64),
        soft=soft,
        subjects=arrays[f"{name}_subjects"].astype(np.int64),
        slices=arrays[f"{name}_slices"].astype(np.int64),
        spacing=spacing,
    )


def _load(
    kind: str,
    n_subjects: int,
    split: Sequence[int] | None,
    seed: int,
    slices: int,
    deform_mm: float,
    cache_dir: str | Path | None,
    use_cache: bool,
) -> TissueDataset:
    if not isinstance(n_subjects, int) or isinstance(n_subjects, bool):
        raise TypeError(f"n_subjects must be an int, got {type(n_subjects).__name__}")
    sizes = _split_sizes(n_subjects, split) if split is not None else _default_split(n_subjects)
    if slices < 1:
        raise ValueError(f"slices_per_subject must be >= 1, got {slices}")
    if not 0 <= deform_mm <= 10:
        raise ValueError(f"deform_mm must be in [0, 10], got {deform_mm}")
    params: dict[str, object] = {
        "version": VERSION,
        "nilearn": _nilearn_version(),
        "kind": kind,
        "n_subjects": n_subjects,
        "split": list(sizes),
        "seed": int(seed),
        "slices_per_subject": int(slices) if kind == "2d" else _D,
        "deform_mm": float(deform_mm),
    }
    meta = json.dumps(params, sort_keys=True)
    digest = hashlib.sha256(meta.encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / f"mni152_tissue{kind}_{digest}.npz"
    arrays = _read_cache(path, meta) if use_cache else None
    from_cache = arrays is not None
    if arrays is None:
        arrays = _generate(kind, n_subjects, sizes, int(seed), int(slices), float(deform_mm))
        if use_cache and not _write_cache(path, meta, arrays):
            path = None  # type: ignore[assignment]
    spacing = (SPACING_MM,) * (2 if kind == "2d" else 3)
    splits = {s: _decode(s, arrays, spacing) for s in ("train", "val", "test")}
    return TissueDataset(
        **splits, seed=int(seed), params=params, cache_path=path if use_cache else None, from_cache=from_cache
    )


def load_tissue_dataset(
    n_subjects: int = 20,
    split: Sequence[int] | None = (12, 4, 4),
    seed: int = 0,
    *,
    slices_per_subject: int = 24,
    deform_mm: float = 3.0,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> TissueDataset:
    """2D axial slices of the MNI152 tissue task, split by pseudo-subject.

    Args:
        n_subjects: number of pseudo-subjects.
        split: subjects in (train, val, test); must add up to ``n_subjects``. ``None`` = 60/20/20 %, which
            is also used when the default ``(12, 4, 4)`` is left in place with ``n_subjects != 20``.
        seed: seeds every pseudo-subject (subject ``s`` uses ``default_rng((seed, s))``, so subject ``s`` is
            the same whatever ``n_subjects`` is).
        slices_per_subject: axial slices per subject, evenly spaced over the brain (template z 12-70).
        deform_mm: RMS of the smooth deformation in mm.
        cache_dir: where the ``.npz`` cache lives (default :func:`default_cache_dir`).
        use_cache: read / write the cache; ``False`` always regenerates and writes nothing.

    Returns:
        :class:`TissueDataset` whose splits hold ``images (N, 1, 112, 96)`` float32, ``labels (N, 112, 96)``
        int64, ``soft (N, 4, 112, 96)`` float32, ``subjects``/``slices (N,)`` and ``spacing (2.0, 2.0)``.
    """
    if split is not None and split == (12, 4, 4) and n_subjects != 20:
        split = None  # the default split only fits the default subject count
    return _load("2d", n_subjects, split, seed, slices_per_subject, deform_mm, cache_dir, use_cache)


def load_tissue_volumes(
    n_subjects: int = 20,
    split: Sequence[int] | None = (12, 4, 4),
    seed: int = 0,
    *,
    deform_mm: float = 3.0,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> TissueDataset:
    """3D variant: one volume per pseudo-subject, ``images (N, 1, 112, 96, 80)`` (axes y, x, z; 2 mm).

    Same pseudo-subjects as :func:`load_tissue_dataset` with the same ``seed`` and ``deform_mm``: the 2D
    slices are the axial planes ``[..., z]`` of these volumes at the ``slices`` z indices. About 17 MB per
    subject in memory; building 20 subjects takes ~20 s.
    """
    if split is not None and split == (12, 4, 4) and n_subjects != 20:
        split = None
    return _load("3d", n_subjects, split, seed, _D, deform_mm, cache_dir, use_cache)


# ------------------------------------------------------------------------------------------------- shift sets


def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or int(severity) != severity or not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be an integer 1..5, got {severity!r}")
    return int(severity)


def _thick_slice(x: np.ndarray, axis: int, step: float) -> np.ndarray:
    """Slice-profile blur (FWHM = ``step`` voxels) along ``axis``, sampling every ``step`` voxels, and linear
    interpolation back onto the original grid."""
    n = x.shape[axis]
    blurred = ndimage.gaussian_filter1d(x, sigma=step / 2.355, axis=axis, mode="nearest")
    pos = np.arange(0.0, n - 1 + 1e-6, step)  # acquired slice centres
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * x.ndim
    shape[axis] = -1
    frac = (pos - lo).reshape(shape)
    thick = np.take(blurred, lo, axis=axis) * (1 - frac) + np.take(blurred, hi, axis=axis) * frac
    back = np.arange(n) / step  # original grid in acquired-slice units
    lo2 = np.minimum(np.floor(back).astype(np.int64), len(pos) - 1)
    hi2 = np.minimum(lo2 + 1, len(pos) - 1)
    frac2 = np.clip(back - lo2, 0, 1).reshape(shape)
    return np.take(thick, lo2, axis=axis) * (1 - frac2) + np.take(thick, hi2, axis=axis) * frac2


def shift_images(
    images: np.ndarray, kind: ShiftKind, severity: int = 3, seed: int = 0, spacing: float = SPACING_MM
) -> np.ndarray:
    """Apply an acquisition shift to images ``(N, 1, *S)`` (2 or 3 spatial dims); returns a new float32 array.

    * ``"noise"``: additive Gaussian noise, σ ∈ (0.04 … 0.2) of the normalised intensity, clipped at 0;
    * ``"blur"``: Gaussian blur, σ ∈ (0.6 … 2.0) voxels over the spatial axes;
    * ``"thick_slice"``: slices of (4 … 10) mm thickness along the *last* spatial axis (z for volumes; for 2D
      axial slices the last axis is x, i.e. a thick sagittal acquisition), resampled back to ``spacing``;
    * ``"contrast"``: offset gamma ``((x + 0.1)^γ − 0.1^γ) / (1.1^γ − 0.1^γ)``, γ ∈ (0.8 … 0.3), which lowers
      the GM/WM contrast (0 and 1 are kept);
    * ``"bias_field"``: a smooth random multiplicative field ``exp(a · g)``, a ∈ (0.15 … 0.6), per image.

    The anatomy is unchanged, so the labels and soft references of the source stay exact.
    """
    if kind not in SHIFT_KINDS:
        raise ValueError(f"kind must be one of {SHIFT_KINDS}, got {kind!r}")
    severity = _check_severity(severity)
    x = np.asarray(images, dtype=np.float32)
    if x.ndim not in (4, 5) or x.shape[1] != 1:
        raise ValueError(f"images must have shape (N, 1, *spatial) with 2 or 3 spatial dims, got {x.shape}")
    level = SHIFT_LEVELS[kind][severity - 1]
    rng = np.random.default_rng((int(seed), SHIFT_KINDS.index(kind), severity))
    spatial = x.shape[2:]
    if kind == "noise":
        out = x + rng.normal(0.0, level, size=x.shape).astype(np.float32)
    elif kind == "blur":
        out = ndimage.gaussian_filter(x, sigma=(0, 0, *([level] * len(spatial))), mode="nearest")
    elif kind == "thick_slice":
        out = _thick_slice(x, x.ndim - 1, level / spacing)
    elif (
        kind == "contrast"
    ):  # gamma with an offset: slope at 0 stays bounded, so background noise is not blown up
        eps = 0.1
        out = ((np.clip(x, 0, None) + eps) ** level - eps**level) / ((1 + eps) ** level - eps**level)
    else:
        ctrl = rng.standard_normal((x.shape[0], *([4] * len(spatial))))
        ctrl /= np.sqrt(np.mean(ctrl**2, axis=tuple(range(1, ctrl.ndim)), keepdims=True))
        zoom = (1, *[s / 4 for s in spatial])
        g = ndimage.zoom(ctrl, zoom, order=3, mode="nearest", grid_mode=True)
        out = x * np.exp(level * g.astype(np.float32))[:, None]
    return np.clip(out, 0, None).astype(np.float32)


def make_shifted(split: TissueSplit, kind: ShiftKind, severity: int = 3, seed: int = 0) -> TissueSplit:
    """A shifted copy of ``split`` (see :func:`shift_images`) with the same labels and soft references.

    The result's name is ``"<split>/<kind><severity>"``, e.g. ``"test/noise3"``.
    """
    images = shift_images(split.images, kind, severity, seed, spacing=float(split.spacing[-1]))
    return replace(split, name=f"{split.name}/{kind}{_check_severity(severity)}", images=images)
