"""Slice-wise synthetic data of a few subjects, for the statistical-unit (subject grouping) tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def subject_volume(
    rng: np.random.Generator, shape=(14, 12, 16), num_classes: int = 3, noise: float = 1.2, sharpen: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(probs (C, X, Y, Z) float64, label (X, Y, Z) int64)``: a ball and a core, noisy softmax probabilities
    (``sharpen`` multiplies the logits)."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    c = [s / 2 + rng.uniform(-1.5, 1.5) for s in shape]
    d2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + 0.3 * (z - c[2]) ** 2
    label = np.zeros(shape, np.int64)
    label[d2 < (shape[0] / 3) ** 2] = 1
    if num_classes > 2:
        label[d2 < (shape[0] / 6) ** 2] = 2
    onehot = np.eye(num_classes)[label]
    logits = sharpen * (3.0 * onehot + rng.normal(0, noise, onehot.shape))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)
    return np.moveaxis(probs, -1, 0), label


def write_slices(
    root: Path, volumes: dict[str, tuple[np.ndarray, np.ndarray]], name: str = "pred"
) -> tuple[Path, Path]:
    """Each subject's volume as 2D slices along the last axis: ``root/name/<subject>_slice<k>.npz`` (key
    ``probabilities`` ``(C, X, Y)``) and ``root/labels/<subject>_slice<k>.npy``."""
    pred, lab = root / name, root / "labels"
    pred.mkdir(parents=True, exist_ok=True)
    lab.mkdir(parents=True, exist_ok=True)
    for subject, (probs, label) in volumes.items():
        for k in range(label.shape[-1]):
            cid = f"{subject}_slice{k:02d}"
            np.savez(pred / f"{cid}.npz", probabilities=probs[..., k].astype(np.float32))
            np.save(lab / f"{cid}.npy", label[..., k])
    return pred, lab


def write_volumes(root: Path, volumes: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[Path, Path]:
    """Each subject's whole volume as one case: ``root/vol_pred/<subject>.npz`` and ``root/vol_labels``."""
    pred, lab = root / "vol_pred", root / "vol_labels"
    pred.mkdir(parents=True, exist_ok=True)
    lab.mkdir(parents=True, exist_ok=True)
    for subject, (probs, label) in volumes.items():
        np.savez(pred / f"{subject}.npz", probabilities=probs.astype(np.float32))
        np.save(lab / f"{subject}.npy", label)
    return pred, lab
