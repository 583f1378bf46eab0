"""Synthetic datasets for the evaluation tests: NIfTI, NumPy and nnU-Net v2 layouts with known geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np


def make_case(
    rng: np.random.Generator, shape: tuple[int, ...] = (12, 10, 8), num_classes: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """``(probs (C, *S) float32, label (*S) int16)``: nested boxes of classes, noisy softmax probabilities."""
    label = np.zeros(shape, dtype=np.int16)
    c0 = [rng.integers(s // 3, s - s // 3) for s in shape]
    for k in range(1, num_classes):
        r = [max(1, s // (2 + k)) for s in shape]
        sl = tuple(slice(max(0, c - ri), c + ri) for c, ri in zip(c0, r, strict=True))
        label[sl] = k
    onehot = np.eye(num_classes, dtype=np.float32)[label]  # (*S, C)
    logits = 3.0 * onehot + rng.normal(0, 1.2, onehot.shape).astype(np.float32)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (e / e.sum(-1, keepdims=True)).astype(np.float32)
    return np.moveaxis(probs, -1, 0).copy(), label


def affine_for(spacing: tuple[float, ...]) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = np.diag(spacing)
    aff[:3, 3] = [-10.0, 5.0, 2.0]
    return aff


def write_nifti_dataset(
    root: Path, n: int, *, seed: int = 0, shape=(12, 10, 8), num_classes: int = 4, spacing=(1.0, 1.5, 2.5)
) -> tuple[Path, Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``root/pred/case_XXX.nii.gz`` (x, y, z, C) float32 and ``root/labels/case_XXX.nii.gz``."""
    rng = np.random.default_rng(seed)
    pred, lab = root / "pred", root / "labels"
    pred.mkdir(parents=True, exist_ok=True)
    lab.mkdir(parents=True, exist_ok=True)
    data = {}
    aff = affine_for(spacing)
    for i in range(n):
        cid = f"case{i:03d}"
        probs, label = make_case(rng, shape, num_classes)
        nib.save(nib.Nifti1Image(np.moveaxis(probs, 0, -1), aff), pred / f"{cid}.nii.gz")
        nib.save(nib.Nifti1Image(label, aff), lab / f"{cid}.nii.gz")
        data[cid] = (probs, label)
    return pred, lab, data


def write_nnunet_dataset(
    root: Path,
    n: int,
    *,
    seed: int = 0,
    shape=(12, 10, 8),
    num_classes: int = 4,
    spacing=(1.0, 1.5, 2.5),
    dtype=np.float32,
) -> tuple[Path, Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """nnU-Net v2 layout: ``pred/case.npz`` (key probabilities, (C, z, y, x)) + ``labelsTr/case.nii.gz``."""
    rng = np.random.default_rng(seed)
    pred, lab = root / "nnunet_pred", root / "labelsTr"
    pred.mkdir(parents=True, exist_ok=True)
    lab.mkdir(parents=True, exist_ok=True)
    (pred / "plans.json").write_text(json.dumps({"dataset_name": "Dataset001_Test"}))
    data = {}
    aff = affine_for(spacing)
    for i in range(n):
        cid = f"case{i:03d}"
        probs, label = make_case(rng, shape, num_classes)
        np.savez_compressed(pred / f"{cid}.npz", probabilities=probs.transpose(0, 3, 2, 1).astype(dtype))
        nib.save(nib.Nifti1Image(label, aff), lab / f"{cid}.nii.gz")
        data[cid] = (probs, label)
    return pred, lab, data
