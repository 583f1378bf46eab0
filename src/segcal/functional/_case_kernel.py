"""One fused pass over a case's voxels for the common exclusive / hard-label case (numba).

Per block of voxels it validates the probabilities (in [0, 1], no NaN, summing to one: the core kernels'
channel-sum check, see :func:`segcal.functional._kernels._mark_sums_off`) and records the label range, and
accumulates the per-class confusion counts (argmax vs label), squared errors (Brier) and the log-likelihood of
the label (NLL), and bins the top-label confidence / correctness with the core's two-pass binning (the same
bins as :func:`segcal.functional.calibration.top_label_statistics`, bitwise). Class rows are walked by
vectorised loops; the only scalar loops are the two scatters (top-label bins, confusion cells) over
interleaved lane tables. The formulas are the core's (:mod:`segcal.functional.overlap`,
:mod:`segcal.functional.calibration`), whose values the tests compare with; this pass only replaces ~10
separate full-volume tensor passes by one. When the validation flags voxels, the caller's precise checks name
the problem (bad input only).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from segcal.functional._kernels import (
    _BLOCK,
    _CHUNK,
    _LANES,
    _QSCALE_INV,
    _bin_row,
    _block_argmax,
    _mark_sums_off,
    _unpack_lanes,
    voxel_kernel_ok,
)

__all__ = ["fused_case_pass"]


@njit(nogil=True, boundscheck=False, error_model="numpy")
def _row_label_loop(pc, lb, k, masked, wgt, py, sqk):  # pragma: no cover - compiled
    """Class ``k``'s row ``pc`` (n,) of a block: the likelihood of the label ``py[i] = p_k`` where
    ``lb[i] == k`` (clamped into [0, 1]), and the squared error ``(p_k - [lb == k])**2`` (float64, weighted
    by the mask ``wgt`` 0 / 1) added element-wise to ``sqk`` (n,). Vectorised."""
    zero = pc.dtype.type(0.0)
    one = pc.dtype.type(1.0)
    for i in range(pc.shape[0]):
        v = min(max(pc[i], zero), one)
        v = v if v == v else zero
        yk = lb[i] == k
        py[i] = v if yk else py[i]
        d = np.float64(v) - (1.0 if yk else 0.0)
        if masked:
            sqk[i] += wgt[i] * (d * d)
        else:
            sqk[i] += d * d

@njit(nogil=True, boundscheck=False)
def _row_label_terms(pc, lb, k, masked, wgt, py, sqk):  # pragma: no cover - compiled
    """:func:`_row_label_loop` with ``masked`` as a constant (no branch inside the loop)."""
    if masked:
        _row_label_loop(pc, lb, k, True, wgt, py, sqk)
    else:
        _row_label_loop(pc, lb, k, False, wgt, py, sqk)

@njit(nogil=True, boundscheck=False)
def _pair_index(lb, c, arg, wgt, idx):  # pragma: no cover - compiled
    """Confusion cell ``argmax * (C + 1) + label`` of each voxel of a block into ``idx`` (a label outside
    [0, C) as column C; voxels outside the mask: the discard cell ``C * (C + 1)``). Vectorised."""
    ci = np.int32(c)
    discard = np.int32(c * (c + 1))
    for i in range(lb.shape[0]):
        y = np.int32(lb[i])
        yi = y if (y >= 0) & (y < ci) else ci
        j = np.int32(arg[i] * (ci + 1) + yi)
        idx[i] = j if wgt[i] != 0.0 else discard

@njit(nogil=True, boundscheck=False)
def _scatter_pairs(idx, n, lanes):  # pragma: no cover - compiled
    """Counts the cells ``idx[:n]`` into ``_LANES`` interleaved tables ``lanes`` (L, C * (C + 1) + 1)."""
    nr = n // _LANES * _LANES
    for i0 in range(0, nr, _LANES):
        for r in range(_LANES):
            lanes[np.uint64(r), np.uint64(idx[i0 + r])] += 1
    for i in range(nr, n):
        lanes[0, np.uint64(idx[i])] += 1

@njit(nogil=True, boundscheck=False)
def _nll_hits(lb, c, arg, py, wgt, lo_eps, hi_eps, prod, hit):  # pragma: no cover - compiled
    """Multiplies the clamped likelihood of the label into ``prod`` (voxels inside the mask with a label in
    [0, C); others multiply by 1) and sets the top-label hit ``argmax == label``. Vectorised."""
    for i in range(lb.shape[0]):
        y = np.int64(lb[i])
        ok = (y >= 0) & (y < c) & (wgt[i] != 0.0)
        f = min(max(np.float64(py[i]), lo_eps), hi_eps)
        prod[i] *= f if ok else 1.0
        hit[i] = np.uint8(y == arg[i])

@njit(nogil=True)
def _block_buffers(p):  # pragma: no cover - compiled
    """Scratch rows of ``_BLOCK`` voxels: max, channel sums, a second sums row and label likelihoods in the
    probabilities' dtype; argmax and confusion cells (int32); top-label hits (uint8); mask weights (ones);
    validation marks (int32 zeros); NLL likelihood products (ones: element-wise products of <= ``blk`` clamped
    likelihoods, so no underflow)."""
    return (
        np.empty(_BLOCK, p.dtype),
        np.empty(_BLOCK, p.dtype),
        np.empty(_BLOCK, p.dtype),
        np.empty(_BLOCK, p.dtype),
        np.empty(_BLOCK, np.int32),
        np.empty(_BLOCK, np.int32),
        np.empty(_BLOCK, np.uint8),
        np.ones(_BLOCK),
        np.zeros(_BLOCK, np.int32),
        np.ones(_BLOCK),
    )


@njit(nogil=True, boundscheck=False)
def _label_range(lb, lo, hi):  # pragma: no cover - compiled
    """``(min(lo, min lb), max(hi, max lb))`` as int64 over a block's labels ``lb`` (n >= 1,)."""
    lo_b = lb[0]
    hi_b = lb[0]
    for i in range(lb.shape[0]):
        lo_b = min(lo_b, lb[i])
        hi_b = max(hi_b, lb[i])
    return min(lo, np.int64(lo_b)), max(hi, np.int64(hi_b))


