"""The binning core: one formula, one place.

Every calibration quantity in segcal (marginal ECE/ACE/MCE, top-label ECE, reliability diagrams, dataset
reliability histograms, pooled dataset metrics, the hard-binned mL1-ACE loss) derives from three **mergeable**
sums per image ``b``, channel ``c`` and bin ``k``:

* ``count[b, c, k]`` — number of voxels whose probability falls in bin ``k``;
* ``sum_p[b, c, k]`` — sum of those probabilities;
* ``sum_y[b, c, k]`` — sum of their targets (1/0 for hard labels, the reference probability for soft targets).

Bin convention: ``M`` equal-width bins on [0, 1]; bin ``k`` is the half-open interval ``(k/M, (k+1)/M]`` and
``p = 0`` belongs to bin 0 (``closed="right"``, as MONAI's ``calibration_binning`` and the ACE authors' code).
``closed="left"`` gives ``[k/M, (k+1)/M)`` with ``p = 1`` in bin ``M - 1`` (torchmetrics' convention). The edges
``k/M`` are the correctly rounded values in the probabilities' dtype, so ``p = k/M`` written in that dtype is
a tie resolved by ``closed``.

Sums are accumulated in float64 (counts are exact integers stored as float64), whatever the input dtype
(float16/bfloat16/float32/float64), so images, batches, processes and machines merge exactly by addition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from segcal.functional import _kernels, _simd, _triton
from segcal.functional._scatter import contended_atomics, spread_bin_sum
from segcal.functional.inputs import (
    PROB_ATOL,
    Activation,
    Mode,
    as_label_map,
    as_tensor,
    check_label_range,
    check_mode,
    check_prediction,
    check_probabilities,
    check_target,
    region_probabilities,
    region_targets,
    to_probabilities,
)

Closed = Literal["right", "left"]

__all__ = [
    "MAX_BINS",
    "BinStats",
    "Closed",
    "bin_edges",
    "bin_index",
    "bin_statistics",
    "check_num_bins",
    "hard_bin_sums",
    "soft_bin_sums",
]


@dataclass(frozen=True)
class BinStats:
    """Per-image, per-channel, per-bin sums; each tensor is ``(B, C, M)`` float64.

    ``a + b`` concatenates nothing: it adds the sums (use it to merge the same images computed in parts, e.g.
    two halves of a volume or two regions). :meth:`cat` stacks images, :meth:`pooled` sums over images.
    """

    count: torch.Tensor
    sum_p: torch.Tensor
    sum_y: torch.Tensor

    def __post_init__(self) -> None:
        if not (self.count.shape == self.sum_p.shape == self.sum_y.shape) or self.count.ndim != 3:
            raise ValueError("BinStats tensors must all have shape (B, C, M)")

    @property
    def num_bins(self) -> int:
        return int(self.count.shape[-1])

    @property
    def num_channels(self) -> int:
        return int(self.count.shape[1])

    def __add__(self, other: BinStats) -> BinStats:
        if self.count.shape != other.count.shape:
            raise ValueError(
                f"cannot add BinStats of shapes {tuple(self.count.shape)} and {tuple(other.count.shape)}"
            )
        return BinStats(self.count + other.count, self.sum_p + other.sum_p, self.sum_y + other.sum_y)

    @staticmethod
    def cat(parts: Sequence[BinStats]) -> BinStats:
        """Stack images of several BinStats along the batch axis."""
        return BinStats(
            torch.cat([s.count for s in parts]),
            torch.cat([s.sum_p for s in parts]),
            torch.cat([s.sum_y for s in parts]),
        )

    def pooled(self) -> BinStats:
        """Sum over images: the dataset-level (micro) statistics, shape ``(1, C, M)``."""
        return BinStats(
            self.count.sum(0, keepdim=True), self.sum_p.sum(0, keepdim=True), self.sum_y.sum(0, keepdim=True)
        )

    def mean_p(self) -> torch.Tensor:
        """Expected frequency ``e_k`` per bin (NaN for empty bins)."""
        return torch.where(self.count > 0, self.sum_p / self.count.clamp_min(1), torch.nan)

    def mean_y(self) -> torch.Tensor:
        """Observed frequency ``o_k`` per bin (NaN for empty bins)."""
        return torch.where(self.count > 0, self.sum_y / self.count.clamp_min(1), torch.nan)

    def to(self, device: torch.device | str) -> BinStats:
        return BinStats(self.count.to(device), self.sum_p.to(device), self.sum_y.to(device))

    def numpy(self) -> np.ndarray:
        """``(B, C, 3, M)`` float64 array (count, sum_p, sum_y) for storage."""
        return torch.stack([self.count, self.sum_p, self.sum_y], dim=2).cpu().numpy()

    @staticmethod
    def from_numpy(arr: np.ndarray) -> BinStats:
        t = as_tensor(np.asarray(arr, dtype=np.float64))
        if t.ndim != 4 or t.shape[2] != 3:
            raise ValueError(f"expected a (B, C, 3, M) array, got shape {tuple(t.shape)}")
        return BinStats(t[:, :, 0].clone(), t[:, :, 1].clone(), t[:, :, 2].clone())


def bin_edges(
    num_bins: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """The ``M + 1`` edges ``k / M``, correctly rounded in ``dtype``.

    Computed on ``device`` itself (IEEE float64 division, the same values everywhere), so a CUDA caller waits
    for no host-to-device copy; devices without float64 (MPS) get the CPU values copied."""
    check_num_bins(num_bins)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    here = dev if dev.type != "mps" else torch.device("cpu")
    edges = torch.arange(num_bins + 1, dtype=torch.float64, device=here) / num_bins
    return edges.to(dtype=dtype, device=dev)


def bin_index(probs: torch.Tensor, num_bins: int = 20, closed: Closed = "right") -> torch.Tensor:
    """Bin index ``k`` (int64) of each probability, same shape as ``probs`` (see module docstring)."""
    edges = bin_edges(num_bins, probs.dtype, probs.device)
    inner = edges[1:-1].contiguous()
    if closed == "right":
        return torch.bucketize(probs, inner, right=False)
    if closed == "left":
        return torch.bucketize(probs, inner, right=True)
    raise ValueError(f"closed must be 'right' or 'left', got {closed!r}")


#: the largest number of bins accepted: far above any use in calibration (10-100 bins), low enough that the
#: per-thread histograms stay small (their memory grows with the number of bins)
MAX_BINS = 10_000


def check_num_bins(num_bins: object) -> None:
    """Raise ``ValueError`` unless ``num_bins`` is an integer in ``[1, MAX_BINS]`` (a bool is not a count)."""
    if isinstance(num_bins, bool) or not isinstance(num_bins, int | np.integer) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    if num_bins > MAX_BINS:
        raise ValueError(f"num_bins must be a positive integer of at most {MAX_BINS}, got {num_bins}")




def _prepare_mask(
    mask: torch.Tensor | None, batch: int, spatial: Sequence[int], device: torch.device | None = None
) -> torch.Tensor | None:
    """``mask`` as a bool ``(B, *spatial)`` tensor (a channel axis of one dropped; 0 / 1 values of any dtype), on
    ``device`` when given (the prediction's: a mask may come from the host)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    spatial = tuple(spatial)
    if mask.ndim == len(spatial) + 2 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if tuple(mask.shape) != (batch, *spatial):
        raise ValueError(f"mask shape {tuple(mask.shape)} must be (B, *spatial) = {(batch, *spatial)}")
    if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must be binary (0/1 or bool)")
    return mask.bool() if device is None else mask.to(device, torch.bool)


def bin_statistics(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_bins: int = 20,
    *,
    activation: Activation = None,
    mode: Mode = "exclusive",
    include_background: bool = True,
    mask: torch.Tensor | None = None,
    regions: Sequence[Sequence[int]] | None = None,
    closed: Closed = "right",
    check: bool = True,
) -> BinStats:
    """Per-image, per-class, per-bin sums (count, Σp, Σy) of a segmentation prediction.

    Args:
        pred: probabilities or logits ``(B, C, *spatial)`` (2 or 3 spatial dims), any floating dtype.
        target: label map ``(B, *spatial)`` / ``(B, 1, *spatial)`` (exclusive mode), or one-hot / multi-hot /
            soft map ``(B, C, *spatial)`` (values in [0, 1]; soft values give the reference probability).
        num_bins: ``M``, equal-width bins on [0, 1] (default 20).
        activation: ``"softmax"`` / ``"sigmoid"`` if ``pred`` holds logits, ``None`` for probabilities.
        mode: ``"exclusive"`` (softmax classes) or ``"multilabel"`` (independent, possibly overlapping channels).
        include_background: keep channel 0 in exclusive mode (ignored in multilabel mode and with ``regions``).
        mask: optional region ``(B, *spatial)``; voxels outside it are ignored (e.g. a brain mask or a dilated
            bounding box, see :mod:`segcal.functional.regions`).
        regions: build multilabel region channels by summing softmax classes, e.g. BraTS
            ``[[3], [1, 3], [1, 2, 3]]`` → ET, TC, WT; the target is mapped the same way.
        closed: tie convention at the edges ``k/M`` (see module docstring).
        check: validate shapes, dtypes, ranges and NaN. Disable only for already-validated input.

    Returns:
        :class:`BinStats` with tensors ``(B, C', M)`` float64 on ``pred``'s device, ``C'`` the kept channels.

    Uses a fused, parallel numba kernel on CPU and vectorised ``bincount`` on other devices; no Python loop
    over images or classes. On CPU, float32/float64 probabilities with a label map are validated and clamped
    in the same single pass as the binning; no copy of the input is made (labels are never expanded to
    one-hot), so the extra memory is a few histograms per thread.
    """
    mode = check_mode(mode)
    check_num_bins(num_bins)
    if closed not in ("right", "left"):
        raise ValueError(f"closed must be 'right' or 'left', got {closed!r}")
    # Fast path: float32/float64 probabilities on CPU are validated and clamped inside the numba kernel (one
    # read of the tensor, no clamped copy); everything else goes through the torch checks first.
    fused = (
        isinstance(pred, torch.Tensor)
        and activation is None
        and regions is None
        and pred.device.type == "cpu"
        and pred.dtype in (torch.float32, torch.float64)
        and not pred.requires_grad
    )
    pmode = "exclusive" if regions is not None else mode
    # the GPU kernel clamps too: without checks it reads the input as given (to_probabilities would clamp a copy)
    gpu_raw = (
        not check and activation is None and regions is None and isinstance(pred, torch.Tensor)
        and _triton.available(pred, num_bins)
    )
    if fused or gpu_raw:
        if check:
            check_prediction(pred, finite=False)
        probs = pred
    else:
        probs = to_probabilities(pred, activation, pmode, check=check)
    b, c, *spatial = probs.shape
    if check:  # on the fused path the range of a label map is checked with the binning (_validated_numba_bins)
        check_target(target, probs.shape, pmode, label_range=not (fused and pmode == "exclusive"))
    mask_t = _prepare_mask(mask, b, spatial, probs.device)

    if regions is not None:  # region channels sum softmax classes; the result is multilabel
        target = region_targets(target, regions, c, spatial)
        probs = region_probabilities(probs, regions)
        c = probs.shape[1]
        mode = "multilabel"
        include_background = True

    is_dense = target.ndim == probs.ndim and target.shape[1] == c and c > 1
    labels = None if is_dense else as_label_map(target, spatial)
    if labels is not None and mode == "multilabel" and c == 1:
        labels = None  # a single binary channel given as (B, 1, *S) 0/1 map: use it densely
    first = 0 if (include_background or mode != "exclusive") else 1
    if first == 1 and c < 2:
        raise ValueError("include_background=False needs at least 2 channels")
    dense_y = None
    if labels is None:
        dense_y = target if target.shape[1] == c else target.expand(b, c, *spatial)

    if fused:
        out = _validated_numba_bins(probs, labels, dense_y, first, mask_t, num_bins, closed, mode, check)
    elif probs.device.type == "cpu" and not probs.requires_grad:
        out, _, _ = _bin_statistics_numba(probs, labels, dense_y, first, mask_t, num_bins, closed, False)
    elif labels is not None and _triton.available(probs, num_bins):  # one fused pass on a GPU
        out = _triton.label_bin_sums(probs, labels, first, mask_t, bin_edges(num_bins, probs.dtype), closed)
    else:
        class_ids = torch.arange(first, c, dtype=torch.int64)
        dy = dense_y[:, first:] if dense_y is not None else None
        out = _bin_statistics_torch(
            probs[:, first:].detach(), labels, dy, class_ids, mask_t, num_bins, closed
        )
    return BinStats(out[:, :, 0], out[:, :, 1], out[:, :, 2])


def _validated_numba_bins(
    probs: torch.Tensor,
    labels: torch.Tensor | None,
    dense_y: torch.Tensor | None,
    first: int,
    mask: torch.Tensor | None,
    num_bins: int,
    closed: Closed,
    mode: Mode,
    check: bool,
) -> torch.Tensor:
    """The numba path on unclamped probabilities: with a label map in exclusive mode the kernel validates in
    its single pass (the precise torch checks run only when it flags something, to name the problem); other
    inputs are checked by torch first (no clamped copy is made).

    The labels' range is checked here too (``bin_statistics`` leaves it out of ``check_target`` on this path):
    by the kernel's own pass where it reports the largest label, else by :func:`check_label_range`; the kernels
    only compare labels for equality, so labels outside the channels cannot make them read or write out of
    bounds before the error is raised. Labels are checked before the probabilities, as ``check_target`` runs
    before the binning elsewhere."""
    validate = check and labels is not None and mode == "exclusive"
    if check and not validate:
        check_probabilities(probs, mode)
    out, vstats, labels_max = _bin_statistics_numba(probs, labels, dense_y, first, mask, num_bins, closed, validate)
    if validate:
        if labels_max is None or labels_max >= probs.shape[1]:
            check_label_range(labels, probs.shape[1])  # type: ignore[arg-type]
        if vstats is not None and vstats.sum() > 0:
            check_probabilities(probs, mode)
    return out


def _numba_view(x: torch.Tensor, b: int, c: int, s: int) -> np.ndarray:
    """``(B, C, S)`` NumPy view of ``x`` (no copy when the spatial dims can be flattened)."""
    x = x.reshape(b, c, s)
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    return x.numpy()


def _bin_statistics_numba(
    probs: torch.Tensor,
    labels: torch.Tensor | None,
    dense_y: torch.Tensor | None,
    first: int,
    mask: torch.Tensor | None,
    num_bins: int,
    closed: Closed,
    validate: bool = False,
) -> tuple[torch.Tensor, np.ndarray | None, int | None]:
    """Numba path. ``probs`` / ``dense_y`` are the full ``(B, C, *spatial)`` tensors; channels ``first:`` are
    binned. Returns ``(B, C - first, 3, M)`` float64 and, with ``validate`` (label maps only), the kernel's
    per-task flags (values outside [0, 1] or NaN, voxels whose channel sum is off) over every voxel and channel
    (``None`` where the precise checks already ran) and the largest label (``None`` where the kernel does not
    report it; see :func:`segcal.functional._simd.hist_voxels`)."""
    b, c = probs.shape[:2]
    s = int(np.prod(probs.shape[2:]))
    out = np.zeros((b, c - first, 3, num_bins))
    use_mask = mask is not None
    mask_np = mask.reshape(b, s).numpy().view(np.uint8) if use_mask else np.zeros((1, 1), np.uint8)  # type: ignore[union-attr]
    native = probs.dtype in (torch.float32, torch.float64)
    # edges rounded in the input dtype (ties at k/M resolved as in float16/bfloat16), then widened exactly
    edges = bin_edges(num_bins, probs.dtype).to(probs.dtype if native else torch.float32).numpy()
    tables = _kernels.edge_tables(edges)
    lab_np = None
    if labels is not None:
        lab_t = labels.reshape(b, s)
        if lab_t.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
            lab_t = lab_t.to(torch.int64)
        lab_np = lab_t.numpy()
    if not native:
        _hist_half_rows(probs, lab_np, dense_y, first, mask_np, use_mask, tables, closed, out)
        return torch.from_numpy(out).to(probs.device), None, None
    vstats, labels_max = _hist_native(probs, lab_np, dense_y, first, mask_np, use_mask, tables, closed, validate, out)
    return torch.from_numpy(out).to(probs.device), vstats, labels_max


def _hist_native(
    probs: torch.Tensor,
    lab_np: np.ndarray | None,
    dense_y: torch.Tensor | None,
    first: int,
    mask_np: np.ndarray,
    use_mask: bool,
    tables: tuple[np.ndarray, np.ndarray],
    closed: Closed,
    validate: bool,
    out: np.ndarray,
) -> tuple[np.ndarray | None, int | None]:
    """Float32 / float64 probabilities into ``out`` ``(B, C - first, 3, M)``; returns the validation counts of
    the voxel kernel (label maps whose bin count it covers), else None, and the largest label where the AVX2
    kernel validated (:func:`segcal.functional._simd.hist_voxels`), else None."""
    b, c = probs.shape[:2]
    s = int(np.prod(probs.shape[2:]))
    num_bins = out.shape[-1]
    right = closed == "right"
    p_np = _numba_view(probs, b, c, s)
    if lab_np is None:
        y_t = dense_y.reshape(b, c, s)  # type: ignore[union-attr]
        if y_t.dtype == torch.bool:
            y_t = y_t.view(torch.uint8)
        elif y_t.dtype in (torch.float16, torch.bfloat16):
            y_t = y_t.float()
        _kernels._hist_dense(p_np, y_t.numpy(), first, mask_np, use_mask, *tables, right, out)
        return None, None
    if _kernels.voxel_kernel_ok(num_bins, p_np.dtype):
        chunk = _kernels.task_chunk(s, b)
        vstats = np.zeros(b * ((s + chunk - 1) // chunk))
        thr = min(PROB_ATOL * max(1, c), 6.0)  # < 7: a flagged value makes its voxel sum >= 8 (kernel)
        if _simd.applies(p_np, lab_np, mask_np):  # float32 on AVX2: the same sums, bit for bit
            t0, t1, per_call = _simd.thresholds(num_bins, right)
            labels_max = np.zeros(vstats.shape, np.int64)
            _simd.hist_voxels(p_np, lab_np, first, mask_np, use_mask, right, validate, thr, chunk, t0, t1, per_call,
                              _simd.COMPACTION_TABLE, out, vstats, labels_max)
            return vstats, int(labels_max.max()) if validate else None
        exact = p_np.dtype == np.float64  # float64 sums; float32: fixed-point sums (see the kernel)
        _kernels._hist_voxels(p_np, lab_np, first, mask_np, use_mask, right, validate, thr, exact, chunk, out, vstats)
        return vstats, None
    # a bin count whose edges the division does not reproduce: table lookups
    if validate:
        check_probabilities(probs, "exclusive")
    full = np.zeros((b * c, 3, num_bins))
    ids = np.arange(c, dtype=np.int64)
    _kernels._hist_labels(p_np.reshape(b * c, s), lab_np, ids, mask_np, use_mask, *tables, right, full)
    out += full.reshape(b, c, 3, num_bins)[:, first:]
    return None, None


def _hist_half_rows(
    probs: torch.Tensor,
    lab_np: np.ndarray | None,
    dense_y: torch.Tensor | None,
    first: int,
    mask_np: np.ndarray,
    use_mask: bool,
    tables: tuple[np.ndarray, np.ndarray],
    closed: Closed,
    out: np.ndarray,
) -> None:
    """float16 / bfloat16 probabilities: converted one image-channel row at a time, so the extra memory stays
    at one row."""
    b, c = probs.shape[:2]
    s = int(np.prod(probs.shape[2:]))
    right = closed == "right"
    p3 = probs.reshape(b, c, s)
    for bi in range(b):
        m_row = mask_np[bi : bi + 1] if use_mask else mask_np
        for ci in range(first, c):
            row = p3[bi, ci].float().reshape(1, 1, s).numpy()
            o = out[bi : bi + 1, ci - first : ci - first + 1]
            if lab_np is not None:
                ids = np.array([ci], np.int64)
                _kernels._hist_labels(row[0], lab_np[bi : bi + 1], ids, m_row, use_mask, *tables, right, o[0])
            else:
                y_row = dense_y.reshape(b, c, s)[bi, ci]  # type: ignore[union-attr]
                y_row = y_row.to(torch.uint8) if y_row.dtype == torch.bool else y_row.float()
                _kernels._hist_dense(row, y_row.reshape(1, 1, s).numpy(), 0, m_row, use_mask, *tables, right, o)


_TORCH_CHUNK = 1 << 22


def _bin_statistics_torch(
    probs: torch.Tensor,
    labels: torch.Tensor | None,
    dense_y: torch.Tensor | None,
    class_ids: torch.Tensor,
    mask: torch.Tensor | None,
    num_bins: int,
    closed: Closed,
) -> torch.Tensor:
    """Vectorised path (CUDA, or CPU without numba), chunked over voxels to bound memory: the per-bin sums of
    each chunk by ``bincount``, on a GPU by :func:`~segcal.functional._scatter.spread_bin_sum` (no atomic
    contention)."""
    b, c = probs.shape[:2]
    s = int(np.prod(probs.shape[2:]))
    dev = probs.device
    p = probs.reshape(b, c, s)
    n_out = b * c * num_bins
    offs = (torch.arange(b * c, device=dev) * num_bins).view(b, c, 1)
    acc = torch.zeros(3, n_out + 1, dtype=torch.float64, device=dev)
    ids = class_ids.to(dev).view(1, c, 1)
    lab = labels.reshape(b, 1, s) if labels is not None else None
    y = dense_y.reshape(b, c, s) if dense_y is not None else None
    msk = mask.reshape(b, 1, s) if mask is not None else None
    chunk = _TORCH_CHUNK * (8 if contended_atomics(dev) else 1)  # fewer, larger launches on a GPU
    step = max(1, chunk // max(1, b * c))
    for s0 in range(0, s, step):
        sl = slice(s0, min(s, s0 + step))
        pc = p[:, :, sl].clamp(0.0, 1.0).contiguous()  # clamped only after validation
        key = bin_index(pc, num_bins, closed) + offs
        if msk is not None:
            key = torch.where(msk[:, :, sl], key, n_out)
        key = key.reshape(-1)
        yc = (lab[:, :, sl] == ids) if lab is not None else y[:, :, sl]  # type: ignore[index]
        if contended_atomics(dev):  # a GPU: the spread copies of the bins
            values = torch.stack([torch.ones_like(pc, dtype=torch.float64), pc.double(), yc.double()])
            acc += spread_bin_sum(key[None], values.reshape(3, -1), n_out + 1)
        else:  # bincount: the fastest histogram on a CPU (1.6x the spread path's scatter_add there)
            acc[0] += torch.bincount(key, minlength=n_out + 1).to(torch.float64)
            acc[1] += torch.bincount(key, weights=pc.reshape(-1).double(), minlength=n_out + 1)
            acc[2] += torch.bincount(key, weights=yc.reshape(-1).double(), minlength=n_out + 1)
    return acc[:, :n_out].reshape(3, b, c, num_bins).permute(1, 2, 0, 3).contiguous()


def class_index(class_ids: Sequence[int] | None, c: int, device: torch.device) -> torch.Tensor:
    """``class_ids`` (default ``0, ..., c - 1``) as an int64 tensor on ``device``. A run of consecutive ids (the
    losses' kept classes) is made there by ``arange``: no host-to-device copy, which on a GPU would first wait
    for the queued work."""
    ids = list(range(c)) if class_ids is None else [int(i) for i in class_ids]
    if ids and ids == list(range(ids[0], ids[0] + len(ids))):
        return torch.arange(ids[0], ids[0] + len(ids), device=device)
    return torch.as_tensor(ids, dtype=torch.int64, device=device)


def _loss_rows(probs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, S)`` rows of the probabilities and the target in the accumulation dtype (float32 for half
    inputs, float64 kept), contiguous."""
    p = _prob_rows(probs)
    return p, target.reshape(p.shape[0], p.shape[1], -1).to(p.dtype).contiguous()


def _prob_rows(probs: torch.Tensor) -> torch.Tensor:
    """``(B, C, S)`` contiguous rows of the probabilities in the accumulation dtype (float32 for half inputs,
    float64 kept)."""
    b, c = probs.shape[:2]
    return probs.reshape(b, c, -1).to(torch.promote_types(probs.dtype, torch.float32)).contiguous()


def _numba_rows(p: torch.Tensor) -> bool:
    """The loss sums take the numba kernels for CPU float32 / float64 rows (the torch formulas elsewhere)."""
    return p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64)


class _HardBinSums(torch.autograd.Function):
    """``(count, Σp, Σy)`` per bin of ``p``, ``y`` ``(B, C, S)`` (or, with ``class_ids`` ``(C,)``, an int64 label
    map ``y`` ``(B, S)`` whose hits in channel ``c`` are the voxels labelled ``class_ids[c]``: no one-hot); the
    bin of each value is computed once in the forward pass and kept (numba: one byte per value up to 256 bins,
    two above; torch: int64) for the backward pass, which gathers the gradient of each bin's sum back to its
    values (``∂Σp_k/∂p_i = 1`` for ``p_i`` in bin ``k``). ``use_numba``: the CPU kernel (float32 / float64 CPU
    rows), else ``bin_index`` and ``scatter_add``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        p: torch.Tensor,
        y: torch.Tensor,
        num_bins: int,
        closed: Closed,
        use_numba: bool,
        class_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, c, s = p.shape
        if use_numba:
            idx = torch.empty((b, c, s), dtype=torch.uint8 if num_bins <= 256 else torch.int16, device="cpu")
            out = np.zeros((b * c, 3, num_bins))
            edges = bin_edges(num_bins, p.dtype).numpy()
            lo, hi = _kernels.edge_tables(edges)
            divide = _kernels.voxel_kernel_ok(num_bins, edges.dtype)
            y_np, lab, ids = _kernel_targets(p, y, class_ids)
            _kernels._hard_sums(
                p.reshape(b * c, s).numpy(), y_np, lab, ids, lo, hi, closed == "right", divide,
                idx.reshape(b * c, s).numpy(), out,
            )
            sums = torch.from_numpy(out).to(p.dtype).reshape(b, c, 3, num_bins)
            count, sum_p, sum_y = (sums[:, :, q].contiguous() for q in range(3))
        else:
            if class_ids is not None:  # on a GPU the one-hot rows are cheap next to the scatter
                y = _label_rows(y, class_ids, p.dtype)
            idx = bin_index(p, num_bins, closed)
            rows = idx.reshape(1, b * c * s) + (torch.arange(b * c, device=p.device) * num_bins).repeat_interleave(s)
            values = torch.stack([torch.ones_like(p), p, y]).reshape(3, -1)
            sums = spread_bin_sum(rows, values, b * c * num_bins).reshape(3, b, c, num_bins)
            count, sum_p, sum_y = sums[0], sums[1], sums[2]
        ctx.save_for_backward(idx)
        ctx.mark_non_differentiable(count)
        return count, sum_p, sum_y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, _g_count: torch.Tensor, g_p: torch.Tensor, g_y: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        (idx,) = ctx.saved_tensors  # type: ignore[attr-defined]
        need_p, need_y = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        gp = _gather_bins(g_p, idx) if need_p else None
        gy = _gather_bins(g_y, idx) if need_y else None  # never for a label map (integers need no gradient)
        return gp, gy, None, None, None, None


def _gather_bins(g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[b, c, i] = g[b, c, idx[b, c, i]]`` for ``g`` ``(B, C, M)`` and bins ``idx`` ``(B, C, S)``."""
    if idx.dtype == torch.int64 or g.requires_grad:  # the torch path (or a double backward): differentiable
        return g.gather(2, idx.long())
    b, c, s = idx.shape
    out = torch.empty((b, c, s), dtype=g.dtype, device="cpu")  # the numba path: CPU tensors only
    gc = g.detach().contiguous().reshape(b * c, -1)
    _kernels._gather_bins(gc.numpy(), idx.reshape(b * c, s).numpy(), out.reshape(b * c, s).numpy())
    return out


def hard_bin_sums(
    probs: torch.Tensor,
    target: torch.Tensor,
    num_bins: int = 20,
    closed: Closed = "right",
    class_ids: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differentiable hard-binned sums for losses: ``(count, sum_p, sum_y)``, each ``(B, C, M)``.

    ``probs`` is ``(B, C, *spatial)``; ``target`` (already validated) is either ``(B, C, *spatial)`` (one-hot /
    multi-hot / soft) or an integer label map ``(B, *spatial)`` / ``(B, 1, *spatial)`` (``C > 1``, exclusive
    classes), whose voxels labelled ``class_ids[c]`` (default ``c``) are the hits of channel ``c``: the label map
    is read directly, no one-hot is built (``class_ids = [1, ..., C]`` for probabilities without the background
    channel). The bin assignment is piecewise constant, so the gradient flows through ``sum_p`` (and a dense
    ``sum_y``) only (ACE-MICCAI §2): each value's bin is computed once (:func:`bin_index`'s convention) and reused
    by the backward pass. Sums keep the dtype of ``probs`` (promoted to float32 for half inputs) so autograd and
    AMP work unchanged; on CPU (float32 / float64) one numba pass accumulates them in float64, elsewhere
    ``scatter_add`` in that dtype (no host synchronisation).
    """
    check_num_bins(num_bins)
    if closed not in ("right", "left"):
        raise ValueError(f"closed must be 'right' or 'left', got {closed!r}")
    p, y, ids = _loss_inputs(probs, target, class_ids)
    return _HardBinSums.apply(p, y, int(num_bins), closed, _numba_rows(p), ids)  # type: ignore[no-any-return]


def _loss_inputs(
    probs: torch.Tensor, target: torch.Tensor, class_ids: Sequence[int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(p, y, ids)`` for the loss sums: the ``(B, C, S)`` probability rows, and either the integer label map
    ``(B, S)`` int64 with the class ids ``(C,)`` (``target`` a label map ``(B, *spatial)`` / ``(B, 1, *spatial)``
    of ``C > 1`` exclusive classes) or the dense target rows with ``ids = None`` (which takes no ``class_ids``)."""
    b, c = probs.shape[:2]
    spatial = tuple(probs.shape[2:])
    label_map = (
        c > 1 and not target.is_floating_point() and target.dtype != torch.bool
        and tuple(target.shape) in ((b, *spatial), (b, 1, *spatial))
    )
    if not label_map:
        if class_ids is not None:
            raise ValueError("class_ids applies to a label map target (B, *spatial), not to a dense target")
        return (*_loss_rows(probs, target), None)
    ids = class_index(class_ids, c, target.device)
    if ids.shape != (c,):
        raise ValueError(f"class_ids must name one class per channel ({c}), got {len(ids)}")
    return _prob_rows(probs), target.reshape(b, -1).to(torch.int64).contiguous(), ids


class _SoftBinSums(torch.autograd.Function):
    """The numba pass of :func:`soft_bin_sums` (CPU float32 / float64) with its hand-derived gradient (a
    second numba pass). Under ``create_graph=True`` the backward pass differentiates the torch formula instead,
    so higher derivatives are those of the formula."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        p: torch.Tensor,
        y: torch.Tensor,
        num_bins: int,
        class_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, c, s = p.shape
        out = np.zeros((b * c, 3, num_bins))
        _kernels._soft_sums(p.reshape(b * c, s).numpy(), *_kernel_targets(p, y, class_ids), out)
        ctx.save_for_backward(p, y, class_ids)
        ctx.num_bins = num_bins  # type: ignore[attr-defined]
        sums = torch.from_numpy(out).to(p.dtype).reshape(b, c, 3, num_bins)
        return tuple(sums[:, :, q].contiguous() for q in range(3))

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, g_w: torch.Tensor, g_wp: torch.Tensor, g_wy: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        p, y, class_ids = ctx.saved_tensors  # type: ignore[attr-defined]
        need_p = ctx.needs_input_grad[0]  # type: ignore[attr-defined]
        need_y = ctx.needs_input_grad[1] and class_ids is None  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is itself differentiable
            yd = y if class_ids is None else _label_rows(y, class_ids, p.dtype)
            wanted = [t for t, need in ((p, need_p), (y, need_y)) if need]
            sums = _soft_bin_sums_torch(p, yd, ctx.num_bins)  # type: ignore[attr-defined]
            grads = iter(torch.autograd.grad(sums, wanted, (g_w, g_wp, g_wy), create_graph=True, allow_unused=True))
            return (next(grads) if need_p else None), (next(grads) if need_y else None), None, None
        b, c, s = p.shape
        g = torch.stack([g_w, g_wp, g_wy], 2).to(torch.float64).reshape(b * c, 3, -1).contiguous()
        gp = torch.empty_like(p)
        gy = torch.empty_like(y) if need_y else torch.empty((0, 0), dtype=p.dtype)
        gy_np = gy.reshape(b * c, s).numpy() if need_y else gy.numpy()
        _kernels._soft_grads(p.reshape(b * c, s).numpy(), *_kernel_targets(p, y, class_ids), g.numpy(),
                             gp.reshape(b * c, s).numpy(), gy_np)
        return (gp if need_p else None), (gy if need_y else None), None, None


def _kernel_targets(
    p: torch.Tensor, y: torch.Tensor, class_ids: torch.Tensor | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y rows, label map, class ids)`` as the loss kernels (hard and soft sums) take them: dense ``(B C, S)``
    targets with empty label arrays, or an empty ``y`` with the ``(B, S)`` int64 label map and the ``(C,)`` ids."""
    b, c, s = p.shape
    if class_ids is None:
        return y.reshape(b * c, s).numpy(), np.zeros((1, 0), np.int64), np.zeros(0, np.int64)
    return np.zeros((1, 0), p.numpy().dtype), y.numpy(), class_ids.numpy()


def _label_rows(lab: torch.Tensor, class_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The one-hot rows ``(B, C, S)`` in ``dtype`` of a label map ``(B, S)``: channel ``c`` is class
    ``class_ids[c]`` (the torch formulas' dense target; the CPU kernels read the label map itself)."""
    return (lab.unsqueeze(1) == class_ids.to(lab.device).view(1, -1, 1)).to(dtype)


def soft_bin_sums(
    probs: torch.Tensor, target: torch.Tensor, num_bins: int = 20, class_ids: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differentiable soft-binned sums (ACE-journal): ``(weight, sum_wp, sum_wy)``, each ``(B, C, M)``.

    ``target`` (already validated): ``(B, C, *spatial)`` one-hot / soft, or an integer label map
    ``(B, *spatial)`` / ``(B, 1, *spatial)`` (``C > 1``) whose voxels labelled ``class_ids[c]`` (default ``c``)
    are the hits of channel ``c``, read on the CPU without a one-hot (as :func:`hard_bin_sums`).

    Each probability is shared linearly between its two nearest bin centres ``c_k = (k + 1/2) / M`` (triangular
    kernel of width ``1/M``); probabilities below ``c_0`` or above ``c_{M-1}`` go wholly to the edge bin. The
    weights depend on ``p``, so gradients flow through both the weights and the weighted sums. On CPU
    (float32 / float64) one numba pass computes the sums (float64 accumulation) and one more the gradient
    (derived by hand from the formula below); elsewhere the torch formula runs under autograd.
    """
    check_num_bins(num_bins)
    p, y, ids = _loss_inputs(probs, target, class_ids)
    if _numba_rows(p):
        return _SoftBinSums.apply(p, y, int(num_bins), ids)  # type: ignore[no-any-return]
    return _soft_bin_sums_torch(p, y if ids is None else _label_rows(y, ids, p.dtype), num_bins)


def _soft_bin_sums_torch(
    p: torch.Tensor, y: torch.Tensor, num_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch formula of :func:`soft_bin_sums` on ``(B, C, S)`` rows (any device, autograd)."""
    b, c = p.shape[:2]
    acc_dtype = p.dtype
    pos = (p * num_bins - 0.5).clamp(0.0, num_bins - 1.0)  # continuous bin coordinate
    lo = pos.detach().floor().clamp(max=max(num_bins - 2, 0)).to(torch.int64)
    w_hi = pos - lo.to(acc_dtype)
    w_lo = 1.0 - w_hi
    hi = (lo + 1).clamp(max=num_bins - 1)
    n = lo.shape[-1]
    rows = (torch.arange(b * c, device=p.device) * num_bins).repeat_interleave(n)
    index = torch.cat([lo.reshape(-1) + rows, hi.reshape(-1) + rows])[None]
    values = torch.stack([torch.cat([w_lo, w_hi]), torch.cat([w_lo * p, w_hi * p]), torch.cat([w_lo * y, w_hi * y])])
    sums = spread_bin_sum(index, values.reshape(3, -1), b * c * num_bins).reshape(3, b, c, num_bins)
    return sums[0], sums[1], sums[2]
