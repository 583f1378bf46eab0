"""The folder sidecar ``segcal.json``: what a folder of prediction (or label) files holds, for the facts the
files themselves cannot say (see docs/workflow.md, "The prediction-file contract").

A NumPy ``.npy`` file has no place for the kind of its values, its voxel size or its class names; a NIfTI file
has a geometry but no class names. ``segcal.json`` next to the files states them for the whole folder::

    {"segcal_folder": 1,
     "kind": "probabilities",            # or "logits": what every prediction file of the folder holds
     "spacing": [1.0, 1.0, 2.5],         # voxel size in mm of every case (NumPy files only; NIfTI has its own)
     "class_names": ["background", "CSF", "GM", "WM"],   # name of label value k at index k
     "calibration": {"method": "ts", "temperature": 1.96, ...}}   # set by `segcal calibrate` on its output

Every field is optional. segcal writes the sidecar for every prediction folder it creates (``segcal predict``,
``segcal calibrate``); users may write it by hand for files from other tools. A sidecar that cannot be parsed,
has unknown fields or wrong types is an error naming the file (:class:`~segcal.io.case.CaseError`), never
ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from segcal.io._atomic import write_text
from segcal.io.case import CaseError

__all__ = ["PREDICTION_KINDS", "SIDECAR_NAME", "FolderInfo", "PredictionKind", "read_folder_info", "write_folder_info"]

#: file name of the folder sidecar
SIDECAR_NAME = "segcal.json"
#: what a prediction file holds: class probabilities, or logits (pre-activation network outputs)
PredictionKind = Literal["probabilities", "logits"]
PREDICTION_KINDS: tuple[str, ...] = ("probabilities", "logits")
_VERSION = 1
_FIELDS = ("segcal_folder", "kind", "spacing", "class_names", "calibration")


@dataclass(frozen=True)
class FolderInfo:
    """The facts ``segcal.json`` states about a folder (``None``: not stated).

    Attributes:
        kind: ``"probabilities"`` or ``"logits"``, for every prediction file of the folder.
        spacing: voxel size in mm per spatial axis ``*S`` of every case (for files without geometry).
        class_names: the name of label value ``k`` at index ``k`` (background included).
        calibration: how ``segcal calibrate`` made the folder's files (method, fitted parameters, source
            folders); set only on calibrated outputs, which are never calibrated again.
    """

    kind: PredictionKind | None = None
    spacing: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    calibration: dict[str, Any] | None = field(default=None, compare=False)

    def merged(self, **changes: Any) -> FolderInfo:
        """A copy with ``changes`` applied (``None`` values are ignored, so unstated facts are kept)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"segcal_folder": _VERSION}
        if self.kind is not None:
            out["kind"] = self.kind
        if self.spacing is not None:
            out["spacing"] = list(self.spacing)
        if self.class_names is not None:
            out["class_names"] = list(self.class_names)
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out


def _spacing(value: Any, path: Path) -> tuple[float, ...]:
    ok = isinstance(value, Sequence) and not isinstance(value, str) and 1 <= len(value) <= 3
    if ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        sp = tuple(float(v) for v in value)
        if all(math.isfinite(v) and v > 0 for v in sp):
            return sp
    raise CaseError(path, f"'spacing' must be a list of 1 to 3 positive voxel sizes in mm, got {value!r}")


def _class_names(value: Any, path: Path) -> tuple[str, ...]:
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        if len(set(value)) != len(value):
            raise CaseError(path, f"'class_names' must be unique, got {value!r}")
        return tuple(value)
    raise CaseError(path, f"'class_names' must be a non-empty list of non-empty strings, got {value!r}")


def _parse(raw: Any, path: Path) -> FolderInfo:
    if not isinstance(raw, dict):
        raise CaseError(path, "a segcal.json sidecar must hold a JSON object")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise CaseError(path, f"unknown field(s) {unknown} in the sidecar; valid fields: {list(_FIELDS)}")
    if raw.get("segcal_folder", _VERSION) != _VERSION:
        raise CaseError(path, f"sidecar version {raw['segcal_folder']!r} is not supported (expected {_VERSION})")
    kind = raw.get("kind")
    if kind is not None and kind not in PREDICTION_KINDS:
        raise CaseError(path, f"'kind' must be 'probabilities' or 'logits', got {kind!r}")
    calibration = raw.get("calibration")
    if calibration is not None and not isinstance(calibration, dict):
        raise CaseError(path, f"'calibration' must be a JSON object, got {calibration!r}")
    return FolderInfo(
        kind=kind,
        spacing=_spacing(raw["spacing"], path) if raw.get("spacing") is not None else None,
        class_names=_class_names(raw["class_names"], path) if raw.get("class_names") is not None else None,
        calibration=calibration,
    )


def read_folder_info(folder: str | Path) -> FolderInfo:
    """The sidecar of ``folder`` (an empty :class:`FolderInfo` when it has none); :class:`CaseError` naming the
    sidecar when it is unreadable or invalid."""
    path = Path(folder) / SIDECAR_NAME
    if not path.is_file():
        return FolderInfo()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaseError(path, f"cannot read the segcal.json sidecar: {exc}") from None
    return _parse(raw, path)


def write_folder_info(folder: str | Path, info: FolderInfo) -> Path:
    """Write ``info`` as ``folder/segcal.json`` (atomically); :func:`read_folder_info` reads it back."""
    return write_text(Path(folder) / SIDECAR_NAME, json.dumps(info.as_json(), indent=2) + "\n")
