"""Fused CPU histogram kernels (numba) behind :func:`segcal.functional.binning.bin_statistics`.

One pass over the probabilities computes, per image, channel and bin, the voxel count, the sum of
probabilities and the sum of targets. Work is split into chunks of voxels processed in parallel; each chunk
keeps small local histograms (int32 counts, float64 sums) that are merged exactly at the end: counts are exact
integers, sums are float64 whatever the input dtype.

* :func:`_hist_voxels` (exclusive mode with a label map, the common case) walks the voxels once and handles
  all channels of a voxel together, so the label is read once per voxel. With ``validate`` it also computes,
  in the same pass, what :func:`segcal.functional.inputs.check_probabilities` checks (min, max, number of
  NaN/Inf, largest deviation of the channel sum from 1), so validated input costs a single read of the tensor.
* :func:`_hist_dense` handles one-hot / multi-hot / soft targets row by row (image x channel), with two
  interleaved histograms so runs of voxels in the same bin do not serialise on one memory location.

Bin of ``p`` (after clamping into [0, 1], SPEC §0): the ``k`` with ``edges[k] < p <= edges[k + 1]``
(``closed="right"``) or ``edges[k] <= p < edges[k + 1]`` (``closed="left"``), clamped to ``[0, M - 1]``;
``edges`` are the correctly rounded ``k / M`` in the input dtype. The guess ``int(p * M)`` is within one of
the answer and is corrected branch-free with two comparisons against padded edge tables ``lo``/``hi``.
"""

from __future__ import annotations

import numpy as np

try:  # numba is a hard dependency, but keep the pure-torch path importable if it breaks on a platform
    import numba
    from numba import njit, prange

    HAVE_NUMBA = True
except Exception:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

#: voxels per parallel task; local int32 counts cannot overflow (<= _CHUNK per bin)
_CHUNK = 1 << 16
#: voxels per block inside a chunk (bins are computed for a block, then scattered)
_BLOCK = 512


