"""``torch.save`` files holding plain dicts of tensors, numbers and strings: training checkpoints and calibrator
files. Written atomically (:func:`segcal.io.atomic_write`); read with ``torch.load(weights_only=True)``, so no
arbitrary pickled object is ever executed. torch is imported when a file is read or written, not on import."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segcal.io._atomic import atomic_write
from segcal.io.case import CaseError

__all__ = ["read_torch_file", "write_torch_file"]


def write_torch_file(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` with ``torch.save`` to a temporary file, then rename it to ``path``."""
    import torch

    with atomic_write(path, "wb") as fh:
        torch.save(payload, fh)
    return Path(path)


def read_torch_file(path: str | Path, what: str, map_location: Any = "cpu") -> dict[str, Any]:
    """The dict saved at ``path`` (``weights_only=True``). ``what`` names the kind of file in the errors:
    ``FileNotFoundError`` when missing, :class:`CaseError` naming the file when unreadable or not a dict."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CaseError(path, f"cannot load {what} (corrupt, truncated or not a segcal {what}): {exc}") from None
    if not isinstance(payload, dict):
        raise CaseError(path, f"not a segcal {what} (expected a dict, got {type(payload).__name__})")
    return payload
