"""Readers with geometry: NIfTI, NumPy ``.npy/.npz`` and nnU-Net v2 prediction folders.

Every array returned here is in **label order**: a probability map is ``(C, *S)`` with ``*S`` the spatial axes
of the label file as it is stored (NIfTI ``(x, y, z)``). nnU-Net v2 writes ``case.npz`` (key
``probabilities``) with axes ``(C, z, y, x)``; :func:`read_nnunet_probabilities` reverses the spatial axes so
that they line up with ``labelsTr/case.nii.gz``.

Every read problem (missing, corrupt or truncated file, wrong key, wrong dtype, mismatched shape, spacing or
affine) raises one :class:`CaseError` whose message names the file and the problem. Pickled arrays are never
loaded (``allow_pickle=False``).
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

Format = Literal["auto", "nifti", "npy", "nnunet"]

__all__ = [
    "Case",
    "CaseError",
    "CaseFiles",
    "Format",
    "case_id_from_path",
    "detect_format",
    "load_case",
    "match_cases",
    "read_label",
    "read_mask",
    "read_nifti",
    "read_nnunet_probabilities",
    "read_numpy",
    "read_probabilities",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NUMPY_SUFFIXES = (".npy", ".npz")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
#: tolerance on spacing (mm) and affine entries when prediction and label geometry are compared
GEOMETRY_ATOL = 1e-3


class CaseError(ValueError):
    """A problem with one case's files; ``path`` names the offending file (``None`` if not file-specific)."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


@dataclass
class Case:
    """One evaluated case.

    Attributes:
        case_id: identifier shared by prediction and label files (extensions and ``_0000`` suffixes stripped).
        probabilities: ``(C, *S)`` float array (float16/float32/float64 as stored).
        label: ``(*S)`` integer label map (or ``None`` when only a soft reference is given).
        reference: optional soft reference ``(C, *S)`` in [0, 1] (e.g. mean of several annotators).
        spacing: voxel size in mm per spatial axis of ``*S``.
        affine: ``4 x 4`` voxel-to-world matrix (``None`` for plain NumPy data).
        mask: optional region mask ``(*S)`` bool.
        paths: source files by role (``prediction``, ``label``, ``reference``, ``mask``).
    """

    case_id: str
    probabilities: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None
    reference: np.ndarray | None = None
    mask: np.ndarray | None = None
    paths: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class CaseFiles:
    """The files of one case, before reading: ``prediction`` may be several per-class NIfTI files."""

    case_id: str
    prediction: list[str]
    label: str
    reference: list[str] | None = None
    mask: str | None = None


# --------------------------------------------------------------------------------------------- identifiers


def _strip_suffix(name: str) -> str:
    for suf in (*NIFTI_SUFFIXES, *NUMPY_SUFFIXES):
        if name.endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def case_id_from_path(path: str | Path) -> tuple[str, int | None]:
    """``(case_id, channel)`` from a file name: extension stripped, an nnU-Net ``_0000`` suffix split off."""
    stem = _strip_suffix(Path(path).name)
    m = _CHANNEL_RE.match(stem)
    if m:
        return m.group("case"), int(m.group("channel"))
    return stem, None


def _data_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    if not folder.is_dir():
        raise CaseError(folder, "is not a directory")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(tuple(suffixes)))


def detect_format(pred_dir: str | Path) -> Literal["nifti", "npy", "nnunet"]:
    """Guess the prediction format of a folder.

    ``nnunet``: ``.npz`` files next to nnU-Net's ``plans.json`` / ``dataset.json`` / ``.pkl`` files;
    ``nifti``: NIfTI files and no NumPy files; ``npy`` otherwise.
    """
    folder = Path(pred_dir)
    files = _data_files(folder, (*NIFTI_SUFFIXES, *NUMPY_SUFFIXES))
    has_npz = any(p.name.endswith(".npz") for p in files)
    nnunet_marks = (
        (folder / "plans.json").exists() or (folder / "dataset.json").exists() or any(folder.glob("*.pkl"))
    )
    if has_npz and nnunet_marks:
        return "nnunet"
    if any(p.name.endswith(NIFTI_SUFFIXES) for p in files) and not any(
        p.name.endswith(NUMPY_SUFFIXES) for p in files
    ):
        return "nifti"
    return "npy"


def _group(files: Sequence[Path], by_channel: bool) -> dict[str, list[Path]]:
    """Files by case id; with ``by_channel`` the ``_0000`` suffix is split off (files grouped)."""
    groups: dict[str, list[tuple[int, Path]]] = {}
    for p in files:
        if by_channel:
            cid, ch = case_id_from_path(p)
        else:
            cid, ch = _strip_suffix(p.name), None
        groups.setdefault(cid, []).append((-1 if ch is None else ch, p))
    return {k: [p for _, p in sorted(v)] for k, v in groups.items()}


