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

    @njit(nogil=True, boundscheck=False, cache=True)
    def _pass(p, lab, mask, use_mask, eps, conf, correct, counts, sq, stats):  # pragma: no cover - jitted
        c, n = p.shape
        nll = 0.0
        n_in = 0.0
        n_bad = 0
        lo = np.inf
        hi = -np.inf
        max_dev = 0.0
        lab_lo = 1 << 30
        lab_hi = -(1 << 30)
        for i in range(n):
            s = np.float32(0.0)
            best = -1.0
            arg = 0
            for k in range(c):
                v = p[k, i]
                if not np.isfinite(v):
                    n_bad += 1
                    continue
                if v < lo:
                    lo = v
                if v > hi:
                    hi = v
                s += v
                vc = min(max(v, 0.0), 1.0)
                if vc > best:
                    best = vc
                    arg = k
            dev = abs(s - 1.0)
            if dev > max_dev:
                max_dev = dev
            y = lab[i]
            if y < lab_lo:
                lab_lo = y
            if y > lab_hi:
                lab_hi = y
            conf[i] = best
            correct[i] = 1 if arg == y else 0
            if use_mask and mask[i] == 0:
                continue
            n_in += 1.0
            for k in range(c):
                vc = min(max(np.float64(p[k, i]), 0.0), 1.0)
                t = 1.0 if k == y else 0.0
                sq[k] += (vc - t) * (vc - t)
                if k == y:
                    nll -= np.log(min(max(vc, eps), 1.0 - eps))
            if 0 <= y < c:
                if arg == y:
                    counts[y, 0] += 1.0
                else:
                    counts[arg, 1] += 1.0
                    counts[y, 2] += 1.0
            else:
                counts[arg, 1] += 1.0
        stats[0] = nll
        stats[1] = n_in
        stats[2] = n_bad
        stats[3] = lo
        stats[4] = hi
        stats[5] = max_dev
        stats[6] = lab_lo
        stats[7] = lab_hi


def fused_case_pass(
    probs: np.ndarray, label: np.ndarray, mask: np.ndarray | None, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """One pass over ``probs`` ``(C, *S)`` (float32/float64) and ``label`` ``(*S)``.

    Returns ``(conf (*S) float32, correct (*S) bool, counts (C, 3) tp/fp/fn, sq (C,) Σ(p − y)², info)``
    with ``info``: ``nll_sum, n_in_mask, n_nonfinite, p_min, p_max, max_sum_dev, label_min, label_max``.
    """
    c = probs.shape[0]
    p = np.ascontiguousarray(probs.reshape(c, -1))
    lab = np.ascontiguousarray(label.reshape(-1)).astype(np.int64, copy=False)
    n = lab.size
    m = np.ascontiguousarray(mask.reshape(-1)).view(np.uint8) if mask is not None else np.zeros(1, np.uint8)
    conf = np.empty(n, np.float32)
    correct = np.empty(n, np.uint8)
    counts = np.zeros((c, 3))
    sq = np.zeros(c)
    stats = np.zeros(8)
    _pass(p, lab, m, mask is not None, eps, conf, correct, counts, sq, stats)
    keys = ("nll_sum", "n_in_mask", "n_nonfinite", "p_min", "p_max", "max_sum_dev", "label_min", "label_max")
    shape = label.shape
    return (
        conf.reshape(shape),
        correct.reshape(shape),
        counts,
        sq,
        dict(zip(keys, stats.tolist(), strict=True)),
    )
