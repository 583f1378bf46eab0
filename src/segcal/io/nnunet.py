"""nnU-Net v2 prediction files: paired reader and writer of ``case.npz`` probabilities, and its side files.

``nnUNetv2_predict --save_probabilities`` writes ``case.npz`` with the key ``"probabilities"`` and axes
``(C, z, y, x)``: the spatial axes of the NIfTI label ``(x, y, z)`` reversed. :func:`read_nnunet_probabilities`
returns label order ``(C, x, y, z)`` and :func:`write_nnunet_probabilities` takes label order and stores
nnU-Net's; :func:`nnunet_to_label_order` is the one place where the axes are swapped (a reversal is its own
inverse). An nnU-Net folder is recognised by its JSON / pickle side files (see docs/evaluation.md, "Inputs");
:func:`copy_nnunet_side_files` copies the JSON ones.

A complete nnU-Net prediction folder also holds, per case, the exported segmentation ``case<file_ending>``
(``file_ending`` of ``dataset.json``, ``.nii.gz`` by default) and the properties ``case.pkl``.
:func:`nnunet_segmentation` turns probabilities into nnU-Net's segmentation (argmax of the classes, or the
regions painted in ``regions_class_order`` where their probability exceeds 0.5, as nnU-Net's
``LabelManager.convert_probabilities_to_segmentation``); :func:`write_nnunet_segmentation` writes it with the
geometry (affine and header) of an existing segmentation file of the case; :func:`copy_nnunet_case_files`
copies ``case.pkl`` byte for byte. Pickles are never unpickled (no code from a file is ever run).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segcal.io._atomic import copy_file
from segcal.io.case import CaseError, check_probability_dtype
from segcal.io.nifti import NIFTI_SUFFIXES, read_nifti_image, write_nifti
from segcal.io.numpy import (
    PROBABILITIES_KEY,
    MissingKeyError,
    NumpyRecord,
    UnreadableNumpyError,
    read_numpy_record,
    write_npz,
)

__all__ = [
    "DATASET_JSON",
    "DEFAULT_FILE_ENDING",
    "NNUNET_SIDE_FILES",
    "copy_nnunet_case_files",
    "copy_nnunet_side_files",
    "has_nnunet_side_files",
    "nnunet_segmentation",
    "nnunet_segmentation_path",
    "nnunet_to_label_order",
    "read_nnunet_class_names",
    "read_nnunet_file_ending",
    "read_nnunet_ignore_label",
    "read_nnunet_probabilities",
    "read_nnunet_record",
    "read_nnunet_regions",
    "read_nnunet_regions_class_order",
    "write_nnunet_probabilities",
    "write_nnunet_segmentation",
]

#: nnU-Net side files copied to an nnU-Net-style output folder (JSON only; pickles are never touched)
NNUNET_SIDE_FILES = ("plans.json", "dataset.json")
#: nnU-Net's dataset description, whose ``"labels"`` name the label values
DATASET_JSON = "dataset.json"
#: nnU-Net v2's name of the ignore label (the highest label value; no prediction channel)
_IGNORE = "ignore"
#: the ending of nnU-Net's exported segmentations when ``dataset.json`` names none
DEFAULT_FILE_ENDING = ".nii.gz"


def nnunet_to_label_order(arr: np.ndarray) -> np.ndarray:
    """``(C, z, y, x)`` ↔ ``(C, x, y, z)`` (or ``(C, y, x)`` ↔ ``(C, x, y)``): the spatial axes reversed, the
    class axis kept. Applying it twice gives the input back, so it serves both directions (a view)."""
    return np.transpose(arr, (0, *range(arr.ndim - 1, 0, -1)))


def read_nnunet_record(path: str | Path) -> NumpyRecord:
    """nnU-Net v2 ``case.npz`` (key ``probabilities``, axes ``(C, z, y, x)``) with its metadata entries; the
    record's ``array`` is in label order ``(C, x, y, z)``."""
    p = Path(path)
    try:
        rec = read_numpy_record(p, key=PROBABILITIES_KEY)
    except MissingKeyError as exc:
        raise CaseError(p, f"not an nnU-Net probability file: no key 'probabilities' (keys: {exc.keys})") from None
    except UnreadableNumpyError as exc:
        raise CaseError(p, f"unreadable nnU-Net file (corrupt or truncated?): {exc.problem}") from None
    check_probability_dtype(rec.array, p)
    if rec.array.ndim < 3:
        raise CaseError(p, f"expected probabilities (C, z, y, x) or (C, y, x), got shape {rec.array.shape}")
    rec.array = nnunet_to_label_order(rec.array)
    return rec


