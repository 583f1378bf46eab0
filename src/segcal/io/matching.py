"""Case identifiers, folder format detection, pairing of prediction and label files, and reading one matched
case with every cross-check (see docs/evaluation.md, "Inputs").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from segcal.io.case import (
    Case,
    CaseError,
    CaseFiles,
    check_spatial_shapes,
    drop_singleton_z,
    is_2d_slice,
    match_2d_grid,
    same_geometry,
)
from segcal.io.nifti import NIFTI_SUFFIXES
from segcal.io.nnunet import has_nnunet_side_files, nnunet_segmentation_path
from segcal.io.numpy import NUMPY_SUFFIXES
from segcal.io.volumes import (
    FolderFormat,
    list_prediction_files,
    prediction_suffixes,
    read_label,
    read_mask,
    read_probabilities,
)

__all__ = [
    "EnsembleFiles",
    "Format",
    "MemberReader",
    "SegmentedCaseFiles",
    "average_members",
    "case_id_from_path",
    "detect_format",
    "load_case",
    "match_cases",
    "match_ensemble",
    "match_ensemble_predictions",
    "missing_member_file",
    "read_case_segmentation",
    "with_segmentations",
]

Format = Literal["auto", "nifti", "npy", "nnunet"]

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


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


def detect_format(pred_dir: str | Path) -> FolderFormat:
    """Guess the prediction format of a folder.

    ``nnunet``: ``.npz`` files next to nnU-Net's ``plans.json`` / ``dataset.json`` / ``.pkl`` files;
    ``nifti``: NIfTI files and no NumPy files; ``npy`` otherwise.
    """
    folder = Path(pred_dir)
    files = _data_files(folder, (*NIFTI_SUFFIXES, *NUMPY_SUFFIXES))
    has_npz = any(p.name.endswith(".npz") for p in files)
    if has_npz and has_nnunet_side_files(folder):
        return "nnunet"
    if any(p.name.endswith(NIFTI_SUFFIXES) for p in files) and not any(p.name.endswith(NUMPY_SUFFIXES) for p in files):
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


def _training_layout(labels: dict[str, list[Path]]) -> dict[str, list[Path]]:
    """Label files by case id, reading the training layout of ``segcal train``: where ``<case>_image`` and
    ``<case>_label`` files sit side by side, ``<case>_label`` is the label of case ``<case>`` and the image is not
    a label file. Any other file keeps its own name as case id."""
    out = dict(labels)
    for stem in labels:
        case = stem[: -len("_label")] if stem.endswith("_label") else None
        if case and f"{case}_image" in labels and case not in labels:
            out[case] = out.pop(stem)
            out.pop(f"{case}_image", None)
    return out


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

    Identifiers are file names without extension and without an nnU-Net channel suffix (``case_0000``). A label
    folder may be a training folder of ``segcal train``: ``.npz`` cases (their ``label`` key is read) or
    ``<case>_image`` / ``<case>_label`` NIfTI pairs (``<case>_label`` is the label of ``<case>``).
    With NIfTI predictions several ``case_0000, case_0001, ...`` files are the per-class probability maps of
    one case. Returns ``(cases, unmatched)`` with ``unmatched`` listing, per role, the files without partner.
    """
    fmt = detect_format(pred_dir) if fmt == "auto" else fmt
    if fmt not in ("nifti", "npy", "nnunet"):
        raise ValueError(f"format must be auto, nifti, npy or nnunet, got {fmt!r}")
    any_suffix = (*NIFTI_SUFFIXES, *NUMPY_SUFFIXES)
    pred_files = _data_files(Path(pred_dir), prediction_suffixes(fmt))
    labels = _training_layout(_group(_data_files(Path(label_dir), any_suffix), by_channel=False))
    # NIfTI: case_0000, case_0001 ... are per-class files of one case (unless a label has that stem)
    by_stem = _group(pred_files, by_channel=False)
    if fmt == "nifti" and not all(k in labels for k in by_stem):
        preds = _group(pred_files, by_channel=True)
    else:
        preds = {(k if k in labels else case_id_from_path(k + ".npy")[0]): v for k, v in by_stem.items()}
    refs = _group(_data_files(Path(reference_dir), any_suffix), by_channel=True) if reference_dir is not None else None
    if refs is not None and fmt != "nifti":
        refs = _group(_data_files(Path(reference_dir), any_suffix), by_channel=False)  # type: ignore[arg-type]
    masks = _group(_data_files(Path(mask_dir), any_suffix), by_channel=False) if mask_dir is not None else None
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


