"""nnU-Net v2 prediction files: paired reader and writer of ``case.npz`` probabilities, and its side files.

``nnUNetv2_predict --save_probabilities`` writes ``case.npz`` with the key ``"probabilities"`` and axes
``(C, z, y, x)``: the spatial axes of the NIfTI label ``(x, y, z)`` reversed. :func:`read_nnunet_probabilities`
returns label order ``(C, x, y, z)`` and :func:`write_nnunet_probabilities` takes label order and stores
nnU-Net's; :func:`nnunet_to_label_order` is the one place where the axes are swapped (a reversal is its own
inverse). An nnU-Net folder is recognised by its JSON / pickle side files (see docs/evaluation.md, "Inputs");
:func:`copy_nnunet_side_files` copies the JSON ones, pickles are never read or written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from segcal.io._atomic import copy_file
from segcal.io.case import CaseError, check_probability_dtype
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
    "NNUNET_SIDE_FILES",
    "copy_nnunet_side_files",
    "has_nnunet_side_files",
    "nnunet_to_label_order",
    "read_nnunet_class_names",
    "read_nnunet_probabilities",
    "read_nnunet_record",
    "read_nnunet_regions",
    "write_nnunet_probabilities",
]

#: nnU-Net side files copied to an nnU-Net-style output folder (JSON only; pickles are never touched)
NNUNET_SIDE_FILES = ("plans.json", "dataset.json")
#: nnU-Net's dataset description, whose ``"labels"`` name the label values
DATASET_JSON = "dataset.json"
#: nnU-Net v2's name of the ignore label (the highest label value; no prediction channel)
_IGNORE = "ignore"


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
    background (value 0) in the file's order, an integer being a one-label region. Region-based nnU-Net writes
    one sigmoid probability per region, in this order, no background channel.

    :class:`CaseError` naming the file when it is not region-based (no label is a list), declares an
    ``ignore`` label (its voxels would have to leave every region: not supported), or cannot be read.
    """
    p = Path(path)
    values = _read_labels(p)
    if not any(isinstance(v, list) for v in values.values()):
        raise CaseError(p, "is not a region-based dataset (no label is a list of label values): its predictions "
                        "are softmax classes, score them without --nnunet-regions")
    if _IGNORE in values:
        raise CaseError(p, "declares an 'ignore' label: region-based predictions with an ignore label are not "
                        "supported")
    regions = [(name, tuple(v) if isinstance(v, list) else (v,)) for name, v in values.items()]
    regions = [(name, r) for name, r in regions if set(r) != {0}]
    return tuple(n for n, _ in regions), tuple(r for _, r in regions)