def read_nnunet_probabilities(path: str | Path) -> np.ndarray:
    """nnU-Net v2 ``case.npz`` (key ``probabilities``, axes ``(C, z, y, x)``) → ``(C, x, y, z)``."""
    return read_nnunet_record(path).array


def write_nnunet_probabilities(
    path: str | Path, probs: np.ndarray, extra: dict[str, np.ndarray] | None = None
) -> Path:
    """Probability map ``(C, x, y, z)`` (label order) as nnU-Net's ``case.npz``: key ``"probabilities"``, axes
    ``(C, z, y, x)``, float32, compressed, plus the metadata entries ``extra`` (e.g. segcal's calibration
    mark; nnU-Net reads only ``probabilities``); :func:`read_nnunet_probabilities` reads it back."""
    arr = np.ascontiguousarray(nnunet_to_label_order(probs.astype(np.float32, copy=False)))
    return write_npz(path, {PROBABILITIES_KEY: arr, **(extra or {})}, compressed=True)


def has_nnunet_side_files(folder: str | Path) -> bool:
    """Whether ``folder`` holds nnU-Net's ``plans.json`` / ``dataset.json`` or ``.pkl`` files."""
    folder = Path(folder)
    return any((folder / name).exists() for name in NNUNET_SIDE_FILES) or any(folder.glob("*.pkl"))