@dataclass
class EnsembleFiles(CaseFiles):
    """The files of one case of an ensemble of prediction folders (nnU-Net folds): ``prediction`` holds one
    file per member, in the order of ``members`` (the member folders); :func:`load_case` averages them. The
    file of a member that lacks the case is the path it would have (it does not exist): reading the case fails
    naming that folder, and the case is recomputed once the file appears (the fingerprint covers it)."""

    members: tuple[str, ...] = ()


@dataclass
class SegmentedCaseFiles(CaseFiles):
    """The files of one case of an nnU-Net prediction folder with the segmentation nnU-Net exported beside
    ``case.npz`` (``segmentation``, ``case<file_ending>``; possibly post-processed): ``segcal evaluate
    --nnunet-segmentations`` scores the overlap metrics on it (:func:`read_case_segmentation`). The path is
    where the file should be; a missing file fails the case when it is read."""

    segmentation: str = ""


def with_segmentations(cases: Sequence[CaseFiles], file_ending: str) -> list[SegmentedCaseFiles]:
    """``cases`` with the path of nnU-Net's exported segmentation of each case: ``case<file_ending>`` beside
    its ``case.npz`` (:func:`segcal.io.nnunet.nnunet_segmentation_path`)."""
    out = []
    for c in cases:
        if len(c.prediction) != 1:
            raise ValueError(f"case {c.case_id}: one nnU-Net prediction file per case expected, got {c.prediction}")
        seg = str(nnunet_segmentation_path(c.prediction[0], file_ending))
        out.append(SegmentedCaseFiles(c.case_id, list(c.prediction), c.label, c.reference, c.mask, seg))
    return out


def read_case_segmentation(files: SegmentedCaseFiles, case: Case) -> np.ndarray:
    """nnU-Net's exported segmentation ``(*S)`` (integer, label order) of a case read by :func:`load_case`,
    checked against it: the file must exist, hold integer labels, have the probabilities' spatial shape
    (a singleton third axis of a 2D case is dropped) and, where it has a geometry, the case's spacing and
    affine (tolerance :data:`~segcal.io.case.GEOMETRY_ATOL`); :class:`CaseError` naming the file otherwise."""
    path = files.segmentation
    if not path or not Path(path).is_file():
        raise CaseError(
            path or files.prediction[0], f"missing: nnU-Net's exported segmentation of case {files.case_id} "
            f"(nnUNetv2_predict writes it beside {Path(files.prediction[0]).name}) is needed to score the overlap "
            "metrics on the exported segmentation (--nnunet-segmentations)"
        )
    seg, sp, aff = read_label(path)
    shape = case.probabilities.shape[1:]
    if seg.ndim == len(shape) + 1 and is_2d_slice(seg, 0):
        seg, sp = drop_singleton_z(seg, sp)
    if seg.shape != shape:
        raise CaseError(
            path, f"segmentation shape {seg.shape} != the probabilities' spatial shape {shape} of "
            f"{files.prediction[0]} (label order (x, y, z))"
        )
    if sp is not None and case.spacing and not same_geometry(sp, aff, case.spacing, case.affine):
        raise CaseError(
            path, f"segmentation spacing/affine contradict the case's geometry (label {files.label}): spacing "
            f"{tuple(round(float(s), 4) for s in sp)} vs {tuple(round(float(s), 4) for s in case.spacing)}"
        )
    return seg