@njit(nogil=True, boundscheck=False)
def _flush_nll(prod, nll):  # pragma: no cover - compiled
    """Subtracts the logs of the likelihood products ``prod`` from ``nll``, resets them to 1, returns ``nll``."""
    for i in range(prod.shape[0]):
        nll -= np.log(prod[i])
        prod[i] = 1.0
    return nll


@njit(nogil=True, boundscheck=False)
def _reduce_counts(lanes, sqa, counts, sq):  # pragma: no cover - compiled
    """The end of the pass: the interleaved confusion cells ``lanes`` (L, C * (C + 1) + 1) into tp / fp / fn
    ``counts`` (C, 3), the element-wise squared errors ``sqa`` (C, n) into ``sq`` (C,); returns the number of
    voxels inside the mask."""
    c = counts.shape[0]
    conf = np.zeros((c, c + 1), np.int64)
    for r in range(lanes.shape[0]):
        for k in range(c):
            for j in range(c + 1):
                conf[k, j] += lanes[r, k * (c + 1) + j]
    n_in = 0
    for k in range(c):
        sq[k] = sqa[k].sum()
        npred = conf[k].sum()
        nlab = conf[:, k].sum()
        counts[k, 0] = conf[k, k]
        counts[k, 1] = npred - conf[k, k]
        counts[k, 2] = nlab - conf[k, k]
        n_in += npred
    return n_in


@njit(nogil=True)
def _store_stats(stats, nll, n_in, n_bad, lab_lo, lab_hi):  # pragma: no cover - compiled
    """``stats`` (5,) = NLL sum, voxels in the mask, flagged voxels, label min, label max."""
    stats[0] = nll
    stats[1] = n_in
    stats[2] = n_bad
    stats[3] = lab_lo
    stats[4] = lab_hi


