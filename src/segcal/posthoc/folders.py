"""Calibration data from prediction folders: logits of validation cases and of files to calibrate, read
through :mod:`segcal.io` under its prediction-file contract (see docs/workflow.md, "The prediction-file
contract", and docs/posthoc.md, "Command line").

Every file says what it holds (:mod:`segcal.io.predictions`): logits are used as stored; probabilities are
turned into logits by :func:`probabilities_to_logits`:

* exclusive (softmax) classes: ``z = log(clip(p, 1e-7))``; ``softmax(z) = p`` up to the clip, so a calibrator
  sees exactly the model's distribution (a temperature ``T`` then gives ``p^(1/T) / Σ p^(1/T)``);
* multilabel (sigmoid) channels: ``z = log(clip(p, 1e-7)) - log(clip(1 - p, 1e-7))`` (the logit function);
  ``sigmoid(z) = p`` up to the clip.

The clip loses the logit margins of **saturated** voxels (a class probability below ``1e-7``, or above
``1 - 1e-7`` for sigmoid channels; float32 softmax outputs saturate at margins above about 16): their margin is
cut to ``log(1e7) ≈ 16.1``, which biases a fitted temperature. :class:`FolderVolumes` counts them and
:data:`SATURATION_WARN` is the share above which ``segcal calibrate`` warns that the fit is unreliable and
logits should be saved instead (``segcal predict --save-logits``).

Values are checked against their declared kind before use (:func:`check_prediction_values`): probabilities
must be a probability map, logits must be finite and must not be a probability map; a file no one declared is
accepted only if its values are probabilities. Files written by ``segcal calibrate`` (calibration mark) are
refused: calibrating them again would apply a second calibration on top of the first.

Ensembles (nnU-Net folds; ``segcal calibrate --val-ensemble-with / --apply-ensemble-with``): the members'
**probabilities** are averaged voxel by voxel (:func:`segcal.io.matching.average_members`, as ``segcal evaluate
--ensemble-with`` does; a member holding logits is turned into probabilities first, softmax or sigmoid), and the
calibrator sees the logits of that mean (:func:`read_ensemble_logits`), never a mean of logits (which would be
another ensemble: the normalised geometric mean of the probabilities). Each member file is checked as a single
file is (kind, values, calibration mark).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from segcal.functional.inputs import check_prediction, check_probabilities
from segcal.io import (
    CaseError,
    CaseFiles,
    FolderFormat,
    FolderInfo,
    KindOption,
    Prediction,
    calibration_mark,
    read_folder_info,
    read_label,
    read_prediction,
)
from segcal.io.case import check_spatial_shapes, match_2d_grid, same_geometry
from segcal.io.matching import EnsembleFiles, average_members

__all__ = [
    "PROB_EPS",
    "SATURATION_WARN",
    "FolderVolumes",
    "check_prediction_values",
    "logits_to_probabilities",
    "probabilities_to_logits",
    "read_ensemble_logits",
    "read_logits",
    "read_validation_case",
    "saturated_voxels",
]

Mode = Literal["exclusive", "multilabel"]

#: probabilities are clipped to ``[PROB_EPS, 1 - PROB_EPS]`` before the log
PROB_EPS = 1e-7
#: share of saturated validation voxels above which a fit from probabilities is reported as unreliable
SATURATION_WARN = 0.05


def probabilities_to_logits(p: np.ndarray, mode: Mode = "exclusive") -> np.ndarray:
    """Logits ``(C, *S)`` float32 from probabilities ``(C, *S)`` (module docstring): ``log(clip(p))`` for
    exclusive classes, ``log(clip(p)) - log(clip(1 - p))`` for multilabel channels."""
    p32 = p.astype(np.float32, copy=False)
    z = np.log(np.clip(p32, PROB_EPS, None))
    if mode == "multilabel":
        z -= np.log(np.clip(1 - p32, PROB_EPS, None))
    return z


def logits_to_probabilities(z: np.ndarray, mode: Mode = "exclusive") -> np.ndarray:
    """Probabilities ``(C, *S)`` float64 of logits ``(C, *S)``: softmax over the classes (exclusive) or the
    sigmoid of each channel (multilabel)."""
    t = torch.from_numpy(np.ascontiguousarray(z)).to(torch.float64)
    return (torch.softmax(t, 0) if mode == "exclusive" else torch.sigmoid(t)).numpy()


def saturated_voxels(p: np.ndarray, mode: Mode = "exclusive") -> int:
    """Voxels of ``p`` ``(C, *S)`` whose logit margin :func:`probabilities_to_logits` cuts: some class
    probability below ``PROB_EPS`` (or, multilabel, above ``1 - PROB_EPS``)."""
    cut = p < PROB_EPS
    if mode == "multilabel":
        cut |= p > 1 - PROB_EPS
    return int(cut.any(axis=0).sum())


def _looks_like_probabilities(t: torch.Tensor) -> bool:
    if t.shape[1] < 2:
        return False
    try:
        check_probabilities(t, "exclusive")
    except ValueError:
        return False
    return True


def check_prediction_values(pred: Prediction, path: str | Path, mode: Mode = "exclusive") -> None:
    """Rule: the values of ``pred`` fit its kind, else :class:`CaseError` naming ``path``.

    Probabilities (declared or assumed) must lie in [0, 1] and, for exclusive classes, sum to one
    (:func:`segcal.functional.inputs.check_probabilities`); logits must be finite and must not form a
    probability map (in [0, 1] and summing to one at every voxel), which would mean the kind is declared wrong.
    """
    t = torch.from_numpy(np.ascontiguousarray(pred.values))[None]
    if pred.kind == "logits":
        try:
            check_prediction(t, "logits")
        except ValueError as exc:
            raise CaseError(path, str(exc)) from None
        if _looks_like_probabilities(t):
            raise CaseError(
                path, f"declared as logits (by {pred.declared_by}) but its values are a probability map (in [0, 1], "
                "summing to 1 over the classes at every voxel); declare it as probabilities"
            )
        return
    try:
        check_probabilities(t, mode, name="values")
    except ValueError as exc:
        if pred.declared_by is None:
            raise CaseError(
                path, f"cannot tell whether it holds probabilities or logits: nothing declares it (no npz key "
                f"'probabilities' / 'logits', NIfTI intent_name or segcal.json 'kind'), and its values are not "
                f"probabilities ({exc}); if these are logits, say so with --pred-kind logits, an npz key 'logits' or "
                "a segcal.json sidecar"
            ) from None
        raise CaseError(path, f"declared as probabilities (by {pred.declared_by}) but {exc}") from None


def _checked_prediction(
    path: str | Path, fmt: FolderFormat, kind: KindOption, mode: Mode, prefer: str, info: FolderInfo | None
) -> Prediction:
    """One prediction file read (``prefer``: the array of an ``.npz`` holding both), refused when already
    calibrated by ``segcal calibrate`` or when its values do not fit its kind (:func:`check_prediction_values`)."""
    info = read_folder_info(Path(path).parent) if info is None else info
    pred = read_prediction(path, fmt, kind=kind, prefer=prefer, info=info)  # type: ignore[arg-type]
    mark = calibration_mark(pred, info)
    if mark is not None:
        raise CaseError(
            path, f"is already calibrated ({mark}); calibrating it again would stack a second calibration on the "
            "first: use the uncalibrated predictions"
        )
    check_prediction_values(pred, path, mode)
    return pred


def read_logits(
    path: str | Path,
    fmt: FolderFormat,
    *,
    kind: KindOption = "auto",
    mode: Mode = "exclusive",
    info: FolderInfo | None = None,
) -> tuple[np.ndarray, Prediction, int]:
    """``(logits (C, *S) float32, prediction, saturated voxels)`` of one prediction file (logits preferred
    when an ``.npz`` holds both); refuses files already calibrated by ``segcal calibrate`` and values that do
    not fit their kind (:func:`check_prediction_values`)."""
    pred = _checked_prediction(path, fmt, kind, mode, "logits", info)
    if pred.kind == "logits":
        return pred.values.astype(np.float32, copy=False), pred, 0
    return probabilities_to_logits(pred.values, mode), pred, saturated_voxels(pred.values, mode)


def read_ensemble_logits(
    paths: Sequence[str | Path],
    fmt: FolderFormat,
    *,
    kind: KindOption = "auto",
    mode: Mode = "exclusive",
    case_id: str | None = None,
    members: Sequence[str] = (),
) -> tuple[np.ndarray, Prediction, int]:
    """``(logits (C, *S) float32, prediction, saturated voxels)`` of the mean of the members' probabilities
    (module docstring): one file per member folder ``members``, all of the format ``fmt``, each checked as
    :func:`read_logits` checks a file (probabilities preferred when an ``.npz`` holds both; logits turned into
    probabilities by :func:`logits_to_probabilities`). The mean (:func:`segcal.io.matching.average_members`) is
    turned into logits by :func:`probabilities_to_logits`. The prediction is the first member's as read (its
    geometry and ``meta``, to write an output like it) with ``values`` the mean probabilities.
    :class:`CaseError` naming the member's file when it is missing, unusable, or of another shape."""
    first: list[Prediction] = []

    def member(path: str) -> tuple[np.ndarray, tuple[float, ...] | None, np.ndarray | None]:
        pred = _checked_prediction(path, fmt, kind, mode, "probabilities", None)
        if not first:
            first.append(pred)
        values = pred.values if pred.kind == "probabilities" else logits_to_probabilities(pred.values, mode)
        return values, pred.spacing, pred.affine

    name = case_id if case_id is not None else Path(paths[0]).name
    mean, _, _ = average_members([str(p) for p in paths], member, case_id=name, members=members)
    pred = first[0]
    pred.values, pred.kind = mean, "probabilities"
    return probabilities_to_logits(mean, mode), pred, saturated_voxels(mean, mode)