def _lookup(table: dict[str, list[Path]], cid: str) -> list[Path] | None:
    """Files of ``cid`` in a by-stem table, also trying the id with a ``_0000`` channel suffix."""
    if cid in table:
        return table[cid]
    for k, v in table.items():
        if case_id_from_path(k + ".npy")[0] == cid:
            return v
    return None


def match_cases(
    pred_dir: str | Path,
    label_dir: str | Path,
    fmt: Format = "auto",
    *,
    reference_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
) -> tuple[list[CaseFiles], dict[str, list[str]]]:
    """Pair prediction and label files by case identifier.

    Identifiers are file names without extension and without an nnU-Net channel suffix (``case_0000``).
    With NIfTI predictions several ``case_0000, case_0001, ...`` files are the per-class probability maps of
    one case. Returns ``(cases, unmatched)`` with ``unmatched`` listing, per role, the files without partner.
    """
    fmt = detect_format(pred_dir) if fmt == "auto" else fmt
    if fmt not in ("nifti", "npy", "nnunet"):
        raise ValueError(f"format must be auto, nifti, npy or nnunet, got {fmt!r}")
    pred_suffixes = NIFTI_SUFFIXES if fmt == "nifti" else (".npz",) if fmt == "nnunet" else NUMPY_SUFFIXES
    any_suffix = (*NIFTI_SUFFIXES, *NUMPY_SUFFIXES)
    pred_files = _data_files(Path(pred_dir), pred_suffixes)
    labels = _group(_data_files(Path(label_dir), any_suffix), by_channel=False)
    # NIfTI: case_0000, case_0001 ... are per-class files of one case (unless a label has that stem)
    by_stem = _group(pred_files, by_channel=False)
    if fmt == "nifti" and not all(k in labels for k in by_stem):
        preds = _group(pred_files, by_channel=True)
    else:
        preds = {(k if k in labels else case_id_from_path(k + ".npy")[0]): v for k, v in by_stem.items()}
    refs = (
        _group(_data_files(Path(reference_dir), any_suffix), by_channel=True)
        if reference_dir is not None
        else None
    )
    if refs is not None and fmt != "nifti":
        refs = _group(_data_files(Path(reference_dir), any_suffix), by_channel=False)  # type: ignore[arg-type]
    masks = (
        _group(_data_files(Path(mask_dir), any_suffix), by_channel=False) if mask_dir is not None else None
    )
    unmatched: dict[str, list[str]] = {"prediction": [], "label": [], "reference": [], "mask": []}
    cases: list[CaseFiles] = []
    for cid in sorted(preds):
        lab = _lookup(labels, cid)
        if lab is None:
            unmatched["prediction"] += [str(p) for p in preds[cid]]
            continue
        ref = _lookup(refs, cid) if refs is not None else None
        msk = _lookup(masks, cid) if masks is not None else None
        if refs is not None and ref is None:
            unmatched["prediction"] += [str(p) for p in preds[cid]]
            continue
        if masks is not None and msk is None:
            unmatched["prediction"] += [str(p) for p in preds[cid]]
            continue
        cases.append(
            CaseFiles(
                cid,
                [str(p) for p in preds[cid]],
                str(lab[0]),
                [str(p) for p in ref] if ref is not None else None,
                str(msk[0]) if msk is not None else None,
            )
        )
    used = {p for c in cases for p in [c.label, *(c.reference or []), c.mask] if p}
    unmatched["label"] = [str(p) for v in labels.values() for p in v if str(p) not in used]
    if refs is not None:
        unmatched["reference"] = [str(p) for v in refs.values() for p in v if str(p) not in used]
    if masks is not None:
        unmatched["mask"] = [str(p) for v in masks.values() for p in v if str(p) not in used]
    return cases, {k: v for k, v in unmatched.items() if v}


# ------------------------------------------------------------------------------------------------- readers


def read_nifti(path: str | Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """``(data, spacing, affine)`` of a NIfTI file; data as stored, axes ``(x, y, z[, t])``."""
    import nibabel as nib

    p = Path(path)
    if not p.exists():
        raise CaseError(p, "file not found")
    try:
        img = nib.load(str(p))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt / truncated files
        raise CaseError(
            p, f"cannot read NIfTI file (corrupt or truncated?): {type(exc).__name__}: {exc}"
        ) from None
    n_sp = min(3, data.ndim)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:n_sp])
    return data, spacing, np.asarray(img.affine, dtype=np.float64)