def match_ensemble(
    pred_dirs: Sequence[str | Path],
    label_dir: str | Path,
    fmt: Format = "auto",
    *,
    reference_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
) -> tuple[list[EnsembleFiles], dict[str, list[str]]]:
    """Pair the predictions of several member folders (an ensemble, e.g. the folds ``fold_0 .. fold_4`` of
    nnU-Net) with the labels: each member is matched like :func:`match_cases`, and a case is every id that some
    member matched, with one prediction file per member. A member without that case gets the path the file
    would have (the suffix of another member's file), so :func:`load_case` fails the case naming the folder.

    Each member must hold one prediction file per case (NIfTI per-class files ``case_0000 ...`` are refused,
    ``ValueError``). ``unmatched``: the prediction files without a label, and the label / reference / mask
    files no member used.
    """
    if len(pred_dirs) < 1:
        raise ValueError("an ensemble needs at least one prediction folder")
    dirs = [Path(d) for d in pred_dirs]
    fmt = detect_format(dirs[0]) if fmt == "auto" else fmt
    per_member: list[dict[str, CaseFiles]] = []
    unmatched: dict[str, list[str]] = {}
    for i, d in enumerate(dirs):
        cases, um = match_cases(d, label_dir, fmt, reference_dir=reference_dir, mask_dir=mask_dir)
        multi = next((c for c in cases if len(c.prediction) != 1), None)
        if multi is not None:
            raise ValueError(
                f"{d}: case {multi.case_id} has {len(multi.prediction)} prediction files ({multi.prediction[0]}, "
                "...); an ensemble member must hold one prediction file per case"
            )
        per_member.append({c.case_id: c for c in cases})
        unmatched.setdefault("prediction", []).extend(um.get("prediction", []))
        for role in ("label", "reference", "mask"):  # unused by every member
            left = set(um.get(role, []))
            unmatched[role] = sorted(left if i == 0 else left & set(unmatched.get(role, [])))
    out: list[EnsembleFiles] = []
    for cid in sorted(set().union(*per_member)):
        first = next(m[cid] for m in per_member if cid in m)
        suffix = Path(first.prediction[0]).name[len(cid):]
        preds = [
            m[cid].prediction[0] if cid in m else str(d / f"{cid}{suffix}")
            for m, d in zip(per_member, dirs, strict=True)
        ]
        out.append(EnsembleFiles(cid, preds, first.label, first.reference, first.mask, tuple(str(d) for d in dirs)))
    return out, {k: v for k, v in unmatched.items() if v}


#: what :func:`average_members` reads of one member file: ``(probabilities (C, *S), spacing, affine)``
MemberReader = Callable[[str], tuple[np.ndarray, tuple[float, ...] | None, np.ndarray | None]]


def average_members(
    paths: Sequence[str], read: MemberReader, *, case_id: str, members: Sequence[str] = ()
) -> tuple[np.ndarray, tuple[float, ...] | None, np.ndarray | None]:
    """The arithmetic mean, voxel by voxel, of the probability maps ``(C, *S)`` of one case's member files
    ``paths`` (one per member folder ``members``), each read by ``read`` (summed in float64, returned as
    float32), with the first member's geometry. Probabilities are averaged, never logits (the mean of logits is
    another ensemble: a geometric mean of the probabilities). Every member must exist and have the first
    member's shape (classes and spatial axes) and, where both have one, geometry; :class:`CaseError` naming the
    member's file and folder otherwise."""
    total = None
    sp0 = aff0 = None
    for k, path in enumerate(paths):
        folder = members[k] if k < len(members) else str(Path(path).parent)
        if not Path(path).is_file():
            raise CaseError(
                path, f"missing: ensemble member {folder} has no prediction of case {case_id} (every member "
                "folder must hold the same cases)"
            )
        probs, sp, aff = read(path)
        if total is None:
            total, sp0, aff0 = probs.astype(np.float64), sp, aff
            continue
        if probs.shape != total.shape:
            raise CaseError(
                path, f"ensemble member shape {probs.shape} (classes, spatial axes) != {total.shape} of "
                f"{paths[0]}; every member must have the same classes and shape"
            )
        if sp is not None and sp0 is not None and not same_geometry(sp, aff, sp0, aff0):
            raise CaseError(path, f"ensemble member spacing/affine differ from {paths[0]}")
        total += probs
    if total is None:
        raise CaseError(None, f"case {case_id}: an ensemble needs at least one member file")
    return (total / len(paths)).astype(np.float32), sp0, aff0


