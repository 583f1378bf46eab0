"""Deep ensembles: ``p(y | x) = (1/M) Σ_m p_m(y | x)``, the average of member probabilities (Mehrtash et al.,
IEEE TMI 2020, eq. 6; Lakshminarayanan et al., NeurIPS 2017; see docs/references.md), and the ensemble-size
study of Mehrtash et al. (Fig. 2): metrics versus ``M`` with resampled member subsets, 95% interval.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segcal.functional.calibration import negative_log_likelihood
from segcal.functional.inputs import Mode, check_mode, check_probabilities, check_target
from segcal.functional.overlap import confusion_counts, dice_from_counts
from segcal.io.numpy import read_numpy_array

__all__ = [
    "average_models",
    "average_prediction_folders",
    "ensemble_probabilities",
    "ensemble_size_study",
    "load_array",
]


def ensemble_probabilities(members: Sequence[torch.Tensor], mode: Mode = "exclusive") -> torch.Tensor:
    """Mean of ``M`` member probability maps, each ``(B, C, *spatial)`` (running sum, Ensembles eq. 6)."""
    mode = check_mode(mode)
    if len(members) == 0:
        raise ValueError("an ensemble needs at least one member")
    total: torch.Tensor | None = None
    for m, p in enumerate(members):
        check_probabilities(p, mode, f"member {m}")
        if total is not None and p.shape != total.shape:
            raise ValueError(f"member {m} has shape {tuple(p.shape)}, member 0 has {tuple(total.shape)}")
        total = p.to(torch.float64).clone() if total is None else total.add_(p.to(torch.float64))
    assert total is not None
    return (total / len(members)).to(members[0].dtype)


def average_models(
    models: Sequence[nn.Module], inputs: torch.Tensor, mode: Mode = "exclusive"
) -> torch.Tensor:
    """Ensemble prediction of ``M`` networks on ``inputs``: mean of softmax (or sigmoid) outputs."""
    mode = check_mode(mode)
    if len(models) == 0:
        raise ValueError("an ensemble needs at least one model")
    total: torch.Tensor | None = None
    with torch.no_grad():
        for model in models:
            model.eval()
            z = model(inputs).float()
            p = torch.softmax(z, 1) if mode == "exclusive" else torch.sigmoid(z)
            total = p if total is None else total.add_(p)
    assert total is not None
    return total / len(models)


def load_array(path: str | Path, key: str = "probabilities") -> np.ndarray:
    """Read one ``.npy`` or ``.npz`` array (no pickle). For ``.npz`` use ``key`` or the single stored array."""
    path = Path(path)
    if path.suffix not in (".npy", ".npz"):
        raise ValueError(f"{path}: unsupported file type {path.suffix!r} (expected .npy or .npz)")
    return read_numpy_array(path, key)


def _case_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"prediction folder not found: {folder}")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in (".npy", ".npz")}


def average_prediction_folders(
    folders: Sequence[str | Path], key: str = "probabilities"
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(case_id, mean probability (C, *spatial))`` over the cases common to ``M`` folders of
    ``.npy``/``.npz`` probability maps, matched by file stem. A case missing from any folder raises
    ``ValueError`` (never silently dropped). One case is held at a time."""
    if len(folders) == 0:
        raise ValueError("an ensemble needs at least one prediction folder")
    files = [_case_files(Path(f)) for f in folders]
    cases = sorted(files[0])
    for f, fl in zip(folders[1:], files[1:], strict=True):
        missing = sorted(set(cases) ^ set(fl))
        if missing:
            raise ValueError(f"folders {folders[0]} and {f} hold different cases, e.g. {missing[:5]}")
    for case in cases:
        total = None
        for m, fl in enumerate(files):
            a = load_array(fl[case], key).astype(np.float64)
            if total is not None and a.shape != total.shape:
                raise ValueError(f"case {case}: member {m} has shape {a.shape}, member 0 has {total.shape}")
            total = a if total is None else total + a
        assert total is not None
        yield case, total / len(files)


def ensemble_size_study(
    members: Sequence[torch.Tensor],
    target: torch.Tensor,
    sizes: Sequence[int] = (1, 2, 5, 10),
    n_resamples: int = 20,
    mode: Mode = "exclusive",
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[int, dict[str, tuple[float, float, float]]]:
    """Metrics of ensembles of ``M`` members drawn without replacement from ``members`` (each
    ``(B, C, *spatial)`` probabilities), ``n_resamples`` random subsets per ``M``.

    Metrics per subset: mean over cases of the NLL (:func:`negative_log_likelihood`) and of the foreground
    Dice (exclusive: classes 1..C−1 averaged; multilabel: all channels).

    Returns ``{M: {"nll": (mean, lo, hi), "dice": (mean, lo, hi)}}`` where ``lo, hi`` are the percentile
    interval of the resampled subsets (``confidence``; degenerate when ``M`` equals the number of members).
    """
    mode = check_mode(mode)
    n = len(members)
    if n == 0:
        raise ValueError("ensemble_size_study needs at least one member")
    check_target(target, members[0].shape, mode)
    bad = [m for m in sizes if not 1 <= m <= n]
    if bad:
        raise ValueError(f"ensemble sizes must lie in [1, {n}], got {bad}")
    rng = np.random.default_rng(seed)
    alpha = (1 - confidence) / 2
    out: dict[int, dict[str, tuple[float, float, float]]] = {}
    for m in sizes:
        values: dict[str, list[float]] = {"nll": [], "dice": []}
        for _ in range(n_resamples if m < n else 1):
            idx = rng.choice(n, size=m, replace=False)
            p = ensemble_probabilities([members[i] for i in idx], mode)
            values["nll"].append(float(negative_log_likelihood(p, target, mode=mode).mean()))
            counts = confusion_counts(
                p,
                target,
                mode=mode,
                include_background=False if mode == "exclusive" and p.shape[1] > 1 else True,
            )
            values["dice"].append(float(dice_from_counts(counts).mean()))
        out[m] = {
            k: (float(np.mean(v)), float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha)))
            for k, v in values.items()
        }
    return out