@njit(nogil=True, boundscheck=False, cache=True)
def _pass(p, lab, mask, use_mask, eps, blk, right, thr, exact, counts, sq, top, stats):  # pragma: no cover
    """p: (C, S) float32/float64; lab: (S,) int; mask: (S,) uint8. Blocks of ``_BLOCK`` voxels, each
    class row walked by vectorised loops (:func:`~segcal.functional._kernels._block_argmax`,
    :func:`_row_label_terms`), then one scalar loop per voxel for the confusion matrix; the top-label
    confidences go through the core's two passes (:func:`~segcal.functional._kernels._bin_row`) with lane
    tables flushed every ``_CHUNK`` voxels, so ``top`` equals
    :func:`segcal.functional.calibration.top_label_statistics` exactly.

    counts: (C, 3) float64 tp / fp / fn of the argmax against the label (a label outside [0, C) counts as a
    false positive of the argmax only), masked voxels excluded; sq: (C,) Σ (p_k − [y == k])² over the
    mask; top: (3, M); stats: nll_sum, n_in_mask, number of voxels flagged by the validation (a value
    outside [0, 1] or NaN, or a channel sum off 1 by more than ``thr``), label_min, label_max."""
    c, n = p.shape
    m = top.shape[1]
    width = 2 * m + 1
    h = np.zeros((_LANES, width), np.int64)
    hp = np.zeros((_LANES, width) if exact else (1, 1))
    part = np.zeros((3, m))
    pk32 = np.empty(2 * _BLOCK, np.int32)
    pk = pk32.view(np.int64)
    best, tot, scratch_tot, py, arg, idx, hit, wgt, bad, prod = _block_buffers(p)
    sqa = np.zeros((c, _BLOCK))
    lanes = np.zeros((_LANES, c * (c + 1) + 1), np.int64)  # confusion cells (argmax, label), interleaved
    nll = 0.0
    n_prod = 0
    lab_lo = np.int64(1) << 62
    lab_hi = -(np.int64(1) << 62)
    for s0 in range(0, n, _CHUNK):
        s1 = min(n, s0 + _CHUNK)
        h[:] = 0
        if exact:
            hp[:] = 0.0
        for a0 in range(s0, s1, _BLOCK):
            a1 = min(s1, a0 + _BLOCK)
            nb = a1 - a0
            lb = lab[a0:a1]
            mk = mask[a0:a1] if use_mask else mask[0:0]  # not read without a mask
            if use_mask:
                for i in range(nb):
                    wgt[i] = 1.0 if mk[i] != 0 else 0.0
            _block_argmax(p, a0, a1, best, arg, tot)
            py[:nb] = 1.0
            for k in range(c):
                _row_label_terms(p[k, a0:a1], lb, k, use_mask, wgt[:nb], py[:nb], sqa[k, :nb])
            _mark_sums_off(tot, nb, thr, bad)
            lab_lo, lab_hi = _label_range(lb, lab_lo, lab_hi)
            _pair_index(lb, c, arg[:nb], wgt[:nb], idx)
            _scatter_pairs(idx, nb, lanes)
            _nll_hits(lb, c, arg[:nb], py[:nb], wgt[:nb], eps, 1.0 - eps, prod[:nb], hit[:nb])
            n_prod += 1
            if n_prod == blk:
                nll = _flush_nll(prod, nll)
                n_prod = 0
            _bin_row(best[:nb], hit[:nb], np.uint8(1), mk, m, right, use_mask, pk32, pk, scratch_tot, exact, h, hp)
        _unpack_lanes(h, hp, exact, part)
        top += part
    nll = _flush_nll(prod, nll)
    if not exact:
        for k in range(m):
            top[1, k] *= _QSCALE_INV
    n_in = _reduce_counts(lanes, sqa, counts, sq)
    _store_stats(stats, nll, n_in, bad.sum(), lab_lo, lab_hi)

def fused_case_pass(
    probs: np.ndarray,
    label: np.ndarray,
    mask: np.ndarray | None,
    eps: float,
    num_bins: int,
    closed: str = "right",
    sum_tol: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]] | None:
    """One pass over ``probs`` ``(C, *S)`` (float32/float64) and ``label`` ``(*S)`` (any integer dtype), with
    the optional bool ``mask`` ``(*S)``.

    Returns ``(counts (C, 3) tp/fp/fn, sq (C,) Σ(p − y)², top (3, M) top-label count / Σ confidence /
    Σ correct, info)`` with ``info``: ``nll_sum, n_in_mask, n_flagged, label_min, label_max`` (where voxels are
    flagged, the caller's precise checks name the problem). ``sum_tol``: allowed deviation of a voxel's
    channel sum from 1 (kept below 7). Top-label: confidence = max_c p (first maximum), correct = argmax ==
    label, binned as :func:`segcal.functional.calibration.top_label_statistics` (bitwise the same bins).
    Returns None where the core kernels' preconditions fail (:func:`~segcal.functional._kernels.voxel_kernel_ok`):
    the caller then uses the separate core functions.
    """
    c = probs.shape[0]
    p = np.ascontiguousarray(probs.reshape(c, -1))
    if p.dtype not in (np.float32, np.float64) or not voxel_kernel_ok(num_bins, p.dtype):
        return None
    lab = np.ascontiguousarray(label.reshape(-1))
    if lab.dtype.kind not in "iu" or lab.dtype == np.uint64:
        lab = lab.astype(np.int64)
    if mask is not None and mask.dtype != np.bool_:
        raise TypeError(f"mask must be a bool array, got {mask.dtype}")  # (its bytes are read as 0 / 1)
    m = np.ascontiguousarray(mask.reshape(-1)).view(np.uint8) if mask is not None else np.zeros(1, np.uint8)
    counts = np.zeros((c, 3))
    sq = np.zeros(c)
    top = np.zeros((3, num_bins))
    stats = np.zeros(5)
    # likelihoods are clamped to >= eps, so a product of ``blk`` of them stays a normal float64
    blk = int(max(1, min(64, 300 // max(1.0, -np.log10(eps)))))
    thr = min(float(sum_tol), 6.0)
    exact = p.dtype == np.float64
    _pass(p, lab, m, mask is not None, eps, blk, closed == "right", thr, exact, counts, sq, top, stats)
    keys = ("nll_sum", "n_in_mask", "n_flagged", "label_min", "label_max")
    return counts, sq, top, dict(zip(keys, stats.tolist(), strict=True))