def copy_nnunet_side_files(src_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy nnU-Net's JSON side files (``plans.json``, ``dataset.json``) from ``src_dir`` to ``out_dir`` so
    the output is detected as ``nnunet``; pickles are never copied. Returns the copied names."""
    copied = []
    for name in NNUNET_SIDE_FILES:
        if (Path(src_dir) / name).is_file():
            copy_file(Path(src_dir) / name, Path(out_dir) / name)
            copied.append(name)
    return copied


def _label_value(name: str, value: Any, path: Path) -> int | list[int]:
    """The label value(s) of one ``"labels"`` entry: an int, or a list of ints (a region of a region-based
    dataset; a one-element list is that int)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value[0] if len(value) == 1 else list(value)
    raise CaseError(path, f"'labels' entry {name!r} must be an integer label value (or a list of them), got {value!r}")


def _region_error(path: Path, labels: dict[str, int | list[int]]) -> CaseError:
    spec = ";".join(
        f"{name}={','.join(map(str, v if isinstance(v, list) else [v]))}"
        for name, v in labels.items()
        if v != 0 and v != [0]
    )
    return CaseError(
        path,
        "declares a region-based dataset (labels that are lists of label values): nnU-Net then predicts one "
        "sigmoid channel per region, not class probabilities, and its labels name regions, not classes. "
        "segcal evaluate scores class probabilities: name the classes with --class-names (or a segcal.json "
        f'sidecar), and score the regions of class probabilities with --regions "{spec}"; or, if the files '
        "are nnU-Net's region-based predictions (one sigmoid channel per region), score those channels with "
        "--nnunet-regions",
    )


def read_nnunet_class_names(path: str | Path) -> tuple[str, ...]:
    """The class names of an nnU-Net v2 ``dataset.json``: ``"labels": {"background": 0, "GM": 1, ...}`` as
    ``("background", "GM", ...)``, the name of label value ``k`` at index ``k``.

    The values must be ``0 .. C-1``, each once; nnU-Net's ``"ignore"`` label (the highest value, without a
    prediction channel) is left out. A region-based dataset (a label that is a list of values, as BraTS
    ``"whole_tumor": [1, 2, 3]``) is refused: its names are regions, not classes (the message suggests the
    equivalent ``--regions``). :class:`CaseError` naming the file for anything else.
    """
    p = Path(path)
    values = _read_labels(p)
    if any(isinstance(v, list) for v in values.values()):
        raise _region_error(p, values)
    values.pop(_IGNORE, None)
    by_value = sorted(values.items(), key=lambda kv: kv[1])
    if [v for _, v in by_value] != list(range(len(by_value))):
        raise CaseError(
            p, f"'labels' must give the values 0..{len(by_value) - 1} once each, got {dict(by_value)}"
        )
    return tuple(name for name, _ in by_value)


def _read_labels(p: Path) -> dict[str, int | list[int]]:
    """The ``labels`` object of an nnU-Net v2 ``dataset.json``, each value checked (:class:`CaseError` naming
    the file when it cannot be read or has no ``labels``)."""
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaseError(p, f"cannot read nnU-Net dataset.json: {exc}") from None
    labels = raw.get("labels") if isinstance(raw, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise CaseError(p, "no 'labels' object (nnU-Net v2 format: {\"background\": 0, \"GM\": 1, ...})")
    return {str(name): _label_value(str(name), v, p) for name, v in labels.items()}


def read_nnunet_regions(path: str | Path) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """The regions of a region-based nnU-Net v2 ``dataset.json``, in the order of nnU-Net's prediction
    channels: ``"labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing": 3}``
    gives ``(("whole tumor", "tumor core", "enhancing"), ((1, 2, 3), (2, 3), (3,)))``: every entry but the
    background (value 0) and the ``ignore`` label (:func:`read_nnunet_ignore_label`) in the file's order, an
    integer being a one-label region. Region-based nnU-Net writes one sigmoid probability per region, in this
    order, no background channel.

    :class:`CaseError` naming the file when it is not region-based (no label is a list), or cannot be read.
    """
    p = Path(path)
    values = _read_labels(p)
    if not any(isinstance(v, list) for v in values.values()):
        raise CaseError(p, "is not a region-based dataset (no label is a list of label values): its predictions "
                        "are softmax classes, score them without --nnunet-regions")
    ignore = read_nnunet_ignore_label(p)
    values.pop(_IGNORE, None)
    regions = [(name, tuple(v) if isinstance(v, list) else (v,)) for name, v in values.items()]
    regions = [(name, r) for name, r in regions if set(r) != {0}]
    inside = next((name for name, r in regions if ignore in r), None)
    if inside is not None:
        raise CaseError(p, f"the 'ignore' label {ignore} is part of the region {inside!r}; nnU-Net's ignore label "
                        "belongs to no region")
    return tuple(n for n, _ in regions), tuple(r for _, r in regions)


def read_nnunet_ignore_label(path: str | Path) -> int | None:
    """The value of nnU-Net's ``"ignore"`` label in a ``dataset.json`` (voxels of unknown class, excluded from
    training and evaluation), ``None`` without one; :class:`CaseError` naming the file when it is not one
    integer."""
    p = Path(path)
    value = _read_labels(p).get(_IGNORE)
    if value is None:
        return None
    if not isinstance(value, int):
        raise CaseError(p, f"the 'ignore' label must be one integer label value, got {value!r}")
    return value


def _read_dataset_json(p: Path) -> dict[str, Any]:
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaseError(p, f"cannot read nnU-Net dataset.json: {exc}") from None
    if not isinstance(raw, dict):
        raise CaseError(p, "nnU-Net dataset.json must hold a JSON object")
    return raw


def read_nnunet_file_ending(folder: str | Path) -> str:
    """The ending of the exported segmentations of an nnU-Net folder: ``"file_ending"`` of its
    ``dataset.json`` (``".nii.gz"``, ``".nrrd"``, ...), :data:`DEFAULT_FILE_ENDING` without one."""
    p = Path(folder) / DATASET_JSON
    if not p.is_file():
        return DEFAULT_FILE_ENDING
    ending = _read_dataset_json(p).get("file_ending", DEFAULT_FILE_ENDING)
    if not isinstance(ending, str) or not ending.startswith("."):
        raise CaseError(p, f"'file_ending' must be a file ending such as '.nii.gz', got {ending!r}")
    return ending


def read_nnunet_regions_class_order(path: str | Path) -> tuple[int, ...] | None:
    """``"regions_class_order"`` of a region-based nnU-Net ``dataset.json`` (the label value painted for each
    region channel, in channel order), ``None`` when it has none."""
    p = Path(path)
    order = _read_dataset_json(p).get("regions_class_order")
    if order is None:
        return None
    if not isinstance(order, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in order):
        raise CaseError(p, f"'regions_class_order' must be a list of label values, got {order!r}")
    return tuple(order)


def nnunet_segmentation_path(prediction: str | Path, file_ending: str) -> Path:
    """The exported segmentation ``case<file_ending>`` beside nnU-Net's ``case.npz`` ``prediction``."""
    p = Path(prediction)
    stem = p.name[: -len(".npz")] if p.name.endswith(".npz") else p.stem
    return p.parent / f"{stem}{file_ending}"


def nnunet_segmentation(probs: np.ndarray, regions_class_order: Sequence[int] | None = None) -> np.ndarray:
    """nnU-Net's segmentation ``(*S)`` of probabilities ``(C, *S)``: the argmax over the classes, or, for
    region-based predictions (one sigmoid channel per region), ``regions_class_order[i]`` painted, channel by
    channel in order, where channel ``i`` exceeds 0.5 (0 elsewhere), as nnU-Net's
    ``LabelManager.convert_probabilities_to_segmentation``. ``uint8``, or ``uint16`` from label value 255 on."""
    if regions_class_order is None:
        seg = np.argmax(probs, axis=0)
    else:
        if len(regions_class_order) != probs.shape[0]:
            raise ValueError(
                f"regions_class_order has {len(regions_class_order)} entries but the prediction has "
                f"{probs.shape[0]} region channels"
            )
        seg = np.zeros(probs.shape[1:], dtype=np.int64)
        for i, value in enumerate(regions_class_order):
            seg[probs[i] > 0.5] = value
    return seg.astype(np.uint8 if seg.size == 0 or int(seg.max()) < 255 else np.uint16)


def write_nnunet_segmentation(path: str | Path, seg: np.ndarray, template: str | Path) -> Path:
    """Write the segmentation ``seg`` ``(x, y, z)`` (label order) as NIfTI ``path`` with the affine and header of
    ``template``, an existing segmentation of the same case (nnU-Net's own export, which carries the geometry
    of the reference). :class:`CaseError` naming ``template`` when it is not NIfTI or its shape differs."""
    t = Path(template)
    if not t.name.endswith(NIFTI_SUFFIXES) or not Path(path).name.endswith(NIFTI_SUFFIXES):
        raise CaseError(t, "segmentations are written as NIfTI only (.nii / .nii.gz); this folder's dataset.json "
                        "'file_ending' names another format")
    image = read_nifti_image(t)
    shape = tuple(int(n) for n in image.shape)
    if shape != seg.shape and shape != (*seg.shape, 1):
        raise CaseError(t, f"segmentation shape {shape} != the probabilities' spatial shape {seg.shape} (x, y, z)")
    return write_nifti(path, seg.reshape(shape), image.affine, header=image.header)


def copy_nnunet_case_files(prediction: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the properties ``case.pkl`` that nnU-Net writes beside ``case.npz`` (``prediction``) to
    ``out_dir``, byte for byte (never unpickled): the calibrated probabilities keep the case's geometry, so its
    properties stay true, and nnU-Net's ensembling reads them. Returns the copied names."""
    p = Path(prediction)
    stem = p.name[: -len(".npz")] if p.name.endswith(".npz") else p.stem
    pkl = p.parent / f"{stem}.pkl"
    if not pkl.is_file():
        return []
    copy_file(pkl, Path(out_dir) / pkl.name)
    return [pkl.name]
