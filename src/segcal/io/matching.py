"""Case identifiers, folder format detection, pairing of prediction and label files, and reading one matched
case with every cross-check (see docs/evaluation.md, "Inputs").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from segcal.io.case import Case, CaseError, CaseFiles, same_geometry
from segcal.io.nifti import NIFTI_SUFFIXES
from segcal.io.nnunet import has_nnunet_side_files
from segcal.io.numpy import NUMPY_SUFFIXES
from segcal.io.volumes import FolderFormat, prediction_suffixes, read_label, read_mask, read_probabilities

__all__ = ["Format", "case_id_from_path", "detect_format", "load_case", "match_cases"]

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


def load_case(files: CaseFiles, fmt: FolderFormat) -> Case:
    """Read and cross-check one case (shapes, spacing and affine of prediction, label, reference, mask).

    The probabilities are ``(C, *S)`` in label order (:func:`segcal.io.volumes.read_probabilities`).
    """
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
    if p_sp is not None and l_sp is not None and not same_geometry(p_sp, p_aff, l_sp, l_aff):
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
            raise CaseError(files.reference[0], f"soft reference shape {reference.shape} != prediction {probs.shape}")
        if r_sp is not None and not same_geometry(r_sp, r_aff, spacing, affine):
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