def _read_ensemble(
    files: EnsembleFiles, fmt: FolderFormat
) -> tuple[np.ndarray, tuple[float, ...] | None, np.ndarray | None]:
    """:func:`average_members` of the members' probability files (a file declared as logits is refused by
    :func:`read_probabilities`)."""
    return average_members(
        files.prediction, lambda p: read_probabilities([p], fmt), case_id=files.case_id, members=files.members
    )


def missing_member_file(cases: Sequence[EnsembleFiles]) -> CaseError | None:
    """The error of the first member file of ``cases`` that does not exist (a case some member folder lacks),
    naming the file, the folder and the case; ``None`` when every member holds every case."""
    for files in cases:
        for k, path in enumerate(files.prediction):
            if not Path(path).is_file():
                folder = files.members[k] if k < len(files.members) else str(Path(path).parent)
                return CaseError(
                    path, f"missing: ensemble member {folder} has no prediction of case {files.case_id} (every "
                    "member folder must hold the same cases)"
                )
    return None


def match_ensemble_predictions(pred_dirs: Sequence[str | Path], fmt: FolderFormat) -> dict[str, list[Path]]:
    """Case name → one prediction file per member folder (in the order of ``pred_dirs``), for folders without
    labels (the ``--apply-to`` folds of ``segcal calibrate``); files listed by
    :func:`segcal.io.volumes.list_prediction_files`. Every member must hold the same cases: a case that a
    member lacks is a :class:`CaseError` naming the file that would hold it, the folder and the case."""
    if len(pred_dirs) < 1:
        raise ValueError("an ensemble needs at least one prediction folder")
    listed = [list_prediction_files(d, fmt) for d in pred_dirs]
    names = sorted(set().union(*listed))
    out: dict[str, list[Path]] = {}
    for name in names:
        first = next(m[name] for m in listed if name in m)
        for m, d in zip(listed, pred_dirs, strict=True):
            if name not in m:
                missing = Path(d) / first.name
                raise CaseError(
                    missing, f"missing: ensemble member {d} has no prediction of case {name} (every member folder "
                    f"must hold the same cases; {first} exists)"
                )
        out[name] = [m[name] for m in listed]
    return out


def _geometry_error(path: str, own: Sequence[float], given: Sequence[float], given_from: str) -> CaseError:
    return CaseError(
        path,
        f"the file's own voxel spacing {tuple(round(float(s), 4) for s in own)} contradicts the spacing "
        f"{tuple(float(s) for s in given)} from {given_from}; a file's geometry is never overridden: drop or "
        "correct that spacing, or fix the file",
    )


def _case_spacing(
    files: CaseFiles,
    ndim: int,
    file_spacing: tuple[tuple[float, ...] | None, str],
    spacing: Sequence[float] | None,
    spacing_from: str,
) -> tuple[float, ...] | None:
    """The case's voxel spacing: the files' own (``file_spacing``: the spacing and the file it was read from),
    checked against the folder-level ``spacing`` (:class:`CaseError` naming the file when they differ), else
    ``spacing``, else ``None`` (no geometry)."""
    own, own_path = file_spacing
    if spacing is not None and len(spacing) != ndim:
        raise CaseError(
            files.label,
            f"the spacing {tuple(float(s) for s in spacing)} from {spacing_from} has {len(spacing)} axes but the "
            f"case has {ndim} spatial axes",
        )
    if own is not None:
        if spacing is not None and not same_geometry(own, None, spacing, None):
            raise _geometry_error(own_path, own, spacing, spacing_from)
        return tuple(own)
    return tuple(float(s) for s in spacing) if spacing is not None else None