def read_numpy(path: str | Path, key: str | None = None) -> np.ndarray:
    """Array from ``.npy`` or ``.npz`` (``key``, or the only array in the archive); never unpickles."""
    p = Path(path)
    if not p.exists():
        raise CaseError(p, "file not found")
    try:
        obj = np.load(p, allow_pickle=False)
    except ValueError as exc:
        raise CaseError(p, _value_problem(exc)) from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CaseError(p, f"cannot read NumPy file (corrupt or truncated?): {exc}") from None
    if isinstance(obj, np.lib.npyio.NpzFile):
        with obj:
            keys = list(obj.files)
            if key is None:
                if len(keys) != 1:
                    raise CaseError(
                        p, f"archive holds arrays {keys}; expected exactly one (or the key 'probabilities')"
                    )
                key = keys[0]
            if key not in keys:
                raise CaseError(p, f"archive has no key {key!r} (keys: {keys})")
            try:
                arr = obj[key]
            except ValueError as exc:
                raise CaseError(p, f"array {key!r}: {_value_problem(exc)}") from None
            except (OSError, EOFError, zipfile.BadZipFile) as exc:
                raise CaseError(p, f"cannot read array {key!r} (corrupt or truncated?): {exc}") from None
    else:
        arr = obj
    if arr.dtype == object:
        raise CaseError(p, "object arrays are not supported")
    return arr


def _value_problem(exc: ValueError) -> str:
    if "pickle" in str(exc).lower():
        return f"refusing to load a pickled/object array ({exc})"
    return f"cannot read NumPy data (corrupt or truncated?): {exc}"


def _check_prob_dtype(arr: np.ndarray, path: str | Path) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.floating):
        raise CaseError(path, f"probabilities must be a floating-point array, got dtype {arr.dtype}")
    return arr