def _target(
    files: CaseFiles, z: np.ndarray, pred: Prediction, fmt: FolderFormat
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits on the label grid, target)``: an integer label map ``(*S)``, or a multi-hot ``(C, *S)``; shapes
    and geometry cross-checked as :func:`segcal.io.load_case` does (a 2D slice may be stored ``(X, Y, 1)``)."""
    y, l_sp, l_aff = read_label(files.label)
    if y.shape == z.shape:  # multi-hot (multilabel) labels (C, *spatial)
        return z, y.astype(np.float32)
    z, p_sp, y, l_sp = match_2d_grid(z, pred.spacing, y, l_sp)
    check_spatial_shapes(z, y, files.prediction[0], files.label, fmt)
    if p_sp is not None and l_sp is not None and not same_geometry(p_sp, pred.affine, l_sp, l_aff):
        raise CaseError(files.prediction[0], f"spacing/affine mismatch with label {files.label}")
    return z, y.astype(np.int64)


def read_validation_case(
    files: CaseFiles, fmt: FolderFormat, *, kind: KindOption = "auto", mode: Mode = "exclusive"
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(logits (C, *S) float32, target, saturated voxels)`` of one validation case (:func:`read_logits`; for
    an :class:`~segcal.io.matching.EnsembleFiles` of :func:`segcal.io.matching.match_ensemble`, the logits of
    the members' mean probabilities, :func:`read_ensemble_logits`); target ``(*S)`` int64 or multi-hot
    ``(C, *S)`` float32; shapes and geometry cross-checked."""
    if isinstance(files, EnsembleFiles):
        z, pred, saturated = read_ensemble_logits(
            files.prediction, fmt, kind=kind, mode=mode, case_id=files.case_id, members=files.members
        )
    else:
        z, pred, saturated = read_logits(files.prediction[0], fmt, kind=kind, mode=mode)
    z, y = _target(files, z, pred, fmt)
    return z, y, saturated


class FolderVolumes:
    """Re-iterable ``(logits (1, C, *S), target (1, *S) or (1, C, *S))`` volumes read lazily from disk; the
    cases of :func:`segcal.io.match_cases`, or of :func:`segcal.io.matching.match_ensemble` (each volume the
    logits of the members' mean probabilities).

    ``saturation`` is the share of voxels, over the cases read so far, whose margins the conversion from
    probabilities cut (0 for logits).
    """

    def __init__(
        self, cases: list[CaseFiles], fmt: FolderFormat, *, kind: KindOption = "auto", mode: Mode = "exclusive"
    ) -> None:
        self.cases, self.fmt, self.kind, self.mode = cases, fmt, kind, mode
        self._counts: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self[i] for i in range(len(self.cases)))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        z, y, saturated = read_validation_case(self.cases[i], self.fmt, kind=self.kind, mode=self.mode)
        self._counts[i] = (saturated, int(np.prod(z.shape[1:])))
        return torch.from_numpy(z)[None], torch.from_numpy(y)[None]

    @property
    def saturation(self) -> float:
        total = sum(n for _, n in self._counts.values())
        return sum(s for s, _ in self._counts.values()) / total if total else 0.0
