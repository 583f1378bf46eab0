"""Training data: in-memory arrays or folders of ``.npz`` / NIfTI cases, with seeded random patches.

Images are ``(C_in, *S)`` float32 per case, labels ``(*S)`` int64. Random patch offsets are drawn from a
generator seeded by ``(seed, epoch, index)``, so a batch does not depend on worker processes, DDP ranks or the
global RNG (which keeps resumed runs bit-identical to uninterrupted ones).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from segcal.functional.inputs import as_tensor
from segcal.io.nifti import read_nifti
from segcal.io.numpy import read_npz, read_numpy_record

__all__ = ["SegmentationDataset", "case_name", "read_case", "read_folder", "read_image"]

_NIFTI = re.compile(r"^(?P<case>.+?)(?:_(?P<kind>image|label))?\.nii(?:\.gz)?$")


def case_name(path: Path) -> str:
    """The case id of a training / prediction input file: its name without the extension and ``_image``."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".npz", ".npy"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[:-6] if name.endswith("_image") else name


def read_image(path: str | Path, spatial_dims: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one image for training/prediction: returns ``(image (C_in, *S) float32, affine or None)``.

    ``.npz`` files need the key ``image`` with shape ``(C_in, *S)`` or ``(*S)``; NIfTI files hold ``(*S)`` or
    ``(*S, C_in)`` (channels last, as written by most tools) and keep their affine; an ``.npz`` with a
    ``spacing`` entry gets the affine ``diag(spacing, 1)``, one without has ``None``. With ``spatial_dims``
    given, a missing channel axis is added and trailing singleton NIfTI axes are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    affine = None
    if path.name.endswith((".nii", ".nii.gz")):
        arr, _, affine = read_nifti(path, dtype=np.float32)
        sd = spatial_dims if spatial_dims is not None else min(arr.ndim, 3)
        while arr.ndim > sd + 1 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == sd:
            arr = arr[None]
        elif arr.ndim == sd + 1:  # channels last in NIfTI (a 2D slice stored as (X, Y, 1) gives C_in = 1)
            arr = np.moveaxis(arr, -1, 0)
    elif path.suffix == ".npz":
        rec = read_numpy_record(path, key="image")
        arr = rec.array.astype(np.float32)
        if rec.spacing is not None:  # the geometry of a NumPy case: its voxel size
            affine = np.diag([*rec.spacing, *[1.0] * (4 - len(rec.spacing))])
        if spatial_dims is not None and arr.ndim == spatial_dims:
            arr = arr[None]
    else:
        raise ValueError(f"{path}: unsupported image format (use .npz or .nii/.nii.gz)")
    if spatial_dims is not None and arr.ndim != spatial_dims + 1:
        raise ValueError(
            f"{path}: image has shape {arr.shape}, expected (C_in, *S) with {spatial_dims} spatial dims"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: image contains NaN or Inf")
    return arr, affine


def read_case(path: str | Path, spatial_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """One training case: ``.npz`` with ``image``/``label`` or ``<case>_image.nii*`` (label next to it)."""
    path = Path(path)
    if path.suffix == ".npz":
        image, _ = read_image(path, spatial_dims)
        label = read_npz(path, ("label",))["label"]
    else:
        image, _ = read_image(path, spatial_dims)
        name = case_name(path)
        cands = [path.with_name(f"{name}_label{ext}") for ext in (".nii.gz", ".nii")]
        label_path = next((c for c in cands if c.is_file()), None)
        if label_path is None:
            raise FileNotFoundError(f"{path}: no label file {cands[0].name} next to the image")
        label, _, _ = read_nifti(label_path)
        while label.ndim > spatial_dims and label.shape[-1] == 1:
            label = label[..., 0]
    if label.shape != image.shape[1:]:
        raise ValueError(
            f"{path}: label shape {label.shape} does not match image spatial shape {image.shape[1:]}"
        )
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.equal(np.mod(label, 1), 0)):
            raise ValueError(f"{path}: label map must hold integer class indices")
    return image, label.astype(np.int64)


def read_folder(
    folder: str | Path, spatial_dims: int
) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """All cases (``*.npz``, ``*_image.nii[.gz]``) of a folder, sorted: ``(names, images, labels)``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder not found: {folder}")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix == ".npz" or re.search(r"_image\.nii(\.gz)?$", p.name) is not None
    )
    if not files:
        raise ValueError(f"{folder}: no cases found (expected *.npz or *_image.nii.gz files)")
    names, images, labels = [], [], []
    for f in files:
        img, lab = read_case(f, spatial_dims)
        names.append(case_name(f))
        images.append(img)
        labels.append(lab)
    return names, images, labels


def _as_cases(images: Sequence | np.ndarray | torch.Tensor, labels: Sequence | np.ndarray | torch.Tensor):
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("the dataset is empty")
    out_i, out_l = [], []
    for k, (im, lb) in enumerate(zip(images, labels, strict=True)):
        im = as_tensor(im).to(torch.float32)
        lb = as_tensor(lb)
        if lb.is_floating_point():
            raise TypeError(f"labels[{k}] must be an integer label map, got {lb.dtype}")
        if tuple(im.shape[1:]) != tuple(lb.shape):
            raise ValueError(
                f"case {k}: image shape {tuple(im.shape)} vs label shape {tuple(lb.shape)}; "
                "expected image (C_in, *S) and label (*S)"
            )
        out_i.append(im)
        out_l.append(lb.long())
    return out_i, out_l


def _pad_to(x: torch.Tensor, shape: Sequence[int], value: float = 0.0) -> torch.Tensor:
    pad: list[int] = []
    for cur, tgt in zip(reversed(x.shape[-len(shape) :]), reversed(shape), strict=True):
        pad += [0, max(0, tgt - cur)]
    return torch.nn.functional.pad(x, pad, value=value) if any(pad) else x


class SegmentationDataset(Dataset):
    """Cases ``images[i] (C_in, *S)`` / ``labels[i] (*S)`` → ``(image, label)`` patches or padded images.

    Args:
        images: sequence (or stacked array ``(N, C_in, *S)``) of images.
        labels: sequence (or stacked array ``(N, *S)``) of integer label maps.
        patch_size: random patch size, or ``None`` for whole images zero-padded to ``size_factor``.
        size_factor: whole images are padded to a multiple of this (the UNet strides' product).
        seed: base seed; the patch of case ``i`` in epoch ``e`` depends only on ``(seed, e, i)``.
        same_shape: require equal shapes for whole-image batches (off for validation sets read one by one).
    """

    def __init__(
        self,
        images,
        labels,
        patch_size: Sequence[int] | None = None,
        size_factor: int = 1,
        seed: int = 0,
        same_shape: bool = True,
    ) -> None:
        self.images, self.labels = _as_cases(images, labels)
        self.patch_size = None if patch_size is None else tuple(int(p) for p in patch_size)
        self.size_factor = int(size_factor)
        self.seed = int(seed)
        self.epoch = 0
        if self.patch_size is None and same_shape:
            shapes = {tuple(im.shape) for im in self.images}
            if len(shapes) > 1:
                raise ValueError(
                    f"whole-image training needs equal image shapes, got {sorted(shapes)}; "
                    "set data.patch_size"
                )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, lab = self.images[i], self.labels[i]
        if self.patch_size is None:
            f = self.size_factor
            tgt = [-(-s // f) * f for s in img.shape[1:]]
            return _pad_to(img, tgt), _pad_to(lab, tgt)
        img, lab = _pad_to(img, self.patch_size), _pad_to(lab, self.patch_size)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + i)
        sl = []
        for s, p in zip(img.shape[1:], self.patch_size, strict=True):
            start = int(torch.randint(0, s - p + 1, (1,), generator=g, device="cpu"))
            sl.append(slice(start, start + p))
        return img[(slice(None), *sl)], lab[tuple(sl)]