def read_nnunet_probabilities(path: str | Path) -> np.ndarray:
    """nnU-Net v2 ``case.npz`` (key ``probabilities``, axes ``(C, z, y, x)``) → ``(C, x, y, z)``."""
    p = Path(path)
    if not p.exists():
        raise CaseError(p, "file not found")
    try:
        with np.load(p, allow_pickle=False) as z:
            if "probabilities" not in z.files:
                raise CaseError(
                    p, f"not an nnU-Net probability file: no key 'probabilities' (keys: {list(z.files)})"
                )
            arr = z["probabilities"]
    except CaseError:
        raise
    except ValueError as exc:
        raise CaseError(p, _value_problem(exc)) from None
    except (OSError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
        raise CaseError(p, f"unreadable nnU-Net file (corrupt or truncated?): {exc}") from None
    _check_prob_dtype(arr, p)
    if arr.ndim < 3:
        raise CaseError(p, f"expected probabilities (C, z, y, x) or (C, y, x), got shape {arr.shape}")
    return np.transpose(arr, (0, *range(arr.ndim - 1, 0, -1)))


def read_probabilities(
    paths: Sequence[str | Path], fmt: Literal["nifti", "npy", "nnunet"]
) -> tuple[np.ndarray, tuple[float, ...] | None, np.ndarray | None]:
    """Probability map ``(C, *S)`` with its spacing/affine (``None`` when the format has no geometry).

    * ``nifti``: one 4D file ``(x, y, z, C)`` (classes on the last axis), one 3D file (foreground probability
      of a binary task → ``[1 − p, p]``), or several 3D files ``case_0000, case_0001, ...`` one per class;
    * ``npy``: one ``.npy`` / ``.npz`` array ``(C, *S)`` in the label's axis order (npz: key ``probabilities``
      or the only array);
    * ``nnunet``: ``case.npz`` from ``nnUNetv2_predict --save_probabilities``.
    """
    if len(paths) == 0:
        raise CaseError(None, "no prediction file")
    if fmt == "nnunet":
        return read_nnunet_probabilities(paths[0]), None, None
    if fmt == "npy":
        p = paths[0]
        arr = _read_numpy_probs(p)
        return arr, None, None
    if fmt != "nifti":
        raise ValueError(f"unknown format {fmt!r}")
    arrays = []
    spacing = affine = None
    for p in paths:
        data, sp, aff = read_nifti(p)
        _check_prob_dtype(data, p)
        if spacing is None:
            spacing, affine, first = sp, aff, p
        elif not _same_geometry(sp, aff, spacing, affine):  # type: ignore[arg-type]
            raise CaseError(p, f"spacing/affine differ from the other class file {first}")
        arrays.append(data)
    if len(arrays) == 1:
        data = arrays[0]
        if data.ndim == 4:
            return np.moveaxis(data, -1, 0), spacing, affine
        if data.ndim in (2, 3):
            fg = data
            return np.stack([1 - fg, fg]), spacing, affine
        raise CaseError(paths[0], f"expected a 3D or 4D (x, y, z, C) probability map, got shape {data.shape}")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise CaseError(paths[0], f"per-class probability files have different shapes {sorted(shapes)}")
    return np.stack(arrays), spacing, affine


def _read_numpy_probs(p: str | Path) -> np.ndarray:
    if str(p).endswith(".npz"):
        try:
            with np.load(p, allow_pickle=False) as z:
                key = "probabilities" if "probabilities" in z.files else None
        except Exception:
            key = None  # read_numpy reports the problem
        arr = read_numpy(p, key)
    else:
        arr = read_numpy(p)
    return _check_prob_dtype(arr, p)


def read_label(path: str | Path) -> tuple[np.ndarray, tuple[float, ...] | None, np.ndarray | None]:
    """Integer label map ``(*S)`` with spacing and affine (``None`` for NumPy files)."""
    p = str(path)
    if p.endswith(NIFTI_SUFFIXES):
        data, sp, aff = read_nifti(p)
    else:
        data, sp, aff = read_numpy(p), None, None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            raise CaseError(p, "label map contains NaN/Inf")
        if not np.array_equal(data, np.round(data)):
            raise CaseError(
                p, f"label map must hold integer class indices, got non-integral values ({data.dtype})"
            )
        data = data.astype(np.int64)
    elif not np.issubdtype(data.dtype, np.integer):
        raise CaseError(p, f"label map must be an integer array, got dtype {data.dtype}")
    if data.size == 0:
        raise CaseError(p, "label map is empty")
    return data, sp, aff


def read_mask(path: str | Path) -> np.ndarray:
    """Binary region mask ``(*S)`` (non-zero = inside)."""
    data, _, _ = read_label(path)
    return data != 0


def _same_geometry(
    sp_a: Sequence[float], aff_a: np.ndarray | None, sp_b: Sequence[float], aff_b: np.ndarray | None
) -> bool:
    if len(sp_a) != len(sp_b) or not np.allclose(sp_a, sp_b, atol=GEOMETRY_ATOL):
        return False
    if aff_a is not None and aff_b is not None and not np.allclose(aff_a, aff_b, atol=GEOMETRY_ATOL):
        return False
    return True


def load_case(files: CaseFiles, fmt: Literal["nifti", "npy", "nnunet"]) -> Case:
    """Read and cross-check one case (shapes, spacing and affine of prediction, label, reference, mask)."""
    pred_path = files.prediction[0]
    probs, p_sp, p_aff = read_probabilities(files.prediction, fmt)
    label, l_sp, l_aff = read_label(files.label)
    if probs.ndim != label.ndim + 1:
        raise CaseError(
            pred_path,
            f"probabilities {probs.shape} (C, *S) do not fit the label {label.shape} of {files.label}",
        )
    if probs.shape[1:] != label.shape:
        hint = " (nnU-Net files are (C, z, y, x) against the label's (x, y, z))" if fmt == "nnunet" else ""
        raise CaseError(
            pred_path,
            f"shape mismatch: probabilities have spatial shape {probs.shape[1:]}, label {files.label} has "
            f"{label.shape}{hint}",
        )
    if p_sp is not None and l_sp is not None and not _same_geometry(p_sp, p_aff, l_sp, l_aff):
        raise CaseError(
            pred_path,
            f"spacing/affine mismatch with label {files.label}: "
            f"spacing {tuple(round(s, 4) for s in p_sp)} vs "
            f"{tuple(round(s, 4) for s in l_sp)}",
        )
    spacing = l_sp or p_sp or (1.0,) * label.ndim
    affine = l_aff if l_aff is not None else p_aff
    reference = None
    if files.reference:
        reference, r_sp, r_aff = read_probabilities(
            files.reference, "nifti" if files.reference[0].endswith(NIFTI_SUFFIXES) else "npy"
        )
        if reference.shape != probs.shape:
            raise CaseError(
                files.reference[0], f"soft reference shape {reference.shape} != prediction {probs.shape}"
            )
        if r_sp is not None and not _same_geometry(r_sp, r_aff, spacing, affine):
            raise CaseError(files.reference[0], f"spacing/affine mismatch with label {files.label}")
    mask = None
    if files.mask:
        mask = read_mask(files.mask)
        if mask.shape != label.shape:
            raise CaseError(files.mask, f"mask shape {mask.shape} != label shape {label.shape}")
    paths = {"prediction": list(files.prediction), "label": [files.label]}
    if files.reference:
        paths["reference"] = list(files.reference)
    if files.mask:
        paths["mask"] = [files.mask]
    return Case(files.case_id, probs, label, tuple(spacing), affine, reference, mask, paths)
