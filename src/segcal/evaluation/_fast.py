"""One fused pass over a case's voxels for the common exclusive / hard-label case (numba).

Per voxel it validates the probabilities (finite, in [0, 1], summing to one) and the label (in range), and
accumulates the per-class confusion counts (argmax vs label), squared errors (Brier) and the log-likelihood of
the label (NLL), and writes the top-label confidence / correctness used by the core's binning. The formulas
are the core's (:mod:`segcal.functional.overlap`, :mod:`segcal.functional.calibration`), whose values the
tests compare with; this pass only replaces ~10 separate full-volume tensor passes by one.
"""

from __future__ import annotations

import numpy as np

try:
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

__all__ = ["HAVE_NUMBA", "fused_case_pass"]

if HAVE_NUMBA:
    from segcal.functional._kernels import _bin_of

    @njit(nogil=True, boundscheck=False, cache=True)
    def _pass(p, lab, mask, use_mask, eps, blk, lo, hi, right, counts, sq, top, stats):  # pragma: no cover
        c, n = p.shape
        m = top.shape[1]
        hc = np.zeros(2 * m, np.int64)  # top-label bins: [2k + correct]
        hp = np.zeros(m)
        nll = 0.0
        prod = 1.0  # NLL: log of a product of ``blk`` clamped likelihoods (>= eps ** blk, no underflow)
        n_prod = 0
        n_in = 0
        n_bad = 0
        lo_v = np.inf
        hi_v = -np.inf
        max_dev = 0.0
        lab_lo = 1 << 30
        lab_hi = -(1 << 30)
        for i in range(n):
            y = np.int64(lab[i])
            lab_lo = min(lab_lo, y)
            lab_hi = max(lab_hi, y)
            inside = not use_mask or mask[i] != 0
            s = 0.0
            best = -1.0
            arg = 0
            py = 1.0
            for k in range(c):
                v = np.float64(p[k, i])
                n_bad += not np.isfinite(v)
                lo_v = min(lo_v, v)
                hi_v = max(hi_v, v)
                s += v
                vc = min(max(v, 0.0), 1.0)
                if vc > best:
                    best = vc
                    arg = k
                if k == y:
                    py = vc
                if inside:
                    d = vc - (1.0 if k == y else 0.0)
                    sq[k] += d * d
            max_dev = max(max_dev, abs(s - 1.0))
            if not inside:
                continue
            n_in += 1
            kb = _bin_of(best, lo, hi, m, right)
            hc[np.uint64(2) * kb + np.uint64(arg == y)] += 1
            hp[kb] += best
            if 0 <= y < c:
                prod *= min(max(py, eps), 1.0 - eps)
                n_prod += 1
                if n_prod == blk:
                    nll -= np.log(prod)
                    prod = 1.0
                    n_prod = 0
                if arg == y:
                    counts[y, 0] += 1.0
                else:
                    counts[arg, 1] += 1.0
                    counts[y, 2] += 1.0
            else:
                counts[arg, 1] += 1.0
        nll -= np.log(prod)
        for k in range(m):
            top[0, k] = hc[2 * k] + hc[2 * k + 1]
            top[1, k] = hp[k]
            top[2, k] = hc[2 * k + 1]
        stats[0] = nll
        stats[1] = n_in
        stats[2] = n_bad
        stats[3] = lo_v
        stats[4] = hi_v
        stats[5] = max_dev
        stats[6] = lab_lo
        stats[7] = lab_hi


def fused_case_pass(
    probs: np.ndarray,
    label: np.ndarray,
    mask: np.ndarray | None,
    eps: float,
    edges: np.ndarray,
    closed: str = "right",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """One pass over ``probs`` ``(C, *S)`` (float32/float64) and ``label`` ``(*S)`` (any integer dtype).

    ``edges``: the ``M + 1`` bin edges (:func:`segcal.functional.binning.bin_edges` in the input dtype).
    Returns ``(counts (C, 3) tp/fp/fn, sq (C,) Σ(p − y)², top (3, M) top-label count / Σ confidence /
    Σ correct, info)`` with ``info``: ``nll_sum, n_in_mask, n_nonfinite, p_min, p_max, max_sum_dev,
    label_min, label_max``. Top-label: confidence = max_c p (clamped, first maximum), correct = argmax == label,
    binned as :func:`segcal.functional.calibration.top_label_statistics` does.
    """
    from segcal.functional._kernels import edge_tables

    c = probs.shape[0]
    p = np.ascontiguousarray(probs.reshape(c, -1))
    lab = np.ascontiguousarray(label.reshape(-1))
    if lab.dtype.kind not in "iu" or lab.dtype == np.uint64:
        lab = lab.astype(np.int64)
    m = np.ascontiguousarray(mask.reshape(-1)).view(np.uint8) if mask is not None else np.zeros(1, np.uint8)
    lo, hi = edge_tables(edges)
    counts = np.zeros((c, 3))
    sq = np.zeros(c)
    top = np.zeros((3, len(edges) - 1))
    stats = np.zeros(8)
    # likelihoods are clamped to >= eps, so a product of ``blk`` of them stays a normal float64
    blk = int(max(1, min(64, 300 // max(1.0, -np.log10(eps)))))
    _pass(p, lab, m, mask is not None, eps, blk, lo, hi, closed == "right", counts, sq, top, stats)
    keys = ("nll_sum", "n_in_mask", "n_nonfinite", "p_min", "p_max", "max_sum_dev", "label_min", "label_max")
    return counts, sq, top, dict(zip(keys, stats.tolist(), strict=True))