def _read_reference(
    files: CaseFiles, probs: np.ndarray, spacing: tuple[float, ...] | None, affine: np.ndarray | None
) -> np.ndarray | None:
    """The soft reference ``(C, *S)`` of the case (``None`` without one), checked against the prediction's shape
    and the case's geometry."""
    if not files.reference:
        return None
    reference, r_sp, r_aff = read_probabilities(
        files.reference, "nifti" if files.reference[0].endswith(NIFTI_SUFFIXES) else "npy"
    )
    if reference.ndim == probs.ndim + 1 and is_2d_slice(reference, 1):
        reference, r_sp = drop_singleton_z(reference, r_sp)
    if reference.shape != probs.shape:
        raise CaseError(files.reference[0], f"soft reference shape {reference.shape} != prediction {probs.shape}")
    if r_sp is not None and spacing is not None and not same_geometry(r_sp, r_aff, spacing, affine):
        raise CaseError(files.reference[0], f"spacing/affine mismatch with label {files.label}")
    return reference


def _read_case_mask(files: CaseFiles, shape: tuple[int, ...]) -> np.ndarray | None:
    if not files.mask:
        return None
    mask = read_mask(files.mask)
    if mask.ndim == len(shape) + 1 and is_2d_slice(mask, 0):
        mask = mask[..., 0]
    if mask.shape != shape:
        raise CaseError(files.mask, f"mask shape {mask.shape} != label shape {shape}")
    return mask


def load_case(
    files: CaseFiles,
    fmt: FolderFormat,
    *,
    spacing: Sequence[float] | None = None,
    spacing_from: str = "the given spacing",
    assume_1mm: bool = True,
) -> Case:
    """Read and cross-check one case (shapes, spacing and affine of prediction, label, reference, mask).

    The probabilities are ``(C, *S)`` in label order (:func:`segcal.io.volumes.read_probabilities`). A 2D case
    may store a singleton third spatial axis in one of its files (a prediction ``(X, Y, 1, C)`` against a label
    ``(X, Y)``, or a label ``(X, Y, 1)`` against a prediction ``(C, X, Y)``): it is dropped.

    Geometry: the files' own (the label's, else the prediction's: NIfTI header, ``.npz`` key ``spacing``); else
    ``spacing`` (a folder-level voxel size: a ``segcal.json`` sidecar, ``segcal evaluate --spacing``; named by
    ``spacing_from`` in messages), which a file's own geometry must agree with (:class:`CaseError` naming the
    file otherwise). Without either the case has no geometry: 1 mm voxels with ``assume_1mm``, else an empty
    ``Case.spacing`` (the caller decides, and says so).

    An :class:`EnsembleFiles` (:func:`match_ensemble`) is read as the voxel-wise mean of its members'
    probability maps, each member checked (shape, classes, geometry, probabilities not logits).
    """
    pred_path = files.prediction[0]
    if isinstance(files, EnsembleFiles):
        probs, p_sp, p_aff = _read_ensemble(files, fmt)
    else:
        probs, p_sp, p_aff = read_probabilities(files.prediction, fmt)
    label, l_sp, l_aff = read_label(files.label)
    probs, p_sp, label, l_sp = match_2d_grid(probs, p_sp, label, l_sp)
    check_spatial_shapes(probs, label, files.prediction[0], files.label, fmt)
    if p_sp is not None and l_sp is not None and not same_geometry(p_sp, p_aff, l_sp, l_aff):
        raise CaseError(
            pred_path,
            f"spacing/affine mismatch with label {files.label}: "
            f"spacing {tuple(round(s, 4) for s in p_sp)} vs "
            f"{tuple(round(s, 4) for s in l_sp)}",
        )
    own = (l_sp, files.label) if l_sp is not None else (p_sp, pred_path)
    case_spacing = _case_spacing(files, label.ndim, own, spacing, spacing_from)
    affine = l_aff if l_aff is not None else p_aff
    reference = _read_reference(files, probs, case_spacing, affine)
    mask = _read_case_mask(files, label.shape)
    if case_spacing is None:
        case_spacing = (1.0,) * label.ndim if assume_1mm else ()
    paths = {"prediction": list(files.prediction), "label": [files.label]}
    if files.reference:
        paths["reference"] = list(files.reference)
    if files.mask:
        paths["mask"] = [files.mask]
    return Case(files.case_id, probs, label, case_spacing, affine, reference, mask, paths)
