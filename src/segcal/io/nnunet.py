"""nnU-Net v2 prediction files: paired reader and writer of ``case.npz`` probabilities, and its side files.

``nnUNetv2_predict --save_probabilities`` writes ``case.npz`` with the key ``"probabilities"`` and axes
``(C, z, y, x)``: the spatial axes of the NIfTI label ``(x, y, z)`` reversed. :func:`read_nnunet_probabilities`
returns label order ``(C, x, y, z)`` and :func:`write_nnunet_probabilities` takes label order and stores
nnU-Net's; :func:`nnunet_to_label_order` is the one place where the axes are swapped (a reversal is its own
inverse). An nnU-Net folder is recognised by its JSON / pickle side files (see docs/evaluation.md, "Inputs");
:func:`copy_nnunet_side_files` copies the JSON ones, pickles are never read or written.
"""

from __future__ import annotations

from pathlib import Path

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
    "NNUNET_SIDE_FILES",
    "copy_nnunet_side_files",
    "has_nnunet_side_files",
    "nnunet_to_label_order",
    "read_nnunet_probabilities",
    "read_nnunet_record",
    "write_nnunet_probabilities",
]

#: nnU-Net side files copied to an nnU-Net-style output folder (JSON only; pickles are never touched)
NNUNET_SIDE_FILES = ("plans.json", "dataset.json")


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