def edge_tables(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``lo[k] = edges[k]`` with ``lo[0] = -inf`` and ``hi[k] = edges[k + 1]`` with ``hi[M - 1] = +inf``."""
    lo = edges[:-1].copy()
    hi = edges[1:].copy()
    lo[0] = -np.inf
    hi[-1] = np.inf
    return lo, hi


if HAVE_NUMBA:

    @njit(inline="always", nogil=True, boundscheck=False)
    def _bin_of(v, lo, hi, m, right):  # pragma: no cover - compiled
        k = np.int64(v * m)
        k = min(max(k, 0), m - 1)
        if right:
            k = k - np.int64(v <= lo[k]) + np.int64(v > hi[k])
        else:
            k = k - np.int64(v < lo[k]) + np.int64(v >= hi[k])
        return min(max(k, 0), m - 1)  # keeps memory safe even for NaN when validation is off

    @njit(inline="always", nogil=True)
    def _clamp01(v):  # pragma: no cover - compiled
        return min(max(v, 0.0), 1.0)

    @njit(parallel=True, nogil=True, boundscheck=False, cache=True)
    def _hist_voxels(p, lab, first, mask, use_mask, lo, hi, right, validate, out, vstats):  # pragma: no cover
        """Exclusive mode, label map. p: (B, C, S) float; lab: (B, S) int; mask: (B, S) uint8.

        out: (B, C - first, 3, M) float64, accumulated. vstats: (B * n_chunks, 4) float64 receives per task
        (min, max, number of NaN/Inf, max |sum_c p - 1|) over all voxels and channels (mask ignored).

        Per block of ``_BLOCK`` voxels and channel: phase 1 computes the bins into a small buffer (a simple
        loop LLVM can vectorise), phase 2 scatters into two interleaved histograms (lane = voxel parity, so
        runs of voxels in one bin do not serialise); counts and label hits share one int32 table
        (index ``2k + hit``).
        """
        nb, nc, s = p.shape
        m = out.shape[3]
        kc = nc - first
        n_chunks = (s + _CHUNK - 1) // _CHUNK
        n_tasks = nb * n_chunks
        partial = np.zeros((n_tasks, kc, 3, m))
        mf = np.float64(m)
        for t in prange(n_tasks):
            b = t // n_chunks
            s0 = (t % n_chunks) * _CHUNK
            s1 = min(s, s0 + _CHUNK)
            hc = np.zeros((kc, 4 * m), np.int32)  # [lane][2k + hit]
            hp = np.zeros((kc, 2 * m))  # [lane][k]
            kbuf = np.empty(_BLOCK, np.int64)
            vbuf = np.empty(_BLOCK, np.float64)
            vmin = np.inf
            vmax = -np.inf
            nbad = 0
            dev = 0.0
            for i0 in range(s0, s1, _BLOCK):
                i1 = min(s1, i0 + _BLOCK)
                n = i1 - i0
                if validate:
                    for i in range(i0, i1):
                        tot = 0.0
                        for c in range(nc):
                            v = p[b, c, i]
                            tot += v
                            vmin = min(vmin, v)
                            vmax = max(vmax, v)
                            nbad += not np.isfinite(v)
                        dev = max(dev, abs(tot - 1.0))
                lb = lab[b, i0:i1]
                for c in range(first, nc):
                    pc = p[b, c, i0:i1]
                    for j in range(n):  # phase 1: bins
                        v = min(max(np.float64(pc[j]), 0.0), 1.0)
                        k = min(max(np.int64(v * mf), 0), m - 1)
                        if right:
                            k = k - np.int64(v <= lo[k]) + np.int64(v > hi[k])
                        else:
                            k = k - np.int64(v < lo[k]) + np.int64(v >= hi[k])
                        kbuf[j] = min(max(k, 0), m - 1)  # memory safe even for NaN without validation
                        vbuf[j] = v
                    h = hc[c - first]
                    hs = hp[c - first]
                    for j in range(n):  # phase 2: scatter
                        if use_mask and mask[b, i0 + j] == 0:
                            continue
                        k = kbuf[j]
                        ln = j & 1
                        h[ln * 2 * m + 2 * k + np.int64(lb[j] == c)] += 1
                        hs[ln * m + k] += vbuf[j]
            for c in range(kc):
                for k in range(m):
                    n1 = hc[c, 2 * k + 1] + hc[c, 2 * m + 2 * k + 1]
                    partial[t, c, 0, k] = hc[c, 2 * k] + hc[c, 2 * m + 2 * k] + n1
                    partial[t, c, 1, k] = hp[c, k] + hp[c, m + k]
                    partial[t, c, 2, k] = n1
            vstats[t, 0] = vmin
            vstats[t, 1] = vmax
            vstats[t, 2] = nbad
            vstats[t, 3] = dev
        for bc in prange(nb * kc):
            b = bc // kc
            c = bc % kc
            for j in range(n_chunks):
                for q in range(3):
                    for k in range(m):
                        out[b, c, q, k] += partial[b * n_chunks + j, c, q, k]

    @njit(parallel=True, nogil=True, boundscheck=False, cache=True)
    def _hist_top_label(p, lab, mask, use_mask, lo, hi, right, validate, out, vstats):  # pragma: no cover
        """Top-label bins, exclusive mode with a label map: confidence ``max_c p`` (first maximum, as
        ``torch.max``), hit = ``argmax == label``. p: (B, C, S); lab: (B, S); out: (B, 1, 3, M) accumulated;
        vstats as in :func:`_hist_voxels`."""
        nb, nc, s = p.shape
        m = out.shape[3]
        n_chunks = (s + _CHUNK - 1) // _CHUNK
        n_tasks = nb * n_chunks
        partial = np.zeros((n_tasks, 3, m))
        for t in prange(n_tasks):
            b = t // n_chunks
            s0 = (t % n_chunks) * _CHUNK
            s1 = min(s, s0 + _CHUNK)
            hc = np.zeros(4 * m, np.int32)
            hp = np.zeros(2 * m)
            vmin = np.inf
            vmax = -np.inf
            nbad = 0
            dev = 0.0
            for i in range(s0, s1):
                best = p[b, 0, i]
                arg = 0
                tot = 0.0
                for c in range(nc):
                    v = p[b, c, i]
                    if validate:
                        tot += v
                        vmin = min(vmin, v)
                        vmax = max(vmax, v)
                        nbad += not np.isfinite(v)
                    if v > best:
                        best = v
                        arg = c
                if validate:
                    dev = max(dev, abs(tot - 1.0))
                if use_mask and mask[b, i] == 0:
                    continue
                conf = min(max(np.float64(best), 0.0), 1.0)
                k = _bin_of(conf, lo, hi, m, right)
                ln = i & 1
                hc[ln * 2 * m + 2 * k + np.int64(lab[b, i] == arg)] += 1
                hp[ln * m + k] += conf
            for k in range(m):
                n1 = hc[2 * k + 1] + hc[2 * m + 2 * k + 1]
                partial[t, 0, k] = hc[2 * k] + hc[2 * m + 2 * k] + n1
                partial[t, 1, k] = hp[k] + hp[m + k]
                partial[t, 2, k] = n1
            vstats[t, 0] = vmin
            vstats[t, 1] = vmax
            vstats[t, 2] = nbad
            vstats[t, 3] = dev
        for b in prange(nb):
            for j in range(n_chunks):
                for q in range(3):
                    for k in range(m):
                        out[b, 0, q, k] += partial[b * n_chunks + j, q, k]

    @njit(parallel=True, nogil=True, boundscheck=False, cache=True)
    def _hist_labels(p, lab, class_ids, mask, use_mask, lo, hi, right, out):  # pragma: no cover - compiled
        """Row variant (used for half-precision inputs converted one row at a time).

        p: (R, S) float; lab: (B, S) int; rows r = b * C + c; out: (R, 3, M) float64 (accumulated).
        """
        n_rows, s = p.shape
        c_count = class_ids.shape[0]
        m = out.shape[2]
        n_chunks = (s + _CHUNK - 1) // _CHUNK
        partial = np.zeros((n_rows * n_chunks, 3, m))
        for t in prange(n_rows * n_chunks):
            r = t // n_chunks
            b = r // c_count
            cid = class_ids[r % c_count]
            s0 = (t % n_chunks) * _CHUNK
            s1 = min(s, s0 + _CHUNK)
            hc = np.zeros(m, np.int32)
            hy = np.zeros(m, np.int32)
            hp = np.zeros(m)
            for i in range(s0, s1):
                if use_mask and mask[b, i] == 0:
                    continue
                v = _clamp01(p[r, i])
                k = _bin_of(v, lo, hi, m, right)
                hc[k] += 1
                hy[k] += np.int32(lab[b, i] == cid)
                hp[k] += v
            for k in range(m):
                partial[t, 0, k] = hc[k]
                partial[t, 1, k] = hp[k]
                partial[t, 2, k] = hy[k]
        for r in prange(n_rows):
            for j in range(n_chunks):
                for q in range(3):
                    for k in range(m):
                        out[r, q, k] += partial[r * n_chunks + j, q, k]

    @njit(parallel=True, nogil=True, boundscheck=False, cache=True)
    def _hist_dense(p, y, first, mask, use_mask, lo, hi, right, out):  # pragma: no cover - compiled
        """p, y: (B, C, S) (any strides); channels first.. are binned; mask: (B, S) uint8;
        out: (B, C - first, 3, M) float64, accumulated."""
        nb, nc, s = p.shape
        m = out.shape[3]
        kc = nc - first
        n_chunks = (s + _CHUNK - 1) // _CHUNK
        n_tasks = nb * kc * n_chunks
        partial = np.zeros((n_tasks, 3, m))
        for t in prange(n_tasks):
            row = t // n_chunks
            b = row // kc
            c = first + row % kc
            s0 = (t % n_chunks) * _CHUNK
            s1 = min(s, s0 + _CHUNK)
            hn = np.zeros((2, m), np.int32)
            hp = np.zeros((2, m))
            hy = np.zeros((2, m))
            for i in range(s0, s1):
                if use_mask and mask[b, i] == 0:
                    continue
                v = _clamp01(p[b, c, i])
                k = _bin_of(v, lo, hi, m, right)
                ln = i & 1  # two interleaved histograms: runs of voxels in one bin do not serialise
                hn[ln, k] += 1
                hp[ln, k] += v
                hy[ln, k] += y[b, c, i]
            for k in range(m):
                partial[t, 0, k] = hn[0, k] + hn[1, k]
                partial[t, 1, k] = hp[0, k] + hp[1, k]
                partial[t, 2, k] = hy[0, k] + hy[1, k]
        for row in prange(nb * kc):
            b = row // kc
            c = row % kc
            for j in range(n_chunks):
                for q in range(3):
                    for k in range(m):
                        out[b, c, q, k] += partial[row * n_chunks + j, q, k]


def set_threads(n: int) -> None:
    """Set the number of threads the numba kernels use (defaults to numba's, i.e. all cores)."""
    if HAVE_NUMBA:
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
