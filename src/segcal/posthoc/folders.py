"""Calibration data from prediction folders: logits of validation cases and of files to calibrate, read
through :mod:`segcal.io` (see docs/posthoc.md, "Command line").

Folder formats (:mod:`segcal.io.volumes`): ``npy`` holds **logits** ``(C, *S)``; ``nifti`` and ``nnunet``
hold **probabilities**, turned into logits as ``log(clip(p, 1e-7))``: ``softmax(log p) = p``, so the
calibrators see exactly the model's distribution (a temperature ``T`` then gives ``p^(1/T) / Σ p^(1/T)``).
Every array is in label order ``(C, *S)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcal.io import CaseError, CaseFiles, FolderFormat, load_case, read_label, read_prediction_file
from segcal.io.numpy import read_numpy_logits

__all__ = ["PROB_EPS", "FolderVolumes", "probabilities_to_logits", "read_logits_file", "read_validation_case"]

#: probabilities are clipped to this value before the log (``log(clip(p, EPS))`` are the logits)
PROB_EPS = 1e-7


def probabilities_to_logits(p: np.ndarray) -> np.ndarray:
    """``log(clip(p, 1e-7))`` as float32; ``softmax`` of the result gives back ``p`` (up to the clip)."""
    return np.log(np.clip(p.astype(np.float32, copy=False), PROB_EPS, None))


def read_validation_case(files: CaseFiles, fmt: FolderFormat) -> tuple[np.ndarray, np.ndarray]:
    """``(logits (C, *S) float32, target)`` of one validation case; target ``(*S)`` int64 or multi-hot
    ``(C, *S)`` float32 (``npy`` only). Probability formats are converted with :func:`probabilities_to_logits`;
    shapes, spacing and affine are cross-checked by :func:`segcal.io.load_case`."""
    if fmt == "npy":
        z = read_numpy_logits(files.prediction[0])
        y, _, _ = read_label(files.label)
        if y.shape == z.shape:  # multi-hot (multilabel) labels (C, *spatial)
            return z, y.astype(np.float32)
        if z.shape[1:] != y.shape:
            raise CaseError(
                files.prediction[0],
                f"case {files.case_id}: logits have spatial shape {z.shape[1:]} but labels "
                f"{Path(files.label).name} have {y.shape}",
            )
        return z, y.astype(np.int64)
    case = load_case(files, fmt)
    assert case.label is not None
    return probabilities_to_logits(case.probabilities), case.label.astype(np.int64)


def read_logits_file(path: str | Path, fmt: FolderFormat) -> tuple[np.ndarray, Any]:
    """``(logits (C, *S) float32, meta)`` of one file to calibrate; ``meta`` is what
    :func:`segcal.io.write_prediction_file` needs to write the output in the same format."""
    arr, meta = read_prediction_file(path, fmt)
    return (arr if fmt == "npy" else probabilities_to_logits(arr)), meta


class FolderVolumes:
    """Re-iterable ``(logits (1, C, *S), target (1, *S) or (1, C, *S))`` volumes read lazily from disk."""

    def __init__(self, cases: list[CaseFiles], fmt: FolderFormat) -> None:
        self.cases, self.fmt = cases, fmt

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self[i] for i in range(len(self.cases)))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        z, y = read_validation_case(self.cases[i], self.fmt)
        return torch.from_numpy(z)[None], torch.from_numpy(y)[None]
