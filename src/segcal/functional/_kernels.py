"""Fused CPU histogram kernels (numba) behind :func:`segcal.functional.binning.bin_statistics`.

One pass over the probabilities computes, per row (image x channel) and bin, the voxel count, the sum of
probabilities and the sum of targets. Each row is split into chunks processed in parallel; each chunk keeps
``_LANES`` interleaved sub-histograms so consecutive voxels falling in the same bin (the common case: most voxels
are near 0 or 1) do not serialise on one memory location. Counts are exact integers; sums are float64.

The bin of ``p`` is the ``k`` with ``edges[k] < p <= edges[k + 1]`` (``closed="right"``, SPEC §0) or
``edges[k] <= p < edges[k + 1]`` (``closed="left"``), clamped to ``[0, M - 1]``; ``edges`` are the correctly rounded
``k / M`` in the input dtype. An initial guess ``int(p * M)`` is corrected by at most one comparison each way.
"""

from __future__ import annotations

import numpy as np

try:  # numba is a hard dependency, but keep the pure-torch path importable if it breaks on a platform
    import numba
    from numba import njit, prange

    HAVE_NUMBA = True
except Exception:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

_LANES = 4
_CHUNK = 1 << 16

if HAVE_NUMBA:

    @njit(inline="always", nogil=True, boundscheck=False)
    def _bin_of(v, edges, m, right):  # pragma: no cover - compiled
        k = np.int64(v * m)
        if k > m - 1:
            k = m - 1
        if k < 0:
            k = 0
        if right:
            if k > 0 and v <= edges[k]:
                k -= 1
            elif k < m - 1 and v > edges[k + 1]:
                k += 1
        else:
            if k > 0 and v < edges[k]:
                k -= 1
            elif k < m - 1 and v >= edges[k + 1]:
                k += 1
        return k

    @njit(parallel=True, nogil=True, boundscheck=False, cache=True)
    def _hist_labels(p, lab, class_ids, mask, use_mask, edges, right, out):  # pragma: no cover - compiled
        """p: (R, S) float; lab: (B, S) int; rows r = b * C + c; out: (R, 3, M) float64 (accumulated)."""
        n_rows, s = p.shape
        c_count = class_ids.shape[0]
        m = out.shape[2]
        n_chunks = (s + _CHUNK - 1) // _CHUNK
        partial = np.zeros((n_rows * n_chunks, 3, m))
        for t in prange(n_rows * n_chunks):
            r = t // n_chunks
            j = t % n_chunks
            b = r // c_count
            cid = class_ids[r % c_count]
            s0 = j * _CHUNK
            s1 = min(s, s0 + _CHUNK)
            hc = np.zeros((_LANES, 2 * m), np.int64)
            hp = np.zeros((_LANES, m))
            for i in range(s0, s1):
                if use_mask and mask[b, i] == 0:
                    continue
                v = p[r, i]
                k = _bin_of(v, edges, m, right)
                ln = i & (_LANES - 1)
                hc[ln, 2 * k + (lab[b, i] == cid)] += 1
                hp[ln, k] += v
            for k in range(m):
                n0 = 0
                n1 = 0
                sp = 0.0
                for ln in range(_LANES):
                    n0 += hc[ln, 2 * k]
                    n1 += hc[ln, 2 * k + 1]
                    sp += hp[ln, k]
                partial[t, 0, k] = n0 + n1
                partial[t, 1, k] = sp
                partial[t, 2, k] = n1
        for r in prange(n_rows):
            for j in range(n_chunks):
                for q in range(3):
                    for k in range(m):
                        out[r, q, k] += partial[r * n_chunks + j, q, k]

    @njit(parallel=True, nogil=True, boundscheck=False, cache=True)
    def _hist_dense(p, y, mask, use_mask, c_count, edges, right, out):  # pragma: no cover - compiled
        """p, y: (R, S); rows r = b * C + c; mask: (B, S); out: (R, 3, M) float64 (accumulated)."""
        n_rows, s = p.shape
        m = out.shape[2]
        n_chunks = (s + _CHUNK - 1) // _CHUNK
        partial = np.zeros((n_rows * n_chunks, 3, m))
        for t in prange(n_rows * n_chunks):
            r = t // n_chunks
            j = t % n_chunks
            b = r // c_count
            s0 = j * _CHUNK
            s1 = min(s, s0 + _CHUNK)
            hn = np.zeros((_LANES, m), np.int64)
            hp = np.zeros((_LANES, m))
            hy = np.zeros((_LANES, m))
            for i in range(s0, s1):
                if use_mask and mask[b, i] == 0:
                    continue
                v = p[r, i]
                k = _bin_of(v, edges, m, right)
                ln = i & (_LANES - 1)
                hn[ln, k] += 1
                hp[ln, k] += v
                hy[ln, k] += y[r, i]
            for k in range(m):
                n = 0
                sp = 0.0
                sy = 0.0
                for ln in range(_LANES):
                    n += hn[ln, k]
                    sp += hp[ln, k]
                    sy += hy[ln, k]
                partial[t, 0, k] = n
                partial[t, 1, k] = sp
                partial[t, 2, k] = sy
        for r in prange(n_rows):
            for j in range(n_chunks):
                for q in range(3):
                    for k in range(m):
                        out[r, q, k] += partial[r * n_chunks + j, q, k]


def set_threads(n: int) -> None:
    """Set the number of threads the numba kernels use (defaults to numba's, i.e. all cores)."""
    if HAVE_NUMBA:
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
